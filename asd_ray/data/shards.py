"""The verified reader of shard sets: :class:`ShardSet` opens a set (a local folder or an
object-store prefix), checks its files and manifest, and reads records by their byte ranges.

The data is untrusted: records are read by :mod:`asd_ray.data.records` (which
refuses any member but images, ``cls`` and ``json`` before its bytes are looked
at), and :class:`ShardSet` checks each one against the manifest. This module
knows nothing about losses or training. Sets are written by :mod:`asd_ray.data.shard_writer`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from asd_ray import storage, tables
from asd_ray.data.manifest import Manifest, ManifestIndex, load_index
from asd_ray.data.records import decode_members, iter_records
from asd_ray.data.shard_layout import (
    DATASET_FILE,
    FORMAT_VERSION,
    GROUND_TRUTH_FILE,
    MANIFEST_FILE,
    MAX_DATASET_JSON_BYTES,
    MIN_RECORD_BYTES,
    REMAKE,
    ShardSetInfo,
    parse_dataset_info,
    sample_key,
)
from asd_ray.data.slices import SHARD_CHANGED, RecordPlaces, ShardSlice, assign_slices
from asd_ray.errors import DataError
from asd_ray.storage import Location, ObjectVersion

_DECODE_CHUNK = 64  # records parsed before they are decoded
MAX_SHARDS = 1_000_000  # shard files one set may list


class Sample(NamedTuple):
    """One decoded record (a NamedTuple: cheap to build once per image)."""

    sample_id: int
    key: str
    label: int
    image: np.ndarray  # (H, W, C) uint8
    shard: str


class ShardSet:
    """An opened shard folder (a local folder or an object-store prefix): its ``dataset.json``,
    manifest and shard files.

    Opening a set reads its manifest once, row group by row group, checks it and keeps
    only what reading records needs (:class:`~asd_ray.data.manifest.ManifestIndex`): each
    sample's label and record offset, 12 bytes a sample. Other columns are read again
    from the manifest when asked for (:meth:`manifest_rows`, :meth:`manifest_batches`).

    Args:
        versions: each shard's size and ETag (objects) or mtime (local files) as another
            process saw them when it opened the set (:attr:`versions`); a shard that has
            changed since is refused when it is read.
    """

    def __init__(self, folder: str | Path | Location, *, versions: list[ObjectVersion] | None = None):
        self.folder = storage.location(folder)
        if self.folder.is_local:
            self.folder = storage.location(self.folder.local.absolute(), self.folder.settings)
            if not self.folder.local.is_dir():
                raise DataError(
                    f"shard folder {self.folder} does not exist; create it with `asd-ray shards make`"
                )
        meta_path = self.folder / DATASET_FILE
        entries = storage.list_names(self.folder, limit=MAX_SHARDS + 3)
        if DATASET_FILE not in entries or not storage.is_file(meta_path):
            found = "holds no files" if not entries else f"has no {DATASET_FILE}"
            raise DataError(f"shard folder {self.folder} {found}; create it with `asd-ray shards make`")
        dataset_bytes = storage.read_bytes(meta_path, limit=MAX_DATASET_JSON_BYTES, fix=REMAKE)
        self.info = parse_dataset_info(dataset_bytes, meta_path)
        if self.info.format_version != FORMAT_VERSION:
            raise DataError(f"{meta_path}: format v{self.info.format_version} is not supported")
        self.paths = [self.folder / str(s["file"]) for s in self.info.shards]
        counts = np.array([int(s["count"]) for s in self.info.shards], np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])  # shard i holds ids starts[i]..starts[i+1]-1
        _check_listing(self.folder, entries, self.paths)
        shard_sizes = _check_sizes(self.folder, self.info, self.paths, meta_path)
        manifest_bytes = storage.read_bytes(
            self.folder / MANIFEST_FILE, limit=tables.MAX_TABLE_BYTES, fix=REMAKE
        )
        identity = hashlib.sha256(manifest_bytes + dataset_bytes).hexdigest()
        self._manifest = Manifest(self.folder, len(self), identity)
        self._versions = versions
        self._index = load_index(self._manifest, manifest_bytes, self.info, starts, shard_sizes)
        self._places = RecordPlaces(self.paths, starts, self._index.offsets, shard_sizes)
        self._records = _RecordCheck(self.info.num_classes, self._index, self._places)

    @property
    def versions(self) -> list[ObjectVersion]:
        """Each shard's size and ETag (objects: one HEAD each, made once) or mtime (local)."""
        if self._versions is None:
            self._versions = storage.versions(self.paths)
        return self._versions

    def identity(self) -> str:
        """A sha256 of ``dataset.json`` and the manifest: names the set's records (keys,
        labels, sizes) wherever it is copied or however its location is spelled; model
        cards and seed tables cite it."""
        return self._manifest.identity

    def manifest_batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """:meth:`Manifest.batches <asd_ray.data.manifest.Manifest.batches>` of this set."""
        return self._manifest.batches(columns)

    def manifest_rows(self, ids: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """:meth:`Manifest.rows <asd_ray.data.manifest.Manifest.rows>` of this set."""
        return self._manifest.rows(ids, columns)

    # ------------------------------------------------------------------ samples

    def __len__(self) -> int:
        return self.info.num_samples

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels in sample-id order."""
        return self._index.labels.astype(np.int64)

    def require_uniform_size(self, why: str) -> tuple[int, int, int]:
        """(H, W, C) shared by every image, or a DataError naming a record that differs."""
        shapes = self._index.shapes
        if self._index.uniform_shape is not None:
            return self._index.uniform_shape
        bad = np.flatnonzero((shapes != shapes[0]).any(1))
        if bad.size:
            row = int(bad[0])
            first, other = shapes[0], shapes[row]
            shard = self.paths[self._places.shard_of(row)].name
            raise DataError(
                f"{why} needs one image size, but {self.folder.name}/{shard} record {sample_key(row)!r} is "
                f"{'x'.join(map(str, other))} while the first is {'x'.join(map(str, first))} "
                f"({bad.size} differ); re-make the shards with --image-size"
            )
        return tuple(int(v) for v in shapes[0])

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Decode the whole set into memory: images (N, H, W, C) uint8, labels (N,) int64."""
        h, w, c = self.require_uniform_size("loading into one array")
        images = np.empty((len(self), h, w, c), np.uint8)
        labels = np.empty(len(self), np.int64)
        for sample in self.iter_samples():  # counts every record against dataset.json
            images[sample.sample_id] = sample.image
            labels[sample.sample_id] = sample.label
        return images, labels

    def worker_slices(self, num_workers: int) -> list[list[ShardSlice]]:
        """Split the set into ``num_workers`` contiguous runs of equal sample count (+-1).

        Every sample is read by exactly one worker; a shard may be shared by neighbours
        (by more than two when it holds more than a share), each reading its own record
        range. Why contiguous runs: :func:`~asd_ray.data.slices.assign_slices`.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        counts = [int(s["count"]) for s in self.info.shards]
        return assign_slices(self.paths, counts, num_workers)

    def share_ids(
        self, slices: Iterable[ShardSlice] | None = None, *, keep: np.ndarray | None = None
    ) -> np.ndarray:
        """:meth:`RecordPlaces.share_ids <asd_ray.data.slices.RecordPlaces.share_ids>` of this set."""
        return self._places.share_ids(slices, keep)

    def check_read(
        self, ids: np.ndarray, expected: np.ndarray, *, where: str, cause: str = SHARD_CHANGED
    ) -> None:
        """:meth:`RecordPlaces.check_read <asd_ray.data.slices.RecordPlaces.check_read>` of this set."""
        self._places.check_read(ids, expected, where=where, cause=cause)

    # ------------------------------------------------------------------ reading

    def iter_samples(
        self, slices: Iterable[ShardSlice] | None = None, *, keep: np.ndarray | None = None
    ) -> Iterator[Sample]:
        """Decode samples (all, or those of ``slices``), checked against the manifest
        (see :meth:`iter_checked`)."""
        for sample, _ in self.iter_checked(slices, keep=keep):
            yield sample

    def iter_checked(
        self, slices: Iterable[ShardSlice] | None = None, *, keep: np.ndarray | None = None
    ) -> Iterator[tuple[Sample, dict[str, bytes]]]:
        """The one verified reader: every record decoded, counted and compared with the
        manifest (key, place, label, image size), with its members as stored (an attack
        copies an unchanged record's bytes). Every command reads shard sets through it, so
        a set one command refuses is refused by all.

        A slice is read from its first record's offset to its last record's end: those
        bytes must hold exactly its records, each where the manifest places it. The slices
        of a whole pass (every scoring pass) tile each shard from byte 0, so every pass
        checks that the manifest's offsets are where a plain walk of the tar finds each
        record: no offset can show a reader a record that others do not see.

        Args:
            keep: optional (N,) bool over sample ids; records outside it are skipped
                before decoding (their keys, places and count are still checked). Without
                ``slices``, only the byte ranges holding kept records are read
                (:meth:`~asd_ray.data.slices.RecordPlaces.kept_runs`): a share of every
                W-th sample, or a page's thumbnails, costs what it holds, not the set.
        """
        pieces = list(slices) if slices is not None else self._places.kept_runs(keep)
        with contextlib.ExitStack() as streams:

            def opened(piece: ShardSlice) -> BinaryIO:
                start, stop = self._places.byte_range(piece)
                return streams.enter_context(
                    storage.open_stream(
                        piece.path, expected=self._expected(piece.path), start=start, stop=stop
                    )
                )

            upcoming = opened(pieces[0]) if pieces else None
            for at, piece in enumerate(pieces):
                # The next range opens now: its first bytes arrive while this one is walked.
                stream, upcoming = upcoming, opened(pieces[at + 1]) if at + 1 < len(pieces) else None
                try:
                    yield from self._records.walk(stream, piece, keep)
                finally:
                    stream.close()  # its memory goes now; the stack closes what an error leaves open

    def _expected(self, shard: Location) -> ObjectVersion | None:
        """The version another process saw of an object shard (None: nothing to compare)."""
        if self._versions is None or shard.is_local:
            return None
        if len(self._versions) != len(self.paths):  # dataset.json was rewritten since
            raise DataError(
                f"{self.folder}: lists {len(self.paths)} shards, {len(self._versions)} when the run opened it; "
                "a shard set must not change during a run: restore it or re-make it"
            )
        return self._versions[self._places.index_of(shard)]


@dataclasses.dataclass(frozen=True)
class _RecordCheck:
    """The records of a slice, checked as they are walked: their count, keys and places
    against ``dataset.json`` and the manifest's offsets, then (decoded) their labels and
    image sizes against the manifest's rows."""

    num_classes: int
    index: ManifestIndex
    places: RecordPlaces

    def walk(
        self, stream: BinaryIO, piece: ShardSlice, keep: np.ndarray | None
    ) -> Iterator[tuple[Sample, dict[str, bytes]]]:
        """The records of one slice from ``stream`` (its byte range), checked and decoded."""
        base, count = self.places.records_of(piece.path)
        offsets, name, chunk, read = self.index.offsets, piece.path.name, [], 0
        first = base + piece.start
        start, stop = self.places.byte_range(piece)
        records = iter_records(stream, str(piece.path), base=start, to_end=stop is None)
        for index, key, members, offset in records:
            position = piece.start + index
            if position >= count:
                raise DataError(
                    f"{name}: holds more than the {count} records dataset.json lists; the "
                    "shard was changed after it was made: re-make the shard set"
                )
            sample_id, read = base + position, read + 1
            if key != sample_key(sample_id):
                raise DataError(
                    f"{name}: record {position} has key {key!r}, the manifest expects "
                    f"{sample_key(sample_id)!r}; the shard was changed after it was made: re-make the shard set"
                )
            if offset != offsets[sample_id]:
                raise DataError(
                    f"{name}: record {key!r} lies at byte {offset}, the manifest places it at byte "
                    f"{offsets[sample_id]}; the shard was changed after it was made: re-make the shard set"
                )
            if keep is not None and not keep[sample_id]:
                continue
            chunk.append((sample_id, key, members))
            if len(chunk) == _DECODE_CHUNK:
                yield from self._decode(chunk, name)
                chunk = []
        yield from self._decode(chunk, name)
        whole = piece.start == 0 and piece.stop == count
        self.places.check_read(
            np.arange(first, first + read),
            np.arange(first, base + piece.stop),
            where=name if whole else f"{name} #{piece.start}..#{piece.stop - 1}",
        )

    def _decode(
        self, chunk: list[tuple[int, str, dict[str, bytes]]], shard: str
    ) -> Iterator[tuple[Sample, dict[str, bytes]]]:
        # A chunk of records is parsed first, then decoded: the decoder's working set
        # stays in cache instead of alternating with the tar walk's.
        for sample_id, key, members in chunk:
            label, image = decode_members(members, self.num_classes, shard=shard, key=key)
            expected = int(self.index.labels[sample_id])
            shape = self.index.shape_of(sample_id)
            if label != expected or image.shape != shape:
                raise DataError(
                    f"{shard}: record {key!r} (label {label}, image {image.shape}) disagrees with the "
                    f"manifest (label {expected}, image {shape}); the shard was changed "
                    "after it was made: re-make the shard set"
                )
            yield Sample(sample_id, key, label, image, shard), members


def _check_listing(folder: Location, entries: list[str], paths: list[Location]) -> None:
    """An object prefix holds the set's own files only: a listing with more shards than
    ``dataset.json`` declares (a tampered or mixed-up prefix) is refused. A local folder
    may hold other files, as it always could."""
    if folder.is_local:
        return
    own = {p.name for p in paths} | {DATASET_FILE, MANIFEST_FILE, GROUND_TRUTH_FILE}
    extra = [name for name in entries if name not in own]
    if extra:
        raise DataError(
            f"{folder}: holds {len(extra)} object(s) that {DATASET_FILE} does not declare (first: "
            f"{extra[0]!r}); a shard set's prefix holds only its own files: move them or re-make the set"
        )


def _check_sizes(
    folder: Location, info: ShardSetInfo, paths: list[Location], meta_path: Location
) -> np.ndarray:
    """The counts of ``dataset.json`` against each other and the shard files' sizes, before
    the manifest they size is read (a hostile count must not allocate anything).

    Returns:
        (shards,) int64: each shard file's size.
    """
    counts = [int(s["count"]) for s in info.shards]
    if sum(counts) != info.num_samples:
        raise DataError(
            f"{meta_path}: the shards' counts add up to {sum(counts)}, num_samples is "
            f"{info.num_samples}; re-make the shard set"
        )
    sizes = _shard_file_sizes(folder, paths)
    for path, count in zip(paths, counts):
        size = sizes.get(path.name)
        if size is None:
            raise DataError(f"shard {path} is missing; re-make or re-copy the shard set")
        if count * MIN_RECORD_BYTES > size:
            raise DataError(
                f"{meta_path}: shard {path.name} is {f'{size} bytes' if size else 'empty'}, too small for the "
                f"{count} records it is said to hold; re-make or re-copy the shard set"
            )
    return np.array([sizes[path.name] for path in paths], np.int64)


def _shard_file_sizes(folder: Location, paths: list[Location]) -> dict[str, int]:
    """Each shard file's size by name (one listing of an object prefix), regular files only."""
    if not folder.is_local:
        try:
            found = folder.fs.get_file_info(pafs.FileSelector(folder.fs_path, allow_not_found=True))
        except OSError as err:
            raise storage.failure(folder, err, "listing it") from None
        return {f.base_name: f.size for f in found if f.type == pafs.FileType.File}
    return {p.name: p.local.stat().st_size for p in paths if p.local.is_file()}
