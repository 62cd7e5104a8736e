"""The step loops of one worker, device side: MixMatch, supervised and virtual-model epochs.

Pure torch (plus ``torch.distributed`` when W > 1): :mod:`asd_ray.train` runs
them inside Ray Train, and the benchmarks call them directly. Each step's
draws come from :mod:`asd_ray.batches` in one packed buffer, copied to the
device once; the step reads every changing value from it and never reads a
device value on the host (losses are summed on the device, read once per
epoch), so it can be replayed as a CUDA graph (``compute.cuda_graphs``). They
run on the fast path of :mod:`asd_ray.compute` (bf16 autocast and channels_last
where the hardware supports them, fused Adam).

Batch rules. ``global`` (default) is the single-process step of the paper on
any W: every worker draws the same global batch and serves the rows it holds,
losses are each worker's share of the global means (times W, for DDP's
average), batch norm spans the global batch and MixUp partners come from all
of it (see :func:`mixmatch_epoch`). ``scaled`` takes W times the batch, W
times fewer iterations and a larger learning rate (:func:`asd_ray.batches.lr_factor`) in the
MixMatch and baseline epochs; the stage-3 virtual model keeps the paper's
global batch, step count and learning rate under both rules
(:func:`virtual_epoch`). Every worker runs every step, so DDP never waits on a
rank that ran out of data.

Randomness is derived from (seed, epoch, phase, purpose), the same on every worker,
so a resumed run draws the same batches as an uninterrupted one and W does
not change them (:class:`asd_ray.batches.Purpose` lists the streams).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from asd_ray import compute, distributed
from asd_ray.batches import (
    Phase,
    Purpose,
    StepPlan,
    StepTensors,
    WorkerData,
    batch_scale,
    cross_entropy_plans,
    lr_factor,
    mixmatch_plans,
)
from asd_ray.config import RunConfig
from asd_ray.data import augment
from asd_ray.data.augment import normalize, resample
from asd_ray.losses import mixmatch_loss, sharpen
from asd_ray.messages import EpochLosses


def mixmatch_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    clean: np.ndarray,
    config: RunConfig,
    *,
    epoch: int,
    phase: Phase = Phase.RUN,
    unlabeled: np.ndarray | None = None,
) -> EpochLosses:
    """One MixMatch epoch; every worker takes part in every step of the same global batch.

    Each worker's loss is its rows' share of the global batch's loss (sums divided
    by the global row counts), times W: DDP averages gradients over the workers,
    so the update is the single-process one. With batch norm over the global
    batch (``cluster.sync_batch_norm``) the forward passes are too.

    Args:
        clean: (N,) bool pool mask over the whole training set (True: labeled).
        phase: the run's epochs, or transfer pre-training's (see :func:`mixmatch_plans`).
        unlabeled: (N,) bool, the samples trained on unlabeled (default: every one not in ``clean``).

    Returns:
        the epoch's mean loss, labeled and unlabeled terms, over the global batches.
    """
    iterations = math.ceil(config.mixmatch.iterations / batch_scale(config, data.world))
    plans = mixmatch_plans(
        data, clean, config, epoch=epoch, iterations=iterations, phase=phase, unlabeled=unlabeled
    )
    totals = torch.zeros(3, device=data.device)  # summed on the device: no host sync inside the loop
    model.train()

    def step(plan: StepPlan, buffer: torch.Tensor) -> None:
        totals.add_(_mixmatch_step(model, optimizer, data, config, plan, buffer))

    _run_steps(plans, iterations, step, optimizer, data, config)
    loss, lx, lu = (_sum_over_workers(totals, data.world) / iterations).tolist()
    return EpochLosses(train_loss=loss, loss_x=lx, loss_u=lu)


def _mixmatch_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
    plan: StepPlan,
    buffer: torch.Tensor,
) -> torch.Tensor:
    """One MixMatch step on the device, every changing value read from ``buffer``;
    returns (loss, Lx, Lu), this worker's shares, without reading them on the host."""
    tensors = plan.tensors(buffer)
    drawn = tensors.mixmatch
    assert drawn is not None, "a MixMatch step's plan comes from mixmatch_plans"
    views = step_inputs(data, config, plan, tensors)  # (bl + 2 bu, C, H, W): labeled, u1, u2
    bl, mm, device = plan.labeled, config.mixmatch, data.device
    bu = (views.shape[0] - bl) // 2
    # One autocast region for the guess and the training pass: the weights' bf16 copies
    # are cast once per step (the weights change only at the optimizer's step; under
    # CUDA graphs autocast's cache is off, see compute.autocast).
    with compute.autocast(config.compute, device):
        with torch.no_grad():
            u1, u2 = views[bl : bl + bu], views[bl + bu :]
            guess = (model(u1).float().softmax(1) + model(u2).float().softmax(1)) / 2  # (bu, K)
            guess = sharpen(guess, mm.temperature)
        labels = data.labels[tensors.index[:bl]]
        targets_x = torch.zeros(bl, guess.shape[1], device=device).scatter_(1, labels[:, None], 1.0)
        targets = torch.cat([targets_x, guess, guess])  # (bl + 2 bu, K)
        partner = drawn.partner
        if data.world == 1:
            partner_inputs, partner_targets = views[partner], targets[partner]
        else:  # partners come from the whole global batch: gather every worker's rows (no gradient)
            partner_inputs = torch.cat(distributed.gather_rows(views, list(plan.counts)))[partner]
            partner_targets = torch.cat(distributed.gather_rows(targets, list(plan.counts)))[partner]
        lam = drawn.lam
        mixed_inputs = torch.lerp(partner_inputs, views, lam)  # lam * own + (1 - lam) * partner, in fp32
        mixed_targets = torch.lerp(partner_targets, targets, lam)
        logits = model(mixed_inputs).float()  # one pass: BN statistics mix labeled and unlabeled
    loss, lx, lu = mixmatch_loss(
        logits[:bl],
        mixed_targets[:bl],
        logits[bl:],
        mixed_targets[bl:],
        drawn.weight,
        labeled_total=len(plan.labeled_ids),
        unlabeled_total=2 * len(plan.unlabeled_ids),
    )
    compute.set_lr(optimizer, plan.lr, drawn.lr)
    (loss * data.world).backward()  # DDP's average of W such gradients is the global one
    optimizer.step()
    return torch.stack([loss.detach(), lx.detach(), lu.detach()])


