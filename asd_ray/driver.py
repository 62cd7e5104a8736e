"""The epoch loop: score, split, write the split table, train, evaluate, record.

The driver alone owns the run folder (its layout: :mod:`asd_ray.run_folder`; what it
reads: :mod:`asd_ray.inputs`) and the run's Ray resources, each in a unit of its own:
Ray itself (:mod:`asd_ray.cluster`), the scoring actors (:mod:`asd_ray.scoring_passes`),
the training workers (:mod:`asd_ray.training_workers`), the folder's lock
(:mod:`asd_ray.run_lock`), what an epoch is charged for (:mod:`asd_ray.epoch_clock`)
and what a resume repairs (:mod:`asd_ray.resume`). :func:`run` acquires them in order
and one ``ExitStack`` releases them in reverse, whatever ends the run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from asd_ray import cluster, messages, storage, tables
from asd_ray import progress as progress_bars
from asd_ray.config import RunConfig, config_yaml
from asd_ray.epoch_clock import EpochClock, ScoredAhead
from asd_ray.errors import ConfigError, DataError, storage_error_of
from asd_ray.inputs import RunData, RunInputs, add_trusted_seeds, model_card, open_inputs, resolve_run
from asd_ray.resume import repair_needed, set_aside_unreadable_snapshot
from asd_ray.run_folder import (
    CONFIG_FILE,
    INPUTS_FILE,
    MODEL_FIGURES,
    RUN_LOG,
    SUMMARY_FILE,
    TRAIN_DIR,
    EpochTimes,
    RunLog,
    metrics_row,
    progress_line,
    read_metric_rows,
    run_summary,
    split_path,
    tensorboard_writer,
    write_text,
)
from asd_ray.run_lock import check_cache_dir, lock_run_folder
from asd_ray.run_records import RunRecords
from asd_ray.run_storage import StagedRun
from asd_ray.scores import scores_table
from asd_ray.scoring_passes import Figures, ScoringPasses
from asd_ray.seeds import foreign_seed_warning
from asd_ray.split import make_split, pool_masks, split_summary, stage_of
from asd_ray.training_workers import TrainingWorkers


def run(
    config: RunConfig,
    inputs: RunInputs,
    out: str | Path,
    *,
    resume: bool = False,
    stop_after_epoch: int | None = None,
    progress: Callable[[str], None] = print,
    on_epoch: Callable[[dict[str, Any]], None] | None = None,
    tensorboard: bool = False,
) -> dict[str, Any]:
    """Run (or resume) ASD, or the no-defense baseline, and return the summary.

    Args:
        config: the run's config; on resume only its ``cluster`` section, ``epochs``
            and ``preset`` are used (the rest is read back from RUN/config.yaml, and a
            change to it is refused).
        inputs: the data; on resume read back from RUN/inputs.json.
        out: the run folder: a local path, or an s3:// / gs:// URI (staged on this node's
            disk and published after every record: :mod:`asd_ray.run_storage`).
        resume: continue from the last complete epoch of ``out``.
        stop_after_epoch: stop (resumably) once this epoch is finished.
        progress: called with one human-readable line per event.
        on_epoch: called with each finished epoch's metrics row (schemas/metrics.json).
        tensorboard: also write each row to RUN/tensorboard (tensorboardX event files).

    Returns:
        The summary (:func:`asd_ray.run_folder.run_summary`: defense, last ACC / ASR /
        robust accuracy, worst ASR, the model files, timings), also written to
        RUN/summary.json.
    """
    start = time.perf_counter()
    try:  # absolute: the workers run elsewhere, and a run is one place however it is spelled
        target = storage.absolute(storage.location(out, config.storage))
    except DataError as err:  # the API's check; the command line refuses a bad location in its parser
        raise ConfigError(f"out {err}") from None
    interrupted = False
    # Released in reverse order whatever ends the run: the training workers, the scoring
    # actors, this run's cache folder, the run log, Ray (and the reaper of a Ray started
    # here), the folder's lock, and last (once no process of the run writes the folder any
    # more) a staged run's final publish.
    with contextlib.ExitStack() as resources:
        staged = _staging(target, resume, config, resources)
        folder = staged.staging if staged else target.local
        publish = staged.publish if staged else lambda: None
        resources.callback(lock_run_folder(folder).close)  # before the folder is checked, long before Ray
        try:
            config, inputs = resolve_run(config, inputs, folder, resume)
            data = open_inputs(config, inputs)  # every input is checked before anything is written
            check_cache_dir(config.cluster)
            connected = resources.enter_context(cluster.ray_for_run(config))
            if resume:
                set_aside_unreadable_snapshot(train_storage(config, target), progress)
            else:
                _write_start_records(folder, config, inputs)
                publish()
            progress = RunLog(folder / RUN_LOG, progress)
            resources.callback(progress.close)
            advice = foreign_seed_warning(
                data.seeds, config.mixmatch.noise_overlay, config.transfer.semi_epochs
            )
            if advice:
                progress(advice)
            callbacks = [c for c in (on_epoch, tensorboard_writer(folder) if tensorboard else None) if c]
            data = add_trusted_seeds(data, folder)
            # An interrupt does not wait for the task in hand (an epoch, on ImageNet): ray.shutdown
            # stops the workers. A Ray the caller owns stays up, so its workers are asked to stop
            # as after a normal end.
            session = _Session(
                config,
                data,
                _RunPlace(folder, target, publish, train_storage(config, target)),
                resources,
                finish_task=lambda: not interrupted or connected is None,
            )
            summary = session.loop(
                stop_after_epoch, progress, lambda row: [c(row) for c in callbacks], started=start
            )
            summary["wall_s"] = round(time.perf_counter() - start, 1)
            write_text(folder / SUMMARY_FILE, json.dumps(summary) + "\n")
            return summary
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as the command turns it into one
            interrupted = True
            raise
        except Exception as err:
            full = storage_error_of(err, folder, resumable=(folder / CONFIG_FILE).is_file())
            if staged is not None:  # name the user's location, never the staging folder
                err, full = (staged.naming(e) if e is not None else None for e in (err, full))
            if full is None:
                raise err
            raise full from None


def train_storage(config: RunConfig, target: storage.Location) -> storage.Location:
    """Where Ray Train keeps the run's checkpoints: ``cluster.storage`` (a folder per run
    there, named by the run's location), else RUN/train beside the run's records."""
    if config.cluster.storage is None:
        return target / TRAIN_DIR
    run_key = hashlib.sha256(str(storage.absolute(target)).encode()).hexdigest()[:16]
    return storage.location(config.cluster.storage, config.storage) / f"{TRAIN_DIR}-{run_key}"


def _staging(
    target: storage.Location, resume: bool, config: RunConfig, resources: contextlib.ExitStack
) -> StagedRun | None:
    """A run at a URI is staged on this node's disk (:mod:`asd_ray.run_storage`), and what
    changed there is published last on the way out."""
    if target.is_local:
        return None
    check_cache_dir(config.cluster)  # where the run is staged
    staged = StagedRun.open(target, resume=resume, cache_dir=config.cluster.cache_dir)
    resources.push(lambda kind, error, trace: staged.finish(failing=kind is not None))
    return staged


def _write_start_records(out: Path, config: RunConfig, inputs: RunInputs) -> None:
    """RUN/inputs.json, then RUN/config.yaml, which marks a folder ``--resume`` continues.
    A failure in between takes inputs.json back; a kill in between leaves a folder a new
    run may reuse (:func:`asd_ray.run_folder.failed_start`)."""
    write_text(out / INPUTS_FILE, json.dumps(dataclasses.asdict(inputs), indent=2) + "\n")
    try:
        write_text(out / CONFIG_FILE, config_yaml(config))
    except BaseException:
        (out / INPUTS_FILE).unlink(missing_ok=True)
        raise


def baseline_pools(data: RunData) -> dict[str, Any]:
    """Pool sizes of the no-defense baseline: everything is trained on as labeled."""
    n, truth = len(data.train), data.ground_truth
    poisoned = (
        None if truth is None else int(np.sum(truth.column("is_poison").to_numpy(zero_copy_only=False)))
    )
    return {
        "clean_pool": n,
        "polluted_pool": 0,
        "poison_in_clean": poisoned,
        "poison_fraction_clean": None if poisoned is None else poisoned / n,
    }


@dataclasses.dataclass(frozen=True)
class _RunPlace:
    """Where a run's records go."""

    folder: Path  # the run folder on this node (a staging folder when the run is at a URI)
    target: storage.Location  # the run's location as the user gave it
    publish: Callable[[], None]  # sends what changed in ``folder`` to ``target`` (a no-op when local)
    checkpoints: storage.Location  # Ray Train's storage of the run


