"""Which records of a shard set a read covers, and which bytes of which shards hold them.

A pass over the set is cut into balanced contiguous runs, one per scoring actor
(:func:`assign_slices`); a share of scattered samples (every W-th for a training worker,
a page's thumbnails) is read as the byte ranges that hold its records, close ones
coalesced (:meth:`RecordPlaces.kept_runs`); and every read is counted against the ids it
should have got (:meth:`RecordPlaces.check_read`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

import numpy as np

from asd_ray.data.shard_layout import sample_key
from asd_ray.errors import DataError
from asd_ray.storage import Location

SHARD_CHANGED = "a shard was truncated or changed after it was made: re-make the shard set"
# Kept records closer than this are read as one range: reading through the bytes between
# costs less than opening another range (each range is one more request to an object store).
_READ_THROUGH = 1 << 20


@dataclasses.dataclass(frozen=True)
class ShardSlice:
    """Records ``start <= i < stop`` (positions inside the shard) of one shard file."""

    path: Location
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


def assign_slices(
    paths: Sequence[Location], counts: Sequence[int], num_workers: int
) -> list[list[ShardSlice]]:
    """Cut shards with ``counts`` records into ``num_workers`` balanced contiguous runs.

    The scoring actors (:mod:`asd_ray.scoring_pool`) share a set this way: nothing in a
    scoring pass depends on which classes an actor holds (eval mode: batch norm uses its
    running statistics), so each actor opens only the shards its run covers. Ray Train
    workers instead take every W-th sample (see :mod:`asd_ray.train`), so that every
    worker's batches mix all classes even when the shards are sorted by class.
    """
    total = sum(counts)
    bounds = [total * w // num_workers for w in range(num_workers + 1)]
    result: list[list[ShardSlice]] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pieces, first = [], 0
        for path, count in zip(paths, counts):
            start, stop = max(lo - first, 0), min(hi - first, count)
            if start < stop:
                pieces.append(ShardSlice(path, start, stop))
            first += count
        result.append(pieces)
    return result


class RecordPlaces:
    """Where each record of an opened set lies: shard ``i`` holds sample ids
    ``starts[i]..starts[i+1]-1``, and each record starts at its checked manifest offset.

    Args:
        paths: the shard files, in ``dataset.json``'s order.
        starts: (shards + 1,) int64, each shard's first sample id, then the sample count.
        offsets: (N,) int64, each record's first byte in its shard.
        shard_sizes: (shards,) int64, each shard file's size.
    """

    def __init__(
        self, paths: list[Location], starts: np.ndarray, offsets: np.ndarray, shard_sizes: np.ndarray
    ):
        self.paths, self.starts, self.offsets, self.shard_sizes = paths, starts, offsets, shard_sizes
        self._shard_of = {path.name: index for index, path in enumerate(paths)}

    def index_of(self, shard: Location) -> int:
        """The place of ``shard`` in ``dataset.json``'s list."""
        return self._shard_of[shard.name]

    def records_of(self, shard: Location) -> tuple[int, int]:
        """The first sample id of ``shard`` and how many records it holds."""
        index = self._shard_of[shard.name]
        return int(self.starts[index]), int(self.starts[index + 1] - self.starts[index])

    def shard_of(self, sample_id: int) -> int:
        """The index of the shard holding sample ``sample_id``."""
        return int(np.searchsorted(self.starts, sample_id, side="right") - 1)

    def byte_range(self, piece: ShardSlice) -> tuple[int, int | None]:
        """Where a slice's records lie in its shard: from its first record's offset to the
        next record's, or to the shard's end (None: records past dataset.json's count are
        then found)."""
        base, count = self.records_of(piece.path)
        start = int(self.offsets[base + piece.start]) if piece.start < count else 0
        return start, None if piece.stop >= count else int(self.offsets[base + piece.stop])

    def kept_runs(self, keep: np.ndarray | None) -> list[ShardSlice]:
        """The record ranges that hold the samples of ``keep`` (default: every shard whole),
        a range per stretch of a shard whose kept records lie less than :data:`_READ_THROUGH`
        bytes apart: reading through a gap that small costs less than opening another range."""
        counts = np.diff(self.starts)
        if keep is None:
            return [ShardSlice(path, 0, int(n)) for path, n in zip(self.paths, counts) if n]
        ids = np.flatnonzero(keep)
        shard_of = np.searchsorted(self.starts, ids, side="right") - 1
        # where each kept record ends: the next record's offset, or its shard's end
        nxt = np.minimum(ids + 1, int(self.starts[-1]) - 1)
        ends = np.where(ids + 1 < self.starts[shard_of + 1], self.offsets[nxt], self.shard_sizes[shard_of])
        breaks = (shard_of[1:] != shard_of[:-1]) | (self.offsets[ids[1:]] - ends[:-1] > _READ_THROUGH)
        runs = []
        for run in np.split(np.arange(len(ids)), np.flatnonzero(breaks) + 1):
            if run.size:
                shard = int(shard_of[run[0]])
                base = int(self.starts[shard])
                runs.append(
                    ShardSlice(self.paths[shard], int(ids[run[0]]) - base, int(ids[run[-1]]) - base + 1)
                )
        return runs

    def share_ids(self, slices: Iterable[ShardSlice] | None, keep: np.ndarray | None) -> np.ndarray:
        """The sample ids a share holds, in reading order: the records of ``slices`` (default:
        all), of those only the ones where ``keep`` ((N,) bool) is true."""
        if slices is None:
            return np.flatnonzero(keep) if keep is not None else np.arange(int(self.starts[-1]))
        ranges = []
        for piece in slices:
            first = self.records_of(piece.path)[0]
            ranges.append(np.arange(first + piece.start, first + piece.stop))
        ids = np.concatenate(ranges) if ranges else np.zeros(0, np.int64)
        return ids if keep is None else ids[keep[ids]]

    def check_read(
        self, ids: np.ndarray, expected: np.ndarray, *, where: str, cause: str = SHARD_CHANGED
    ) -> None:
        """The one count check of a read: the sample ``ids`` read (by one reader of a shard,
        one process's share, or gathered from every scoring actor) must be ``expected``
        (:meth:`share_ids`), each once; order aside.

        Raises:
            DataError: naming ``where``, both counts, the first sample missing, read twice or
                not expected (its shard, place in it and key) and ``cause`` with the fix.
        """
        ids, expected = np.asarray(ids), np.asarray(expected)
        if ids.size == expected.size and np.array_equal(ids, expected):
            return
        unique, times = np.unique(ids, return_counts=True)
        wrong = [
            (np.setdiff1d(expected, unique), "missing"),
            (unique[times > 1], "read more than once"),
            (np.setdiff1d(unique, expected), "not expected here"),
        ]
        found = [
            f"{bad.size} {what}, the first sample {self._place(int(bad[0]))}"
            for bad, what in wrong
            if bad.size
        ]
        if found:
            raise DataError(
                f"{where}: read {ids.size} records where the manifest lists {expected.size}: "
                f"{'; '.join(found)}; {cause}"
            )

    def _place(self, sample_id: int) -> str:
        """Sample ``sample_id`` and where its record is (shard, place, key), for a message."""
        total = int(self.starts[-1])
        if not 0 <= sample_id < total:
            return f"id {sample_id} (outside the set's 0..{total - 1})"
        shard = self.shard_of(sample_id)
        place = sample_id - int(self.starts[shard])
        return f"{sample_id} (record #{place} of {self.paths[shard].name}, key {sample_key(sample_id)!r})"
