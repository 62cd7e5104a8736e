"""Typed configuration for every stage, validated on construction. No I/O here.

Defaults follow ``ASD_REFERENCE.md``; each field's comment says what it is.
"""

from __future__ import annotations

import dataclasses
from typing import Any

ATTACKS = ("badnets", "blend", "wanet", "all2all", "clean-label")
TRIGGERS = ("badnets", "blend", "checkerboard")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One backdoor attack: who is poisoned, how, and with which trigger.

    ``rate`` is a per-sample probability over the non-target classes for
    poison-label attacks (badnets, blend, wanet; all classes for all2all) and the
    fraction of the target class for clean-label.
    """

    attack: str
    rate: float = 0.05
    target: int = 0  # target label y_t (ignored by all2all: y -> (y + 1) mod C)
    seed: int = 0  # draws the poisoned samples, noise patterns and WaNet grid
    trigger: str | None = None  # all2all / clean-label: badnets | blend | checkerboard
    pattern_file: str | None = None  # image file for the BadNets / Blend pattern
    location: tuple[int, int] | None = None  # (row, col) of the BadNets patch's corner
    size: int | None = None  # BadNets patch side in pixels (pattern resized, nearest)
    alpha: float = 0.1  # Blend weight of the pattern
    wanet_k: int = 4  # WaNet control-grid size
    wanet_s: float = 0.5  # WaNet warping strength
    wanet_noise: bool = True  # WaNet noise mode: extra samples warped with random noise, labels kept
    cross_ratio: float = 2.0  # WaNet noise samples per poisoned sample
    pgd_eps: float = 16 / 255  # clean-label PGD budget (L-inf, on [0, 1] images)
    pgd_step: float = 1.5 / 255
    pgd_steps: int = 30

    def __post_init__(self) -> None:
        if self.attack not in ATTACKS:
            raise ValueError(f"--attack {self.attack!r} is unknown; choose one of {', '.join(ATTACKS)}")
        if not 0.0 < self.rate <= 1.0:
            raise ValueError(f"--rate {self.rate} must be in (0, 1]")
        if self.target < 0:
            raise ValueError(f"--target {self.target} must be a class index >= 0")
        if self.trigger is not None and self.trigger not in TRIGGERS:
            raise ValueError(f"--trigger {self.trigger!r} is unknown; choose one of {', '.join(TRIGGERS)}")
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"--alpha {self.alpha} must be in (0, 1]")
        if self.attack == "wanet" and self.wanet_noise and self.rate * (1 + self.cross_ratio) > 1:
            raise ValueError(
                f"--rate {self.rate} with --cross-ratio {self.cross_ratio} would modify more than "
                "every sample; lower one of them"
            )
        if self.size is not None and self.size < 1:
            raise ValueError(f"--size {self.size} must be >= 1")

    @property
    def trigger_kind(self) -> str:
        """The image trigger this attack applies."""
        if self.attack in ("badnets", "blend"):
            return self.attack
        if self.attack == "wanet":
            return "wanet"
        return self.trigger or "badnets"

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able parameters (recorded in every ground-truth row)."""
        return dataclasses.asdict(self)
