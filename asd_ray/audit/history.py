"""What a run folder says about its samples: read-only, complete epochs only.

An epoch is complete once its metrics row is written (its split table comes
first), so everything here works on a run that is still going. The suspicion
score is :func:`asd_ray.split.suspicion`: a sample's place in its epoch's
splitting order, 0 = most trusted, 1 = least. A run folder is a local folder or an
object-store prefix (:mod:`asd_ray.storage`): a run given as a ``str`` may be a URI.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from asd_ray import run_folder, storage, tables
from asd_ray.errors import ConfigError, DataError
from asd_ray.model_card import CARD_FILE, MODEL_DIR, read_run_card
from asd_ray.run_folder import INPUTS_FILE, METRICS_FILE, RESTORE, split_path
from asd_ray.split import CLEAN, POLLUTED, check_split, in_pool, suspicion
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


CHECKED_COLUMNS = ("sample_id", "stage", "label", "pool", "is_poison")  # what every read of a split checks
SUSPICION_COLUMNS = ("stage", "label", "rank", "pinned")  # what split.suspicion reads


def read_split(run: Run, epoch: int, columns: Sequence[str] | None = None) -> pa.Table:
    """One epoch's split table, row i being sample i, with its ``suspicion`` score appended.

    Rows are matched by ``sample_id``, never by position, and the table must agree
    with the metrics row of its epoch (stage and pools) and with the run's classes
    before anything is sized by it.

    Args:
        columns: read only these columns (``suspicion`` among them, or not) besides
            :data:`CHECKED_COLUMNS`, which every read checks as above. A projected read
            checks the other columns' types (from the file's footer), never their values.

    Raises:
        DataError: a sample id missing, repeated or out of range, a stage or pool
            sizes other than the metrics row's, or a label outside the run's classes.
    """
    path = split_path(storage.location(run), epoch)
    with tables.ParquetReader(path, "splits") as reader:
        split = reader.read(None if columns is None else _to_read(columns))
    split = tables.by_sample_id(split, where=str(path), fix=RESTORE)
    _check_rows(run, split, epoch, _metrics_row(run, epoch), where=str(path), part=False)
    if columns is None or "suspicion" in columns:
        split = split.append_column("suspicion", pa.array(suspicion(split)))
    return split


def _to_read(columns: Sequence[str]) -> list[str]:
    """The split columns a read of ``columns`` (``suspicion`` included) takes from the file."""
    wanted = set(CHECKED_COLUMNS) | set(columns) - {"suspicion"}
    if "suspicion" in columns:
        wanted |= set(SUSPICION_COLUMNS)
    return [c for c in tables.schema("splits").names if c in wanted]


def _metrics_row(run: Run, epoch: int) -> dict[str, Any]:
    """The metrics row of ``epoch``: what its split table is checked against."""
    metrics = read_metrics(run)
    rows = metrics.filter(pc.equal(metrics.column("epoch"), epoch)).to_pylist()
    if not rows:
        raise DataError(
            f"{storage.location(run) / METRICS_FILE}: no row for epoch {epoch}; audit only complete epochs (with a row)"
        )
    return rows[0]


def _check_rows(
    run: Run, split: pa.Table, epoch: int, row: dict[str, Any], *, where: str, part: bool
) -> None:
    """Check the :data:`CHECKED_COLUMNS` of an epoch's split rows against its metrics row
    ``row`` and the run's classes: the whole table (its ids already checked), or a
    ``part`` of it, whose pools may not outnumber the recorded ones."""
    stage = check_split(split, where=where, fix=RESTORE)
    clean = int(in_pool(split, CLEAN).sum())
    pools = (stage, clean, split.num_rows - clean)
    recorded = (row["stage"], row["clean_pool"], row["polluted_pool"])
    fits = pools[1:] == recorded[1:] if not part else pools[1] <= recorded[1] and pools[2] <= recorded[2]
    if pools[0] != recorded[0] or not fits:
        rows = "samples" if not part else f"samples in a part of {sum(recorded[1:])} rows"
        raise DataError(
            f"{where}: stage {pools[0]}, {pools[1]} clean and {pools[2]} polluted {rows}, but "
            f"{METRICS_FILE} records stage {recorded[0]}, {recorded[1]} clean and {recorded[2]} polluted "
            f"in epoch {epoch}; {RESTORE}"
        )
    _check_labels(run, split, sum(recorded[1:]), where=where)


def _check_labels(run: Run, split: pa.Table, samples: int, *, where: str) -> None:
    """Every label of ``split`` (some rows of a table of ``samples`` rows) is one of the run's classes."""
    classes = num_classes(run, samples)
    labels = split.column("label").to_numpy()
    bad = np.flatnonzero((labels < 0) | (labels >= classes))
    if bad.size:
        sample = split.column("sample_id")[int(bad[0])].as_py()
        raise DataError(
            f"{where}: sample {sample} has label {labels[bad[0]]}, outside the run's classes "
            f"0..{classes - 1}; {RESTORE}"
        )


