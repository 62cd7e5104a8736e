"""A long-lived pool of Ray actors that score every sample (:mod:`asd_ray.scores`).

Each actor decodes its own contiguous run of each shard set once
(:func:`asd_ray.data.slices.assign_slices`, so every sample is scored exactly
once; Ray Train workers take every W-th sample instead, see :mod:`asd_ray.train`)
and keeps it in memory as uint8. Once per pass the driver ``ray.put``s the model weights and
every actor receives the same object reference: weights cross the object store
once per pass, never per batch. Actors restart on failure (up to 3 times)
and retry the call (their data is re-read in ``__init__``, the weights come
with every call). With
``scoring.augment`` on, each actor draws its own augmentation stream, so
augmented scores (unlike the default clean ones) depend on the actor count.

The pool never decides a split: it returns ``(sample_id, label, loss,
prediction)`` tables, and :mod:`asd_ray.split` / :mod:`asd_ray.evaluate` use them.
The same actors run stage 3's second pass with the virtual model's weights, and
one pass can cover several datasets with one weight load (the driver fuses the
end-of-epoch evaluation with the next epoch's scoring).
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import pyarrow as pa
import ray
import torch

from asd_ray import compute, freed_memory, storage
from asd_ray.config import ComputeConfig, DataConfig, ScoringConfig
from asd_ray.data.shards import ShardSet
from asd_ray.data.share import load_share, remove_caches
from asd_ray.data.slices import ShardSlice
from asd_ray.errors import user_error_of
from asd_ray.models import ModelSpec, Weights, load_numpy_weights
from asd_ray.placement import Place
from asd_ray.scores import PASS_SCHEMA, score_images
from asd_ray.storage import Location, ObjectVersion


@dataclasses.dataclass(frozen=True)
class Held:
    """A small set the driver holds decoded (the seeds' trusted copies): its images reach
    the actors through Ray, so no actor reads the run folder they were written to."""

    images: np.ndarray  # (n, H, W, C) uint8
    labels: np.ndarray  # (n,) int64
    ids: np.ndarray  # (n,) int64: ids 0..n-1 of the whole set, or an actor's run of them

    @classmethod
    def of(cls, images: np.ndarray, labels: np.ndarray) -> Held:
        return cls(images, labels, np.arange(len(labels)))

    def __len__(self) -> int:
        return len(self.ids)

    def part(self, index: int, parts: int) -> Held:
        """The ``index``-th of ``parts`` contiguous runs (balanced like the shards' slices)."""
        lo, hi = len(self) * index // parts, len(self) * (index + 1) // parts
        return Held(self.images[lo:hi], self.labels[lo:hi], self.ids[lo:hi])


@ray.remote(max_restarts=3, max_task_retries=3)  # a crash that recurs must surface, not loop
class ScoringActor:
    """Holds a share of one or more shard sets and scores it with given weights.

    Each share names its set by location (a local path or an object-store URI, with its
    storage settings) and the shards' versions the driver saw, so an actor on any node
    reads the same bytes or refuses a set that changed."""

    def __init__(
        self,
        held_shares: list[ray.ObjectRef],
        spec: ModelSpec,
        data: DataConfig,
        scoring: ScoringConfig,
        compute_config: ComputeConfig,
        threads: int,
        memory: tuple[int | None, str | None] = (None, None),
    ):
        freed_memory.return_large_blocks()  # the tar walk's windows: see asd_ray.freed_memory
        # name -> (location, versions, slices) of a shard set, or a Held dataset: the pool's object
        shares: dict[str, tuple[Location, list[ObjectVersion], list[ShardSlice]] | Held] = ray.get(
            held_shares[0]
        )
        torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.data, self.scoring, self.compute = data, scoring, compute_config
        model = compute.prepare_model(spec.build(), compute_config)
        self.model = model.to(self.device).train(False)  # eval mode
        self.shares = {}
        for name, share in shares.items():
            if isinstance(share, Held):
                images, ids, labels = share.images, share.ids, share.labels
            else:
                folder, versions, slices = share
                budget, cache_dir = memory
                images, ids, labels = load_share(
                    ShardSet(folder, versions=versions), slices, budget_bytes=budget, cache_dir=cache_dir
                )
            pixels = torch.from_numpy(images)
            if self.device.type == "cuda" and not isinstance(images, np.memmap):
                pixels = pixels.pin_memory()  # batch copies overlap the arithmetic (a disk cache stays)
            self.shares[name] = (pixels, ids, torch.from_numpy(labels))
        self.place = Place.here()  # a restarted actor has another (another node, or pid)

    def close(self) -> None:
        """Drop the shares and their disk caches (before the pool kills this actor)."""
        self.shares.clear()
        remove_caches()

    def loaded(self, name: str) -> tuple[int, int, Place]:
        """How many samples of ``name`` this actor holds, how many transient storage errors
        its loading retried, and where it runs (the run log reports both)."""
        return len(self.shares[name][1]), storage.RetryCounter.take(), self.place

    def score(
        self, names: list[str], weights: Weights, augment_seeds: dict[str, int] | None = None
    ) -> tuple[dict[str, pa.RecordBatch], dict[str, float], Place]:
        """SCE loss and prediction of every held sample of each dataset in ``names``
        (eval mode, no grad, fp32), with the weights loaded once.

        Returns:
            one record batch per name, the seconds each took (model arithmetic only), and
            where this actor runs.
        """
        load_numpy_weights(self.model, weights)
        batches, seconds = {}, {}
        for name in names:
            start = time.perf_counter()
            seed = (augment_seeds or {}).get(name)
            batches[name] = self._score_one(
                name, None if seed is None else torch.Generator().manual_seed(seed)
            )
            seconds[name] = time.perf_counter() - start
        return batches, seconds, self.place

    def _score_one(self, name: str, generator: torch.Generator | None) -> pa.RecordBatch:
        images, ids, labels = self.shares[name]
        loss, prediction = score_images(
            self.model, images, labels, self.data, self.scoring, self.compute, generator=generator
        )
        return pa.RecordBatch.from_arrays(
            [
                pa.array(ids),
                pa.array(labels.numpy().astype(np.int32)),
                pa.array(loss.numpy().astype(np.float32)),
                pa.array(prediction.numpy().astype(np.int32)),
            ],
            schema=PASS_SCHEMA,
        )


@dataclasses.dataclass(frozen=True)
class PassResult:
    """One scoring pass over one or more datasets with the same weights."""

    tables: dict[str, pa.Table]  # name -> N rows (sample_id, label, loss, prediction), sorted by id
    compute_s: dict[str, float]  # name -> seconds of model arithmetic on the slowest actor
    wall_s: float = 0.0  # the whole pass, as the caller waited for it
    restarted: dict[int, Place] = dataclasses.field(default_factory=dict)  # actors Ray restarted during it


class ScoringPool:
    """A fixed set of :class:`ScoringActor` over named shard sets (e.g. train, test, poison_test).

    Results never depend on the number of actors: every sample is scored once,
    and the assembled table is sorted by sample_id.
    """

    def __init__(
        self,
        datasets: dict[str, ShardSet | Held],
        spec: ModelSpec,
        data: DataConfig,
        scoring: ScoringConfig,
        compute_config: ComputeConfig,
        *,
        num_actors: int,
        cpus: float = 1.0,
        gpus: float = 0.0,
        resources: dict[str, float] | None = None,
        threads: int = 1,
        memory: tuple[int | None, str | None] = (None, None),
    ):
        self.datasets = dict(datasets)
        slices = {
            name: shards.worker_slices(num_actors)
            for name, shards in datasets.items()
            if isinstance(shards, ShardSet)
        }

        def share(name: str, i: int):
            dataset = datasets[name]
            if isinstance(dataset, Held):
                return dataset.part(i, num_actors)
            return dataset.folder, dataset.versions, slices[name][i]

        # Each actor's shares as an object this pool holds: Ray builds a restarted actor (its node
        # or process lost) from the same arguments, and an argument it put in the object store
        # itself (a held dataset over 100 KB) is freed once the actor is built. Passed inside a
        # list, so the actor fetches it (Ray warns of every restartable actor built from a
        # reference it resolves itself, though this one stays alive).
        self.shares = [ray.put({name: share(name, i) for name in datasets}) for i in range(num_actors)]
        self.actors = [
            ScoringActor.options(num_cpus=cpus, num_gpus=gpus, resources=resources or {}).remote(
                [self.shares[i]],
                spec,
                data,
                scoring,
                compute_config,
                threads,
                memory,
            )
            for i in range(num_actors)
        ]
        try:  # waits for decoding; bad data surfaces as the actor's DataError, in one line
            loaded = ray.get([a.loaded.remote(next(iter(datasets))) for a in self.actors])
        except ray.exceptions.RayError as err:
            self.shutdown()
            raise user_error_of(err) or err from None
        assert sum(size for size, _, _ in loaded) == len(next(iter(datasets.values())))
        self.storage_retries = sum(retries for _, retries, _ in loaded)  # while the actors loaded
        self.places = [place for _, _, place in loaded]  # by actor index, as the run log names them

    def run(
        self, name: str, weights: Weights | ray.ObjectRef, *, augment_seed: int | None = None
    ) -> pa.Table:
        """One pass over dataset ``name``: a table of N rows (sample_id, label, loss, prediction)."""
        augment_seeds = None if augment_seed is None else {name: augment_seed}
        return self.run_many([name], weights, augment_seeds=augment_seeds).tables[name]

    def run_many(
        self,
        names: list[str],
        weights: Weights | ray.ObjectRef,
        *,
        augment_seeds: dict[str, int] | None = None,
    ) -> PassResult:
        """One pass over several datasets with the same weights (e.g. the end-of-epoch
        evaluation fused with the next epoch's scoring): one weight load per actor.

        Args:
            names: datasets to score.
            weights: numpy weights, or their object reference.
            augment_seeds: name -> seed for datasets scored under training augmentation.
        """
        start = time.perf_counter()
        ref = weights if isinstance(weights, ray.ObjectRef) else ray.put(weights)
        results = ray.get([a.score.remote(names, ref, augment_seeds) for a in self.actors])
        tables = {name: self._assemble(name, [batches[name] for batches, _, _ in results]) for name in names}
        compute_s = {name: max(seconds[name] for _, seconds, _ in results) for name in names}
        restarted = {i: place for i, (_, _, place) in enumerate(results) if place != self.places[i]}
        self.places = [place for _, _, place in results]
        return PassResult(tables, compute_s, time.perf_counter() - start, restarted)

    def _assemble(self, name: str, batches: list[pa.RecordBatch]) -> pa.Table:
        table = pa.Table.from_batches(batches, schema=PASS_SCHEMA).sort_by("sample_id")
        shards = self.datasets[name]
        if isinstance(shards, Held):  # held in memory: every id exactly once, nothing to re-read
            if not np.array_equal(table.column("sample_id").to_numpy(), shards.ids):
                raise RuntimeError(f"scoring {name}: the actors returned other ids than they were given")
            return table
        shards.check_read(
            table.column("sample_id").to_numpy(),
            shards.share_ids(),
            where=f"scoring {name}",
            cause="the shards changed during the run (an actor restarted and read them again) or an "
            "actor misread them: keep a shard set unchanged while a run reads it",
        )
        return table

    def shutdown(self) -> None:
        try:
            ray.get([actor.close.remote() for actor in self.actors], timeout=60)
        except (ray.exceptions.RayError, TimeoutError):
            pass  # a dead actor has no caches left to remove, or leaves them for its restart
        for actor in self.actors:
            ray.kill(actor)
        self.actors, self.shares = [], []
