"""What every attack declares: :class:`Attack`, the :class:`Param` it reads, the :class:`Stamp`
triggers ``--trigger`` chooses among, and the poison plans they share.

An attack module exposes one :class:`Attack`; :mod:`asd_ray.attacks` lists them. From
that registry ``AttackConfig`` takes its fields and checks, ``asd-ray poison`` its flags
and :mod:`asd_ray.attacks.poison` everything it does per attack, so none of them names
an attack.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from asd_ray.attacks.trigger import Trigger, apply_trigger
from asd_ray.config_ranges import SEED_RULE, Rule, finite, whole
from asd_ray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from asd_ray.config import AttackConfig

Shape = tuple[int, int, int]  # (H, W, C) of every image in a set
ImageTransform = Callable[[np.ndarray], np.ndarray]  # (n, H, W, C) uint8 -> same
Modify = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (sample ids, their images) -> modified images


@dataclass(frozen=True)
class Param:
    """One attack parameter: a field of ``AttackConfig`` and a flag of ``asd-ray poison``.

    Every field is recorded in every ground-truth row, whatever the attack, so each is
    range-checked whatever the attack too; the refusal names it by its flag.
    """

    name: str
    type: Any  # the field's type hint
    default: Any  # dataclasses.MISSING: the Python API requires it too
    help: str  # the flag's help (argparse expands %(default)g)
    rule: Rule | None = None  # the range, checked on construction
    choices: tuple[str, ...] = ()  # the names it may take (None aside), refused by name otherwise
    flag: bool = True  # False: the Python API only (e.g. PGD, which needs a surrogate model)
    required: bool = False  # the command line requires it even though the Python API defaults it
    metavar: tuple[str, ...] | None = None  # names of a tuple's entries on the command line
    local_file: bool = False  # a file this machine reads: the command line takes a local path only

    @property
    def flag_name(self) -> str:
        return "--" + self.name.replace("_", "-")


def _no_check(config: AttackConfig) -> None:
    """An attack or trigger without cross-parameter rules."""


@dataclass(frozen=True)
class Stamp:
    """A (pattern, weight) trigger that all2all and clean-label stamp as ``--trigger`` says.

    ``check`` runs on every ``AttackConfig``, as its parameters are recorded with every attack.
    """

    name: str
    params: tuple[Param, ...]
    build: Callable[[AttackConfig, Shape], Trigger]  # the trigger for images of a shape
    check: Callable[[AttackConfig], None] = _no_check

    def transform(self, config: AttackConfig, shape: Shape) -> ImageTransform:
        trigger = self.build(config, shape)
        return lambda images: apply_trigger(images, trigger)


@dataclass(frozen=True)
class PoisonPlan:
    """Which samples an attack modifies, and their labels afterwards (all shape (N,))."""

    is_poison: np.ndarray  # bool: carries the backdoor trigger
    # bool: a cover sample, modified but keeping its label and teaching no backdoor (WaNet's
    # noise mode, adaptive blend's regularization samples); the ground truth marks it modified,
    # not poisoned
    is_cover: np.ndarray
    label_after: np.ndarray  # int64

    @property
    def is_modified(self) -> np.ndarray:
        return self.is_poison | self.is_cover


@dataclass(frozen=True)
class Labelling:
    """Who an attack poisons and the label each poisoned sample ends with, in the training
    set (drawn) and in the ASR test set (every sample it would poison)."""

    # (labels, num_classes, config, rng) -> (is_poison, label_after)
    draw: Callable[[np.ndarray, int, AttackConfig, np.random.Generator], tuple[np.ndarray, np.ndarray]]
    # (labels, num_classes, target) -> (kept in the test set, label_after)
    test: Callable[[np.ndarray, int, int], tuple[np.ndarray, np.ndarray]]
    uses_target: bool = True  # False: --target is ignored, so need not be a class of the data


@dataclass(frozen=True)
class Surrogate:
    """The model clean-label's PGD perturbs against, and the (mean, std) it expects on
    [0, 1] inputs (None: raw [0, 1] inputs)."""

    model: torch.nn.Module
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None


# (labels, is_poison, config, rng) -> is_cover: extra samples modified with labels kept
CoverDraw = Callable[[np.ndarray, np.ndarray, "AttackConfig", np.random.Generator], np.ndarray]
# (config, shape, plan, surrogate) -> the modification of the plan's samples at training
TrainImages = Callable[["AttackConfig", Shape, PoisonPlan, "Surrogate | None"], Modify]


@dataclass(frozen=True)
class Attack:
    """One backdoor attack: its parameters and checks, whom it poisons, and how it changes
    their images."""

    name: str  # its --attack name, recorded in every ground-truth row
    labelling: Labelling
    # the trigger as a batch transform for images of a shape: the ASR test set gets it, and
    # so do the modified training images unless train_images says otherwise
    trigger: Callable[[AttackConfig, Shape], ImageTransform]
    params: tuple[Param, ...] = ()  # the parameters it reads beyond attack, rate, target and seed
    check: Callable[[AttackConfig], None] = _no_check  # its cross-parameter rules
    covers: CoverDraw | None = None  # drawn after the poisoned samples, from the same generator
    train_images: TrainImages | None = None
    uses_surrogate: bool = False  # poison_shards' surrogate changes its images (recorded as "pgd")

    def modify(
        self, config: AttackConfig, shape: Shape, plan: PoisonPlan, surrogate: Surrogate | None
    ) -> Modify:
        """The modification of the plan's samples at training: ``train_images``, or else the
        trigger on every one."""
        if self.train_images is not None:
            return self.train_images(config, shape, plan, surrogate)
        trigger = self.trigger(config, shape)
        return lambda ids, images: trigger(images)


# The parameters of every attack.
RATE = Param(
    "rate",
    float,
    0.05,
    "poison-label: per-sample probability over non-target samples (all samples "
    "for all2all); clean-label and sig: fraction of the target class",
    rule=finite(0, strict=True, high=1),
    required=True,
)
# y_t (all2all ignores it: y -> (y + 1) mod C)
TARGET = Param("target", int, 0, "target class y_t (default 0)", rule=whole(0, 2**31 - 1))
# draws the poisoned samples, noise patterns and WaNet grid
SEED = Param("seed", int, 0, "seed of the draw and of random patterns", rule=SEED_RULE)
# The picture of the BadNets and Blend triggers (adaptive blend's too), instead of their defaults.
PATTERN_FILE = Param(
    "pattern_file",
    str | None,
    None,
    "badnets/blend/adaptive-blend: image file with the trigger pattern",
    local_file=True,
)


def _poison_label(
    labels: np.ndarray, num_classes: int, config: AttackConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    is_poison = (labels != config.target) & (rng.random(len(labels)) < config.rate)
    label_after = labels.copy()
    label_after[is_poison] = config.target
    return is_poison, label_after


def _target_class(
    labels: np.ndarray, num_classes: int, config: AttackConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    candidates = np.flatnonzero(labels == config.target)
    chosen = rng.choice(candidates, size=round(config.rate * len(candidates)), replace=False)
    is_poison = np.zeros(len(labels), bool)
    is_poison[chosen] = True
    return is_poison, labels.copy()


def _others_to_target(labels: np.ndarray, num_classes: int, target: int) -> tuple[np.ndarray, np.ndarray]:
    return labels != target, np.full(len(labels), target, np.int64)


# Each non-target sample with probability rate, relabelled to the target.
POISON_LABEL = Labelling(draw=_poison_label, test=_others_to_target)
# Exactly round(rate * n) of the n target-class samples, labels kept (a clean-label attack).
TARGET_CLASS = Labelling(draw=_target_class, test=_others_to_target)


def check_covers_fit(config: AttackConfig, ratio: Param) -> None:
    """Refuse a rate whose poisoned samples plus ``ratio`` x as many cover samples would be
    more than every sample."""
    value = getattr(config, ratio.name)
    if config.rate * (1 + value) > 1:
        raise ConfigError(
            f"--rate {config.rate} with {ratio.flag_name} {value} would modify more than "
            "every sample; lower one of them"
        )
