"""The host side of every training step: which rows it takes, how they are augmented and mixed.

A step's randomness is drawn here, on the CPU, from streams keyed by (seed,
epoch, :class:`Phase`, :class:`Purpose`), the same on every worker: the global
batch (every worker draws it and serves the rows it holds), the augmentation of
each row, MixUp's lambda and partners; the step's scalars (learning rate, ramp-up
weight) follow from its position in the epoch. The draws of one step are packed
into one buffer (:class:`StepPlan`): one host->device copy per step, and a
captured CUDA graph reads its changing values from there (:class:`StepTensors`
names them). :mod:`asd_ray.steps` runs the device side.

Two ways of dividing the data meet here: a training worker holds every W-th
sample (``WorkerData``: ids ``rank, rank + W, ...``), so any global batch falls
evenly across workers; the scoring actors take contiguous slices instead
(:meth:`asd_ray.data.shards.ShardSet.worker_slices`), since a pass reads every sample once.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Iterator

import numpy as np
import torch

from asd_ray import compute
from asd_ray.config import RunConfig
from asd_ray.data import augment
from asd_ray.errors import DataError
from asd_ray.losses import mixup_draw, rampup_weight


@dataclasses.dataclass
class WorkerData:
    """This worker's share of the training set: samples ``rank, rank + world, ...``, in memory."""

    images: torch.Tensor  # (n, H, W, C) uint8, on the device (or a host memmap over budget)
    labels: torch.Tensor  # (n,) int64, on the compute device
    sample_ids: np.ndarray  # (n,) int64, ascending
    total: int = 0  # N, samples in the whole training set (0: this share is all of it)
    rank: int = 0
    world: int = 1

    @property
    def device(self) -> torch.device:
        """Where batches are computed (the images may stay in a host or disk cache)."""
        return self.labels.device

    def __post_init__(self) -> None:
        self.total = self.total or len(self.sample_ids)
        if not np.array_equal(self.sample_ids, np.arange(self.rank, self.total, self.world)):
            raise ValueError(
                f"worker {self.rank} of {self.world} must hold sample ids {self.rank}, +{self.world}, ..."
            )

    def serve(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Which rows of a global batch of sample ``ids`` this worker holds.

        Returns:
            (rows, local): positions in ``ids`` and the matching indices into this share.
        """
        rows = np.flatnonzero(ids % self.world == self.rank)
        return rows, ids[rows] // self.world


class Phase(enum.IntEnum):
    """Which part of a run a training stream belongs to: the third key of every stream."""

    RUN = 0  # the run's epochs: MixMatch, the baseline's, the virtual model's
    PRETRAIN = 1  # transfer pre-training (its MixMatch epochs count from 0 again, so they need their own key)


class Purpose(enum.IntEnum):
    """What a training stream draws: the fourth key of every stream (seed, epoch, phase, purpose).

    The values are part of every run's reproducibility: renumbering one changes the
    batches, augmentations and mixes of every run that uses it (gaps stay gaps).

    ===== ================== ================================================ ==========================
    value name               draws                                            drawn by
    ===== ================== ================================================ ==========================
    1     LABELED_BATCHES    the labeled pool's batch order                   :func:`mixmatch_plans`,
                                                                              ``plain_mixmatch_epoch``
    2     UNLABELED_BATCHES  the unlabeled pool's batch order                 the same
    3     AUGMENT            every view's augmentation and noise overlay      the same
    4     MIXUP              MixUp's lambda and partners (a numpy generator)  the same
    5     BASELINE           the no-defense epoch's cross-entropy steps       ``steps.supervised_epoch``
    7     VIRTUAL            stage 3's virtual-model steps                    ``steps.virtual_epoch``
    8     HEAD               transfer pre-training's head fit (epoch 0)       ``steps.head_epochs``
    ===== ================== ================================================ ==========================

    A cross-entropy purpose (5, 7, 8) keys two streams, told apart by a fifth key,
    :class:`CrossEntropyDraw`. MixMatch's phase is :attr:`Phase.RUN` or, in transfer
    pre-training, :attr:`Phase.PRETRAIN`; the head fit runs under ``PRETRAIN``, the
    others under ``RUN``.

    Scoring under training augmentation (``scoring.augment``) is a separate scheme:
    the driver seeds each scoring pass's dataset ``i`` with one integer,
    ``seed * 100_003 + epoch + i``, for a plain ``torch.Generator`` in the scoring
    actors; it never meets these streams (their keys go through a SeedSequence).
    """

    LABELED_BATCHES = 1
    UNLABELED_BATCHES = 2
    AUGMENT = 3
    MIXUP = 4
    BASELINE = 5
    VIRTUAL = 7
    HEAD = 8


class CrossEntropyDraw(enum.IntEnum):
    """The fifth key of a cross-entropy purpose's streams (:func:`cross_entropy_plans`)."""

    BATCHES = 1  # the global batch order over the whole training set
    AUGMENT = 2  # every row's crop and flip


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys: (seed, epoch, phase, purpose), and a
    :class:`CrossEntropyDraw` for a cross-entropy purpose (see :class:`Purpose`)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


class Cycler:
    """Endless batches of indices: a fresh permutation each time the pool is exhausted."""

    def __init__(self, indices: np.ndarray, gen: torch.Generator):
        self.indices, self.gen = torch.as_tensor(indices), gen
        self.order, self.pos = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        return self.indices[torch.randperm(len(self.indices), generator=self.gen)]

    def next(self, size: int) -> np.ndarray:
        """The next ``size`` indices (int64)."""
        out = []
        while size:
            if self.pos == len(self.order):
                self.order, self.pos = self._shuffle(), 0
            take = min(size, len(self.order) - self.pos)
            out.append(self.order[self.pos : self.pos + take])
            self.pos, size = self.pos + take, size - take
        return torch.cat(out).numpy()


def batch_scale(config: RunConfig, world: int) -> int:
    """How many times the configured batch one global step takes: W under ``scaled``, else 1."""
    return world if config.mixmatch.batch_rule == "scaled" else 1


def lr_factor(config: RunConfig, world: int, progress: float | None = None) -> float:
    """Learning-rate multiplier of the ``scaled`` rule at ``progress`` epochs (None: no warm-up).

    Adam's update is normalised by the gradient's scale, so a W times larger batch
    (W times less gradient noise) takes about sqrt(W) times the step size, not W
    (the square-root rule for adaptive optimisers, Malladi et al., NeurIPS 2022);
    a linear warm-up over ``warmup_epochs`` keeps the first large steps from
    overshooting while Adam's moment estimates settle.
    """
    mm, scale = config.mixmatch, batch_scale(config, world)
    factor = {"sqrt": scale**0.5, "linear": float(scale), "none": 1.0}[mm.scaled_lr] if scale > 1 else 1.0
    if progress is None or scale == 1 or mm.warmup_epochs <= 0:
        return factor
    return 1.0 + (factor - 1.0) * min(progress / mm.warmup_epochs, 1.0)


def use_sync_batch_norm(config: RunConfig, world: int) -> bool:
    """Batch norm over the global batch: the switch, or by default W > 1 under ``global``."""
    if config.cluster.sync_batch_norm is not None:
        return config.cluster.sync_batch_norm and world > 1
    return world > 1 and config.mixmatch.batch_rule == "global"


@dataclasses.dataclass(frozen=True)
class Crop:
    """A crop or flip as every output pixel's source coordinates (one gather cuts it)."""

    rows: torch.Tensor  # (b, H) int64
    cols: torch.Tensor  # (b, W) int64


@dataclasses.dataclass(frozen=True)
class Overlay:
    """Each row's noise overlay (:func:`asd_ray.data.augment.noise_overlay`)."""

    key: torch.Tensor  # (b,) int64, the row's noise
    weight: torch.Tensor  # (b,) float32, uniform in [0, mixmatch.noise_overlay)


@dataclasses.dataclass(frozen=True)
class MixMatchValues:
    """What a MixMatch step adds to its rows: MixUp's draw and the step's scalars."""

    partner: torch.Tensor  # (b,) int64, each row's MixUp partner: a row of the gathered global batch
    lam: torch.Tensor  # () float32, MixUp's lambda
    weight: torch.Tensor  # () float32, the unlabeled loss's weight (lambda_u ramped up)
    lr: torch.Tensor  # () float32, the learning rate


@dataclasses.dataclass(frozen=True)
class StepTensors:
    """The values of a :class:`StepPlan`'s buffer, by meaning: views of the buffer, on its
    device. A feature the step does not use is None (the step's code follows from which are set)."""

    index: torch.Tensor  # (b,) int64 share indices of this worker's rows of every view, in order
    crop: Crop | None  # crop or flip (data.augment crop, or data.flip)
    theta: torch.Tensor | None  # (b, 2, 3) float32 affine maps of a resized crop
    overlay: Overlay | None  # mixmatch.noise_overlay > 0
    mixmatch: MixMatchValues | None  # a MixMatch step (None: a cross-entropy one)

    @classmethod
    def unpack(cls, buffer: torch.Tensor, layout: compute.PackLayout) -> StepTensors:
        """The values of ``buffer``, packed by :func:`mixmatch_plans` or :func:`cross_entropy_plans`
        under the names :func:`asd_ray.data.augment.draw` and :func:`_add_views` give them."""
        values = compute.unpack(buffer, layout)
        crop = overlay = mixmatch = None
        if "rows" in values:
            crop = Crop(values["rows"], values["cols"])
        if "overlay_key" in values:
            overlay = Overlay(values["overlay_key"], values["overlay_weight"])
        if "partner" in values:
            mixmatch = MixMatchValues(values["partner"], values["lam"], values["weight"], values["lr"])
        return cls(values["index"], crop, values.get("theta"), overlay, mixmatch)


@dataclasses.dataclass(frozen=True)
class StepPlan:
    """The host side of one step, packed for one host->device copy (:class:`compute.Pack`);
    :class:`StepTensors` says what the buffer holds."""

    buffer: torch.Tensor  # (L,) int64, host
    layout: compute.PackLayout
    lr: float | None  # the step's learning rate (MixMatch); None: the caller sets it per epoch
    labeled: int  # this worker's labeled rows: the first ``labeled`` of ``index`` (all rows of a CE step)
    counts: tuple[int, ...]  # every worker's rows of the step, in rank order (MixMatch's partner gather)
    labeled_ids: np.ndarray  # (Bl,) sample ids of the whole global labeled batch (a CE step's batch)
    unlabeled_ids: np.ndarray  # (Bu,) of the global unlabeled batch (empty for a CE step)

    def tensors(self, buffer: torch.Tensor | None = None) -> StepTensors:
        """The plan's values in ``buffer``, its copy on the device (default: the host buffer,
        for the host-side gather, and tests)."""
        return StepTensors.unpack(self.buffer if buffer is None else buffer, self.layout)


def _add_views(
    pack: compute.Pack,
    data: WorkerData,
    config: RunConfig,
    gen: torch.Generator,
    views: list[tuple[np.ndarray, np.ndarray, int]],
    overlay: float = 0.0,
) -> None:
    """Pack the rows of augmented views: for each ``(rows, local, total)`` (this worker's
    positions in a global batch of ``total``, and their share indices), in order, the
    share indices and the augmentation draws of those rows; with ``overlay`` > 0 also
    each row's noise key and weight, uniform in [0, overlay) (:func:`augment.noise_overlay`)."""
    _, height, width, _ = data.images.shape
    draws = []
    for rows, _, total in views:
        row_draws = augment.draw(config.data, gen, height, width, total, rows)
        if overlay > 0:
            keys = torch.randint(0, 2**31, (total,), generator=gen).numpy()
            weights = (torch.rand(total, generator=gen, dtype=torch.float64) * overlay).numpy()
            row_draws |= {"overlay_key": keys[rows], "overlay_weight": weights[rows]}
        draws.append(row_draws)
    pack.add("index", np.concatenate([local for _, local, _ in views]))
    for key in draws[0]:
        pack.add(key, np.concatenate([d[key] for d in draws]))


def mixmatch_plans(
    data: WorkerData,
    clean: np.ndarray,
    config: RunConfig,
    *,
    epoch: int,
    iterations: int,
    phase: Phase = Phase.RUN,
    unlabeled: np.ndarray | None = None,
) -> Iterator[StepPlan]:
    """Endless MixMatch steps: every worker draws the same global batch (seeded by seed,
    epoch and phase alone) and plans the rows it holds: labeled, then both unlabeled views.

    So every sample of a pool is equally likely to be drawn whatever the worker count
    and however the pools fall across shares, and the augmentation of a row does not
    depend on which worker holds it. MixUp's partners are drawn over the whole global
    batch [labeled, unlabeled view 1, unlabeled view 2].

    Args:
        clean: (N,) bool pool mask over the whole training set (True: labeled).
        iterations: steps per epoch (the ramp-up and learning-rate schedules' unit).
        phase: keys the random streams apart: the run's epochs, or transfer pre-training's.
        unlabeled: (N,) bool, the samples drawn as unlabeled (default: every one not in ``clean``).
    """
    labeled = np.flatnonzero(clean)
    unlabeled = np.flatnonzero(~clean if unlabeled is None else unlabeled & ~clean)
    if len(labeled) == 0 or len(unlabeled) == 0:
        raise DataError(
            f"epoch {epoch}: the split has {len(labeled)} clean and {len(unlabeled)} polluted samples; "
            "MixMatch needs both"
        )
    mm, scale = config.mixmatch, batch_scale(config, data.world)
    bl, bu = mm.batch_labeled * scale, mm.batch_unlabeled * scale
    labeled_batches = Cycler(labeled, generator(config.seed, epoch, phase, Purpose.LABELED_BATCHES))
    unlabeled_batches = Cycler(unlabeled, generator(config.seed, epoch, phase, Purpose.UNLABELED_BATCHES))
    aug_gen = generator(config.seed, epoch, phase, Purpose.AUGMENT)
    mix_rng = np.random.default_rng([config.seed, epoch, phase, Purpose.MIXUP])
    ramp = mm.rampup_epochs or config.epochs
    step = 0
    while True:
        lids, uids = labeled_batches.next(bl), unlabeled_batches.next(bu)
        (lrows, li), (urows, ui) = data.serve(lids), data.serve(uids)
        pack = compute.Pack()
        views = [(lrows, li, bl), (urows, ui, bu), (urows, ui, bu)]
        _add_views(pack, data, config, aug_gen, views, mm.noise_overlay)
        lam, partner = mixup_draw(mix_rng, bl + 2 * bu, mm.mixup_alpha)
        positions = _positions_by_worker(lids, uids, data.world)
        order = np.concatenate(positions)  # global position of each row of the gathered batch
        where = np.empty_like(order)
        where[order] = np.arange(len(order))  # global position -> gathered row
        progress = epoch + step / iterations
        lr = mm.lr * lr_factor(config, data.world, progress)
        pack.add("partner", where[partner[positions[data.rank]]])
        pack.add("lam", lam).add("weight", rampup_weight(progress, max_weight=mm.lambda_u, length=ramp))
        buffer, layout = pack.add("lr", lr).build()
        yield StepPlan(buffer, layout, lr, len(li), tuple(map(len, positions)), lids, uids)
        step += 1


def _positions_by_worker(lids: np.ndarray, uids: np.ndarray, world: int) -> list[np.ndarray]:
    """Every worker's rows of a MixMatch step, in its own order (labeled, unlabeled view 1,
    view 2), as positions in the global batch [labeled, view 1, view 2]."""
    bl, bu = len(lids), len(uids)
    positions = []
    for rank in range(world):
        unlabeled = bl + np.flatnonzero(uids % world == rank)
        positions.append(np.concatenate([np.flatnonzero(lids % world == rank), unlabeled, unlabeled + bu]))
    return positions


def cross_entropy_plans(
    data: WorkerData, config: RunConfig, *, batch: int, epoch: int, phase: Phase, purpose: Purpose
) -> Iterator[StepPlan]:
    """Endless plain, augmented steps on global batches of ``batch`` over the whole training
    set; (seed, ``epoch``, ``phase``, ``purpose``) keys the batch order and the augmentation
    (the same on every worker)."""
    keys = (config.seed, epoch, phase, purpose)
    batches = Cycler(np.arange(data.total), generator(*keys, CrossEntropyDraw.BATCHES))
    aug_gen = generator(*keys, CrossEntropyDraw.AUGMENT)
    while True:
        ids = batches.next(batch)
        rows, local = data.serve(ids)
        pack = compute.Pack()
        _add_views(pack, data, config, aug_gen, [(rows, local, batch)])
        buffer, layout = pack.build()
        yield StepPlan(buffer, layout, None, len(local), (), ids, np.zeros(0, np.int64))
