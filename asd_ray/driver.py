"""The epoch loop: score, split, write the split table, train, evaluate, record.

The driver alone owns ``ray.init``, the actors and the run folder (its layout:
:mod:`asd_ray.run_folder`). One ``TorchTrainer.fit()`` runs the whole schedule
in a background thread; the driver talks to its workers through the run's
:class:`~asd_ray.mailbox.Mailbox`.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray

from asd_ray import __version__, tables
from asd_ray import progress as progress_bars
from asd_ray.attacks.poison import GROUND_TRUTH_FILE, read_ground_truth
from asd_ray.config import RunConfig, config_yaml, load_config
from asd_ray.data.shards import ShardSet, write_shards
from asd_ray.data.share import load_share
from asd_ray.data.sources import from_arrays
from asd_ray.errors import ConfigError, DataError, storage_error_of, user_error_of
from asd_ray.evaluate import accuracy, attack_success_rate, robust_accuracy
from asd_ray.mailbox import NAMESPACE, Mailbox
from asd_ray.models import ModelSpec
from asd_ray.models.saved import MODEL_DIR, save_model, write_card
from asd_ray.reaper import Reaper
from asd_ray.run_folder import (
    BEST_RULE,
    CONFIG_FILE,
    INPUTS_FILE,
    LOCK_FILE,
    MODEL_FIGURES,
    PRETRAIN_FILE,
    RUN_LOG,
    SUMMARY_FILE,
    TRAIN_DIR,
    TRUSTED_SEEDS_DIR,
    RunLog,
    best_row,
    open_to_append,
    progress_line,
    read_inputs,
    read_metric_rows,
    run_summary,
    split_path,
    tensorboard_writer,
    write_metrics,
    write_text,
)
from asd_ray.scores import PASS_SCHEMA, scores_table
from asd_ray.scoring_pool import PassResult, ScoringPool
from asd_ray.seeds import SeedPlan, plan_seeds
from asd_ray.split import DETECTION_KEYS, make_split, split_summary, stage_of

TRUSTED = "trusted"  # the trusted seed copies' name in the scoring pool
_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's index of the checkpoints
_RESULT_POLL_S = 5.0


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """Paths of what a run reads (recorded in RUN/inputs.json)."""

    train: str  # poisoned (untrusted) training shard folder
    test: str  # clean test shard folder (ACC)
    poison_test: str | None = None  # triggered test shard folder (ASR)
    seeds: str | None = None  # seeds table (required for defense asd)
    ground_truth: str | None = None  # poison.parquet of the training set: reporting only

    def absolute(self) -> RunInputs:
        return RunInputs(
            **{k: str(Path(v).absolute()) if v else None for k, v in dataclasses.asdict(self).items()}
        )


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
        config: the run's config; on resume only its ``cluster`` section is used
            (the rest is read back from RUN/config.yaml).
        inputs: the data; on resume read back from RUN/inputs.json.
        out: the run folder.
        resume: continue from the last complete epoch of ``out``.
        stop_after_epoch: stop (resumably) once this epoch is finished.
        progress: called with one human-readable line per event.
        on_epoch: called with each finished epoch's metrics row (schemas/metrics.json).
        tensorboard: also write each row to RUN/tensorboard (tensorboardX event files).

    Returns:
        The summary (:func:`_summary`: defense, last ACC / ASR / robust accuracy,
        worst ASR, the model files, timings), also written to RUN/summary.json.
    """
    start = time.perf_counter()
    out = Path(out).absolute()
    config, inputs = _resolve(config, inputs, out, resume)
    data = _open_inputs(config, inputs)  # every input is checked before anything is written
    connected = _init_ray(config)
    reaper = Reaper.watch() if connected == "local" else None  # started right away: a kill may come soon
    session = lock = None
    try:
        _check_resources(config.cluster)  # a request the cluster cannot meet would wait forever
        lock = _lock_run_folder(out)
        if resume:
            _set_aside_unreadable_snapshot(out / TRAIN_DIR, progress)
        else:
            out.mkdir(parents=True, exist_ok=True)
            write_text(out / INPUTS_FILE, json.dumps(dataclasses.asdict(inputs), indent=2) + "\n")
            write_text(out / CONFIG_FILE, config_yaml(config))  # last: it marks a resumable folder
        progress = RunLog(out / RUN_LOG, progress)
        callbacks = [c for c in (on_epoch, tensorboard_writer(out) if tensorboard else None) if c]
        data = _add_trusted_seeds(data, out)
        session = _Session(config, inputs, data, out)
        summary = session.loop(stop_after_epoch, progress, lambda row: [c(row) for c in callbacks])
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        write_text(out / SUMMARY_FILE, json.dumps(summary) + "\n")
    except Exception as err:
        full = storage_error_of(err, out)
        if full is None:
            raise
        raise full from None
    finally:
        if isinstance(progress, RunLog):
            progress.close()
        if session is not None:
            session.close()
        if lock is not None:
            lock.close()  # released: another driver may take the folder
        if connected:
            ray.shutdown()
        if reaper is not None:
            reaper.close()
    return summary


