"""The epoch loop: score, split, write the split table, train, evaluate, record.

The driver alone owns ``ray.init``, the actors and the run folder (its layout:
:mod:`asd_ray.run_folder`; what it reads: :mod:`asd_ray.inputs`). One
``TorchTrainer.fit()`` runs the whole schedule in a background thread; the driver
sends its workers the tasks of :mod:`asd_ray.messages` through the run's
:class:`~asd_ray.mailbox.Mailbox`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from asd_ray import messages, storage, tables, worker_setup
from asd_ray import progress as progress_bars
from asd_ray.config import RunConfig, config_yaml
from asd_ray.errors import ConfigError, DataError, StorageError, UserError, storage_error_of, user_error_of
from asd_ray.evaluate import accuracy, attack_success_rate, robust_accuracy
from asd_ray.inputs import RunData, RunInputs, add_trusted_seeds, model_card, open_inputs, resolve_run
from asd_ray.mailbox import NAMESPACE, Mailbox
from asd_ray.model_card import CARD_FILE, MODEL_DIR, read_run_card, write_card
from asd_ray.models.saved import read_model_file, save_model
from asd_ray.placement import placement_line, restart_line, scorer_restart_line
from asd_ray.reaper import Reaper
from asd_ray.run_folder import (
    CONFIG_FILE,
    INPUTS_FILE,
    LOCK_FILE,
    MODEL_FIGURES,
    PRETRAIN_FILE,
    RESTORE,
    RUN_LOG,
    SUMMARY_FILE,
    TRAIN_DIR,
    EpochTimes,
    RunLog,
    best_row,
    metrics_row,
    open_to_append,
    progress_line,
    read_metric_rows,
    run_summary,
    split_path,
    tensorboard_writer,
    write_metrics,
    write_text,
)
from asd_ray.run_storage import StagedRun
from asd_ray.scores import PASS_SCHEMA, scores_table
from asd_ray.scoring_pool import Held, PassResult, ScoringPool
from asd_ray.seeds import foreign_seed_warning
from asd_ray.split import make_split, pool_masks, split_summary, stage_of

TRUSTED = "trusted"  # the trusted seed copies' name in the scoring pool
_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's index of the checkpoints
_SNAPSHOT_BYTES = 256 * 1024**2  # the index lists every kept checkpoint's metrics
_RESULT_POLL_S = 5.0
_STOP_WAIT_S = 5.0  # how long an interrupted run waits for idle workers to stop cleanly


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
    staged = None
    if not target.is_local:
        _check_cache_dir(config.cluster)  # where the run is staged
        staged = StagedRun.open(target, resume=resume, cache_dir=config.cluster.cache_dir)
    out = staged.staging if staged else target.local
    publish = staged.publish if staged else lambda: None
    try:
        lock = _lock_run_folder(out)  # before the folder is checked, and long before Ray starts
    except BaseException:
        if staged is not None:
            staged.close()
        raise
    session = connected = reaper = None
    interrupted = False
    try:
        config, inputs = resolve_run(config, inputs, out, resume)
        data = open_inputs(config, inputs)  # every input is checked before anything is written
        _check_cache_dir(config.cluster)
        # Started before Ray: a kill or Ctrl-C may come while Ray starts, and only the reaper
        # knows the processes of a start-up cut short.
        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            reaper = Reaper.watch()
        connected = _init_ray(config)
        _check_resources(config.cluster)  # a request the cluster cannot meet would wait forever
        if resume:
            _set_aside_unreadable_snapshot(train_storage(config, target), progress)
        else:
            _write_start_records(out, config, inputs)
            publish()
        progress = RunLog(out / RUN_LOG, progress)
        advice = foreign_seed_warning(data.seeds, config.mixmatch.noise_overlay, config.transfer.semi_epochs)
        if advice:
            progress(advice)
        callbacks = [c for c in (on_epoch, tensorboard_writer(out) if tensorboard else None) if c]
        data = add_trusted_seeds(data, out)
        session = _Session(
            config, data, out, publish, train_storage(config, target), target=target, started=start
        )
        summary = session.loop(stop_after_epoch, progress, lambda row: [c(row) for c in callbacks])
        summary["wall_s"] = round(time.perf_counter() - start, 1)
        write_text(out / SUMMARY_FILE, json.dumps(summary) + "\n")
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM as the command turns it into one
        interrupted = True
        raise
    except Exception as err:
        full = storage_error_of(err, out, resumable=(out / CONFIG_FILE).is_file())
        if staged is not None:  # name the user's location, never the staging folder
            err, full = (_naming(e, staged) if e is not None else None for e in (err, full))
        if full is None:
            raise err
        raise full from None
    finally:
        # Every step runs even if one before it fails; the lock goes last, once no process
        # of this run writes the folder any more.
        with contextlib.ExitStack() as cleanup:
            if staged is not None:  # last: once the run's processes have stopped and its log is closed
                cleanup.callback(_publish_last, staged, failing=lambda: sys.exc_info()[0] is not None)
            cleanup.callback(lock.close)  # released: another driver may take the folder
            if reaper is not None:
                cleanup.callback(reaper.close)
            if connected:
                cleanup.callback(ray.shutdown)
            if session is not None:
                # An interrupt does not wait for the task in hand (an epoch, on ImageNet):
                # ray.shutdown stops the workers. A Ray the caller owns stays up, so its
                # workers are asked to stop as after a normal end.
                cleanup.callback(session.close, finish_task=not interrupted or connected is None)
            if isinstance(progress, RunLog):
                cleanup.callback(progress.close)
    return summary


def train_storage(config: RunConfig, target: storage.Location) -> storage.Location:
    """Where Ray Train keeps the run's checkpoints: ``cluster.storage`` (a folder per run
    there, named by the run's location), else RUN/train beside the run's records."""
    if config.cluster.storage is None:
        return target / TRAIN_DIR
    run_key = hashlib.sha256(str(storage.absolute(target)).encode()).hexdigest()[:16]
    return storage.location(config.cluster.storage, config.storage) / f"{TRAIN_DIR}-{run_key}"


def _publish_last(staged: StagedRun, *, failing: Callable[[], bool]) -> None:
    """Publish what the run wrote until here (its log's last lines too), then remove the
    staging folder. If that fails, the staging folder stays and is named; an error already
    on its way (a bad input, an interrupt) keeps its own line and status."""
    try:
        staged.publish()
    except (UserError, StorageError) as err:
        line = (
            f"asd-ray: {staged.target}: the run's last records were not published ({err}); they are "
            f"kept in {staged.staging}: copy them there, or continue with --resume from what the bucket holds"
        )
        if not failing():
            raise StorageError(line) from None
        print(progress_bars.terminal_safe(line), file=sys.stderr, flush=True)
        return
    staged.close()


def _naming(err: BaseException, staged: StagedRun) -> BaseException:
    """``err`` with the staging folder's path replaced by the run's URI in its message (a
    full disk stays named: it is this node's, not the bucket's)."""
    if not isinstance(err, UserError) or str(staged.staging) not in str(err):
        return err
    renamed = type(err)(str(err).replace(str(staged.staging), str(staged.target)))
    renamed.__cause__ = err.__cause__
    return renamed


def _lock_run_folder(out: Path) -> _RunFolderLock:
    """Hold ``RUN/.lock`` (an OS lock, gone with its process, so a killed driver leaves none)
    from before the folder is checked to the run's end; a second driver is refused with
    the owner named. The folder is created if missing, and must take new files.

    Raises:
        ConfigError: a file stands where the folder or one above it should be.
        DataError: another driver holds the folder, or no file can be created in it.
    """
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out {out}: {blocking} is a file; name a folder for the run")
    lock = _RunFolderLock(out, made=_missing_folders(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.take()
        tempfile.TemporaryFile(dir=out).close()  # a folder whose lock file exists may still be read-only
    except OSError as err:
        lock.close()
        raise DataError(
            f"run folder {out}: cannot write there ({err.strerror or type(err).__name__}); "
            "choose another --out or make it writable"
        ) from None
    except BaseException:
        lock.close()
        raise
    return lock


class _RunFolderLock:
    """``RUN/.lock`` held by this driver. A run that ends before its first record
    (RUN/config.yaml) takes back what taking the lock made, the lock file and the
    folders, so a refused start leaves nothing behind."""

    def __init__(self, out: Path, made: list[Path]):
        self.out, self.path, self.made = out, out / LOCK_FILE, made  # made: deepest folder first
        self.handle = None
        self.made_file = False

    def take(self) -> None:
        """Lock the file now at ``RUN/.lock``: one that a driver ending its failed start
        unlinked while this one opened it would lock nothing, so that is tried again."""
        while True:
            self.made_file = self.made_file or not os.path.lexists(self.path)
            handle = open_to_append(self.path, readable=True)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                raise DataError(
                    f"run folder {self.out} is being written by {owner}; wait for that run or choose another --out"
                ) from None
            try:
                current = os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        self.handle = handle
        handle.seek(0)
        handle.truncate()
        handle.write(f"the asd-ray driver pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        handle.flush()

    def close(self) -> None:
        """Release the lock: another driver may take the folder."""
        try:
            if not (self.out / CONFIG_FILE).exists():  # no run started here
                if self.made_file and self.handle is not None:
                    self.path.unlink(missing_ok=True)
                _remove_empty(self.made)
        finally:
            if self.handle is not None:
                self.handle.close()


def _missing_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, deepest first."""
    return [p for p in (path, *path.parents) if not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


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


def _check_cache_dir(cluster) -> None:
    """``cluster.cache_dir`` must take new files: the workers would find out only after
    Ray started, in a traceback. Folders made for the check are removed again."""
    if cluster.cache_dir is None:
        return
    folder = Path(cluster.cache_dir)
    made = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(
            f"cluster.cache_dir {folder}: cannot create files there ({err.strerror or type(err).__name__}); "
            "name a writable folder (or leave it unset for the system's temporary folder)"
        ) from None
    finally:
        _remove_empty(made)


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
    is already initialised keeps its own (set them before ``ray.init``). Every
    worker of the job sets itself up first (:mod:`asd_ray.worker_setup`).

    Returns:
        ``"local"`` (a Ray this driver started), ``"cluster"`` (a running one it
        joined) or None (Ray was already initialised: the caller owns it).
    """
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return None
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": worker_setup.SETUP_HOOK}
    if os.environ.get("RAY_ADDRESS"):
        runtime_env["env_vars"] = {key: os.environ[key] for key in RAY_TRAIN_ENV}
        with _keeping_sigterm_handler():  # a batch scheduler's SIGTERM on a cluster too
            ray.init(logging_level=logging.WARNING, runtime_env=runtime_env)
        return "cluster"
    c = config.cluster
    cpus = c.workers * c.cpus_per_worker + c.scorers * c.cpus_per_scorer
    with _keeping_sigterm_handler():
        ray.init(
            num_cpus=max(int(np.ceil(cpus)), os.cpu_count() or 1),
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
        )
    return "local"


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Give SIGTERM back to the handler it had before ``ray.init``, which replaces it twice:
    with ``sys.exit(15)`` at once, then in its C++ core with a handler that aborts the process
    (exit 134, no ``finally`` runs). The asd-ray command's handler turns SIGTERM into an
    interrupt that stops the run cleanly; a SIGTERM that Ray's Python handler took during
    ``ray.init`` is passed on to it (one in the short window under the C++ handler still
    aborts)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray installs no handler from another thread
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as stop:
        if stop.code != signal.SIGTERM or not callable(before):
            raise
        before(signal.SIGTERM, None)  # the SIGTERM Ray's handler took
        raise
    finally:
        if before is not None:  # None: a handler not set from Python, which cannot be restored
            signal.signal(signal.SIGTERM, before)


def _set_aside_unreadable_snapshot(train_dir: storage.Location, progress: Callable[[str], None]) -> None:
    """Move Ray Train's checkpoint index aside when a crash left it torn (Ray Train would
    refuse to start); the workers then resume from the newest intact checkpoint folder."""
    path = train_dir / _TRAIN_SNAPSHOT
    if not storage.exists(path):
        return
    try:
        json.loads(storage.read_bytes(path, limit=_SNAPSHOT_BYTES))
    except (DataError, ValueError, RecursionError):
        aside = train_dir / f"{path.name}.unreadable-{int(time.time())}"
        try:
            path.fs.move(path.fs_path, aside.fs_path)
        except OSError as err:
            raise storage.failure(path, err, "moving it aside") from None
        progress(f"asd-ray: {path} was unreadable (moved to {aside.name}); using the checkpoint folders")


def _check_resources(cluster) -> None:
    """Refuse a run that asks for more CPUs, GPUs or custom resources than the Ray cluster
    has (Ray would wait)."""
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
    for name in sorted({*cluster.worker_resources, *cluster.scorer_resources}):
        asks[name] = (
            cluster.workers * cluster.worker_resources.get(name, 0)
            + cluster.scorers * cluster.scorer_resources.get(name, 0),
            "cluster.worker_resources x --workers + cluster.scorer_resources x --scorers; nodes offer it "
            f"with ray start --resources '{{\"{name}\": N}}'",
        )
    for resource, (need, how) in asks.items():
        if need > have.get(resource, 0) + 1e-9:
            what = f"{resource}s" if resource in ("CPU", "GPU") else f"of the custom resource {resource}"
            raise DataError(
                f"the run asks for {need:g} {what} ({how}) but the Ray cluster has "
                f"{have.get(resource, 0):g}; lower those settings or add nodes (start them before the run)"
            )


def _model_holds(folder: Path, rows: list[dict[str, Any]]) -> bool:
    """Whether the model folder holds the last recorded epoch: last.pt, card.json and, when
    that epoch is the best, best.pt (a driver of an older asd-ray killed between its
    writes left a metrics row whose model was not saved)."""
    last, best = rows[-1]["epoch"], best_row(rows)["epoch"]
    try:
        card = read_run_card(folder / CARD_FILE, fix=RESTORE)
        held = {kind: read_model_file(folder / f"{kind}.pt")[1]["epoch"] for kind in ("last", "best")}
    except (OSError, DataError):
        return False
    if (card["last"]["epoch"], card["best"]["epoch"], held["last"]) != (last, best, last):
        return False
    return best != last or held["best"] == last  # an earlier best.pt has no checkpoint to come from


@dataclasses.dataclass(frozen=True)
class _Prefetched:
    """Scores of the next epoch, computed in this epoch's fused evaluation pass."""

    table: pa.Table  # the training set's pass table (sample_id, label, loss, prediction)
    wall_s: float  # its share of the pass's wall time
    compute_s: float  # its model arithmetic on the slowest actor


@dataclasses.dataclass
class _EpochClock:
    """Wall seconds of one epoch's phases and the model arithmetic inside them.

    Scoring for epoch e+1 runs in epoch e's evaluation pass (one weight broadcast):
    its share of that pass moves out of e's ``eval_s`` and ``epoch_s`` and into
    e+1's ``score_s`` and ``epoch_s``, so each epoch is charged for its own work.
    """

    carried_in_s: float = 0.0  # this epoch's scoring, done in the previous evaluation pass
    carried_out_s: float = 0.0  # the next epoch's scoring, done in this evaluation pass
    # Model arithmetic of every phase: rank 0's in training, the slowest actor's per scoring pass.
    compute_s: float = 0.0
    wall: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(EpochTimes.PHASES, 0.0))
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - start

    def times(self) -> EpochTimes:
        epoch_s = time.perf_counter() - self.started + self.carried_in_s - self.carried_out_s
        return EpochTimes(
            score_s=self.wall["score_s"] + self.carried_in_s,
            virtual_s=self.wall["virtual_s"],
            split_s=self.wall["split_s"],
            train_s=self.wall["train_s"],
            eval_s=self.wall["eval_s"] - self.carried_out_s,
            epoch_s=epoch_s,
            fixed_s=max(epoch_s - self.compute_s, 0.0),
        )


