"""What a run folder says about its samples: read-only, complete epochs only.

An epoch is complete once its metrics row is written (its split table comes
first), so everything here works on a run that is still going. The suspicion
score is :func:`asd_ray.split.suspicion`: a sample's place in its epoch's
splitting order, 0 = most trusted, 1 = least. A run folder is a local folder or an
object-store prefix (:mod:`asd_ray.storage`): a run given as a ``str`` may be a URI.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from asd_ray import run_folder, storage, tables
from asd_ray.errors import ConfigError, DataError
from asd_ray.models.saved import CARD_FILE, MODEL_DIR, read_run_card
from asd_ray.run_folder import INPUTS_FILE, METRICS_FILE, RESTORE, split_path
from asd_ray.split import check_split, suspicion
from asd_ray.storage import Location

if TYPE_CHECKING:
    from asd_ray.data.shards import ShardSet

Run = str | Path | Location  # a run folder: a local path or an object-store URI


def read_metrics(run: Run) -> pa.Table:
    """The run's metrics table, one row per complete epoch, in epoch order.

    Raises:
        DataError: an epoch is repeated (a gap can be left by a crash before its row
            was written, and reads).
    """
    where = storage.location(run)
    if storage.info(where).type != pafs.FileType.Directory:
        raise DataError(f"{where}: no such run folder; pass the --out of `asd-ray run`")
    return run_folder.read_metrics(where)


def complete_epochs(run: Run) -> list[int]:
    """Epochs with both a metrics row and a split table, ascending."""
    epochs = read_metrics(run).column("epoch").to_pylist()
    return [e for e in epochs if storage.is_file(split_path(storage.location(run), e))]


def resolve_epoch(run: Run, epoch: int | str) -> int:
    """``epoch`` as a number: ``last`` or an integer among the complete epochs."""
    epochs = complete_epochs(run)
    if not epochs:
        raise DataError(f"{run}: no complete epoch with a split table yet (a --defense none run has none)")
    if epoch == "last":
        return epochs[-1]
    try:
        value = int(epoch)
    except ValueError:
        raise DataError(f"--epoch {epoch!r}: give a number or 'last'") from None
    if value not in epochs:
        raise DataError(f"--epoch {value}: complete epochs are {epochs[0]}..{epochs[-1]}")
    return value


def read_split(run: Run, epoch: int) -> pa.Table:
    """One epoch's split table, row i being sample i, with its ``suspicion`` score appended.

    Rows are matched by ``sample_id``, never by position, and the table must agree
    with the metrics row of its epoch (stage and pools) and with the run's classes
    before anything is sized by it.

    Raises:
        DataError: a sample id missing, repeated or out of range, a stage or pool
            sizes other than the metrics row's, or a label outside the run's classes.
    """
    path = split_path(storage.location(run), epoch)
    split = tables.by_sample_id(tables.read_parquet(path, "splits"), where=str(path), fix=RESTORE)
    stage = check_split(split, where=str(path), fix=RESTORE)
    rows = [r for r in read_metrics(run).to_pylist() if r["epoch"] == epoch]
    if not rows:
        raise DataError(
            f"{storage.location(run) / METRICS_FILE}: no row for epoch {epoch}; audit only complete epochs (with a row)"
        )
    row = rows[0]
    clean = pc.sum(pc.equal(split.column("pool"), "clean")).as_py()
    pools = (stage, clean, split.num_rows - clean)
    recorded = (row["stage"], row["clean_pool"], row["polluted_pool"])
    if pools != recorded:
        raise DataError(
            f"{path}: stage {pools[0]}, {pools[1]} clean and {pools[2]} polluted samples, but "
            f"{METRICS_FILE} records stage {recorded[0]}, {recorded[1]} clean and {recorded[2]} polluted "
            f"in epoch {epoch}; {RESTORE}"
        )
    classes = num_classes(run, split)
    labels = split.column("label").to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        raise DataError(
            f"{path}: sample {bad[0]} has label {labels[bad[0]]}, outside the run's classes "
            f"0..{classes - 1}; {RESTORE}"
        )
    return split.append_column("suspicion", pa.array(suspicion(split)))


def num_classes(run: Run, split: pa.Table) -> int:
    """The run's class count: its model card's, else at most one class per row (every
    class of an ASD run, the only kind with split tables, has a seed)."""
    card = read_card(run)
    return split.num_rows if card is None else card["architecture"]["num_classes"]


def flag_history(run: Run, epochs: list[int] | None = None) -> pa.Table:
    """Per sample over ``epochs`` (default: the complete ones): flags.json's table."""
    epochs = complete_epochs(run) if epochs is None else epochs
    if not epochs:
        raise DataError(f"{run}: no complete epoch with a split table yet")
    flagged = _flags(run, epochs)
    last = read_split(run, epochs[-1])
    return tables.from_pydict(
        {
            "sample_id": last.column("sample_id").to_numpy(),
            "label": last.column("label").to_numpy(),
            "epochs_seen": np.full(last.num_rows, len(epochs)),
            "epochs_polluted": flagged.sum(0),
            "flagged_streak": _streak(flagged),
            "last_epoch": np.full(last.num_rows, epochs[-1]),
            "last_pool": last.column("pool").to_pylist(),
            "pinned": last.column("pinned").to_pylist(),
            "last_rank": last.column("rank").to_numpy(),
            "suspicion": last.column("suspicion").to_numpy(),
            "loss": last.column("loss").to_numpy(),
            "loss_reduction": last.column("loss_reduction").to_pylist(),
            "is_poison": last.column("is_poison").to_pylist(),
            "original_label": last.column("original_label").to_pylist(),
        },
        "flags",
    )


