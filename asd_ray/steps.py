"""The step loops of one worker: MixMatch, supervised and virtual-model epochs.

Pure torch (plus ``torch.distributed`` when W > 1): :mod:`asd_ray.train` runs
them inside Ray Train, and the benchmarks call them directly. They run on the
fast path of :mod:`asd_ray.compute` (bf16 autocast and channels_last where the
hardware supports them; losses summed on the device so the step loop never
waits for the host).

Batch rules. ``global`` (default) is the single-process step of the paper on
any W: every worker draws the same global batch and serves the rows it holds,
losses are each worker's share of the global means (times W, for DDP's
average), batch norm spans the global batch and MixUp partners come from all
of it (see :func:`mixmatch_epoch`). ``scaled`` takes W times the batch, W
times fewer iterations and a larger learning rate (:func:`lr_factor`) in the
MixMatch and baseline epochs; the stage-3 virtual model keeps the paper's
global batch, step count and learning rate under both rules
(:func:`virtual_epoch`). Every worker runs every step, so DDP never waits on a
rank that ran out of data.

Randomness is derived from (seed, epoch, purpose), the same on every worker,
so a resumed run draws the same batches as an uninterrupted one and W does
not change them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from asd_ray import compute, distributed
from asd_ray.config import RunConfig
from asd_ray.data.augment import augment
from asd_ray.errors import DataError
from asd_ray.losses import mixmatch_loss, mixup, mixup_draw, rampup_weight, sharpen


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

    def pixels(self, local: torch.Tensor) -> torch.Tensor:
        """(m, H, W, C) uint8 images at share indices ``local`` (CPU), on the compute device."""
        if self.images.device == self.device:
            return self.images[compute.to_device(local, self.device)]
        return compute.to_device(self.images[local], self.device)  # gathered on the host, one copy

    def serve(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Which rows of a global batch of sample ``ids`` this worker holds.

        Returns:
            (rows, local): positions in ``ids`` and the matching indices into this
            share, both (m,) int64 on the CPU.
        """
        rows = torch.nonzero(ids % self.world == self.rank).flatten()
        return rows, ids[rows] // self.world


def generator(*keys: int) -> torch.Generator:
    """A CPU generator seeded from integer keys (seed, epoch, rank, purpose)."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(keys)).generate_state(1)[0]))


class Cycler:
    """Endless batches of indices: a fresh permutation each time the pool is exhausted."""

    def __init__(self, indices: np.ndarray, gen: torch.Generator):
        self.indices, self.gen = torch.as_tensor(indices), gen
        self.order, self.pos = self._shuffle(), 0

    def _shuffle(self) -> torch.Tensor:
        return self.indices[torch.randperm(len(self.indices), generator=self.gen)]

    def next(self, size: int) -> torch.Tensor:
        """The next ``size`` indices (int64, on the CPU)."""
        out = []
        while size:
            if self.pos == len(self.order):
                self.order, self.pos = self._shuffle(), 0
            take = min(size, len(self.order) - self.pos)
            out.append(self.order[self.pos : self.pos + take])
            self.pos, size = self.pos + take, size - take
        return torch.cat(out)


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
class StepBatch:
    """This worker's rows of one global MixMatch batch, augmented, plus where they sit in it."""

    x: torch.Tensor  # (bl, C, H, W) labeled views
    y: torch.Tensor  # (bl,) int64 labels
    u1: torch.Tensor  # (bu, C, H, W) first view of the unlabeled rows
    u2: torch.Tensor  # (bu, C, H, W) second view
    labeled_ids: torch.Tensor  # (Bl,) sample ids of the whole global labeled batch (CPU)
    unlabeled_ids: torch.Tensor  # (Bu,) sample ids of the whole global unlabeled batch (CPU)


