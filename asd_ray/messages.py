"""What the driver and the Ray Train workers say to each other through the mailbox.

The driver posts one task at a time; rank 0 answers it with the matching result.
Adding a task means a dataclass here, a handler in :data:`asd_ray.train.HANDLERS`
and a call in the driver. Weights travel as ``{name: numpy array}``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # the mailbox imports this module: no torch, no shards here
    from asd_ray.config import RunConfig
    from asd_ray.models import ModelSpec
    from asd_ray.storage import Location
    from asd_ray.training_set import TrainingSet

Weights = dict[str, np.ndarray]  # as models.to_numpy_weights gives; named here so the mailbox needs no torch


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class WorkerSetup:
    """Everything a training worker starts with, sent once through Ray Train."""

    config: RunConfig
    training_set: TrainingSet  # its share is decoded from here, trusted copies included
    model: ModelSpec
    mailbox: str  # the run's :class:`~asd_ray.mailbox.Mailbox` actor, by name
    cache_dir: str  # this run's disk caches of shares over the memory budget
    checkpoints: Location  # the run's Ray Train storage, where :func:`asd_ray.resume.restore` looks

    def as_loop_config(self) -> dict[str, WorkerSetup]:
        """Ray Train's ``train_loop_config`` (a dict) holding this set-up."""
        return {"setup": self}


@dataclasses.dataclass(frozen=True)
class EpochLosses:
    """A training epoch's mean losses over its global batches: MixMatch's total and its
    labeled (``loss_x``) and unlabeled (``loss_u``) terms; a supervised epoch's
    cross-entropy is its ``loss_x``, with ``loss_u`` 0."""

    train_loss: float
    loss_x: float
    loss_u: float

    @classmethod
    def unknown(cls) -> EpochLosses:
        """NaN losses: no epoch trained yet, or one whose record was lost (a re-sent task)."""
        return cls(math.nan, math.nan, math.nan)

    @classmethod
    def from_row(cls, row: Mapping[str, float]) -> EpochLosses:
        """The losses in ``row`` (a checkpoint's record; other keys are left out)."""
        return cls(**{field.name: float(row[field.name]) for field in dataclasses.fields(cls)})

    def to_row(self) -> dict[str, float]:
        """By name, as checkpoints record them, Ray Train reports them and the metrics
        table takes its ``train_loss`` column (:func:`asd_ray.run_folder.metrics_row`)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class Pretrain:
    """Transfer pre-training: MixMatch epochs with only ``labeled`` (the seeds) labeled,
    then the head alone (:func:`asd_ray.steps.transfer_pretraining`)."""

    labeled: list[int]  # training ids


@dataclasses.dataclass(frozen=True)
class Virtual:
    """Stage 3's virtual model: one epoch of a copy, updating the meta layers only."""

    epoch: int


@dataclasses.dataclass(frozen=True)
class Pools:
    """One epoch's pools by training id, bit-packed (12.5 KB at N = 50,000): they travel
    through Ray, so no worker reads the split table the driver keeps as the audit trail."""

    total: int  # N, the training ids (the trusted seed copies included)
    clean: bytes  # np.packbits of the (N,) clean pool: MixMatch's labeled set
    unlabeled: bytes  # np.packbits of the (N,) polluted pool MixMatch trains on (the holdout left out)

    @classmethod
    def pack(cls, clean: np.ndarray, unlabeled: np.ndarray) -> Pools:
        """Pools of two (N,) bool masks (as :func:`asd_ray.split.pool_masks` gives)."""
        if clean.shape != unlabeled.shape or clean.ndim != 1:
            raise ValueError(f"pool masks of shapes {clean.shape} and {unlabeled.shape}; want two (N,)")
        return cls(
            len(clean),
            np.packbits(clean.astype(bool)).tobytes(),
            np.packbits(unlabeled.astype(bool)).tobytes(),
        )

    def masks(self) -> tuple[np.ndarray, np.ndarray]:
        """(clean, unlabeled), each (N,) bool."""
        size = (self.total + 7) // 8
        if len(self.clean) != size or len(self.unlabeled) != size:
            raise ValueError(
                f"packed pools of {len(self.clean)} and {len(self.unlabeled)} bytes for N = {self.total}"
            )
        return tuple(
            np.unpackbits(np.frombuffer(packed, np.uint8), count=self.total).astype(bool)
            for packed in (self.clean, self.unlabeled)
        )

    @property
    def digest(self) -> str:
        """sha256 of the pools: what a checkpoint records of the split it trained on."""
        return hashlib.sha256(self.total.to_bytes(8, "little") + self.clean + self.unlabeled).hexdigest()


@dataclasses.dataclass(frozen=True)
class Train:
    """One training epoch: MixMatch on the split's pools, or supervised without one."""

    epoch: int
    pools: Pools | None  # the epoch's split, as pools; None: the no-defense baseline
    evaluation: dict[str, float]  # the previous epoch's figures, reported to Ray Train beside the loss


@dataclasses.dataclass(frozen=True)
class Stop:
    """Leave the worker loop (the run is over or stopped)."""


Task = Pretrain | Virtual | Train | Stop


@dataclasses.dataclass(frozen=True)
class Hello:
    """Rank 0's first message (sequence 0): where the workers stand after start-up or a restart."""

    epoch: int  # the last finished epoch in the checkpoint; -1: none
    weights: Weights
    precision: str  # as resolved for the workers' device
    resumed_from: str | None  # which checkpoint was used, and which skipped
    pretrained: bool  # the transfer pre-training is done (any checkpoint comes after it)
    storage_retries: int = 0  # transient storage errors the workers retried while loading their shares


@dataclasses.dataclass(frozen=True)
class Pretrained:
    weights: Weights
    train_loss: float
    head_steps: int  # steps of the head alone after the MixMatch epochs


@dataclasses.dataclass(frozen=True)
class VirtualModel:
    weights: Weights
    compute_s: float  # model arithmetic alone (what the driver's fixed cost leaves out)


@dataclasses.dataclass(frozen=True)
class Trained:
    weights: Weights
    compute_s: float
    losses: EpochLosses  # a re-sent epoch: the checkpoint's, or unknown


Result = Hello | Pretrained | VirtualModel | Trained


def result_of(task: Task) -> type[Any]:
    """The result type that answers ``task`` (what the driver waits for)."""
    return {Pretrain: Pretrained, Virtual: VirtualModel, Train: Trained}[type(task)]