@dataclasses.dataclass(frozen=True)
class _Epoch:
    """One finished epoch: its metrics row, the trained weights, the next epoch's scores."""

    row: dict[str, Any]
    weights: messages.Weights
    ahead: ScoredAhead | None  # computed in this epoch's evaluation pass (same weights)


class _Epochs:
    """ASD's epoch, step by step, on the run's scoring actors and training workers."""

    def __init__(
        self, config: RunConfig, data: RunData, folder: Path, scoring: ScoringPasses, workers: TrainingWorkers
    ):
        self.config, self.data, self.folder = config, data, folder
        self.scoring, self.workers = scoring, workers
        self.last_evaluation: dict[str, float] = {}  # the last epoch's figures, for Ray Train's report

    def run(
        self, epoch: int, weights: messages.Weights, ahead: ScoredAhead | None, *, score_next: bool
    ) -> _Epoch:
        """Score, split, write, train, evaluate one epoch. With ``score_next``, the
        evaluation pass also scores the training set for the next epoch (same weights,
        one broadcast)."""
        clock = EpochClock()
        if self.config.defense == "asd":
            stage = stage_of(epoch, self.config.split)
            scores = self._scores(epoch, weights, ahead, clock)
            meta = self._meta_scores(epoch, clock) if stage == 3 else None
            split, pools = self._split(epoch, scores, meta, clock)
        else:
            stage, split, pools = 0, None, baseline_pools(self.data)
        with clock.phase("train_s"):
            trained = self.workers.ask(
                messages.Train(epoch, split, self.last_evaluation), f"epoch {epoch} training"
            )
        clock.compute_s += trained.compute_s
        figures, ahead = self._evaluate(epoch, trained.weights, clock, score_next=score_next)
        row = metrics_row(
            {"epoch": epoch, "stage": stage, "defense": self.config.defense},
            figures,
            pools,
            trained.losses.to_row(),
            dataclasses.asdict(clock.times()),
        )
        return _Epoch(row, trained.weights, ahead)

    def _scores(
        self, epoch: int, weights: messages.Weights, ahead: ScoredAhead | None, clock: EpochClock
    ) -> pa.Table:
        """The epoch's scores table: computed in the last evaluation pass, or now."""
        if ahead is None:
            with clock.phase("score_s"):
                scored = self.scoring.training_pass(epoch, weights)
            ahead = ScoredAhead(scored.table, wall_s=0.0, compute_s=scored.compute_s)
        clock.carry_in(ahead)
        return scores_table(ahead.table)  # checked before stage 3 spends a virtual epoch

    def _meta_scores(self, epoch: int, clock: EpochClock) -> pa.Table:
        """Stage 3: the virtual model's scores (one epoch of a throw-away copy), for the meta-split."""
        with clock.phase("virtual_s"):
            virtual = self.workers.ask(messages.Virtual(epoch), f"epoch {epoch} virtual model")
        clock.compute_s += virtual.compute_s
        with clock.phase("score_s"):
            scored = self.scoring.training_pass(epoch, virtual.weights)
            meta = scores_table(scored.table)
        clock.compute_s += scored.compute_s
        return meta

    def _split(
        self, epoch: int, scores: pa.Table, meta: pa.Table | None, clock: EpochClock
    ) -> tuple[messages.Pools, dict[str, Any]]:
        """Make and write the epoch's split table (the audit trail); its pools, for the
        workers, and its summary."""
        data = self.data
        with clock.phase("split_s"):
            split = make_split(
                epoch,
                scores,
                config=self.config.split,
                num_classes=data.train.info.num_classes,
                seed_ids=data.seed_ids,
                meta_scores=meta,
                ground_truth=data.ground_truth,
                trusted_ids=data.trusted_ids,
                tampered_ids=data.tampered_ids,
            )
            path = tables.write_parquet(split, split_path(self.folder, epoch), "splits")
            masks = pool_masks(split, data.total, self.config.split.holdout_ratio, where=str(path))
            summary = split_summary(split)
        return messages.Pools.pack(*masks), summary

    def _evaluate(
        self, epoch: int, weights: messages.Weights, clock: EpochClock, *, score_next: bool
    ) -> tuple[Figures, ScoredAhead | None]:
        """Evaluate the trained weights and, in the same pass, score the next epoch (ASD)."""
        with clock.phase("eval_s"):
            evaluation = self.scoring.evaluate(weights, next_epoch=epoch + 1 if score_next else None)
        if evaluation.next_epoch is None:
            clock.compute_s += evaluation.compute_s
            return evaluation.figures, None
        scored = evaluation.next_epoch
        wall_s = clock.carry_out(evaluation.compute_s, scored.compute_s)
        return evaluation.figures, ScoredAhead(scored.table, wall_s, scored.compute_s)