class _Session:
    """The Ray side of one run: scoring pool, mailbox and the training thread."""

    def __init__(
        self,
        config: RunConfig,
        data: RunData,
        out: Path,
        publish: Callable[[], None],
        checkpoints: storage.Location,
        target: storage.Location,
        started: float,
    ):
        self.config, self.data, self.out = config, data, out
        self.target = target  # the run's location as the user gave it (``out`` stages it when a URI)
        self.started = started  # the driver's start (time.perf_counter), for a resume's recovery time
        self.publish, self.checkpoints = publish, checkpoints
        self.card = model_card(config, data)
        self.last_evaluation: dict[str, float] = {}  # the last epoch's figures, for Ray Train's report
        self.training_sets = ["train", *([TRUSTED] if data.trusted is not None else [])]
        # The seeds' trusted copies, decoded once here: actors and workers get them through
        # Ray, so none of them reads RUN/trusted-seeds (on another node it is not there).
        self.trusted = data.trusted_copies()
        run_id = uuid.uuid4().hex[:12]
        # Disk caches of shares over the memory budget: one folder per run (restarted workers
        # reuse it, concurrent runs never share it), removed by the processes and by close().
        self.cache_dir = Path(config.cluster.cache_dir or tempfile.gettempdir()) / f"asd-ray-cache-{run_id}"
        mailbox_name = f"mailbox-{run_id}"
        # On this node (the driver's, as Ray Train's controller): losing another node never loses it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.mailbox = Mailbox.options(
            name=mailbox_name, namespace=NAMESPACE, scheduling_strategy=here
        ).remote()
        self.progress: Callable[[str], None] = lambda _: None  # the run log, once the loop starts
        self.worker_groups = self.restarts = 0  # ready so far, and started again after a failure
        self.pool = self._scoring_pool()
        trainer = self._trainer(mailbox_name)
        self.fit_error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="asd-ray-fit", daemon=True)
        self.fit_started = time.perf_counter()
        self.thread.start()

    def _scoring_pool(self) -> ScoringPool:
        """Actors over every dataset the run scores: the training set (ASD only), the test sets."""
        config, data, c = self.config, self.data, self.config.cluster
        datasets = {"test": data.test}
        if config.defense == "asd":
            held = {TRUSTED: Held.of(*self.trusted)} if self.trusted is not None else {}
            datasets = {"train": data.train, **held, **datasets}
        if data.poison_test is not None:
            datasets["poison_test"] = data.poison_test
        return ScoringPool(
            datasets,
            data.spec,
            config.data,
            config.scoring,
            config.compute,
            num_actors=c.scorers,
            cpus=c.cpus_per_scorer,
            gpus=c.gpus_per_scorer,
            resources=c.scorer_resources,
            threads=c.threads_per_process,
            memory=(c.memory_budget_bytes, str(self.cache_dir)),
        )

    def _trainer(self, mailbox_name: str):
        """The TorchTrainer whose one ``fit()`` serves every epoch (:mod:`asd_ray.train`)."""
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
        from ray.train import RunConfig as TrainRunConfig
        from ray.train.torch import TorchTrainer

        from asd_ray.failure_notes import FailureNotes
        from asd_ray.train import train_loop_per_worker

        c = self.config.cluster
        storage_path, storage_filesystem = storage.for_ray_train(self.checkpoints.parent)
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": self.config.to_dict(),
                "train": self.data.train.folder,  # a Location: its storage settings travel with it
                "train_versions": self.data.train.versions,
                "model": dataclasses.asdict(self.data.spec),
                "mailbox": mailbox_name,
                "cache_dir": str(self.cache_dir),
                "checkpoints": self.checkpoints,
                "trusted": self.trusted,
            },
            scaling_config=ScalingConfig(
                num_workers=c.workers,
                use_gpu=c.gpus_per_worker > 0,
                resources_per_worker={
                    "CPU": c.cpus_per_worker,
                    **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {}),
                    **c.worker_resources,
                },
            ),
            run_config=TrainRunConfig(
                name=self.checkpoints.name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                failure_config=FailureConfig(max_failures=c.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level="WARNING"),
                callbacks=[FailureNotes(mailbox_name, NAMESPACE)],
            ),
        )

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as err:  # reported by _await in the driver thread
            self.fit_error = err

    def _await(self, seq: int, what: str) -> messages.Result:
        while True:
            result = ray.get(self.mailbox.wait_result.remote(seq, _RESULT_POLL_S))
            if result is not None:
                return result
            if not self.thread.is_alive():
                users_error = user_error_of(self.fit_error) if self.fit_error else None
                if users_error:
                    raise users_error from None  # the workers stopped on bad input: its one line
                raise RuntimeError(f"Ray Train stopped during {what}: {self.fit_error!r}") from self.fit_error

    def _ask(self, task: messages.Task, what: str) -> Any:
        """Post ``task`` to the workers and wait for rank 0's answer."""
        seq = ray.get(self.mailbox.post_task.remote(task))
        result = self._await(seq, what)
        self._report_worker_groups(what)
        assert isinstance(result, messages.result_of(task)), (task, type(result))
        return result

    def _report_worker_groups(self, what: str) -> None:
        """Log the workers' placement (the first group) and every restart since the last call."""
        for group in ray.get(self.mailbox.groups.remote()):
            self.worker_groups += 1
            if self.worker_groups > 1 or group.failed_at is not None:
                self.restarts += 1
                self.progress(restart_line(group, self.restarts, self.config.cluster.max_failures, what))
            if self.worker_groups == 1:
                self.progress(placement_line(group.places, self.pool.places))

    def _scored(self, result: PassResult, what: str) -> PassResult:
        """``result``, once its restarted scoring actors (a lost node or process) are logged."""
        for index, place in result.restarted.items():
            self.progress(scorer_restart_line(index, place, what, result.wall_s))
        return result

    def loop(
        self,
        stop_after_epoch: int | None,
        progress: Callable[[str], None],
        on_epoch: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Every epoch after the last finished one, up to ``stop_after_epoch``; the summary."""
        config, out = self.config, self.out
        hello, startup_s = self._start(progress)
        retries = {"scorers": self.pool.storage_retries, "training workers": hello.storage_retries}
        if any(retries.values()):
            counts = " and ".join(f"the {who} {count}" for who, count in retries.items() if count)
            progress(
                f"asd-ray: storage: {counts} transient read error(s) retried (a dropped connection or a "
                "busy server) while loading their shares; every read completed"
            )
        weights, done = hello.weights, hello.epoch
        rows = read_metric_rows(out, done)
        if done >= 0 and (not rows or rows[-1]["epoch"] < done):
            rows.append(self._recover_row(done, weights))
            self._record(weights, rows)
            progress(f"asd-ray: epoch {done} was checkpointed but not recorded; re-evaluated it")
        elif rows and not _model_holds(out / MODEL_DIR, rows):
            self._keep_model(weights, rows)
            progress(
                f"asd-ray: {out / MODEL_DIR} did not hold epoch {done}, the last recorded one; "
                "saved it again from its checkpoint"
            )
        if config.transfer.semi_epochs and done < 0 and not hello.pretrained:
            weights = self._pretrain(progress)
        last = config.epochs - 1 if stop_after_epoch is None else min(stop_after_epoch, config.epochs - 1)
        prefetched = None
        bar = progress_bars.counter(total=config.epochs, desc="asd-ray", unit="epoch", initial=done + 1)
        for epoch in range(done + 1, last + 1):
            row, weights, prefetched = self._epoch(epoch, weights, prefetched, score_next=epoch < last)
            rows.append(row)
            self._record(weights, rows)
            self.last_evaluation = {f"eval_{k}": row[k] for k in MODEL_FIGURES if row[k] is not None}
            progress(progress_line(row, config.epochs))
            self.publish()  # a run at a URI: that line too (a driver lost before the next epoch's record keeps it)
            bar.update(1)
            if on_epoch is not None:
                on_epoch(dict(row))
        bar.close()
        summary = run_summary(config, rows, hello.precision, startup_s, out, named=str(self.target))
        summary["seeds_tampered"] = int(self.data.tampered_ids.size)
        summary["seeds_added"] = self.data.total - len(self.data.train)
        return summary

    def _start(self, progress: Callable[[str], None]) -> tuple[messages.Hello, float]:
        """Wait for the workers' hello and say what the run is and where it resumes."""
        config, data = self.config, self.data
        self.progress = progress
        hello = self._await(0, "start-up")
        startup_s = time.perf_counter() - self.fit_started
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
                f"asd-ray: the resume took {time.perf_counter() - self.started:.1f}s from this driver's start "
                f"to the workers' start-up after epoch {hello.epoch} (the run's records read, its inputs "
                "checked, Ray Train started, the checkpoint loaded)"
            )
        self._report_worker_groups("start-up")
        if data.seeds is not None and (data.seeds.tampered.size or data.trusted is not None):
            progress(
                f"asd-ray: {data.seeds.tampered.size} seed(s) differ from their training copy (pinned to the "
                f"polluted pool as tampered); {data.total - len(data.train)} trusted seed copies join the training set"
            )
        return hello, startup_s

    def _pretrain(self, progress: Callable[[str], None]) -> messages.Weights:
        """Transfer pre-training on the workers (see :func:`asd_ray.steps.transfer_pretraining`);
        its model's figures go to RUN/pretrain.json. Returns the weights epoch 0 starts from."""
        t = self.config.transfer
        start = time.perf_counter()
        result = self._ask(messages.Pretrain(self.data.seed_ids.tolist()), "transfer pre-training")
        figures, _ = self._evaluate(result.weights)
        record = {
            **figures,
            "semi_epochs": t.semi_epochs,
            "head_steps": result.head_steps,
            "labeled": int(self.data.seed_ids.size),
            "train_loss": result.train_loss,
            "wall_s": round(time.perf_counter() - start, 1),
        }
        write_text(self.out / PRETRAIN_FILE, json.dumps(record) + "\n")
        self.publish()
        asr = "" if figures["asr"] is None else f", ASR {100 * figures['asr']:.1f}%"
        progress(
            f"asd-ray: transfer pre-training ({t.semi_epochs} MixMatch epochs with the {record['labeled']} "
            f"seeds labeled, then {record['head_steps']} steps of the head alone): ACC {100 * figures['acc']:.1f}%{asr}; "
            f"{record['wall_s']:.0f}s"
        )
        return result.weights

    def _record(self, weights: messages.Weights, rows: list[dict[str, Any]]) -> None:
        """The last row's model files, then the metrics: its row in RUN/metrics.parquet
        commits the epoch, so a driver killed in between leaves an epoch a resume
        re-evaluates and records again, never a row whose model was not saved."""
        self._keep_model(weights, rows)
        write_metrics(self.out, rows)
        self.publish()  # a run at a URI: this epoch's records, its metrics rows last

    def _keep_model(self, weights: messages.Weights, rows: list[dict[str, Any]]) -> None:
        """RUN/model/last.pt every epoch, best.pt when this epoch is the best so far, card.json."""
        folder = self.out / MODEL_DIR
        row, best = rows[-1], best_row(rows)
        figures = {k: row[k] for k in MODEL_FIGURES}
        save_model(folder, "last", weights, {**self.card, "kind": "last", **figures})
        if best is row:
            save_model(folder, "best", weights, {**self.card, "kind": "best", **figures})
        best_figures = {k: best[k] for k in MODEL_FIGURES}
        write_card(folder, {**self.card, "last": figures, "best": best_figures})

    def _epoch(
        self, epoch: int, weights: messages.Weights, prefetched: _Prefetched | None, *, score_next: bool
    ) -> tuple[dict[str, Any], messages.Weights, _Prefetched | None]:
        """Score, split, write, train, evaluate one epoch; returns its metrics row, the new
        weights and the next epoch's scores (``score_next``: computed in this epoch's
        evaluation pass, same weights, one broadcast)."""
        clock = _EpochClock()
        if self.config.defense == "asd":
            stage = stage_of(epoch, self.config.split)
            scores, meta = self._score(epoch, weights, prefetched, stage, clock)
            split, pools = self._split(epoch, scores, meta, clock)
        else:
            stage, split, pools = 0, None, self._baseline_pools()
        with clock.phase("train_s"):
            trained = self._ask(messages.Train(epoch, split, self.last_evaluation), f"epoch {epoch} training")
        clock.compute_s += trained.compute_s
        figures, prefetched = self._evaluate_and_prefetch(epoch, trained.weights, score_next, clock)
        row = metrics_row(
            {"epoch": epoch, "stage": stage, "defense": self.config.defense},
            figures,
            pools,
            {"train_loss": float(trained.metrics["train_loss"])},
            dataclasses.asdict(clock.times()),
        )
        return row, trained.weights, prefetched

    def _score(
        self,
        epoch: int,
        weights: messages.Weights,
        prefetched: _Prefetched | None,
        stage: int,
        clock: _EpochClock,
    ) -> tuple[pa.Table, pa.Table | None]:
        """The epoch's scores table and, in stage 3, the virtual model's (the meta-split's)."""
        if prefetched is None:
            with clock.phase("score_s"):
                table, compute_s = self._score_training_sets(epoch, weights)
                prefetched = _Prefetched(table, wall_s=0.0, compute_s=compute_s)
        clock.carried_in_s = prefetched.wall_s
        clock.compute_s += prefetched.compute_s
        scores = scores_table(prefetched.table)  # checked before stage 3 spends a virtual epoch
        meta = None
        if stage == 3:
            with clock.phase("virtual_s"):
                virtual = self._ask(messages.Virtual(epoch), f"epoch {epoch} virtual model")
            clock.compute_s += virtual.compute_s
            with clock.phase("score_s"):
                meta_pass, meta_compute_s = self._score_training_sets(epoch, virtual.weights)
                meta = scores_table(meta_pass)
            clock.compute_s += meta_compute_s
        return scores, meta

    def _split(
        self, epoch: int, scores: pa.Table, meta: pa.Table | None, clock: _EpochClock
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
            path = tables.write_parquet(split, split_path(self.out, epoch), "splits")
            masks = pool_masks(split, data.total, self.config.split.holdout_ratio, where=str(path))
            summary = split_summary(split)
        return messages.Pools.pack(*masks), summary

    def _score_training_sets(self, epoch: int, weights: messages.Weights) -> tuple[pa.Table, float]:
        """One scoring pass over the training set (and the trusted copies); its table and arithmetic."""
        result = self.pool.run_many(
            self.training_sets, ray.put(weights), augment_seeds=self._augment_seeds(epoch)
        )
        return self._training_pass(self._scored(result, f"epoch {epoch} scoring"))

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

    def _evaluate_and_prefetch(
        self, epoch: int, weights: messages.Weights, score_next: bool, clock: _EpochClock
    ) -> tuple[dict[str, float | None], _Prefetched | None]:
        """Evaluate the trained weights and, in the same pass, score the next epoch (ASD)."""
        next_names = self.training_sets if score_next and self.config.defense == "asd" else []
        with clock.phase("eval_s"):
            figures, evaluation = self._evaluate(weights, next_names, self._augment_seeds(epoch + 1))
        clock.compute_s += sum(s for name, s in evaluation.compute_s.items() if name not in next_names)
        if not next_names:
            return figures, None
        table, next_compute_s = self._training_pass(evaluation)  # the next epoch's share, by arithmetic
        share = next_compute_s / max(sum(evaluation.compute_s.values()), 1e-9)
        prefetched = _Prefetched(table, clock.wall["eval_s"] * share, next_compute_s)
        clock.carried_out_s = prefetched.wall_s
        return figures, prefetched

    def _evaluate(
        self, weights: messages.Weights, extra: list[str] = (), augment_seeds: dict[str, int] | None = None
    ) -> tuple[dict[str, float | None], PassResult]:
        """ACC on the clean test set and, when given, ASR and robust accuracy on the
        triggered one, in one pass that also scores the datasets in ``extra``."""
        names = ["test", *(["poison_test"] if self.data.poison_test is not None else []), *extra]
        result = self._scored(
            self.pool.run_many(names, ray.put(weights), augment_seeds=augment_seeds), "evaluation"
        )
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

    def _recover_row(self, epoch: int, weights: messages.Weights) -> dict[str, Any]:
        """The metrics row of an epoch that was checkpointed but not recorded (the driver
        stopped in between): evaluated again from the checkpoint; its loss and timings are NaN."""
        if self.config.defense == "asd":
            stage = stage_of(epoch, self.config.split)
            pools = split_summary(tables.read_parquet(split_path(self.out, epoch), "splits"))
        else:
            stage, pools = 0, self._baseline_pools()
        figures, _ = self._evaluate(weights)
        return metrics_row(
            {"epoch": epoch, "stage": stage, "defense": self.config.defense},
            figures,
            pools,
            {"train_loss": float("nan")},
            dataclasses.asdict(EpochTimes.unknown()),
        )

    def close(self, *, finish_task: bool = True) -> None:
        """Stop the scoring pool, the mailbox and the training thread.

        Args:
            finish_task: let the workers end the task in hand and stop. False: workers that
                wait for a task stop at once, and one in the middle of a task is left to the
                ``ray.shutdown`` that follows (an interrupted run does not wait for an epoch
                to end); a resume starts from the last checkpoint.
        """
        try:
            if self.thread.is_alive():
                ray.get(self.mailbox.post_task.remote(messages.Stop()))
                self.thread.join(timeout=120 if finish_task else _STOP_WAIT_S)
        finally:
            self.pool.shutdown()
            if (
                not self.thread.is_alive()
            ):  # else ray.shutdown ends it: a worker waiting on it would fail loudly
                ray.kill(self.mailbox)
            shutil.rmtree(
                self.cache_dir, ignore_errors=True
            )  # this node's; other nodes' go with their processes