def _resolve(config: RunConfig, inputs: RunInputs, out: Path, resume: bool) -> tuple[RunConfig, RunInputs]:
    """The config and inputs of a new run, or those recorded in ``out`` for a resumed one."""
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out {out}: {blocking} is a file; name a folder for the run")
    if resume:
        if not (out / CONFIG_FILE).is_file():
            raise DataError(f"--resume {out}: no {CONFIG_FILE} there; start a new run with --out")
        saved = load_config(None, out / CONFIG_FILE)
        refused = [key for key in _changed_keys(saved.to_dict(), config.to_dict()) if not _resumable(key)]
        if refused:
            raise DataError(
                f"--resume {out}: {refused[0]} differs from the run's config ({len(refused)} setting(s)); "
                "a resumed run keeps its algorithm and data settings (only cluster.* and epochs may "
                "change): drop the flag, or start a new run with --out"
            )
        inputs = RunInputs(**read_inputs(out))
        return config, inputs
    if out.exists() and any(p.name != LOCK_FILE for p in out.iterdir()):
        raise DataError(
            f"run folder {out} is not empty; pass --resume to continue it or choose another --out"
        )
    if config.defense == "asd" and not inputs.seeds:
        raise DataError("defense asd needs a seeds table: make one with `asd-ray seeds` and pass --seeds")
    return config, inputs.absolute()


def _lock_run_folder(out: Path):
    """Hold ``RUN/.lock`` (an OS lock, gone with its process, so a killed driver leaves none)
    while this driver writes the folder; a second driver is refused with the owner named.

    Returns:
        the open lock file: closing it releases the lock.
    """
    out.mkdir(parents=True, exist_ok=True)
    handle = open_to_append(out / LOCK_FILE, readable=True)  # held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        owner = handle.read().strip() or "another process"
        handle.close()
        raise DataError(
            f"run folder {out} is being written by {owner}; wait for that run or choose another --out"
        ) from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"the asd-ray driver pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
    handle.flush()
    return handle


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return sorted(keys)


def _resumable(key: str) -> bool:
    """Settings a resumed run may change: where it runs, and how long (the lambda_u ramp
    and stage boundaries stay as configured, and are checked against the new length)."""
    return key.startswith("cluster.") or key in ("epochs", "preset")


@dataclasses.dataclass(frozen=True)
class _Prefetched:
    """Scores of the next epoch, computed in this epoch's fused evaluation pass."""

    table: pa.Table  # the training set's pass table (sample_id, label, loss, prediction)
    wall_s: float  # its share of the pass's wall time
    compute_s: float  # its model arithmetic on the slowest actor