class _Session:
    """One run from the workers' start-up to its last epoch: its actors, workers and records,
    what a resume repairs, and the transfer pre-training."""

    def __init__(
        self,
        config: RunConfig,
        data: RunData,
        place: _RunPlace,
        resources: contextlib.ExitStack,
        *,
        finish_task: Callable[[], bool],
    ):
        self.config, self.data, self.place = config, data, place
        self.records = RunRecords(place.folder, place.publish, model_card(config, data))
        # The seeds' trusted copies are decoded once here: actors and workers get them through
        # Ray, so none of them reads RUN/trusted-seeds (on another node it is not there).
        training = data.training_set()
        run_id = uuid.uuid4().hex[:12]
        # Disk caches of shares over the memory budget: one folder per run (restarted workers
        # reuse it, concurrent runs never share it), removed by the processes and on the way
        # out (this node's; other nodes' go with their processes).
        cache_dir = Path(config.cluster.cache_dir or tempfile.gettempdir()) / f"asd-ray-cache-{run_id}"
        resources.callback(shutil.rmtree, cache_dir, ignore_errors=True)
        self.scoring = ScoringPasses(config, data, training, str(cache_dir))
        resources.callback(self.scoring.shutdown)
        setup = messages.WorkerSetup(
            config, training, data.spec, f"mailbox-{run_id}", str(cache_dir), place.checkpoints
        )
        self.workers = TrainingWorkers(setup, lambda: self.scoring.places)
        resources.callback(lambda: self.workers.close(finish_task=finish_task()))
        self.epochs = _Epochs(config, data, place.folder, self.scoring, self.workers)

    def loop(
        self,
        stop_after_epoch: int | None,
        progress: Callable[[str], None],
        on_epoch: Callable[[dict[str, Any]], None],
        *,
        started: float,
    ) -> dict[str, Any]:
        """Every epoch after the last finished one, up to ``stop_after_epoch``; the summary."""
        config = self.config
        self.progress = self.scoring.progress = self.workers.progress = progress
        hello, startup_s = self._start(started)
        weights, done = hello.weights, hello.epoch
        rows = read_metric_rows(self.place.folder, done)
        self._repair(done, weights, rows)
        if config.transfer.semi_epochs and done < 0 and not hello.pretrained:
            weights = self._pretrain()
        last = config.epochs - 1 if stop_after_epoch is None else min(stop_after_epoch, config.epochs - 1)
        ahead = None
        bar = progress_bars.counter(total=config.epochs, desc="asd-ray", unit="epoch", initial=done + 1)
        for epoch in range(done + 1, last + 1):
            finished = self.epochs.run(epoch, weights, ahead, score_next=epoch < last)
            weights, ahead = finished.weights, finished.ahead
            rows.append(finished.row)
            self.records.record(weights, rows)
            self.epochs.last_evaluation = {
                f"eval_{k}": finished.row[k] for k in MODEL_FIGURES if finished.row[k] is not None
            }
            progress(progress_line(finished.row, config.epochs))
            self.place.publish()  # a run at a URI: that line too (a driver lost before the next record keeps it)
            bar.update(1)
            on_epoch(dict(finished.row))
        bar.close()
        summary = run_summary(
            config, rows, hello.precision, startup_s, self.place.folder, named=str(self.place.target)
        )
        summary["seeds_tampered"] = int(self.data.tampered_ids.size)
        summary["seeds_added"] = self.data.total - len(self.data.train)
        return summary

    def _start(self, started: float) -> tuple[messages.Hello, float]:
        """Wait for the workers' hello and say what the run is and where it resumes."""
        config, data, progress = self.config, self.data, self.progress
        hello = self.workers.hello()
        startup_s = time.perf_counter() - self.workers.started
        where = f"resuming after epoch {hello.epoch}" if hello.epoch >= 0 else "epoch 0"
        progress(
            f"asd-ray: {config.defense} on {len(data.train)} samples, {data.train.info.num_classes} classes, "
            f"{config.model.name} ({hello.precision}), {config.cluster.workers} workers + "
            f"{config.cluster.scorers} scorers; Ray Train up in {startup_s:.1f}s; {where}"
        )
        if hello.resumed_from:
            progress(f"asd-ray: {hello.resumed_from}")
        if hello.epoch >= 0:
            progress(
                f"asd-ray: the resume took {time.perf_counter() - started:.1f}s from this driver's start "
                f"to the workers' start-up after epoch {hello.epoch} (the run's records read, its inputs "
                "checked, Ray Train started, the checkpoint loaded)"
            )
        self.workers.report_groups("start-up")
        if data.seeds is not None and (data.seeds.tampered.size or data.trusted is not None):
            progress(
                f"asd-ray: {data.seeds.tampered.size} seed(s) differ from their training copy (pinned to the "
                f"polluted pool as tampered); {data.total - len(data.train)} trusted seed copies join the training set"
            )
        retries = {"scorers": self.scoring.storage_retries, "training workers": hello.storage_retries}
        if any(retries.values()):
            counts = " and ".join(f"the {who} {count}" for who, count in retries.items() if count)
            progress(
                f"asd-ray: storage: {counts} transient read error(s) retried (a dropped connection or a "
                "busy server) while loading their shares; every read completed"
            )
        return hello, startup_s

    def _repair(self, done: int, weights: messages.Weights, rows: list[dict[str, Any]]) -> None:
        """Complete what a driver killed after the workers' last checkpoint left undone."""
        model_folder = self.records.model_folder
        repair = repair_needed(done, rows, model_folder)
        if repair == "row":
            rows.append(self._recover_row(done, weights))
            self.records.record(weights, rows)
            self.progress(f"asd-ray: epoch {done} was checkpointed but not recorded; re-evaluated it")
        elif repair == "model":
            self.records.keep_model(weights, rows)
            self.progress(
                f"asd-ray: {model_folder} did not hold epoch {done}, the last recorded one; "
                "saved it again from its checkpoint"
            )

    def _recover_row(self, epoch: int, weights: messages.Weights) -> dict[str, Any]:
        """The metrics row of an epoch that was checkpointed but not recorded (the driver
        stopped in between): evaluated again from the checkpoint; its loss and timings are NaN."""
        if self.config.defense == "asd":
            stage = stage_of(epoch, self.config.split)
            pools = split_summary(tables.read_parquet(split_path(self.place.folder, epoch), "splits"))
        else:
            stage, pools = 0, baseline_pools(self.data)
        figures = self.scoring.evaluate(weights).figures
        return metrics_row(
            {"epoch": epoch, "stage": stage, "defense": self.config.defense},
            figures,
            pools,
            messages.EpochLosses.unknown().to_row(),
            dataclasses.asdict(EpochTimes.unknown()),
        )

    def _pretrain(self) -> messages.Weights:
        """Transfer pre-training on the workers (see :func:`asd_ray.steps.transfer_pretraining`);
        its model's figures go to RUN/pretrain.json. Returns the weights epoch 0 starts from."""
        t = self.config.transfer
        start = time.perf_counter()
        result = self.workers.ask(messages.Pretrain(self.data.seed_ids.tolist()), "transfer pre-training")
        figures = self.scoring.evaluate(result.weights).figures
        record = {
            **figures,
            "semi_epochs": t.semi_epochs,
            "head_steps": result.head_steps,
            "labeled": int(self.data.seed_ids.size),
            "train_loss": result.train_loss,
            "wall_s": round(time.perf_counter() - start, 1),
        }
        self.records.record_pretraining(record)
        asr = "" if figures["asr"] is None else f", ASR {100 * figures['asr']:.1f}%"
        self.progress(
            f"asd-ray: transfer pre-training ({t.semi_epochs} MixMatch epochs with the {record['labeled']} "
            f"seeds labeled, then {record['head_steps']} steps of the head alone): ACC {100 * figures['acc']:.1f}%{asr}; "
            f"{record['wall_s']:.0f}s"
        )
        return result.weights