def mixmatch_batches(
    data: WorkerData, clean: np.ndarray, config: RunConfig, *, epoch: int, phase: int = 0
) -> Iterator[StepBatch]:
    """Endless MixMatch batches: every worker draws the same global batch (seeded by
    seed, epoch and phase alone) and augments the rows it holds.

    So every sample of a pool is equally likely to be drawn whatever the worker
    count and however the pools fall across shares, and the augmentation of a
    row does not depend on which worker holds it.

    Args:
        clean: (N,) bool pool mask over the whole training set (True: labeled).
        phase: keys the random streams apart: 0 for the run's epochs, 1 for transfer pre-training.
    """
    labeled, unlabeled = np.flatnonzero(clean), np.flatnonzero(~clean)
    if len(labeled) == 0 or len(unlabeled) == 0:
        raise DataError(
            f"epoch {epoch}: the split has {len(labeled)} clean and {len(unlabeled)} polluted samples; "
            "MixMatch needs both"
        )
    mm, scale = config.mixmatch, batch_scale(config, data.world)
    bl, bu = mm.batch_labeled * scale, mm.batch_unlabeled * scale
    labeled_batches = Cycler(labeled, generator(config.seed, epoch, phase, 1))
    unlabeled_batches = Cycler(unlabeled, generator(config.seed, epoch, phase, 2))
    aug_gen = generator(config.seed, epoch, phase, 3)
    while True:
        lids, uids = labeled_batches.next(bl), unlabeled_batches.next(bu)
        lrows, li = data.serve(lids)
        urows, ui = data.serve(uids)
        unlabeled = data.pixels(ui)
        yield StepBatch(
            x=_augment(data.pixels(li), config, aug_gen, lrows, bl),
            y=data.labels[compute.to_device(li, data.device)],
            u1=_augment(unlabeled, config, aug_gen, urows, bu),
            u2=_augment(unlabeled, config, aug_gen, urows, bu),
            labeled_ids=lids,
            unlabeled_ids=uids,
        )


