"""A shard set's ``manifest.parquet``: checked against ``dataset.json`` when the set is opened
and kept as compact per-sample arrays (:class:`ManifestIndex`); its other columns are read
again when asked for (:class:`Manifest`), from the bytes the set was opened with.

The manifest is untrusted like the shards: models are sized from it before any image is
decoded, and the audit hands each flagged sample's shard and key to a data-cleaning step,
so every row is checked (ids, keys, places, labels, image sizes, record offsets) before it
is kept. Only one row group's rows are ever decoded at a time.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd_ray import storage, tables
from asd_ray.data.records import MAX_PIXELS
from asd_ray.data.shard_layout import (
    DATASET_FILE,
    JPEG_MAX_SIDE,
    MANIFEST_FILE,
    MAX_DATASET_JSON_BYTES,
    MIN_RECORD_BYTES,
    REMAKE,
    ShardSetInfo,
    sample_key,
)
from asd_ray.errors import DataError
from asd_ray.storage import Location


@dataclasses.dataclass(frozen=True)
class ManifestIndex:
    """What an opened set keeps of its manifest: 12 bytes a sample (17 when image sizes are
    mixed), so ImageNet-21k's 14 M samples cost 170 MB in every process, not gigabytes."""

    labels: np.ndarray  # (N,) int32
    offsets: np.ndarray  # (N,) int64: where each record starts in its shard
    shapes: np.ndarray | None  # (N, 3) uint16 (H, W, C), only when sizes are mixed
    uniform_shape: tuple[int, int, int] | None  # (H, W, C) of every image, when they share one

    def shape_of(self, sample_id: int) -> tuple[int, ...]:
        """(H, W, C) the manifest gives sample ``sample_id``'s image."""
        return self.uniform_shape or tuple(int(v) for v in self.shapes[sample_id])


