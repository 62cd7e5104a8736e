"""Backdoor attacks behind one interface: one module per attack, each exposing an
:class:`~asd_ray.attacks.base.Attack`, and poison.py, which writes the poisoned shards and
their ground truth through them.

:data:`ATTACKS` lists the attacks; :data:`PARAMS` is every parameter they read, the fields
of ``AttackConfig`` and the flags of ``asd-ray poison``.
"""

import dataclasses

from asd_ray.attacks import adaptive_blend, all2all, badnets, blend, clean_label, sig, wanet
from asd_ray.attacks.base import RATE, SEED, TARGET, Attack, Param
from asd_ray.attacks.triggers import TRIGGER_CHOICE, TRIGGERS

ATTACKS: dict[str, Attack] = {
    attack.name: attack
    for attack in (
        badnets.ATTACK,
        blend.ATTACK,
        wanet.ATTACK,
        all2all.ATTACK,
        clean_label.ATTACK,
        sig.ATTACK,
        adaptive_blend.ATTACK,
    )
}

ATTACK_CHOICE = Param("attack", str, dataclasses.MISSING, "the attack", choices=tuple(ATTACKS))

# In the order AttackConfig.to_dict() records them in every ground-truth row (and dataset.json):
# the ones of every attack, the trigger choice and each trigger's, then each attack's own. A new
# parameter comes after the others, so existing records keep their shape.
PARAMS: tuple[Param, ...] = tuple(
    dict.fromkeys(
        (
            ATTACK_CHOICE,
            RATE,
            TARGET,
            SEED,
            TRIGGER_CHOICE,
            *(param for stamp in TRIGGERS.values() for param in stamp.params),
            *(param for attack in ATTACKS.values() for param in attack.params),
        )
    )
)