def _global_mixup(
    inputs: torch.Tensor, targets: torch.Tensor, batch: StepBatch, data: WorkerData, rng, alpha: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp of this worker's rows with partners drawn over the whole global batch.

    The global batch is [labeled, unlabeled view 1, unlabeled view 2]; lambda and
    the permutation come from ``rng`` (the same on every worker), and the partner
    rows are gathered from the workers that hold them (no gradient flows through
    a partner: inputs are data and guesses are computed without gradient).
    """
    bl, bu = len(batch.labeled_ids), len(batch.unlabeled_ids)
    if data.world == 1:
        return mixup(inputs, targets, rng=rng, alpha=alpha)[:2]
    lam, partner = mixup_draw(rng, bl + 2 * bu, alpha)
    lrank, urank = batch.labeled_ids % data.world, batch.unlabeled_ids % data.world
    positions = [  # every worker's rows, in its own order, as positions in the global batch
        torch.cat([torch.nonzero(lrank == r).flatten(), bl + torch.nonzero(urank == r).flatten()])
        for r in range(data.world)
    ]
    positions = [torch.cat([p, p[p >= bl] + bu]) for p in positions]  # + the second unlabeled view
    counts = [len(p) for p in positions]
    order = torch.cat(positions)  # global position of each gathered row
    where = torch.empty_like(order)
    where[order] = torch.arange(len(order))  # global position -> gathered row
    rows = where[torch.from_numpy(partner)[positions[data.rank]]]
    rows = compute.to_device(rows, inputs.device)
    with torch.no_grad():
        all_inputs = torch.cat(distributed.gather_rows(inputs.detach(), counts))
        all_targets = torch.cat(distributed.gather_rows(targets.detach(), counts))
    return lam * inputs + (1 - lam) * all_inputs[rows], lam * targets + (1 - lam) * all_targets[rows]


def mixmatch_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    clean: np.ndarray,
    config: RunConfig,
    *,
    epoch: int,
    phase: int = 0,
) -> dict[str, float]:
    """One MixMatch epoch; every worker takes part in every step of the same global batch.

    Each worker's loss is its rows' share of the global batch's loss (sums divided
    by the global row counts), times W: DDP averages gradients over the workers,
    so the update is the single-process one. With batch norm over the global
    batch (``cluster.sync_batch_norm``) the forward passes are too.

    Args:
        clean: (N,) bool pool mask over the whole training set.
        phase: 0 for the run's epochs, 1 for transfer pre-training (see :func:`mixmatch_batches`).

    Returns:
        the epoch's mean loss, labeled and unlabeled terms, over the global batches.
    """
    batches = mixmatch_batches(data, clean, config, epoch=epoch, phase=phase)
    mix_rng = np.random.default_rng([config.seed, epoch, phase, 4])
    mm = config.mixmatch
    iterations = math.ceil(mm.iterations / batch_scale(config, data.world))
    ramp = mm.rampup_epochs or config.epochs
    device = data.device
    model.train()
    totals = torch.zeros(3, device=device)  # summed on the device: no host sync inside the loop
    for step in range(iterations):
        batch = next(batches)
        progress = epoch + step / iterations
        for group in optimizer.param_groups:
            group["lr"] = mm.lr * lr_factor(config, data.world, progress)
        with torch.no_grad(), compute.autocast(config.compute, device):
            guess = (model(batch.u1).float().softmax(1) + model(batch.u2).float().softmax(1)) / 2  # (bu, K)
            guess = sharpen(guess, mm.temperature)
        targets_x = F.one_hot(batch.y, guess.shape[1]).float()  # (bl, K)
        inputs = torch.cat([batch.x, batch.u1, batch.u2])  # (bl + 2 bu, C, H, W)
        targets = torch.cat([targets_x, guess, guess])
        mixed_inputs, mixed_targets = _global_mixup(inputs, targets, batch, data, mix_rng, mm.mixup_alpha)
        with compute.autocast(config.compute, device):
            logits = model(mixed_inputs).float()  # one pass: BN statistics mix labeled and unlabeled
        weight = rampup_weight(progress, max_weight=mm.lambda_u, length=ramp)
        bl = len(batch.y)
        loss, lx, lu = mixmatch_loss(
            logits[:bl],
            mixed_targets[:bl],
            logits[bl:],
            mixed_targets[bl:],
            weight,
            labeled_total=len(batch.labeled_ids),
            unlabeled_total=2 * len(batch.unlabeled_ids),
        )
        optimizer.zero_grad(set_to_none=True)
        (loss * data.world).backward()  # DDP's average of W such gradients is the global one
        optimizer.step()
        totals += torch.stack([loss.detach(), lx.detach(), lu.detach()])
    loss, lx, lu = (_sum_over_workers(totals, data.world) / iterations).tolist()
    return {"train_loss": loss, "loss_x": lx, "loss_u": lu}


def _sum_over_workers(values: torch.Tensor, world: int) -> torch.Tensor:
    """Each worker's partial sums of the global losses, added up (once per epoch)."""
    if world > 1:
        torch.distributed.all_reduce(values)
    return values


def _augment(
    images: torch.Tensor,
    config: RunConfig,
    generator: torch.Generator,
    rows: torch.Tensor,
    total: int,
) -> torch.Tensor:
    """Training augmentation of rows ``rows`` of a global batch of ``total``, in the model's memory format."""
    x = augment(images, config.data, generator, rows=rows, total=total)
    return x.contiguous(memory_format=compute.memory_format(config.compute))


