"""The trusted seed set: w clean samples per class that start ASD's stage 1.

Seeds must come from a source the defender trusts: a clean shard set (the same
data before it reached the untrusted pipeline, or another dataset: the paper's
transfer variant), or a user's own list. Benchmarks may instead exclude the
ground-truth poison of the attacked set, which assumes an oracle; the table's
``method`` column records which was used.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa

from asd_ray import tables
from asd_ray.data.shards import ShardSet
from asd_ray.errors import DataError


def pick_seeds(
    shards: ShardSet,
    per_class: int = 10,
    *,
    seed: int = 0,
    exclude: np.ndarray | None = None,
    method: str = "random",
) -> pa.Table:
    """Draw ``per_class`` samples of every class uniformly at random.

    Args:
        shards: the trusted shard set the seeds are read from.
        per_class: w, samples per class.
        seed: seed of the draw (the same seed gives the same table).
        exclude: (N,) bool, samples that may not be drawn (e.g. ground-truth poison).
        method: recorded in the table.

    Returns:
        A seeds table (schemas/seeds.json), sorted by sample_id.

    Raises:
        DataError: if a class has fewer than ``per_class`` candidates.
    """
    if per_class < 1:
        raise ValueError(f"--per-class {per_class} must be >= 1")
    labels = shards.labels
    allowed = np.ones(len(labels), bool) if exclude is None else ~np.asarray(exclude, bool)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls, name in enumerate(shards.info.class_names):
        candidates = np.flatnonzero((labels == cls) & allowed)
        if len(candidates) < per_class:
            raise DataError(
                f"class {cls} ({name!r}) of {shards.folder} has only {len(candidates)} usable "
                f"samples, {per_class} seeds were asked for; lower --per-class or add clean "
                "samples of that class"
            )
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return _seed_table(shards, np.sort(np.concatenate(chosen)), method)


def seeds_from_list(shards: ShardSet, keys: Sequence[str]) -> pa.Table:
    """A seed table from the user's own list of record keys (or sample ids) in ``shards``."""
    key_to_id = {k: i for i, k in enumerate(shards.manifest.column("key").to_pylist())}
    ids = []
    for key in keys:
        key = key.strip()
        if key in key_to_id:
            ids.append(key_to_id[key])
        elif key.isdigit() and int(key) < len(shards):
            ids.append(int(key))
        else:
            raise DataError(f"seed {key!r} is neither a key nor a sample id of {shards.folder}")
    if len(set(ids)) != len(ids):
        raise DataError("the seed list names a sample twice; list each seed once")
    return _seed_table(shards, np.sort(np.array(ids, np.int64)), "user-list")


def read_seed_list(path: str | Path) -> list[str]:
    """Keys or sample ids, one per line; blank lines and ``#`` comments are skipped."""
    lines = Path(path).read_text().splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _seed_table(shards: ShardSet, ids: np.ndarray, method: str) -> pa.Table:
    rows = shards.manifest.take(pa.array(ids))
    n = len(ids)
    return tables.from_pydict(
        {
            "sample_id": ids,
            "key": rows.column("key").to_pylist(),
            "label": rows.column("label").to_pylist(),
            "dataset": [str(shards.folder)] * n,
            "method": [method] * n,
        },
        "seeds",
    )