def step_inputs(data: WorkerData, config: RunConfig, plan: StepPlan, tensors: StepTensors) -> torch.Tensor:
    """The augmented, normalised rows of a step, (b, C, H, W) in the model's memory format:
    one gather of the uint8 pixels (crop and flip included), one normalisation."""
    if data.images.device == data.device:
        source, index = data.images, tensors.index
    else:  # a host or disk cache: whole images cross once, the crop is cut on the device
        source = compute.to_device(data.images[plan.tensors().index], data.device)
        index = torch.arange(len(source), device=data.device)
    if tensors.crop is not None:  # every output pixel's source coordinates, one gather
        pixels = augment.gather(source, index, tensors.crop.rows, tensors.crop.cols)
    else:
        pixels = source[index]
    x = normalize(pixels, config.data)
    if tensors.theta is not None:
        x = resample(x, tensors.theta)
    if tensors.overlay is not None:
        x = augment.noise_overlay(x, tensors.overlay.key, tensors.overlay.weight, config.data)
    return x.contiguous(memory_format=compute.memory_format(config.compute))


def _run_steps(
    plans: Iterator[StepPlan],
    steps: int,
    step: Callable[[StepPlan, torch.Tensor], None],
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
) -> None:
    """Run ``steps`` steps: each plan's buffer is copied to the device once and ``step``
    runs on it, eagerly, or replayed as a CUDA graph under ``compute.cuda_graphs``."""
    graphed = (
        config.compute.cuda_graphs
        and data.device.type == "cuda"
        and data.world == 1
        and data.images.device == data.device
    )
    if not graphed:
        for plan in itertools.islice(plans, steps):
            optimizer.zero_grad(set_to_none=True)
            step(plan, compute.to_device(plan.buffer, data.device))
        return
    compute.make_capturable(optimizer, data.device)
    first = next(plans)
    replay = compute.GraphedStep(
        functools.partial(step, first), lambda: optimizer.zero_grad(set_to_none=True)
    )
    for plan in itertools.chain([first], itertools.islice(plans, steps - 1)):
        if plan.layout != first.layout:
            raise RuntimeError("a graphed step's layout changed between steps")  # shapes are fixed at W = 1
        replay(plan.buffer, data.device)


def _cross_entropy_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
    plan: StepPlan,
    buffer: torch.Tensor,
    batch: int,
) -> torch.Tensor:
    """One cross-entropy step on the device; returns this worker's share of the batch's mean loss."""
    tensors = plan.tensors(buffer)
    with compute.autocast(config.compute, data.device):
        logits = model(step_inputs(data, config, plan, tensors)).float()
    loss = F.cross_entropy(logits, data.labels[tensors.index], reduction="sum") / batch  # share of the mean
    (loss * data.world).backward()  # DDP's average of W such gradients is the global one
    optimizer.step()
    return loss.detach()


