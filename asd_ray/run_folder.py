"""What a run folder holds, and the helpers that write and read its records.

    RUN/config.yaml                     the full config (re-read by --resume)
    RUN/inputs.json                     shard folders, seeds and ground-truth paths
    RUN/splits/epoch=NNN/part-0.parquet one split table per epoch (hive layout)
    RUN/metrics.parquet, metrics.jsonl  one row per finished epoch
    RUN/train/                          Ray Train storage: checkpoints of every epoch
    RUN/trusted-seeds/                  the seeds' trusted copies a run trains on, if any
    RUN/pretrain.json                   transfer pre-training's model: ACC, ASR, loss, time
    RUN/model/{last,best}.pt, card.json the trained classifier and its model card
    RUN/summary.json                    the final one-line summary
    RUN/run.log                         every progress line, time-stamped
    RUN/audit/                          what ``asd-ray report`` writes

The driver writes them; :mod:`asd_ray.audit` only reads them. The readers here take a
local folder or a run folder at an object-store URI (:mod:`asd_ray.storage`), which holds
the same names.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import math
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa

from asd_ray import files, storage, tables
from asd_ray.config import RunConfig, StorageConfig
from asd_ray.errors import DataError
from asd_ray.model_card import MODEL_DIR
from asd_ray.storage import Location

CONFIG_FILE, INPUTS_FILE, SUMMARY_FILE = "config.yaml", "inputs.json", "summary.json"
METRICS_FILE, METRICS_JSONL = "metrics.parquet", "metrics.jsonl"
LOCK_FILE = ".lock"
TRUSTED_SEEDS_DIR = "trusted-seeds"  # shard set of the seeds' trusted copies a run trains on
RUN_LOG = "run.log"  # every progress line, time-stamped, across resumes
TRAIN_DIR = "train"  # Ray Train's storage inside the run folder
PRETRAIN_FILE = "pretrain.json"  # figures of the transfer pre-trained model ASD starts from
SPLITS_DIR = "splits"
RESTORE = "restore the run's own file (or run again)"  # the fix for a run folder's damaged record


def split_path(run: Path | Location, epoch: int) -> Path | Location:
    """Where the split table of ``epoch`` lives (hive layout: readable as one dataset)."""
    return run / SPLITS_DIR / f"epoch={epoch:03d}" / "part-0.parquet"


MODEL_FIGURES = ("epoch", "stage", "acc", "asr", "robust_acc")
BEST_RULE = (
    "best.pt is the epoch with the highest ACC on the clean test set (--test) among the epochs of "
    "the latest stage reached (stage 3 once ASD reaches it; every epoch without a defense), ties "
    "going to the later epoch; its test ACC is therefore slightly optimistic. last.pt is the final "
    "epoch, the model the paper reports."
)


def best_row(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics row whose model is ``best.pt`` (:data:`BEST_RULE`)."""
    stage = rows[-1]["stage"]
    return max((r for r in rows if r["stage"] == stage), key=lambda r: (r["acc"], r["epoch"]))


def run_summary(
    config: RunConfig,
    rows: list[dict[str, Any]],
    precision: str,
    startup_s: float,
    out: Path,
    *,
    named: str | None = None,
) -> dict[str, Any]:
    """The run's one-line result: last epoch's figures, the worst ASR, the model files.
    ``named``: the run's location as the user gave it (a URI whose records are staged in
    ``out``); the summary names that, never the staging folder."""
    where = named or str(out)
    last = rows[-1] if rows else {}
    asrs = [(r["asr"], r["epoch"]) for r in rows if r["asr"] is not None]
    worst = max(asrs, default=(None, None))
    best = best_row(rows) if rows else {}
    return {
        "defense": config.defense,
        "acc": last.get("acc"),
        "asr": last.get("asr"),
        "robust_acc": last.get("robust_acc"),
        "asr_worst": worst[0],
        "asr_worst_epoch": worst[1],
        "max_poison_fraction_clean": max(
            (r["poison_fraction_clean"] for r in rows if r["poison_fraction_clean"] is not None),
            default=None,
        ),
        "epochs": len(rows),
        "best_epoch": best.get("epoch"),
        "model": f"{where}/{MODEL_DIR}",
        "precision": precision,
        "train_startup_s": round(startup_s, 1),
        "mean_epoch_s": time_split(rows),
        "run_dir": where,
        **(
            {"pretrain": files.read_json(out / PRETRAIN_FILE, fix=RESTORE)}
            if os.path.lexists(out / PRETRAIN_FILE)
            else {}
        ),
    }