def num_classes(run: Run, samples: int) -> int:
    """The run's class count: its model card's, else at most one class per sample of its
    ``samples`` (every class of an ASD run, the only kind with split tables, has a seed)."""
    card = read_card(run)
    return samples if card is None else card["architecture"]["num_classes"]


def flag_history(run: Run, epochs: list[int] | None = None) -> pa.Table:
    """Per sample over ``epochs`` (default: the complete ones): flags.json's table, from
    Arrow columns (the last epoch's) and per-sample counters, one epoch's pools at a time."""
    epochs = complete_epochs(run) if epochs is None else epochs
    if not epochs:
        raise DataError(f"{run}: no complete epoch with a split table yet")
    last = read_split(run, epochs[-1])
    polluted, streak = _flag_counts(run, epochs, last)
    n = last.num_rows
    columns = {
        "sample_id": last.column("sample_id"),
        "label": last.column("label"),
        "epochs_seen": np.full(n, len(epochs), np.int64),
        "epochs_polluted": polluted.astype(np.int64),
        "flagged_streak": streak.astype(np.int64),
        "last_epoch": np.full(n, epochs[-1], np.int64),
        "last_pool": last.column("pool"),
        "pinned": last.column("pinned"),
        "last_rank": last.column("rank"),
        "suspicion": last.column("suspicion"),
        "loss": last.column("loss"),
        "loss_reduction": last.column("loss_reduction"),
        "is_poison": last.column("is_poison"),
        "original_label": last.column("original_label"),
    }
    return tables.validate(pa.table(columns), "flags")


def _flag_counts(run: Run, epochs: list[int], last: pa.Table | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N,) epochs each sample spent in the polluted pool and its streak there up to the
    last of ``epochs``: counters updated one epoch's pool column at a time (never an
    epochs x N matrix). ``last``: the last epoch's split, when the caller holds it."""
    count = streak = None
    for epoch in epochs:
        split = last if last is not None and epoch == epochs[-1] else read_split(run, epoch, ("pool",))
        polluted = in_pool(split, POLLUTED)
        if count is None:
            count, streak = np.zeros(len(polluted), np.int32), np.zeros(len(polluted), np.int32)
        elif len(polluted) != len(count):
            raise DataError(
                f"{split_path(storage.location(run), epoch)}: {len(polluted)} rows, earlier epochs have "
                f"{len(count)}; {RESTORE}"
            )
        count += polluted
        streak += 1
        streak *= polluted
    assert count is not None and streak is not None  # epochs is never empty
    return count, streak


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
    keep = in_pool(split, POLLUTED)
    if label is not None:
        keep &= split.column("label").to_numpy() == label
    streak = _flag_counts(run, epochs, split)[1][keep]
    rows = split.filter(keep).append_column("flagged_streak", pa.array(streak.astype(np.int64)))
    rows = rows.sort_by([("suspicion", "descending"), ("sample_id", "ascending")])
    rows = rows.append_column("epoch", pa.array(np.full(rows.num_rows, epoch), pa.int64()))
    return rows.slice(0, top) if top is not None else rows