def _sum_over_workers(values: torch.Tensor, world: int) -> torch.Tensor:
    """Each worker's partial sums of the global losses, added up (once per epoch)."""
    if world > 1:
        torch.distributed.all_reduce(values)
    return values


def cross_entropy_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
    *,
    steps: int,
    batch: int,
    epoch: int,
    phase: Phase,
    purpose: Purpose,
    frozen_norm: bool = False,
) -> float:
    """``steps`` of plain, augmented cross-entropy on global batches of ``batch``
    over the whole training set (every worker serves its rows); the mean loss.

    Shared by the no-defense baseline, the virtual model and transfer pre-training's
    head fit. (seed, ``epoch``, ``phase``, ``purpose``) keys the batch order and the
    augmentation (the same on every worker). ``frozen_norm``: batch-norm layers whose
    parameters are frozen keep their running statistics too (a frozen backbone stays
    exactly as it was).
    """
    model.train()
    if frozen_norm:
        for module in model.modules():
            params = list(module.parameters(recurse=False))
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(
                p.requires_grad for p in params
            ):
                module.train(False)
    total = torch.zeros((), device=data.device)  # summed on the device: no host sync inside the loop

    def step(plan: StepPlan, buffer: torch.Tensor) -> None:
        total.add_(_cross_entropy_step(model, optimizer, data, config, plan, buffer, batch))

    plans = cross_entropy_plans(data, config, batch=batch, epoch=epoch, phase=phase, purpose=purpose)
    _run_steps(plans, steps, step, optimizer, data, config)
    return _sum_over_workers(total, data.world).item() / max(steps, 1)


def supervised_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
    *,
    epoch: int,
) -> EpochLosses:
    """The no-defense baseline: one pass of plain cross-entropy over the whole poisoned set."""
    batch = config.baseline_batch_size * batch_scale(config, data.world)
    compute.set_lr(optimizer, config.mixmatch.lr * lr_factor(config, data.world, epoch))
    loss = cross_entropy_steps(
        model,
        optimizer,
        data,
        config,
        steps=max(1, data.total // batch),
        batch=batch,
        epoch=epoch,
        phase=Phase.RUN,
        purpose=Purpose.BASELINE,
    )
    return EpochLosses(train_loss=loss, loss_x=loss, loss_u=0.0)


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
    optimizer = compute.adam([p for p in virtual.parameters() if p.requires_grad], lr)
    cross_entropy_steps(
        wrapped,
        optimizer,
        data,
        config,
        steps=steps,
        batch=batch,
        epoch=epoch,
        phase=Phase.RUN,
        purpose=Purpose.VIRTUAL,
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
) -> tuple[EpochLosses, int]:
    """Transfer-based ASD's initial model (paper section 5.4), trained in place.

    ``transfer.semi_epochs`` MixMatch epochs with only the seeds labeled and the
    whole training set unlabeled (λ_u ramped over these epochs alone), then
    :func:`head_epochs` on the whole training set with the backbone frozen.

    Args:
        model: the training model (DDP-wrapped or compiled as the epochs use it).
        base: the bare model inside it.
        labeled: (N,) bool, True for the seeds (their trusted copies included).

    Returns:
        the last semi-supervised epoch's losses (NaN without one) and the head fit's steps
        (0 without a head fit).
    """
    pre = dataclasses.replace(
        config, mixmatch=dataclasses.replace(config.mixmatch, rampup_epochs=config.transfer.semi_epochs)
    )
    losses = EpochLosses.unknown()
    for epoch in range(config.transfer.semi_epochs):
        losses = mixmatch_epoch(model, optimizer, data, labeled, pre, epoch=epoch, phase=Phase.PRETRAIN)
    if config.transfer.head_epochs <= 0:
        return losses, 0
    base.load_state_dict(head_epochs(base, data, config).state_dict())
    return losses, head_steps(config, data.total, data.world)


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
    optimizer = compute.adam([p for p in probe.parameters() if p.requires_grad], config.mixmatch.lr)
    batch = config.baseline_batch_size * batch_scale(config, data.world)
    cross_entropy_steps(
        wrapped,
        optimizer,
        data,
        config,
        steps=head_steps(config, data.total, data.world),
        batch=batch,
        epoch=0,
        phase=Phase.PRETRAIN,
        purpose=Purpose.HEAD,
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