def open_to_append(path: Path, *, readable: bool = False) -> TextIO:
    """``path`` opened for appending (created if missing), a regular file only and never
    through a symbolic link: a run folder handed over may hold a link that points at a file
    elsewhere, or a FIFO that would block the open.

    Raises:
        DataError: ``path`` is a symbolic link, a FIFO or a device.
    """
    flags = os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_NONBLOCK
    flags |= os.O_RDWR if readable else os.O_WRONLY
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as err:
        if err.errno not in (errno.ELOOP, errno.ENXIO):  # ENXIO: a FIFO no one reads
            raise
        kind = "a symbolic link" if err.errno == errno.ELOOP else "a FIFO"
        raise DataError(
            f"{path} is {kind}; a run writes only regular files inside its folder: remove it"
        ) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DataError(
            f"{path} is {files.kind_of(mode)}; a run writes only regular files inside its folder: remove it"
        )
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a+" if readable else "a", encoding="utf-8")


class RunLog:
    """The progress callback, also appending each line to RUN/run.log with a time stamp."""

    def __init__(self, path: Path, progress: Callable[[str], None]):
        self.progress, self.file = progress, open_to_append(path)

    def __call__(self, line: str) -> None:
        self.progress(line)
        self.file.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def tensorboard_writer(out: Path) -> Callable[[dict[str, Any]], None]:
    """A callback writing each metrics row's numbers to RUN/tensorboard (``tensorboard --logdir``)."""
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise DataError("--tensorboard needs the tensorboardX package: pip install tensorboardX") from None
    writer = SummaryWriter(str(out / "tensorboard"))

    def write(row: dict[str, Any]) -> None:
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "epoch" and value == value:  # not NaN
                writer.add_scalar(key, value, row["epoch"])
        writer.flush()

    return write


def write_text(path: Path, text: str) -> None:
    with tables.atomic_file(path) as tmp:
        tmp.write_text(text)


def recorded_config(run: str | Path | Location, settings: StorageConfig | None = None) -> Path | Location:
    """RUN/config.yaml, which marks a folder that ``--resume`` can continue (a local path, or
    the object of a run at a URI, reached with ``settings``).

    Raises:
        DataError: the folder has none (no run was started there).
    """
    where = storage.location(run, settings) / CONFIG_FILE
    if not storage.is_file(where):
        raise DataError(f"--resume {run}: no {CONFIG_FILE} there; start a new run with --out")
    return where.local if where.is_local else where


_START_TEMPORARY = re.compile(rf"\.(?:{re.escape(INPUTS_FILE)}|{re.escape(CONFIG_FILE)})\.\w+\.tmp")


def failed_start(run: Path) -> list[Path] | None:
    """The temporary files in ``run`` when it holds no more than a start cut short leaves
    (the lock, inputs.json, their temporary files: no config.yaml), which a new run may
    take over; None when it holds anything else (a run's records, or files not a run's)."""
    found = list(run.iterdir()) if run.is_dir() else []
    temporary = [p for p in found if _START_TEMPORARY.fullmatch(p.name)]
    if all(p.name in (LOCK_FILE, INPUTS_FILE) for p in found if p not in temporary):
        return temporary
    return None


INPUT_FIELDS = ("train", "test", "poison_test", "seeds", "ground_truth")  # RUN/inputs.json


def read_inputs(run: str | Path | Location) -> dict[str, str | None]:
    """``RUN/inputs.json``: the shard folders, seeds and ground truth the run read.

    Raises:
        DataError: the file is missing, not a regular file (a link, a FIFO), too large or
            deep, not JSON, or not the record a run writes (a path per known field,
            ``train`` and ``test`` always).
    """
    path = storage.location(run) / INPUTS_FILE
    if not storage.lexists(path):
        raise DataError(f"{path}: missing or unreadable; is {run} a run folder?")
    inputs = files.read_json(path, fix=RESTORE)  # a regular file, never through a link, capped
    ok = (
        isinstance(inputs, dict)
        and set(inputs) <= set(INPUT_FIELDS)
        and all(isinstance(inputs.get(k), str) for k in ("train", "test"))
        and all(v is None or isinstance(v, str) for v in inputs.values())
    )
    if not ok:
        raise DataError(
            f'{path}: not a run\'s inputs (a path for "train" and "test", and only {INPUT_FIELDS}); {RESTORE}'
        )
    return inputs


def read_metrics(out: Path | Location) -> pa.Table:
    """RUN/metrics.parquet in epoch order, matched by its ``epoch`` column, not its row order.

    Raises:
        DataError: an epoch recorded twice.
    """
    path = storage.location(out) / METRICS_FILE
    metrics = tables.read_parquet(path, "metrics")
    epochs = metrics.column("epoch").to_numpy()
    order = np.argsort(epochs, kind="stable")
    repeated = epochs[order][1:][np.diff(epochs[order]) == 0]
    if repeated.size:
        raise DataError(f"{path}: epoch {repeated[0]} appears more than once; {RESTORE}")
    return metrics.take(pa.array(order))


