"""The per-worker training loop run by Ray Train: MixMatch epochs over given pools.

It never computes a split: each epoch's pools come from the split table the
driver wrote. The loop is the same for 1 or N workers (DDP: gloo on CPU, NCCL
on GPU) and runs on the fast path of :mod:`asd_ray.compute` (bf16 autocast and
channels_last where the hardware supports them; losses summed on the device so
the step loop never waits for the host). Each worker decodes its share of the training shards once (every W-th
sample, so shares are class-balanced even on class-sorted shards), then per
epoch selects the clean (labeled) and polluted (unlabeled) samples of that
share with the split table's masks.

Batch rule: with ``mixmatch.batch_rule = global`` (default) each of W workers
draws ``batch / W`` labeled and unlabeled samples per step, so the global batch
stays 64 + 64 whatever W is; ``per_worker`` gives every worker the full batch
(global batch W times larger). Every worker runs the same number of steps, so
DDP never waits on a rank that ran out of data.

Randomness is derived from (seed, epoch, rank, purpose), so a resumed run draws
the same batches as an uninterrupted one; checkpoints store the model,
optimizer, epoch, base seed and the split table used.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.train
import ray.train.torch
import torch
import torch.nn.functional as F

from asd_ray import compute
from asd_ray.config import RunConfig, from_dict
from asd_ray.data.augment import augment
from asd_ray.data.shards import ShardSet
from asd_ray.errors import DataError
from asd_ray.losses import mixmatch_loss, mixup, rampup_weight, sharpen
from asd_ray.mailbox import NAMESPACE
from asd_ray.scoring import ModelSpec, load_share, to_numpy_weights

CHECKPOINT_FILE = "state.pt"


@dataclasses.dataclass
class WorkerData:
    """This worker's share of the training set, in memory."""

    images: torch.Tensor  # (n, H, W, C) uint8, on the device
    labels: torch.Tensor  # (n,) int64, on the device
    sample_ids: np.ndarray  # (n,) int64


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


def _local_batch(batch: int, config: RunConfig, world: int) -> int:
    return batch // world if config.mixmatch.batch_rule == "global" else batch