class Manifest:
    """``manifest.parquet`` of an opened set, as it was opened: :attr:`identity` is the sha256
    of its bytes and ``dataset.json``'s, and its rows are read again only from bytes that
    still match it (a shard set must not change while it is read)."""

    def __init__(self, folder: Location, num_rows: int, identity: str):
        self.folder, self.num_rows, self.identity = folder, num_rows, identity

    def batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """The manifest's ``columns`` (and ``sample_id``), a row group at a time in id order,
        from the manifest this set was opened with (a changed file is refused)."""
        wanted = ["sample_id", *(c for c in columns if c != "sample_id")]
        yield from self.read_batches(self._unchanged_bytes(), wanted)

    def rows(self, ids: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """The manifest rows of sample ``ids`` (ascending order), ``columns`` of them (and
        ``sample_id``); only the row groups holding them are decoded."""
        ids = np.unique(np.asarray(ids, np.int64))
        if ids.size and not 0 <= ids[0] <= ids[-1] < self.num_rows:
            raise ValueError(f"sample ids must lie in 0..{self.num_rows - 1}")
        wanted = ["sample_id", *(c for c in columns if c != "sample_id")]
        data = self._unchanged_bytes()
        with tables.ParquetReader(
            self.folder / MANIFEST_FILE, "manifest", rows=self.num_rows, data=data
        ) as reader:
            sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
            bounds = np.concatenate([[0], np.cumsum(sizes)])  # ids are 0..N-1 in order (checked on open)
            groups = np.unique(np.searchsorted(bounds, ids, side="right") - 1).tolist()
            pieces = [
                reader.read(wanted, row_groups=[g]).take(
                    pa.array(ids[(ids >= bounds[g]) & (ids < bounds[g + 1])] - bounds[g])
                )
                for g in groups
            ]
        return pa.concat_tables(pieces) if pieces else tables.schema("manifest").empty_table().select(wanted)

    def read_batches(self, data: bytes, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The rows of manifest bytes ``data`` (``columns`` of them, default all), a row group
        at a time, checked against its schema."""
        with tables.ParquetReader(
            self.folder / MANIFEST_FILE, "manifest", rows=self.num_rows, data=data
        ) as reader:
            for group in range(reader.metadata.num_row_groups):
                yield from reader.read(columns, row_groups=[group]).to_batches()

    def _unchanged_bytes(self) -> bytes:
        """The manifest's bytes again, refused if they are not the ones the set was opened with."""
        data = storage.read_bytes(self.folder / MANIFEST_FILE, limit=tables.MAX_TABLE_BYTES, fix=REMAKE)
        meta = storage.read_bytes(self.folder / DATASET_FILE, limit=MAX_DATASET_JSON_BYTES, fix=REMAKE)
        if hashlib.sha256(data + meta).hexdigest() != self.identity:
            raise DataError(
                f"{self.folder}: its manifest changed since it was opened; a shard set must not change "
                "while it is read: restore it or re-make it"
            )
        return data


def load_index(
    manifest: Manifest, data: bytes, info: ShardSetInfo, starts: np.ndarray, shard_sizes: np.ndarray
) -> ManifestIndex:
    """Check the manifest (its bytes ``data``) row group by row group against ``dataset.json``
    (``info``; shard ``i`` holds sample ids ``starts[i]..starts[i+1]-1``) and the shard files'
    sizes; return what is kept of it."""
    n, where, uniform_shape = manifest.num_rows, manifest.folder / MANIFEST_FILE, info.uniform_shape
    labels, offsets = np.empty(n, np.int32), np.empty(n, np.int64)
    shapes = None if uniform_shape else np.empty((n, 3), np.uint16)
    done = 0
    for batch in manifest.read_batches(data):
        rows = len(batch)
        if done + rows > n:
            break  # counted below: more rows than the metadata declared
        _check_rows(batch, done, manifest.folder, info, starts)
        labels[done : done + rows] = batch.column("label").to_numpy()
        offsets[done : done + rows] = batch.column("offset").to_numpy()
        if shapes is not None:
            for axis, column in enumerate(("height", "width", "channels")):
                shapes[done : done + rows, axis] = batch.column(column).to_numpy()
        done += rows
    if done != n:
        raise DataError(f"{where}: holds other than the {n} rows it declares; {REMAKE}")
    _check_offsets(offsets, manifest.folder, starts, shard_sizes)
    return ManifestIndex(labels, offsets, shapes, uniform_shape)


def _check_rows(
    batch: pa.RecordBatch, first: int, folder: Location, info: ShardSetInfo, starts: np.ndarray
) -> None:
    """One row group of the manifest (rows ``first``..) against ``dataset.json``: ids, keys,
    record places, labels and image sizes."""
    where = f"{folder}/{MANIFEST_FILE}"
    ids = np.arange(first, first + len(batch))
    if not np.array_equal(batch.column("sample_id").to_numpy(), ids):
        raise DataError(f"{folder}: manifest sample ids are not 0..N-1 in order")
    expected_keys = pc.utf8_lpad(pc.cast(batch.column("sample_id"), pa.string()), 9, "0")
    wrong = np.flatnonzero(~pc.equal(batch.column("key"), expected_keys).to_numpy(zero_copy_only=False))
    if wrong.size:
        row = int(wrong[0])
        raise DataError(
            f"{where}: row {first + row} has key {batch.column('key')[row].as_py()!r}, asd-ray names "
            f"sample {first + row} {sample_key(first + row)!r}; {REMAKE}"
        )
    files = [str(s["file"]) for s in info.shards]
    # shard names as indices into dataset.json's list (-1: a name it does not list)
    shard_index = pc.fill_null(pc.index_in(batch.column("shard"), pa.array(files)), -1).to_numpy()
    places = batch.column("index_in_shard").to_numpy()
    expected_index = np.searchsorted(starts, ids, side="right") - 1
    expected_places = ids - starts[expected_index]
    wrong = np.flatnonzero((shard_index != expected_index) | (places != expected_places))
    if wrong.size:
        row = int(wrong[0])
        raise DataError(
            f"{where}: row {first + row} places its record at "
            f"{batch.column('shard')[row].as_py()!r} #{places[row]}, {DATASET_FILE} at "
            f"{files[expected_index[row]]!r} #{expected_places[row]}; re-make the shard set"
        )
    labels = batch.column("label").to_numpy()
    outside = np.flatnonzero((labels < 0) | (labels >= info.num_classes))
    if outside.size:
        raise DataError(
            f"{where}: row {first + int(outside[0])} has label {int(labels[outside[0]])}, "
            f"outside the {info.num_classes} classes of {DATASET_FILE}; re-make the shard set"
        )
    _check_image_sizes(batch, first, where, info.uniform_shape)


def _check_image_sizes(batch: pa.RecordBatch, first: int, where: str, uniform_shape: tuple | None) -> None:
    """The image sizes of one row group: each ``dataset.json``'s size, or (mixed sizes) one a
    shard set can hold. Mixed-size records are checked against their own rows when decoded,
    but buffers are sized from the rows before that."""
    heights, widths = (batch.column(c).to_numpy().astype(np.int64) for c in ("height", "width"))
    channels = batch.column("channels").to_numpy()
    if uniform_shape is None:
        bad = np.flatnonzero(
            (heights < 1)
            | (widths < 1)
            | (heights * widths > MAX_PIXELS)
            | (np.maximum(heights, widths) > JPEG_MAX_SIDE)
            | ~np.isin(channels, (1, 3))
        )
        if bad.size:
            row = int(bad[0])
            raise DataError(
                f"{where}: row {first + row} claims a {heights[row]}x{widths[row]}x"
                f"{channels[row]} image, which no shard set holds; re-make the shard set"
            )
        return
    for column, values, value in zip(
        ("height", "width", "channels"), (heights, widths, channels), uniform_shape
    ):
        differ = np.flatnonzero(values != value)
        if differ.size:
            raise DataError(
                f"{where}: row {first + int(differ[0])} has {column} {values[differ[0]]}, "
                f"{DATASET_FILE} says every image is {'x'.join(map(str, uniform_shape))}; "
                "re-make the shard set"
            )


def _check_offsets(
    offsets: np.ndarray, folder: Location, starts: np.ndarray, shard_sizes: np.ndarray
) -> None:
    """Record offsets as a writer leaves them: each shard's first record at byte 0, each
    next one at least a record's size further, the last a record's size before the
    shard's end. Whether a record does lie at its offset is checked whenever it is read
    (:meth:`asd_ray.data.shards.ShardSet.iter_checked` compares every record's place with
    its offset)."""
    counts = np.diff(starts)
    firsts = starts[:-1][counts > 0]
    step = np.diff(offsets)
    within = np.ones(len(step), bool)
    within[firsts[1:] - 1] = False  # the step from one shard's last record to the next's first
    room = np.repeat(shard_sizes, counts) - offsets
    checks = [
        (firsts[offsets[firsts] != 0], "is its shard's first record, which lies at byte 0"),
        (np.flatnonzero(within & (step < MIN_RECORD_BYTES)) + 1, "is too close to the record before it"),
        (np.flatnonzero(room < MIN_RECORD_BYTES), "is too close to its shard's end"),
    ]
    for rows, why in checks:
        if rows.size:
            row = int(rows[0])
            raise DataError(
                f"{folder}/{MANIFEST_FILE}: row {row} places its record at byte {offsets[row]}, "
                f"but it {why}; re-make the shard set"
            )
