"""The per-worker training loop run by Ray Train: MixMatch epochs over given pools.

It never computes a split: each epoch's pools come with its task, through Ray
(:class:`asd_ray.messages.Pools`: no worker reads a split table), and
the step loops are :mod:`asd_ray.steps`. The loop is the same
for 1 or W workers (DDP: gloo on CPU, NCCL on GPU). Each worker decodes its
share of the training set once (:meth:`asd_ray.training_set.TrainingSet.share`).
After each trained epoch rank 0 writes a checkpoint (what it holds, and how a
restarted worker restores it: :mod:`asd_ray.resume`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch

from asd_ray import compute, distributed, resume, storage
from asd_ray.batches import WorkerData, use_sync_batch_norm
from asd_ray.config import RunConfig
from asd_ray.data.share import remove_caches
from asd_ray.mailbox import NAMESPACE
from asd_ray.messages import (
    EpochLosses,
    Hello,
    Pretrain,
    Pretrained,
    Result,
    Stop,
    Task,
    Train,
    Trained,
    Virtual,
    VirtualModel,
    Weights,
    WorkerSetup,
)
from asd_ray.models import to_numpy_weights
from asd_ray.placement import Place
from asd_ray.resume import Restored
from asd_ray.steps import mixmatch_epoch, supervised_epoch, transfer_pretraining, virtual_epoch


def train_loop_per_worker(loop_config: dict[str, WorkerSetup]) -> None:
    """Ray Train entry: run tasks from the run's mailbox until told to stop."""
    setup = loop_config["setup"]
    _quiet_ray_train_logs()
    # DDP notes once that a 1-channel stem's gradient strides differ from its bucket; harmless.
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    config = setup.config
    torch.set_num_threads(config.cluster.threads_per_process)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    # The precision resolved once for this device and image size (TF32 only under tf32).
    resolved = compute.configure_training(config.compute, device, setup.model.image_size)
    config = dataclasses.replace(config, compute=resolved)

    data = _load_share(setup, rank, world, device)  # 1. this worker's share

    # 2. Model (same initial weights on every rank), batch norm over the global batch
    # where the config asks for it, and the optimizer.
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = compute.prepare_model(setup.model.build(), config.compute)
    if use_sync_batch_norm(config, world):
        model = distributed.sync_batch_norm(model)
    model = ray.train.torch.prepare_model(model)
    base = model.module if hasattr(model, "module") else model
    model = compute.maybe_compile(model, config.compute)
    optimizer = compute.adam(base.parameters(), config.mixmatch.lr)

    # 3. Resume from the run's newest intact checkpoint, if any (epoch -1: transfer pre-training's model).
    restored = resume.restore(setup.checkpoints, base, optimizer, device)

    mailbox = ray.get_actor(setup.mailbox, namespace=NAMESPACE)
    ray.get(mailbox.register.remote(rank, Place.here()))  # for the run log's placement line
    # A collective: every rank has registered before rank 0's hello below.
    storage_retries = distributed.total(storage.RetryCounter.take(), device)  # while the shares loaded
    if rank == 0:
        hello = Hello(
            restored.epoch,
            to_numpy_weights(base),
            config.compute.precision,
            restored.resumed_from,
            restored.pretrained,
            storage_retries,
        )
        ray.get(mailbox.post_result.remote(0, hello))

    # 4. Serve the driver's tasks until told to stop.
    worker = _Worker(config, model, base, optimizer, data, rank, restored)
    seen = 0
    while True:
        posted = ray.get(mailbox.wait_task.remote(seen))
        if posted is None:
            continue
        seen, task = posted
        if isinstance(task, Stop):
            remove_caches()
            return
        result = HANDLERS[type(task)](worker, task)
        if rank == 0:
            ray.get(mailbox.post_result.remote(seen, result))


def _load_share(setup: WorkerSetup, rank: int, world: int, device: torch.device) -> WorkerData:
    """This worker's share of the training set, decoded once (:meth:`asd_ray.training_set.TrainingSet.share`):
    on the device, or a memmap served from disk batch by batch when over the memory budget."""
    training = setup.training_set
    images, ids, labels = training.share(
        rank, world, budget_bytes=setup.config.cluster.memory_budget_bytes, cache_dir=setup.cache_dir
    )
    pixels = torch.from_numpy(images)
    pixels = pixels if isinstance(images, np.memmap) else pixels.to(device)
    labels = torch.from_numpy(labels).to(device)
    return WorkerData(pixels, labels, ids, total=training.total, rank=rank, world=world)