@dataclasses.dataclass
class _Data:
    train: ShardSet
    test: ShardSet
    poison_test: ShardSet | None
    seeds: SeedPlan | None  # None without a defense
    ground_truth: pa.Table | None  # over the training ids, then the trusted copies
    spec: ModelSpec
    original_labels: np.ndarray | None  # the triggered test set's clean labels (robust accuracy)
    trusted: ShardSet | None = None  # RUN/trusted-seeds: seeds' trusted copies, ids N.. N+E-1

    @property
    def total(self) -> int:
        """Training samples including the trusted copies."""
        return len(self.train) + (len(self.trusted) if self.trusted is not None else 0)

    @property
    def trusted_ids(self) -> np.ndarray:
        return np.arange(len(self.train), self.total)

    @property
    def seed_ids(self) -> np.ndarray:
        return (
            np.concatenate([self.seeds.in_place, self.trusted_ids]) if self.seeds else np.empty(0, np.int64)
        )

    @property
    def tampered_ids(self) -> np.ndarray:
        return self.seeds.tampered if self.seeds else np.empty(0, np.int64)


def _open_inputs(config: RunConfig, inputs: RunInputs) -> _Data:
    """Open and cross-check every input before any Ray work starts."""
    train, test = ShardSet(inputs.train), ShardSet(inputs.test)
    poison_test = ShardSet(inputs.poison_test) if inputs.poison_test else None
    height, width, channels = train.require_uniform_size("training")
    for name, other in (("test", test), ("poison-test", poison_test)):
        if other is None:
            continue
        if other.info.num_classes != train.info.num_classes:
            raise DataError(
                f"class-count mismatch: {other.folder} ({name}) has {other.info.num_classes} classes, "
                f"{train.folder} (train) has {train.info.num_classes}; make both from the same dataset"
            )
        if other.require_uniform_size(name) != (height, width, channels):
            raise DataError(
                f"{other.folder} ({name}) images are {other.require_uniform_size(name)}, training images "
                f"are {(height, width, channels)}; make both with the same --image-size"
            )
    if channels != len(config.data.mean):
        raise DataError(
            f"{train.folder} images have {channels} channel(s) but data.mean has {len(config.data.mean)} "
            "entries; pick the preset of this dataset or set data.mean/data.std"
        )
    seeds = None
    if config.defense == "asd":
        table = tables.read_parquet(inputs.seeds, "seeds")
        seeds = plan_seeds(train, table, config.split.seeds_per_class, where=inputs.seeds)
    truth = read_ground_truth(inputs.ground_truth, train) if inputs.ground_truth else None
    m = config.model
    spec = ModelSpec(m.name, train.info.num_classes, channels, max(height, width), m.factory, m.meta_layers)
    original = None
    if poison_test is not None and (poison_test.folder / GROUND_TRUTH_FILE).is_file():
        test_truth = read_ground_truth(poison_test.folder / GROUND_TRUTH_FILE, poison_test)
        original = test_truth.column("original_label").to_numpy()
    return _Data(train, test, poison_test, seeds, truth, spec, original)


def _add_trusted_seeds(data: _Data, out: Path) -> _Data:
    """Write the seeds' trusted copies as RUN/trusted-seeds (once; a resume reads them back)
    and extend the ground truth over them (never poisoned)."""
    if data.seeds is None or not data.seeds.num_extras:
        return data
    folder = out / TRUSTED_SEEDS_DIR
    if not (folder / "dataset.json").is_file():
        images, labels = [], []
        for source, ids, trusted_labels in data.seeds.extras:
            keep = np.zeros(len(ShardSet(source)), bool)
            keep[ids] = True
            pixels, _, _ = load_share(ShardSet(source), keep=keep)
            images.append(pixels)
            labels.append(trusted_labels)
        records = from_arrays(
            np.concatenate(images), np.concatenate(labels), class_names=data.train.info.class_names
        )
        write_shards(records, folder, name="trusted", samples_per_shard=10_000, overwrite=False)
    trusted = ShardSet(folder)
    truth = data.ground_truth
    if truth is not None:
        n, labels = len(data.train), trusted.labels.astype(np.int32)
        extra = {
            "sample_id": np.arange(n, n + len(trusted)),
            "is_poison": np.zeros(len(trusted), bool),
            "is_modified": np.zeros(len(trusted), bool),
            "original_label": labels,
            "label_after": labels,
            "attack": ["trusted-seed"] * len(trusted),
            "params": ["{}"] * len(trusted),
        }
        truth = pa.concat_tables([truth, tables.from_pydict(extra, "poison")])
    return dataclasses.replace(data, trusted=trusted, ground_truth=truth)


