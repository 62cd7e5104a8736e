"""The per-worker training loop run by Ray Train: MixMatch epochs over given pools.

It never computes a split: each epoch's pools come with its task, through Ray
(:class:`asd_ray.messages.Pools`: no worker reads a split table), and
the step loops are :mod:`asd_ray.steps`. The loop is the same
for 1 or W workers (DDP: gloo on CPU, NCCL on GPU). Each worker decodes its
share of the training shards once: every W-th sample, so shares are
class-balanced even on class-sorted shards (in memory, or in a disk cache over
the memory budget). Checkpoints store the model, optimizer, epoch, base seed
and the digest of the pools trained on, with a sha256 digest of the checkpoint
so a resume skips a torn one.
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

from asd_ray import compute, distributed, storage
from asd_ray.batches import WorkerData, use_sync_batch_norm
from asd_ray.config import RunConfig, from_dict
from asd_ray.data.shards import ShardSet
from asd_ray.data.share import append_rows, load_share, remove_caches
from asd_ray.errors import DataError
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
)
from asd_ray.models import ModelSpec, to_numpy_weights
from asd_ray.models.saved import load_weights_only
from asd_ray.placement import Place
from asd_ray.steps import mixmatch_epoch, supervised_epoch, transfer_pretraining, virtual_epoch
from asd_ray.storage import Location

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_DIGEST = "state.sha256"  # a checkpoint whose state.pt does not match it is skipped


MAX_CHECKPOINT_BYTES = 64 * 1024**3  # a checkpoint holds the model and Adam's two moments


def newest_checkpoint(folder: Location) -> Location | None:
    """The newest ``checkpoint_*`` folder of a run's Ray Train storage (names sort by time),
    a local folder or an object prefix."""
    names = storage.list_names(folder, limit=storage.MAX_LISTING, folders=True)  # not Ray Train's index file
    found = [n for n in names if n.startswith("checkpoint_")]
    return folder / max(found) if found else None


def newest_intact_state(latest: Location, device: torch.device) -> tuple[dict, str]:
    """The newest checkpoint state, starting from ``latest``, whose ``state.pt`` matches its
    digest and loads (weights only); older checkpoints beside it are the fallback.

    Returns:
        the state and a line saying which checkpoint was used (and which were skipped).

    Raises:
        DataError: when no checkpoint of the run is intact.
    """
    names = storage.list_names(latest.parent, limit=storage.MAX_LISTING, folders=True)
    candidates = sorted((n for n in names if n.startswith("checkpoint_") and n <= latest.name), reverse=True)
    skipped = []
    for name in candidates:
        folder = latest.parent / name
        state_path, digest_path = folder / CHECKPOINT_FILE, folder / CHECKPOINT_DIGEST
        try:
            data = storage.read_bytes(state_path, limit=MAX_CHECKPOINT_BYTES)
            if storage.exists(digest_path):
                digest = storage.read_bytes(digest_path, limit=1024).decode(errors="replace").strip()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise DataError(f"{state_path}: digest mismatch")
            state = load_weights_only(data, state_path, fix="skipped", map_location=device)
        except (OSError, DataError):  # unreadable, digest mismatch, or not a checkpoint
            skipped.append(name)
            continue
        note = f"resumed from {name} (epoch {int(state['epoch'])})"
        return state, note + (f"; skipped unreadable {', '.join(skipped)}" if skipped else "")
    raise DataError(
        f"{latest.parent}: no intact checkpoint ({', '.join(skipped)} unreadable); start the run again"
    )


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
    # The precision resolved once for this device and image size (TF32 only under tf32).
    resolved = compute.configure_training(config.compute, device, loop_config["model"]["image_size"])
    config = dataclasses.replace(config, compute=resolved)

    data = _load_share(loop_config, config, rank, world, device)  # 1. this worker's share

    # 2. Model (same initial weights on every rank), batch norm over the global batch
    # where the config asks for it, and the optimizer.
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        model = compute.prepare_model(ModelSpec(**loop_config["model"]).build(), config.compute)
    if use_sync_batch_norm(config, world):
        model = distributed.sync_batch_norm(model)
    model = ray.train.torch.prepare_model(model)
    base = model.module if hasattr(model, "module") else model
    model = compute.maybe_compile(model, config.compute)
    optimizer = compute.adam(base.parameters(), config.mixmatch.lr)

    # 3. Resume from the last checkpoint, if any (epoch -1: transfer pre-training's model).
    done_epoch, done_metrics, resumed_from, pretrained = -1, {}, None, False
    # The run folder's newest intact checkpoint, after a worker-group restart as on --resume.
    # Not ray.train.get_checkpoint(): its controller registers a report up to one health
    # check after the worker made it, so a worker killed in between restarted its group
    # from scratch; and a torn index of Ray Train's would hide every checkpoint.
    latest = newest_checkpoint(loop_config["checkpoints"])
    if latest:
        state, resumed_from = newest_intact_state(latest, device)
        base.load_state_dict(state["model"])
        compute.load_adam_state(optimizer, state["optimizer"])
        done_epoch = int(state["epoch"])
        done_metrics = state.get("metrics", {})
        pretrained = True  # any checkpoint comes after the pre-training, if the run has one

    mailbox = ray.get_actor(loop_config["mailbox"], namespace=NAMESPACE)
    ray.get(mailbox.register.remote(rank, Place.here()))  # for the run log's placement line
    # A collective: every rank has registered before rank 0's hello below.
    storage_retries = distributed.total(storage.RetryCounter.take(), device)  # while the shares loaded
    if rank == 0:
        hello = Hello(
            done_epoch,
            to_numpy_weights(base),
            config.compute.precision,
            resumed_from,
            pretrained,
            storage_retries,
        )
        ray.get(mailbox.post_result.remote(0, hello))

    # 4. Serve the driver's tasks until told to stop.
    worker = _Worker(config, model, base, optimizer, data, rank, done_epoch, done_metrics, pretrained)
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


def _load_share(loop_config: dict[str, Any], config: RunConfig, rank: int, world: int, device) -> WorkerData:
    """This worker's share of the training set, decoded once: every world-th sample,
    so each share mixes all classes even when the shards are sorted by class (a
    contiguous share would give each rank's batch-norm statistics a few classes only;
    scoring actors, which keep no statistics, read contiguous shard slices instead:
    :func:`asd_ray.data.shards.assign_slices`). The seeds' trusted copies, if any,
    follow as ids N.. and are shared the same way; they come decoded through Ray
    (:meth:`asd_ray.inputs.RunData.trusted_copies`), not from the run folder."""
    shards = ShardSet(loop_config["train"], versions=loop_config["train_versions"])
    trusted = loop_config["trusted"]  # (images, labels) or None
    n = len(shards)
    total = n + (len(trusted[1]) if trusted is not None else 0)
    c = config.cluster
    images, ids, labels = load_share(
        shards,
        keep=np.arange(len(shards)) % world == rank,
        budget_bytes=c.memory_budget_bytes,
        cache_dir=loop_config["cache_dir"],
    )
    if trusted is not None:
        mine = np.flatnonzero(np.arange(n, total) % world == rank)
        images = append_rows(images, trusted[0][mine])
        ids, labels = np.concatenate([ids, mine + n]), np.concatenate([labels, trusted[1][mine]])
    pixels = torch.from_numpy(images)  # over budget: a memmap, served from disk batch by batch
    pixels = pixels if isinstance(images, np.memmap) else pixels.to(device)
    return WorkerData(pixels, torch.from_numpy(labels).to(device), ids, total=total, rank=rank, world=world)


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
    done_epoch: int  # the last epoch in a checkpoint (-1: none, or the pre-training's)
    done_metrics: dict[str, float]  # its losses, answered again when a restart re-sends it
    pretrained: bool  # the transfer pre-training is in a checkpoint

    def pretrain(self, task: Pretrain) -> Pretrained:
        if self.pretrained:  # re-sent after a restart: the checkpoint already has it
            return Pretrained(
                self._weights(self.base),
                float(self.done_metrics.get("train_loss", float("nan"))),
                int(self.done_metrics.get("head_steps", 0)),
            )
        labeled = np.zeros(self.data.total, bool)
        labeled[task.labeled] = True
        losses, head_steps = transfer_pretraining(
            self.model, self.base, self.optimizer, self.data, labeled, self.config
        )
        self.optimizer = compute.adam(self.base.parameters(), self.config.mixmatch.lr)  # ASD starts afresh
        outcome = {**losses.to_row(), "head_steps": head_steps}
        self._report(-1, None, outcome, outcome)  # a restart keeps it
        self.pretrained, self.done_metrics = True, {k: float(v) for k, v in outcome.items()}
        return Pretrained(self._weights(self.base), losses.train_loss, head_steps)

    def virtual(self, task: Virtual) -> VirtualModel:
        start = time.perf_counter()
        virtual = virtual_epoch(
            self.base, self.data, self.config, epoch=task.epoch
        )  # bare: it wraps its copy
        compute_s = time.perf_counter() - start
        return VirtualModel(self._weights(virtual), compute_s)

    def train(self, task: Train) -> Trained:
        if task.epoch <= self.done_epoch:  # re-sent after a restart: the checkpoint already has it
            recorded = task.epoch == self.done_epoch and self.done_metrics
            losses = EpochLosses.from_row(self.done_metrics) if recorded else EpochLosses.unknown()
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
        self.done_epoch, self.done_metrics = task.epoch, losses.to_row()
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
                state = {
                    "model": self.base.state_dict(),
                    "optimizer": self.optimizer.state_dict(),
                    "epoch": epoch,
                    "seed": self.config.seed,
                    "split": split,
                    "metrics": {k: float(v) for k, v in metrics.items()},
                }
                torch.save(state, Path(folder) / CHECKPOINT_FILE)
                digest = hashlib.sha256((Path(folder) / CHECKPOINT_FILE).read_bytes()).hexdigest()
                (Path(folder) / CHECKPOINT_DIGEST).write_text(digest + "\n")
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