def cross_entropy_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
    *,
    steps: int,
    batch: int,
    seeds: tuple[int, ...],
    frozen_norm: bool = False,
) -> float:
    """``steps`` of plain, augmented cross-entropy on global batches of ``batch``
    over the whole training set (every worker serves its rows); the mean loss.

    Shared by the no-defense baseline, the virtual model and transfer pre-training's
    head fit. ``seeds`` keys the batch order and the augmentation (the same on every
    worker). ``frozen_norm``: batch-norm layers whose parameters are frozen keep
    their running statistics too (a frozen backbone stays exactly as it was).
    """
    batches = Cycler(np.arange(data.total), generator(*seeds, 1))
    aug_gen = generator(*seeds, 2)
    device = data.device
    model.train()
    if frozen_norm:
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in params
            ):
                module.train(False)
    total = torch.zeros((), device=device)  # summed on the device: no host sync inside the loop
    for _ in range(steps):
        rows, local = data.serve(batches.next(batch))
        with compute.autocast(config.compute, device):
            logits = model(_augment(data.pixels(local), config, aug_gen, rows, batch)).float()
        labels = data.labels[compute.to_device(local, device)]
        loss = F.cross_entropy(logits, labels, reduction="sum") / batch  # share of the mean
        optimizer.zero_grad(set_to_none=True)
        (loss * data.world).backward()  # DDP's average of W such gradients is the global one
        optimizer.step()
        total += loss.detach()
    return _sum_over_workers(total, data.world).item() / max(steps, 1)