def mixmatch_batches(
    data: WorkerData, clean: np.ndarray, config: RunConfig, *, epoch: int, rank: int, world: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Endless MixMatch inputs from this worker's share: labeled views, their labels,
    and two views of the unlabeled batch, augmented on the data's device.

    Args:
        clean: (n,) bool pool mask over the share (True: labeled).

    Yields:
        x (bl, C, H, W) float, y (bl,) int64, u1 and u2 (bu, C, H, W) float.
    """
    labeled, unlabeled = np.flatnonzero(clean), np.flatnonzero(~clean)
    if len(labeled) == 0 or len(unlabeled) == 0:
        raise DataError(
            f"epoch {epoch}: worker {rank} holds {len(labeled)} clean and {len(unlabeled)} polluted "
            "samples; each worker needs both: use fewer workers or more seeds"
        )
    mm = config.mixmatch
    bl, bu = _local_batch(mm.batch_labeled, config, world), _local_batch(mm.batch_unlabeled, config, world)
    labeled_batches = Cycler(labeled, generator(config.seed, epoch, rank, 1))
    unlabeled_batches = Cycler(unlabeled, generator(config.seed, epoch, rank, 2))
    aug_gen = generator(config.seed, epoch, rank, 3)
    device = data.images.device
    while True:
        li = compute.to_device(labeled_batches.next(bl), device)
        ui = compute.to_device(unlabeled_batches.next(bu), device)
        x = _augment(data.images[li], config, aug_gen)  # (bl, C, H, W)
        u1 = _augment(data.images[ui], config, aug_gen)  # (bu, C, H, W)
        u2 = _augment(data.images[ui], config, aug_gen)
        yield x, data.labels[li], u1, u2


def mixmatch_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    clean: np.ndarray,
    config: RunConfig,
    *,
    epoch: int,
    rank: int,
    world: int,
) -> dict[str, float]:
    """One MixMatch epoch on this worker's share; ``clean`` is its (n,) bool pool mask."""
    batches = mixmatch_batches(data, clean, config, epoch=epoch, rank=rank, world=world)
    mix_rng = np.random.default_rng([config.seed, epoch, rank, 4])
    num_classes = model.module.head.out_features if hasattr(model, "module") else model.head.out_features
    mm = config.mixmatch
    ramp = mm.rampup_epochs or config.epochs
    device = data.images.device
    model.train()
    totals = torch.zeros(3, device=device)  # summed on the device: no host sync inside the loop
    for step in range(mm.iterations):
        x, y, u1, u2 = next(batches)
        bl = len(y)
        with torch.no_grad(), compute.autocast(config.compute, device):
            guess = (model(u1).float().softmax(1) + model(u2).float().softmax(1)) / 2  # (bu, K)
            guess = sharpen(guess, mm.temperature)
        targets_x = F.one_hot(y, num_classes).float()  # (bl, K)
        inputs = torch.cat([x, u1, u2])  # (bl + 2 bu, C, H, W)
        targets = torch.cat([targets_x, guess, guess])
        mixed_inputs, mixed_targets, _ = mixup(inputs, targets, rng=mix_rng, alpha=mm.mixup_alpha)
        with compute.autocast(config.compute, device):
            logits = model(mixed_inputs).float()  # one pass: BN statistics mix labeled and unlabeled
        weight = rampup_weight(epoch + step / mm.iterations, max_weight=mm.lambda_u, length=ramp)
        loss, lx, lu = mixmatch_loss(logits[:bl], mixed_targets[:bl], logits[bl:], mixed_targets[bl:], weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        totals += torch.stack([loss.detach(), lx.detach(), lu.detach()])
    loss, lx, lu = (totals / mm.iterations).tolist()
    return {"train_loss": loss, "loss_x": lx, "loss_u": lu}


def _augment(images: torch.Tensor, config: RunConfig, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a uint8 batch, in the memory format the model expects."""
    return augment(images, config.data, generator).contiguous(
        memory_format=compute.memory_format(config.compute)
    )


def cross_entropy_steps(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
    *,
    steps: int,
    batch: int,
    seeds: tuple[int, ...],
) -> float:
    """``steps`` of plain, augmented cross-entropy over the whole share; the mean loss.

    Shared by the no-defense baseline and the virtual model. ``seeds`` keys the
    batch order and the augmentation.
    """
    batches = Cycler(np.arange(len(data.sample_ids)), generator(*seeds, 1))
    aug_gen = generator(*seeds, 2)
    device = data.images.device
    model.train()
    total = torch.zeros((), device=device)  # summed on the device: no host sync inside the loop
    for _ in range(steps):
        idx = compute.to_device(batches.next(batch), device)
        with compute.autocast(config.compute, device):
            logits = model(_augment(data.images[idx], config, aug_gen)).float()
        loss = F.cross_entropy(logits, data.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach()
    return total.item() / max(steps, 1)


def supervised_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data: WorkerData,
    config: RunConfig,
    *,
    epoch: int,
    rank: int,
    world: int,
    total_samples: int,
) -> dict[str, float]:
    """The no-defense baseline: one pass of plain cross-entropy over the whole poisoned set."""
    loss = cross_entropy_steps(
        model,
        optimizer,
        data,
        config,
        steps=max(1, total_samples // config.baseline_batch_size),
        batch=_local_batch(config.baseline_batch_size, config, world),
        seeds=(config.seed, epoch, rank, 5),
    )
    return {"train_loss": loss, "loss_x": loss, "loss_u": 0.0}


def virtual_epoch(
    model: torch.nn.Module,
    data: WorkerData,
    config: RunConfig,
    *,
    epoch: int,
    rank: int,
    world: int,
    total_samples: int,
) -> torch.nn.Module:
    """Train a throw-away copy of ``model`` (stage 3's virtual model) and return it.

    Only ``meta_parameters()`` (the second half of the features plus the head)
    are updated, with plain CE, Adam and batch-norm in train mode, over the whole
    poisoned set for ``virtual.epochs`` (at least ``virtual.min_steps`` steps).
    It runs on the training workers under DDP: they already hold the model, the
    data and a process group, so it costs no extra start-up.
    """
    base = model.module if hasattr(model, "module") else model
    virtual = copy.deepcopy(base)
    meta = {id(p) for p in virtual.meta_parameters()}
    for param in virtual.parameters():
        param.requires_grad_(id(param) in meta)
    wrapped = virtual
    if world > 1:
        device_ids = [data.images.device] if data.images.device.type == "cuda" else None
        wrapped = torch.nn.parallel.DistributedDataParallel(virtual, device_ids=device_ids)
    vc = config.virtual
    optimizer = torch.optim.Adam([p for p in virtual.parameters() if p.requires_grad], lr=vc.lr)
    cross_entropy_steps(
        wrapped,
        optimizer,
        data,
        config,
        steps=max(vc.min_steps, int(np.ceil(vc.epochs * total_samples / vc.batch_size))),
        batch=_local_batch(vc.batch_size, config, world),
        seeds=(config.seed, epoch, rank, 7),
    )
    return virtual


def clean_mask(split_path: str, sample_ids: np.ndarray, total: int) -> np.ndarray:
    """(n,) bool: which of this worker's samples the split table puts in the clean pool."""
    table = pq.read_table(split_path, columns=["sample_id", "pool"])
    clean = np.zeros(total, bool)
    ids = table.column("sample_id").to_numpy()
    clean[ids] = np.asarray(table.column("pool").to_pylist()) == "clean"
    return clean[sample_ids]


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train entry: run tasks from the run's mailbox until told to stop."""
    _quiet_ray_train_logs()
    # DDP notes once that a 1-channel stem's gradient strides differ from its bucket; harmless.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    config = from_dict(loop_config["config"])
    torch.set_num_threads(config.cluster.threads_per_process)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()

    # 1. This worker's share of the training set, decoded once: every world-th sample,
    # so each share mixes all classes even when the shards are sorted by class (a
    # contiguous share would give each rank's batch-norm statistics a few classes only).
    shards = ShardSet(loop_config["train"])
    images, ids, labels = load_share(shards, keep=np.arange(len(shards)) % world == rank)
    data = WorkerData(torch.from_numpy(images).to(device), torch.from_numpy(labels).to(device), ids)

    # 2. Model (same initial weights on every rank) and optimizer.
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = compute.prepare_model(ModelSpec(**loop_config["model"]).build(), config.compute)
    model = ray.train.torch.prepare_model(model)
    base = model.module if hasattr(model, "module") else model
    model = compute.maybe_compile(model, config.compute)
    optimizer = torch.optim.Adam(base.parameters(), lr=config.mixmatch.lr)

    # 3. Resume from the last checkpoint, if any.
    done_epoch = -1
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as folder:
            state_path = Path(folder) / CHECKPOINT_FILE
            state = torch.load(state_path, weights_only=True, map_location=device)
        base.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        done_epoch = int(state["epoch"])

    mailbox = ray.get_actor(loop_config["mailbox"], namespace=NAMESPACE)
    if rank == 0:
        hello = {
            "epoch": done_epoch,
            "weights": to_numpy_weights(base),
            "precision": compute.resolve_precision(config.compute, device),
        }
        ray.get(mailbox.post_result.remote(0, hello))

    # 4. Serve the driver's tasks. ``compute_s`` is the model arithmetic (and batch
    # assembly) alone; checkpointing and messaging are the driver's fixed cost.
    seen = 0
    while True:
        task = ray.get(mailbox.wait_task.remote(seen))
        if task is None:
            continue
        seen = task["seq"]
        if task["kind"] == "stop":
            return
        clean = None
        if task["kind"] == "train" and task["split"] is not None:  # read before the clock starts
            clean = clean_mask(task["split"], data.sample_ids, len(shards))
        start = time.perf_counter()
        if task["kind"] == "virtual":
            virtual = virtual_epoch(  # the bare model: it wraps its own copy in DDP
                base, data, config, epoch=task["epoch"], rank=rank, world=world, total_samples=len(shards)
            )
            if rank == 0:
                compute_s = time.perf_counter() - start
                result = {"weights": to_numpy_weights(virtual), "compute_s": compute_s}
                ray.get(mailbox.post_result.remote(seen, result))
            del virtual  # and its DDP reducer
            continue
        epoch = task["epoch"]
        if epoch <= done_epoch:  # re-sent after a restart: the checkpoint already has it
            metrics = {"train_loss": float("nan"), "loss_x": float("nan"), "loss_u": float("nan")}
        elif task["split"] is None:
            metrics = supervised_epoch(
                model, optimizer, data, config, epoch=epoch, rank=rank, world=world, total_samples=len(shards)
            )
        else:
            metrics = mixmatch_epoch(
                model, optimizer, data, clean, config, epoch=epoch, rank=rank, world=world
            )
        compute_s = time.perf_counter() - start
        if epoch > done_epoch:
            _report(base, optimizer, epoch, task["split"], config.seed, metrics, rank)
            done_epoch = epoch
        if rank == 0:
            result = {**metrics, "weights": to_numpy_weights(base), "compute_s": compute_s}
            ray.get(mailbox.post_result.remote(seen, result))


def _quiet_ray_train_logs() -> None:
    """Silence Ray Train's per-report INFO line (its logger is named by file path)."""
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.WARNING)


def _report(model, optimizer, epoch: int, split: str | None, seed: int, metrics: dict, rank: int) -> None:
    """Every rank reports (a barrier); rank 0 attaches the checkpoint."""
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = None
        if rank == 0:
            state = {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "seed": seed,
                "split": split,
            }
            torch.save(state, Path(folder) / CHECKPOINT_FILE)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report({"epoch": epoch, **metrics}, checkpoint=checkpoint)