@dataclasses.dataclass(repr=False, eq=False)
class _Worker:
    """One worker's state between tasks. Every rank runs each handler (DDP needs all of
    them); only rank 0's result is posted, so only rank 0 copies weights to the host.
    ``compute_s`` in a result is the model arithmetic (and batch assembly) alone;
    checkpoints, weight copies and messages are the driver's fixed cost."""

    config: RunConfig
    model: torch.nn.Module  # as trained: DDP-wrapped and compiled where configured
    base: torch.nn.Module  # the bare module: weights, checkpoints, the virtual model's copy
    optimizer: torch.optim.Optimizer
    data: WorkerData
    rank: int
    checkpointed: Restored  # what the checkpoints hold: a task re-sent after a restart is answered from it

    def pretrain(self, task: Pretrain) -> Pretrained:
        if self.checkpointed.pretrained:  # re-sent after a restart: the checkpoint already has it
            return Pretrained(
                self._weights(self.base),
                float(self.checkpointed.metrics.get("train_loss", float("nan"))),
                int(self.checkpointed.metrics.get("head_steps", 0)),
            )
        labeled = np.zeros(self.data.total, bool)
        labeled[task.labeled] = True
        losses, head_steps = transfer_pretraining(
            self.model, self.base, self.optimizer, self.data, labeled, self.config
        )
        self.optimizer = compute.adam(self.base.parameters(), self.config.mixmatch.lr)  # ASD starts afresh
        outcome = {**losses.to_row(), "head_steps": head_steps}
        self._report(-1, None, outcome, outcome)  # a restart keeps it
        self.checkpointed = dataclasses.replace(
            self.checkpointed, metrics={k: float(v) for k, v in outcome.items()}, pretrained=True
        )
        return Pretrained(self._weights(self.base), losses.train_loss, head_steps)

    def virtual(self, task: Virtual) -> VirtualModel:
        start = time.perf_counter()
        virtual = virtual_epoch(
            self.base, self.data, self.config, epoch=task.epoch
        )  # bare: it wraps its copy
        compute_s = time.perf_counter() - start
        return VirtualModel(self._weights(virtual), compute_s)

    def train(self, task: Train) -> Trained:
        if self.checkpointed.covers(task.epoch):  # re-sent after a restart: the checkpoint already has it
            recorded = task.epoch == self.checkpointed.epoch and self.checkpointed.metrics
            losses = EpochLosses.from_row(self.checkpointed.metrics) if recorded else EpochLosses.unknown()
            return Trained(self._weights(self.base), 0.0, losses)
        if task.pools is None:
            start = time.perf_counter()
            losses = supervised_epoch(self.model, self.optimizer, self.data, self.config, epoch=task.epoch)
        else:
            assert task.pools.total == self.data.total, (task.pools.total, self.data.total)
            clean, unlabeled = task.pools.masks()  # before the clock
            start = time.perf_counter()
            losses = mixmatch_epoch(
                self.model,
                self.optimizer,
                self.data,
                clean,
                self.config,
                epoch=task.epoch,
                unlabeled=unlabeled,
            )
        compute_s = time.perf_counter() - start
        # The driver's figures of the epoch before ride along, for Ray Train's dashboard.
        split = None if task.pools is None else task.pools.digest
        self._report(task.epoch, split, losses.to_row(), {**losses.to_row(), **task.evaluation})
        self.checkpointed = dataclasses.replace(self.checkpointed, epoch=task.epoch, metrics=losses.to_row())
        return Trained(self._weights(self.base), compute_s, losses)

    def _weights(self, module: torch.nn.Module) -> Weights:
        """The weights for the driver: rank 0's only (the others' results are not posted)."""
        return to_numpy_weights(module) if self.rank == 0 else {}

    def _report(self, epoch: int, split: str | None, metrics: dict, reported: dict) -> None:
        """Every rank reports ``reported`` (a barrier); rank 0 attaches the checkpoint, which
        keeps the epoch's ``metrics`` for a task re-sent after a restart and ``split``, the
        digest of the pools it trained on (:attr:`asd_ray.messages.Pools.digest`)."""
        with tempfile.TemporaryDirectory() as folder:
            checkpoint = None
            if self.rank == 0:
                state = resume.checkpoint_state(
                    self.base, self.optimizer, epoch, self.config.seed, split, metrics
                )
                torch.save(state, Path(folder) / resume.CHECKPOINT_FILE)
                digest = hashlib.sha256((Path(folder) / resume.CHECKPOINT_FILE).read_bytes()).hexdigest()
                (Path(folder) / resume.CHECKPOINT_DIGEST).write_text(digest + "\n")
                checkpoint = ray.train.Checkpoint.from_directory(folder)
            ray.train.report({"epoch": epoch, **reported}, checkpoint=checkpoint)


HANDLERS: dict[type[Task], Callable[[_Worker, Any], Result]] = {
    Pretrain: _Worker.pretrain,
    Virtual: _Worker.virtual,
    Train: _Worker.train,
}


def _quiet_ray_train_logs() -> None:
    """Silence Ray Train's per-report INFO line (its logger is named by file path)."""
    from ray.train.v2._internal.execution import context

    context.logger.setLevel(logging.WARNING)