def supervised_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
    *,
    epoch: int,
) -> dict[str, float]:
    """The no-defense baseline: one pass of plain cross-entropy over the whole poisoned set."""
    batch = config.baseline_batch_size * batch_scale(config, data.world)
    for group in optimizer.param_groups:
        group["lr"] = config.mixmatch.lr * lr_factor(config, data.world, epoch)
    loss = cross_entropy_steps(
        model,
        optimizer,
        data,
        config,
        steps=max(1, data.total // batch),
        batch=batch,
        seeds=(config.seed, epoch, 0, 5),
    )
    return {"train_loss": loss, "loss_x": loss, "loss_u": 0.0}


def virtual_epoch(
    model: torch.nn.Module, data: WorkerData, config: RunConfig, *, epoch: int
) -> torch.nn.Module:
    """Train a throw-away copy of ``model`` (stage 3's virtual model) and return it.

    Only ``meta_parameters()`` (the second half of the features plus the head)
    are updated, with plain CE, Adam and batch-norm in train mode, over the whole
    poisoned set for ``virtual.epochs`` (at least ``virtual.min_steps`` steps).
    It runs on the training workers under DDP: they already hold the model, the
    data and a process group, so it costs no extra start-up.

    Under either batch rule it is the paper's single-process model: global
    batches of ``virtual.batch_size`` at ``virtual.lr``, the same step count, and
    batch norm over the global batch on W > 1 workers. ``scaled`` changes only
    the MixMatch and baseline epochs: fewer, larger steps would move the virtual
    model less, and the meta-split measures how far it moves.

    Args:
        model: the bare model (not wrapped in DDP or compiled).
    """
    virtual, wrapped = _partial_copy(model, "meta_parameters", data, global_norm=data.world > 1)
    steps, batch, lr = virtual_schedule(config, data.total)
    optimizer = compute.adam([p for p in virtual.parameters() if p.requires_grad], lr, data.device)
    cross_entropy_steps(
        wrapped, optimizer, data, config, steps=steps, batch=batch, seeds=(config.seed, epoch, 0, 7)
    )
    return virtual


def virtual_schedule(config: RunConfig, total: int) -> tuple[int, int, float]:
    """(steps, global batch, learning rate) of the virtual model over ``total`` samples:
    ``virtual.epochs`` passes, at least ``virtual.min_steps``; the same for every worker
    count and batch rule."""
    vc = config.virtual
    return max(vc.min_steps, math.ceil(vc.epochs * total / vc.batch_size)), vc.batch_size, vc.lr


def transfer_pretraining(
    model: torch.nn.Module,
    base: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    labeled: np.ndarray,
    config: RunConfig,
) -> dict[str, float]:
    """Transfer-based ASD's initial model (paper section 5.4), trained in place.

    ``transfer.semi_epochs`` MixMatch epochs with only the seeds labeled and the
    whole training set unlabeled (λ_u ramped over these epochs alone), then
    :func:`head_epochs` on the whole training set with the backbone frozen.

    Args:
        model: the training model (DDP-wrapped or compiled as the epochs use it).
        base: the bare model inside it.
        labeled: (N,) bool, True for the seeds (their trusted copies included).

    Returns:
        the last semi-supervised epoch's losses and ``head_steps`` (0 without a head fit).
    """
    pre = dataclasses.replace(
        config, mixmatch=dataclasses.replace(config.mixmatch, rampup_epochs=config.transfer.semi_epochs)
    )
    losses = {"train_loss": float("nan"), "loss_x": float("nan"), "loss_u": float("nan")}
    for epoch in range(config.transfer.semi_epochs):
        losses = mixmatch_epoch(model, optimizer, data, labeled, pre, epoch=epoch, phase=1)
    if config.transfer.head_epochs <= 0:
        return {**losses, "head_steps": 0}
    base.load_state_dict(head_epochs(base, data, config).state_dict())
    return {**losses, "head_steps": head_steps(config, data.total, data.world)}


def head_epochs(model: torch.nn.Module, data: WorkerData, config: RunConfig) -> torch.nn.Module:
    """Transfer pre-training's last step: a copy of ``model`` whose linear head alone
    was fitted by plain CE on the whole training set for ``transfer.head_epochs``
    passes, at least ``transfer.head_min_steps`` steps (batch ``baseline_batch_size``,
    Adam at ``mixmatch.lr``); the backbone, batch-norm statistics included, stays frozen.

    Seeds from another dataset teach the head their own domain's look of each
    class; fitting the head to the training set's features gives stage 1's losses
    a model that reads the training images. The frozen backbone keeps the head
    from taking up the backdoor beyond what the features already encode.

    Args:
        model: the bare model (not wrapped in DDP or compiled).
    """
    probe, wrapped = _partial_copy(model, "head_parameters", data)
    optimizer = compute.adam(
        [p for p in probe.parameters() if p.requires_grad], config.mixmatch.lr, data.device
    )
    batch = config.baseline_batch_size * batch_scale(config, data.world)
    cross_entropy_steps(
        wrapped,
        optimizer,
        data,
        config,
        steps=head_steps(config, data.total, data.world),
        batch=batch,
        seeds=(config.seed, 0, 1, 8),
        frozen_norm=True,
    )
    return probe


def head_steps(config: RunConfig, total: int, world: int) -> int:
    """Steps of :func:`head_epochs`: ``transfer.head_epochs`` passes, at least ``head_min_steps``."""
    scale = batch_scale(config, world)
    t = config.transfer
    return max(
        1,
        math.ceil(t.head_min_steps / scale),
        math.ceil(t.head_epochs * total / (config.baseline_batch_size * scale)),
    )


def _partial_copy(
    model: torch.nn.Module, trainable: str, data: WorkerData, *, global_norm: bool = False
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A deep copy of ``model`` with only ``getattr(copy, trainable)()`` trainable, and the
    copy wrapped in its own DDP when there are several workers (its reducer then knows
    only those parameters). ``global_norm``: its batch norms span the global batch (a
    no-op where the model's already do)."""
    part = copy.deepcopy(model)
    if global_norm:
        distributed.sync_batch_norm(part)
    keep = {id(p) for p in getattr(part, trainable)()}
    for param in part.parameters():
        param.requires_grad_(id(param) in keep)
    wrapped = part
    if data.world > 1:
        device_ids = [data.device] if data.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(part, device_ids=device_ids)
    return part, wrapped


def clean_mask(split_path: str, total: int) -> np.ndarray:
    """(N,) bool: which samples the split table puts in the clean pool."""
    table = pq.read_table(split_path, columns=["sample_id", "pool"])
    clean = np.zeros(total, bool)
    ids = table.column("sample_id").to_numpy()
    clean[ids] = np.asarray(table.column("pool").to_pylist()) == "clean"
    return clean