def _flags(run: Run, epochs: list[int]) -> np.ndarray:
    """(epochs, N) bool: in the polluted pool, from each split table's pool column alone."""
    rows = []
    for epoch in epochs:
        pool = read_split(run, epoch).column("pool")
        if rows and len(pool) != len(rows[0]):
            raise DataError(
                f"{split_path(storage.location(run), epoch)}: {len(pool)} rows, earlier epochs have {len(rows[0])}; "
                f"{RESTORE}"
            )
        rows.append(pc.equal(pool, "polluted").to_numpy(zero_copy_only=False))
    return np.stack(rows)


def _streak(flagged: np.ndarray) -> np.ndarray:
    """(N,) epochs in a row each sample has been flagged, up to the last epoch."""
    streak = np.zeros(flagged.shape[1], np.int64)
    for row in flagged:
        streak = np.where(row, streak + 1, 0)
    return streak


def flagged_samples(
    run: Run, epoch: int | str = "last", *, top: int | None = None, label: int | None = None
) -> pa.Table:
    """The polluted pool of one epoch, most suspicious first, with each sample's streak."""
    epoch = resolve_epoch(run, epoch)
    epochs = [e for e in complete_epochs(run) if e <= epoch]
    split = read_split(run, epoch)
    classes = int(pc.max(split.column("label")).as_py()) + 1  # every class has seeds in every split
    if label is not None and not 0 <= label < classes:
        raise ConfigError(f"--class {label}: the run's classes are 0..{classes - 1}; choose one of them")
    split = split.append_column("flagged_streak", pa.array(_streak(_flags(run, epochs))))
    keep = pc.equal(split.column("pool"), "polluted")
    if label is not None:
        keep = pc.and_(keep, pc.equal(split.column("label"), label))
    rows = split.filter(keep).sort_by([("suspicion", "descending"), ("sample_id", "ascending")])
    rows = rows.append_column("epoch", pa.array(np.full(rows.num_rows, epoch), pa.int64()))
    return rows.slice(0, top) if top is not None else rows


def sample_history(run: Run, sample_id: int) -> list[dict[str, Any]]:
    """One sample's row of every complete epoch's split, with its suspicion."""
    out = []
    for epoch in complete_epochs(run):
        split = read_split(run, epoch)
        if not 0 <= sample_id < split.num_rows:
            raise DataError(f"sample {sample_id}: the run's samples are 0..{split.num_rows - 1}")
        out.append({"epoch": epoch, **split.slice(sample_id, 1).to_pylist()[0]})
    return out