RAY_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one log line less per run
    # Ray Train's controller drains each worker's one-slot report queue once per
    # health check (every 2 s by default), so ray.train.report blocked up to 2 s
    # once per epoch: 1.5 s of a 2 s baseline epoch on mnist-quick. At 0.25 s the
    # wait is gone for the cost of one small RPC per worker four times a second.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


def _init_ray(config: RunConfig) -> str | None:
    """Connect to Ray, starting a local one sized for the run unless one is running or
    reachable (job submit).

    :data:`RAY_TRAIN_ENV` reaches Ray Train's controller through the environment a
    local Ray inherits, or the job's runtime env on a running cluster; a Ray that
    is already initialised keeps its own (set them before ``ray.init``).

    Returns:
        ``"local"`` (a Ray this driver started), ``"cluster"`` (a running one it
        joined) or None (Ray was already initialised: the caller owns it).
    """
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return None
    if os.environ.get("RAY_ADDRESS"):
        env_vars = {key: os.environ[key] for key in RAY_TRAIN_ENV}
        ray.init(logging_level=logging.WARNING, runtime_env={"env_vars": env_vars})
        return "cluster"
    c = config.cluster
    cpus = c.workers * c.cpus_per_worker + c.scorers * c.cpus_per_scorer
    ray.init(
        num_cpus=max(int(np.ceil(cpus)), os.cpu_count() or 1),
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
    )
    return "local"


def _set_aside_unreadable_snapshot(train_dir: Path, progress: Callable[[str], None]) -> None:
    """Move Ray Train's checkpoint index aside when a crash left it torn (Ray Train would
    refuse to start); the workers then resume from the newest intact checkpoint folder."""
    path = train_dir / _TRAIN_SNAPSHOT
    try:
        json.loads(path.read_bytes())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        aside = path.with_name(f"{path.name}.unreadable-{int(time.time())}")
        path.rename(aside)
        progress(f"asd-ray: {path} was unreadable (moved to {aside.name}); using the checkpoint folders")


def _check_resources(cluster) -> None:
    """Refuse a run that asks for more CPUs or GPUs than the Ray cluster has (Ray would wait)."""
    have = ray.cluster_resources()
    asks = {
        "GPU": (
            cluster.workers * cluster.gpus_per_worker + cluster.scorers * cluster.gpus_per_scorer,
            "--gpus-per-worker x --workers + --gpus-per-scorer x --scorers",
        ),
        "CPU": (
            cluster.workers * cluster.cpus_per_worker + cluster.scorers * cluster.cpus_per_scorer,
            "cluster.cpus_per_worker x --workers + cluster.cpus_per_scorer x --scorers",
        ),
    }
    for resource, (need, how) in asks.items():
        if need > have.get(resource, 0) + 1e-9:
            raise DataError(
                f"the run asks for {need:g} {resource}s ({how}) but the Ray cluster has "
                f"{have.get(resource, 0):g}; lower those settings or add nodes (start them before the run)"
            )