def sample_history(run: Run, sample_id: int) -> list[dict[str, Any]]:
    """One sample's row of every complete epoch's split, with its suspicion.

    Each epoch's row comes from the row group whose sample_id statistics hold it (one
    group of :data:`asd_ray.tables.ROW_GROUP_ROWS` rows in a table asd-ray wrote),
    checked like any part of a split (:func:`_check_rows`) against the table's row count
    (from its footer) and the metrics row. Its suspicion needs the size of its ranking
    group, so ``sample_id`` and :data:`SUSPICION_COLUMNS` are read whole (ids, labels and
    stage checked). Not checked: the other groups' pools, losses and ground truth.
    """
    out = []
    for epoch in complete_epochs(run):
        path = split_path(storage.location(run), epoch)
        row = _metrics_row(run, epoch)
        with tables.ParquetReader(path, "splits") as reader:
            found, position = _sample_row(run, reader, sample_id, epoch, row)
            inputs = reader.read(("sample_id", *SUSPICION_COLUMNS))
        samples = inputs.num_rows
        tables.id_order(inputs.column("sample_id").to_numpy(), where=str(path), fix=RESTORE, n=samples)
        _check_labels(run, inputs, samples, where=str(path))
        stages = pc.unique(inputs.column("stage")).to_pylist()
        if stages != [row["stage"]]:
            raise DataError(
                f"{path}: rows of stage(s) {sorted(stages)}, but {METRICS_FILE} records stage {row['stage']} "
                f"in epoch {epoch}; {RESTORE}"
            )
        score = suspicion(inputs)[position]  # by position in the file, as the row was found
        out.append({"epoch": epoch, **found.to_pylist()[0], "suspicion": float(score)})
    return out


def _sample_row(
    run: Run, reader: tables.ParquetReader, sample_id: int, epoch: int, row: dict[str, Any]
) -> tuple[pa.Table, int]:
    """Sample ``sample_id``'s row of an epoch's split table and its position in the file,
    reading the row groups its statistics may be in until one holds it (statistics may
    lie: a group's ids are checked, and a row is taken for its sample_id alone)."""
    where, metadata = str(reader.where), reader.metadata
    samples = row["clean_pool"] + row["polluted_pool"]
    if metadata.num_rows != samples:
        raise DataError(
            f"{where}: {metadata.num_rows} rows, but {METRICS_FILE} records {samples} samples in epoch "
            f"{epoch}; {RESTORE}"
        )
    if not 0 <= sample_id < samples:
        raise DataError(f"sample {sample_id}: the run's samples are 0..{samples - 1}")
    starts = np.cumsum([0] + [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)])
    for group in reader.row_groups_holding("sample_id", sample_id):
        part = reader.read(row_groups=[group])
        ids = part.column("sample_id").to_numpy()
        tables.id_order(ids, where=where, fix=RESTORE, n=samples, complete=False)
        _check_rows(run, part, epoch, row, where=where, part=True)
        hit = np.flatnonzero(ids == sample_id)
        if hit.size:
            return part.slice(int(hit[0]), 1), int(starts[group] + hit[0])
    raise DataError(f"{where}: no row of sample {sample_id} where its row-group statistics say; {RESTORE}")


def per_class(run: Run, epoch: int | str = "last") -> list[dict[str, Any]]:
    """Pools (and poison, with ground truth) per class in one epoch."""
    split = read_split(run, resolve_epoch(run, epoch), columns=())
    labels = split.column("label").to_numpy()
    polluted = in_pool(split, POLLUTED)
    truth = split.column("is_poison")
    poison = truth.to_numpy(zero_copy_only=False) if truth.null_count == 0 else None
    names = class_names(run)
    classes = int(labels.max()) + 1  # read_split bounds the labels by the run's classes

    def count(mask: np.ndarray) -> np.ndarray:  # (classes,) samples of each class in mask
        return np.bincount(labels[mask], minlength=classes)

    everyone = np.ones(len(labels), bool)
    columns = {"samples": count(everyone), CLEAN: count(~polluted), POLLUTED: count(polluted)}
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
    from asd_ray.data.shard_layout import DATASET_FILE
    from asd_ray.data.shards import ShardSet

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
    clean_seeds = split.column("is_seed").to_numpy(zero_copy_only=False) & in_pool(split, CLEAN)
    fits = split.num_rows - int(trusted.sum()) == len(shards) and not trusted[: len(shards)].any()
    if not fits or not clean_seeds[trusted].all():
        raise DataError(
            f"{where / 'splits'}: {split.num_rows} rows, {int(trusted.sum())} of them trusted seed copies, "
            f"do not fit the {len(shards)} samples of {folder} (one row each, then the copies as clean "
            f"seeds); {RESTORE}"
        )
    return shards