def per_class(run: Run, epoch: int | str = "last") -> list[dict[str, Any]]:
    """Pools (and poison, with ground truth) per class in one epoch."""
    split = read_split(run, resolve_epoch(run, epoch))
    labels = split.column("label").to_numpy()
    polluted = pc.equal(split.column("pool"), "polluted").to_numpy(zero_copy_only=False)
    truth = split.column("is_poison")
    poison = truth.to_numpy(zero_copy_only=False) if truth.null_count == 0 else None
    names = class_names(run)
    classes = int(labels.max()) + 1  # read_split bounds the labels by the run's classes

    def count(mask: np.ndarray) -> np.ndarray:  # (classes,) samples of each class in mask
        return np.bincount(labels[mask], minlength=classes)

    everyone = np.ones(len(labels), bool)
    columns = {"samples": count(everyone), "clean": count(~polluted), "polluted": count(polluted)}
    if poison is not None:
        columns |= {"poisoned": count(poison), "poisoned_in_clean": count(poison & ~polluted)}
    return [
        {
            "class": c,
            "name": names[c] if c < len(names) else str(c),
            **{k: int(v[c]) for k, v in columns.items()},
        }
        for c in range(classes)
    ]


def read_card(run: Run) -> dict[str, Any] | None:
    """RUN/model/card.json, or None before the run's first epoch has written it.

    Raises:
        DataError: it lacks what the audit reads from it (best and last epochs, the
            classes, the training set's identity).
    """
    path = storage.location(run) / MODEL_DIR / CARD_FILE
    if not storage.lexists(path):  # a link is there, and refused
        return None
    return read_run_card(path, fix=RESTORE)


def class_names(run: Run) -> list[str]:
    """The training set's class names (from the model card), or [] before it exists."""
    card = read_card(run)
    return [] if card is None else list(card["classes"])


def train_shards(run: Run, split: pa.Table) -> ShardSet | None:
    """The training shard set the run read, or None if it is no longer where inputs.json
    says (or inputs.json is gone).

    The set must be the one the model card names (same identity, not merely the
    same size) and ``split`` must hold one row per sample of it (plus the seeds'
    trusted copies after them, clean seeds), so record keys and images belong to
    their rows.

    Raises:
        DataError: another shard set, no model card to check it against, or a split
            table that does not fit it.
    """
    from asd_ray.data.shards import DATASET_FILE, ShardSet

    where = storage.location(run)
    if not storage.lexists(where / INPUTS_FILE):  # a link is there, and refused
        return None
    folder = storage.location(run_folder.read_inputs(where)["train"])
    if not storage.is_file(folder / DATASET_FILE):
        return None
    card = read_card(where)
    card_path = where / MODEL_DIR / CARD_FILE
    if card is None:
        raise DataError(
            f"{card_path}: missing, so {folder} cannot be checked as the run's training set; "
            "wait for the run's first epoch to finish, or restore the file"
        )
    shards = ShardSet(folder)
    if shards.identity() != card["data"]["train"]["identity_sha256"]:
        raise DataError(
            f"{where / INPUTS_FILE}: {folder} is not the shard set the run trained on (its identity "
            f'differs from {card_path}); point "train" at the run\'s own training shards'
        )
    trusted = pc.fill_null(pc.equal(split.column("pinned"), "trusted"), False).to_numpy(zero_copy_only=False)
    clean_seeds = pc.and_(split.column("is_seed"), pc.equal(split.column("pool"), "clean"))
    fits = split.num_rows - int(trusted.sum()) == len(shards) and not trusted[: len(shards)].any()
    if not fits or not clean_seeds.to_numpy(zero_copy_only=False)[trusted].all():
        raise DataError(
            f"{where / 'splits'}: {split.num_rows} rows, {int(trusted.sum())} of them trusted seed copies, "
            f"do not fit the {len(shards)} samples of {folder} (one row each, then the copies as clean "
            f"seeds); {RESTORE}"
        )
    return shards