class _Session:
    """The Ray side of one run: scoring pool, mailbox and the training thread."""

    def __init__(self, config: RunConfig, inputs: RunInputs, data: _Data, out: Path):
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
        from ray.train import RunConfig as TrainRunConfig
        from ray.train.torch import TorchTrainer

        from asd_ray.train import train_loop_per_worker

        self.config, self.data, self.out = config, data, out
        self.card = _model_card(config, data)
        self.last_evaluation: dict[str, Any] = {}  # the last epoch's figures, for Ray Train's report
        self.training_sets = ["train", *([TRUSTED] if data.trusted is not None else [])]
        c = config.cluster
        run_id = uuid.uuid4().hex[:12]
        mailbox_name = f"mailbox-{run_id}"
        # Disk caches of shares over the memory budget: one folder per run (restarted workers
        # reuse it, concurrent runs never share it), removed by the processes and by close().
        self.cache_dir = Path(c.cache_dir or tempfile.gettempdir()) / f"asd-ray-cache-{run_id}"
        self.mailbox = Mailbox.options(name=mailbox_name, namespace=NAMESPACE).remote()
        datasets = {"test": data.test}
        if config.defense == "asd":
            datasets = {"train": data.train, **({TRUSTED: data.trusted} if data.trusted else {}), **datasets}
        if data.poison_test is not None:
            datasets["poison_test"] = data.poison_test
        self.pool = ScoringPool(
            datasets,
            data.spec,
            config.data,
            config.scoring,
            config.compute,
            num_actors=c.scorers,
            cpus=c.cpus_per_scorer,
            gpus=c.gpus_per_scorer,
            threads=c.threads_per_process,
            memory=(c.memory_budget_bytes, str(self.cache_dir)),
        )
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": config.to_dict(),
                "train": inputs.train,
                "model": dataclasses.asdict(data.spec),
                "mailbox": mailbox_name,
                "cache_dir": str(self.cache_dir),
                "checkpoints": str(out / TRAIN_DIR),
                "trusted": str(data.trusted.folder) if data.trusted is not None else None,
            },
            scaling_config=ScalingConfig(
                num_workers=c.workers,
                use_gpu=c.gpus_per_worker > 0,
                resources_per_worker={
                    "CPU": c.cpus_per_worker,
                    **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {}),
                },
            ),
            run_config=TrainRunConfig(
                name=TRAIN_DIR,
                storage_path=str(out),
                failure_config=FailureConfig(max_failures=c.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        self.fit_error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="asd-ray-fit", daemon=True)
        self.fit_started = time.perf_counter()
        self.thread.start()

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as err:  # reported by _await in the driver thread
            self.fit_error = err

    def _await(self, seq: int, what: str) -> dict[str, Any]:
        while True:
            result = ray.get(self.mailbox.wait_result.remote(seq, _RESULT_POLL_S))
            if result is not None:
                return result
            if not self.thread.is_alive():
                users_error = user_error_of(self.fit_error) if self.fit_error else None
                if users_error:
                    raise users_error from None  # the workers stopped on bad input: its one line
                raise RuntimeError(f"Ray Train stopped during {what}: {self.fit_error!r}") from self.fit_error

    def loop(
        self,
        stop_after_epoch: int | None,
        progress: Callable[[str], None],
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        config, data, out = self.config, self.data, self.out
        hello = self._await(0, "start-up")
        startup_s = time.perf_counter() - self.fit_started
        weights, done = hello["weights"], hello["epoch"]
        rows = read_metric_rows(out, done)
        progress(
            f"asd-ray: {config.defense} on {len(data.train)} samples, {data.train.info.num_classes} classes, "
            f"{config.model.name} ({hello['precision']}), {config.cluster.workers} workers + "
            f"{config.cluster.scorers} scorers; "
            f"Ray Train up in {startup_s:.1f}s; {'resuming after epoch ' + str(done) if done >= 0 else 'epoch 0'}"
        )
        if hello.get("resumed_from"):
            progress(f"asd-ray: {hello['resumed_from']}")
        if data.seeds is not None and (data.seeds.tampered.size or data.trusted is not None):
            progress(
                f"asd-ray: {data.seeds.tampered.size} seed(s) differ from their training copy (pinned to the "
                f"polluted pool as tampered); {data.total - len(data.train)} trusted seed copies join the training set"
            )
        if done >= 0 and (not rows or rows[-1]["epoch"] < done):
            rows.append(self._recover_row(done, weights))
            write_metrics(out, rows)
            self._keep_model(weights, rows)
            progress(f"asd-ray: epoch {done} was checkpointed but not recorded; re-evaluated it")
        if config.transfer.semi_epochs and done < 0 and not hello["pretrained"]:
            weights = self._pretrain(progress)
        last = config.epochs - 1 if stop_after_epoch is None else min(stop_after_epoch, config.epochs - 1)
        prefetched = None
        bar = progress_bars.counter(total=config.epochs, desc="asd-ray", unit="epoch", initial=done + 1)
        for epoch in range(done + 1, last + 1):
            row, weights, prefetched = self._epoch(epoch, weights, prefetched, score_next=epoch < last)
            rows.append(row)
            write_metrics(out, rows)
            self._keep_model(weights, rows)
            self.last_evaluation = {f"eval_{k}": row[k] for k in MODEL_FIGURES if row[k] is not None}
            progress(progress_line(row, config.epochs))
            bar.update(1)
            if on_epoch is not None:
                on_epoch(dict(row))
        bar.close()
        summary = run_summary(config, rows, hello["precision"], startup_s, out)
        summary["seeds_tampered"] = int(data.tampered_ids.size)
        summary["seeds_added"] = data.total - len(data.train)
        return summary

    def _pretrain(self, progress: Callable[[str], None]) -> Any:
        """Transfer pre-training on the workers (see :func:`asd_ray.steps.transfer_pretraining`);
        its model's figures go to RUN/pretrain.json. Returns the weights epoch 0 starts from."""
        t = self.config.transfer
        start = time.perf_counter()
        seq = ray.get(self.mailbox.post_task.remote("pretrain", labeled=self.data.seed_ids.tolist()))
        result = self._await(seq, "transfer pre-training")
        figures, _ = self._evaluate(result["weights"])
        record = {
            **figures,
            "semi_epochs": t.semi_epochs,
            "head_steps": int(result["head_steps"]),
            "labeled": int(self.data.seed_ids.size),
            "train_loss": float(result["train_loss"]),
            "wall_s": round(time.perf_counter() - start, 1),
        }
        write_text(self.out / PRETRAIN_FILE, json.dumps(record) + "\n")
        asr = "" if figures["asr"] is None else f", ASR {100 * figures['asr']:.1f}%"
        progress(
            f"asd-ray: transfer pre-training ({t.semi_epochs} MixMatch epochs with the {record['labeled']} "
            f"seeds labeled, then {record['head_steps']} steps of the head alone): ACC {100 * figures['acc']:.1f}%{asr}; "
            f"{record['wall_s']:.0f}s"
        )
        return result["weights"]

    def _keep_model(self, weights, rows: list[dict[str, Any]]) -> None:
        """RUN/model/last.pt every epoch, best.pt when this epoch is the best so far, card.json."""
        folder = self.out / MODEL_DIR
        row, best = rows[-1], best_row(rows)
        figures = {k: row[k] for k in MODEL_FIGURES}
        save_model(folder, "last", weights, {**self.card, "kind": "last", **figures})
        if best is row:
            save_model(folder, "best", weights, {**self.card, "kind": "best", **figures})
        best_figures = {k: best[k] for k in MODEL_FIGURES}
        write_card(folder, {**self.card, "last": figures, "best": best_figures})

    def _training_pass(self, result: PassResult) -> tuple[pa.Table, float]:
        """The training set's pass table (its ids, then the trusted copies' as N..) and its
        model arithmetic."""
        table, compute_s = result.tables["train"], result.compute_s["train"]
        if TRUSTED in result.tables:
            extra = result.tables[TRUSTED]
            ids = pa.array(extra.column("sample_id").to_numpy() + len(self.data.train))
            table = pa.concat_tables([table, extra.set_column(0, "sample_id", ids)]).cast(PASS_SCHEMA)
            compute_s += result.compute_s[TRUSTED]
        return table, compute_s

    def _augment_seeds(self, epoch: int) -> dict[str, int] | None:
        """Scoring under training augmentation (the authors' variant) draws per epoch."""
        if not self.config.scoring.augment:
            return None
        return {name: self.config.seed * 100_003 + epoch + i for i, name in enumerate(self.training_sets)}

    def _epoch(
        self, epoch: int, weights, prefetched: _Prefetched | None, *, score_next: bool
    ) -> tuple[dict[str, Any], Any, _Prefetched | None]:
        """Score, split, write, train, evaluate one epoch.

        The evaluation of the trained weights is fused with the next epoch's scoring
        pass (same weights: one broadcast, one round trip); ``prefetched`` carries
        those scores, their share of the pass's wall time and their arithmetic.
        """
        config, data = self.config, self.data
        t0 = time.perf_counter()
        score_s = virtual_s = virtual_compute_s = carried_in_s = 0.0
        scoring_compute_s = 0.0  # model arithmetic on the scoring actors (slowest actor)
        path, stage = None, 0
        if config.defense == "asd":
            stage = stage_of(epoch, config.split)
            if prefetched is None:
                result = self.pool.run_many(
                    self.training_sets, ray.put(weights), augment_seeds=self._augment_seeds(epoch)
                )
                table, scored_s = self._training_pass(result)
                prefetched = _Prefetched(table, 0.0, scored_s)
                score_s = time.perf_counter() - t0
            scores = scores_table(prefetched.table)
            carried_in_s = prefetched.wall_s  # spent in the previous epoch's evaluation pass
            score_s += carried_in_s
            scoring_compute_s = prefetched.compute_s
            meta = None
            if stage == 3:
                t1 = time.perf_counter()
                seq = ray.get(self.mailbox.post_task.remote("virtual", epoch=epoch))
                virtual = self._await(seq, f"epoch {epoch} virtual model")
                virtual_s = time.perf_counter() - t1
                virtual_compute_s = virtual["compute_s"]
                t2 = time.perf_counter()
                result = self.pool.run_many(
                    self.training_sets, ray.put(virtual["weights"]), augment_seeds=self._augment_seeds(epoch)
                )
                meta_pass, meta_compute_s = self._training_pass(result)
                meta = scores_table(meta_pass)
                score_s += time.perf_counter() - t2
                scoring_compute_s += meta_compute_s
            t3 = time.perf_counter()
            split = make_split(
                epoch,
                scores,
                config=config.split,
                num_classes=data.train.info.num_classes,
                seed_ids=data.seed_ids,
                meta_scores=meta,
                ground_truth=data.ground_truth,
                trusted_ids=data.trusted_ids,
                tampered_ids=data.tampered_ids,
            )
            path = tables.write_parquet(split, split_path(self.out, epoch), "splits")
            summary = split_summary(split)
            split_s = time.perf_counter() - t3
        else:
            split_s, summary = 0.0, self._baseline_pools()
        t4 = time.perf_counter()
        seq = ray.get(
            self.mailbox.post_task.remote(
                "train", epoch=epoch, split=str(path) if path else None, evaluation=self.last_evaluation
            )
        )
        result = self._await(seq, f"epoch {epoch} training")
        train_s, train_compute_s = time.perf_counter() - t4, result["compute_s"]
        weights = result["weights"]
        t5 = time.perf_counter()
        next_names = self.training_sets if score_next and config.defense == "asd" else []
        figures, evaluation = self._evaluate(weights, next_names, self._augment_seeds(epoch + 1))
        eval_s = time.perf_counter() - t5
        prefetched = None
        if next_names:  # the next epoch's share of the fused pass, by arithmetic
            compute_s = evaluation.compute_s
            table, next_compute_s = self._training_pass(evaluation)
            share = next_compute_s / max(sum(compute_s.values()), 1e-9)
            prefetched = _Prefetched(table, eval_s * share, next_compute_s)
            eval_s -= prefetched.wall_s
        eval_compute_s = sum(s for name, s in evaluation.compute_s.items() if name not in next_names)
        epoch_s = time.perf_counter() - t0 + carried_in_s - (prefetched.wall_s if prefetched else 0.0)
        model_s = train_compute_s + virtual_compute_s + scoring_compute_s + eval_compute_s
        measured = {
            "train_loss": float(result["train_loss"]),
            "score_s": score_s,
            "virtual_s": virtual_s,
            "split_s": split_s,
            "train_s": train_s,
            "eval_s": eval_s,
            "epoch_s": epoch_s,
            "fixed_s": max(epoch_s - model_s, 0.0),
        }
        row = self._metrics_row(epoch, stage, figures, summary, measured)
        return row, weights, prefetched

    def _evaluate(
        self, weights, extra: list[str] = (), augment_seeds: dict[str, int] | None = None
    ) -> tuple[dict[str, float | None], PassResult]:
        """ACC on the clean test set and, when given, ASR and robust accuracy on the
        triggered one, in one pass that also scores the datasets in ``extra``."""
        names = ["test", *(["poison_test"] if self.data.poison_test is not None else []), *extra]
        result = self.pool.run_many(names, ray.put(weights), augment_seeds=augment_seeds)
        figures = {"acc": accuracy(result.tables["test"]), "asr": None, "robust_acc": None}
        if "poison_test" in result.tables:
            figures["asr"] = attack_success_rate(result.tables["poison_test"])
            if self.data.original_labels is not None:
                figures["robust_acc"] = robust_accuracy(
                    result.tables["poison_test"], self.data.original_labels
                )
        return figures, result

    def _baseline_pools(self) -> dict[str, Any]:
        """Pool sizes of the no-defense baseline: everything is trained on as labeled."""
        n, truth = len(self.data.train), self.data.ground_truth
        poisoned = (
            None if truth is None else int(np.sum(truth.column("is_poison").to_numpy(zero_copy_only=False)))
        )
        return {
            "clean_pool": n,
            "polluted_pool": 0,
            "poison_in_clean": poisoned,
            "poison_fraction_clean": None if poisoned is None else poisoned / n,
        }

    def _recover_row(self, epoch: int, weights) -> dict[str, Any]:
        """The metrics row of an epoch that was checkpointed but not recorded (the driver
        stopped in between): evaluated again from the checkpoint; its loss and timings are NaN."""
        if self.config.defense == "asd":
            stage = stage_of(epoch, self.config.split)
            summary = split_summary(tables.read_parquet(split_path(self.out, epoch), "splits"))
        else:
            stage, summary = 0, self._baseline_pools()
        figures, _ = self._evaluate(weights)
        unknown = dict.fromkeys(
            ("train_loss", "score_s", "virtual_s", "split_s", "train_s", "eval_s", "epoch_s", "fixed_s"),
            float("nan"),
        )
        return self._metrics_row(epoch, stage, figures, summary, unknown)

    def _metrics_row(
        self, epoch: int, stage: int, figures: dict[str, Any], pools: dict[str, Any], measured: dict
    ) -> dict[str, Any]:
        """One row of schemas/metrics.json: evaluation, pools and detection, loss and timings."""
        return {
            "epoch": epoch,
            "stage": stage,
            "defense": self.config.defense,
            **figures,
            "clean_pool": pools["clean_pool"],
            "polluted_pool": pools["polluted_pool"],
            "poison_in_clean": pools.get("poison_in_clean"),
            "poison_fraction_clean": pools.get("poison_fraction_clean"),
            **{k: pools.get(k) for k in DETECTION_KEYS},
            **measured,
        }

    def close(self) -> None:
        try:
            if self.thread.is_alive():
                ray.get(self.mailbox.post_task.remote("stop"))
                self.thread.join(timeout=120)
        finally:
            self.pool.shutdown()
            ray.kill(self.mailbox)
            shutil.rmtree(
                self.cache_dir, ignore_errors=True
            )  # this node's; other nodes' go with their processes


def _model_card(config: RunConfig, data: _Data) -> dict[str, Any]:
    """What a model file says about itself besides its epoch and figures."""
    height, width, channels = data.train.require_uniform_size("training")
    datasets = {"train": data.train, "test": data.test, "poison_test": data.poison_test}
    return {
        "asd_ray_version": __version__,
        "architecture": dataclasses.asdict(data.spec),
        "classes": list(data.train.info.class_names),
        "input": {
            "height": height,
            "width": width,
            "channels": channels,
            "mean": list(config.data.mean),
            "std": list(config.data.std),
            "normalise": "x = (pixels / 255 - mean) / std per channel, as (B, C, H, W) float32",
        },
        "preset": config.preset,
        "defense": config.defense,
        "epochs": config.epochs,
        "data": {
            name: {"folder": str(shards.folder), "identity_sha256": shards.identity()}
            for name, shards in datasets.items()
            if shards is not None
        },
        "selection": BEST_RULE,
    }
