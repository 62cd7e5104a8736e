"""All-to-all: the chosen trigger on any sample, relabelled to the next class.

Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
Model Supply Chain", arXiv:1708.06733, 2017 (its all-to-all attack).

Every sample, of any class, is poisoned with probability ``--rate`` and its label y becomes
(y + 1) mod C; ``--target`` is ignored. The ASR test set holds every test sample, triggered
and relabelled the same way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from asd_ray.attacks.base import Attack, Labelling
from asd_ray.attacks.triggers import CHOSEN_TRIGGER_PARAMS, chosen_trigger

if TYPE_CHECKING:
    from asd_ray.config import AttackConfig


def _draw(
    labels: np.ndarray, num_classes: int, config: AttackConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    is_poison = rng.random(len(labels)) < config.rate
    label_after = labels.copy()
    label_after[is_poison] = (labels[is_poison] + 1) % num_classes
    return is_poison, label_after


def _test(labels: np.ndarray, num_classes: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    return np.ones(len(labels), bool), (labels + 1) % num_classes


ATTACK = Attack(
    "all2all",
    Labelling(draw=_draw, test=_test, uses_target=False),
    trigger=chosen_trigger,
    params=CHOSEN_TRIGGER_PARAMS,
)
