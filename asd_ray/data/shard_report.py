"""``asd-ray shards inspect``: every record of a set read through the verified reader, and a
report of what the set holds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asd_ray import progress, storage, tables
from asd_ray.data.shard_layout import GROUND_TRUTH_FILE
from asd_ray.data.shards import ShardSet
from asd_ray.storage import Location


def inspect_shard_set(folder: str | Path | Location) -> dict:
    """Read and decode every record of a shard set and check it against its manifest.

    Returns:
        A JSON-able report: samples and shards, counts per class, image sizes,
        and whether a ground-truth table is present (and how many it poisons).

    Raises:
        DataError: on the first record that is unreadable or disagrees with the manifest.
    """
    shards = ShardSet(folder)
    per_class = np.zeros(shards.info.num_classes, np.int64)
    sizes: dict[str, int] = {}
    seen = 0
    samples = progress.bar(shards.iter_samples(), total=len(shards), desc="shards inspect")
    for sample in samples:  # checks and counts every record against the manifest
        per_class[sample.label] += 1
        size = "x".join(map(str, sample.image.shape))
        sizes[size] = sizes.get(size, 0) + 1
        seen += 1
    report = {
        "command": "shards inspect",
        "folder": str(shards.folder),
        "samples": seen,
        "shards": len(shards.paths),
        "classes": shards.info.num_classes,
        "per_class": {name: int(n) for name, n in zip(shards.info.class_names, per_class)},
        "image_sizes": sizes,
        "schema": "ok",
        "attack": (shards.info.attack or {}).get("params", {}).get("attack"),  # types checked on open
    }
    truth_path = shards.folder / GROUND_TRUTH_FILE
    if storage.exists(truth_path):
        truth = tables.read_parquet(truth_path, "poison", rows=seen)
        report["ground_truth_poisoned"] = int(np.sum(truth.column("is_poison").to_numpy()))
    return report
