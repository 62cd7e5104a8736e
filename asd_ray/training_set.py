"""The ids a run trains on: the training shard set's 0..N-1, then the seeds' trusted
copies at N..N+E-1.

The trusted copies (clean images of seeds whose training copy differs, or seeds taken
from another set) are written once to RUN/trusted-seeds and decoded by the driver; the
scoring actors and the training workers get them through Ray, so no process but the
driver reads the run folder. Every place that joins the two parts goes through
:class:`TrainingSet`, so the id layout is said once.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa

from asd_ray.data.shards import ShardSet
from asd_ray.data.share import append_rows, load_share
from asd_ray.storage import Location, ObjectVersion

TRAIN = "train"  # the training shard set's name in the scoring pool
TRUSTED = "trusted"  # the trusted copies' name in the scoring pool


def trusted_ids(train_size: int, trusted_count: int) -> np.ndarray:
    """(E,) int64: the trusted copies' training ids, right after the shard set's."""
    return np.arange(train_size, train_size + trusted_count, dtype=np.int64)


@dataclasses.dataclass(frozen=True, repr=False, eq=False)
class TrainingSet:
    """What a process needs to hold its part of the training set, small enough to send
    through Ray: the shard set's place and versions, and the decoded trusted copies."""

    folder: Location  # the training shard set (its storage settings travel with it)
    versions: list[ObjectVersion]  # its shards as the driver saw them: a changed shard is refused
    size: int  # N, the shard set's samples
    trusted: tuple[np.ndarray, np.ndarray] | None  # (E, H, W, C) uint8 images, (E,) int64 labels

    @classmethod
    def of(cls, train: ShardSet, trusted: ShardSet | None) -> TrainingSet:
        """Decode the trusted copies (a few per class) once, on the driver."""
        copies = None
        if trusted is not None:
            images, _, labels = load_share(trusted)
            copies = (images, labels)
        return cls(train.folder, train.versions, len(train), copies)

    @property
    def total(self) -> int:
        """Training samples, trusted copies included."""
        return self.size + self.trusted_count

    @property
    def trusted_count(self) -> int:
        return 0 if self.trusted is None else len(self.trusted[1])

    @property
    def scored(self) -> tuple[str, ...]:
        """The datasets a scoring pass over the training set runs on, by pool name."""
        return (TRAIN, TRUSTED) if self.trusted is not None else (TRAIN,)

    def share(
        self, rank: int, world: int, *, budget_bytes: int | None, cache_dir: str
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Worker ``rank``'s share, decoded: every ``world``-th training id, trusted copies
        included, as (images (n, H, W, C) uint8 or a memmap over budget, ids (n,) int64,
        labels (n,) int64).

        Every world-th sample, so each share mixes all classes even when the shards are
        sorted by class (a contiguous share would give each rank's batch-norm statistics a
        few classes only; scoring actors, which keep no statistics, read contiguous shard
        slices instead: :func:`asd_ray.data.slices.assign_slices`)."""
        shards = ShardSet(self.folder, versions=self.versions)
        images, ids, labels = load_share(
            shards, keep=np.arange(self.size) % world == rank, budget_bytes=budget_bytes, cache_dir=cache_dir
        )
        if self.trusted is not None:
            mine = np.flatnonzero(np.arange(self.size, self.total) % world == rank)
            images = append_rows(images, self.trusted[0][mine])
            ids = np.concatenate([ids, mine + self.size])
            labels = np.concatenate([labels, self.trusted[1][mine]])
        return images, ids, labels

    def pass_table(self, tables: dict[str, pa.Table], schema: pa.Schema) -> pa.Table:
        """One scoring pass's training table: the shard set's rows, then the trusted copies'
        with their ids moved to N.. (a pass numbers each dataset from 0)."""
        table = tables[TRAIN]
        if TRUSTED not in tables:
            return table
        extra = tables[TRUSTED]
        ids = pa.array(extra.column("sample_id").to_numpy() + self.size)
        return pa.concat_tables([table, extra.set_column(0, "sample_id", ids)]).cast(schema)