def read_metric_rows(out: Path | Location, done: int) -> list[dict[str, Any]]:
    """Metrics rows of a run folder up to epoch ``done`` (empty for a new run)."""
    if done < 0 or not storage.exists(storage.location(out) / METRICS_FILE):
        return []
    return [r for r in read_metrics(out).to_pylist() if r["epoch"] <= done]


def write_metrics(out: Path, rows: list[dict[str, Any]]) -> None:
    """RUN/metrics.jsonl, then RUN/metrics.parquet: the Parquet, which a resume reads back,
    commits the rows (a kill in between leaves its last row to be re-evaluated, and both
    written again). A number JSON cannot hold (a recovered row's NaN loss and timings) is
    null in the JSON lines, the Parquet keeps it."""
    table = tables.from_pydict({k: [r[k] for r in rows] for k in tables.schema("metrics").names}, "metrics")
    with tables.atomic_file(out / METRICS_JSONL) as tmp:
        tmp.write_text("".join(json.dumps(_json_row(r), allow_nan=False) + "\n" for r in rows))
    tables.write_parquet(table, out / METRICS_FILE, "metrics")


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


@dataclasses.dataclass(frozen=True)
class EpochTimes:
    """An epoch's wall seconds by phase: the metrics table's ``*_s`` columns.

    ``epoch_s`` is the whole epoch, ``fixed_s`` what of it is not model arithmetic
    (messages, weight transfers, checkpoints, waiting).
    """

    score_s: float
    virtual_s: float
    split_s: float
    train_s: float
    eval_s: float
    epoch_s: float
    fixed_s: float

    PHASES = ("score_s", "virtual_s", "split_s", "train_s", "eval_s")  # they add up to about epoch_s

    @classmethod
    def unknown(cls) -> EpochTimes:
        """NaN everywhere: an epoch re-evaluated after the driver stopped before recording it."""
        return cls(*[float("nan")] * len(dataclasses.fields(cls)))


def metrics_row(*parts: dict[str, Any]) -> dict[str, Any]:
    """One row of schemas/metrics.json, its columns taken by name from ``parts`` (the epoch
    and stage, evaluation figures, a split summary, the loss, :class:`EpochTimes` as a dict);
    keys the schema does not have are left out, nullable columns may be missing.

    Raises:
        ValueError: a column the schema requires is in no part, or two parts give a key
            different values (a bug, not bad data).
    """
    merged: dict[str, Any] = {}
    for part in parts:
        clash = [k for k in part.keys() & merged.keys() if part[k] != merged[k]]
        if clash:
            raise ValueError(f"metrics row parts disagree on {clash}")
        merged |= part
    schema = tables.schema("metrics")
    missing = [f.name for f in schema if not f.nullable and f.name not in merged]
    if missing:
        raise ValueError(f"metrics row without {missing}")
    return {name: merged.get(name) for name in schema.names}


def time_split(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean seconds per epoch by phase; ``overhead`` is what no phase accounts for, ``fixed``
    everything that is not model arithmetic."""
    if not rows:
        return {}
    names = [f.name for f in dataclasses.fields(EpochTimes)]
    means = {p: float(np.nanmean([r[p] for r in rows])) for p in names}  # NaN: recovered epochs
    means["overhead_s"] = means["epoch_s"] - sum(means[p] for p in EpochTimes.PHASES)
    return {k.removesuffix("_s"): round(v, 3) for k, v in means.items()}


def progress_line(row: dict[str, Any], epochs: int) -> str:
    asr = f" asr {100 * row['asr']:5.1f}%" if row["asr"] is not None else ""
    if row["robust_acc"] is not None:
        asr += f" robust {100 * row['robust_acc']:5.1f}%"
    poison = f" (poisoned {row['poison_in_clean']})" if row["poison_in_clean"] is not None else ""
    return (
        f"epoch {row['epoch'] + 1:>3}/{epochs} stage {row['stage']} | acc {100 * row['acc']:5.1f}%{asr} | "
        f"clean {row['clean_pool']}{poison} polluted {row['polluted_pool']} | loss {row['train_loss']:.3f} | "
        f"score {row['score_s']:.1f}s virtual {row['virtual_s']:.1f}s split {row['split_s']:.2f}s "
        f"train {row['train_s']:.1f}s eval {row['eval_s']:.1f}s total {row['epoch_s']:.1f}s "
        f"(fixed {row['fixed_s']:.2f}s)"
    )
