"""End to end on one GPU with Ray: a training worker and a scorer sharing the GPU, two
epochs of the ``cifar10`` schedule on synthetic 32-px shards, each epoch's times beside
``jobs/bench_gpu.py``'s projection.

The run is the real one (``asd_ray.driver.run``: Ray actors score, the driver
splits, Ray Train trains, then evaluation), stopped resumably after two epochs,
so the schedule is the preset's (1,024 MixMatch steps of 64 + 64 per epoch).
The data: BadNets at 5% over synthetic images whose mean colour depends on the
class (learnable, so the split has something to find), 50,000 training and
10,000 test images, and 10 seeds per class from the clean parent.

It appends JSON lines to ``--out-jsonl`` (default ``$OUT/gpu_run_check.jsonl``)
as it goes: the data, then each epoch's row (score, split, train, evaluation and
whole-epoch seconds, from the run's metrics), with the projection of that epoch
from a ``bench_gpu.jsonl`` when ``--bench`` names one (its ``default`` 32-px
variant: scoring the training set and the test sets, the steps, the per-epoch
rest), then a summary.

    python jobs/gpu_run_check.py [--bench $OUT/bench_gpu.jsonl] [--smoke]

On a device machine without Ray, install the wheels carried there first (the
ray wheel is too large for one call: send it in two parts into /tmp). ``--smoke``
runs a tiny version on the CPU (no GPU requested from Ray).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from asd_ray import progress
from asd_ray.config import load_config
from asd_ray.data.sources import from_arrays
from asd_ray.demo import prepare_badnets


def synthetic(split: str, n: int, size: int = 32, classes: int = 10):
    """A learnable synthetic source: each class has its own mean colour, plus noise."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    labels = np.arange(n) % classes
    colours = np.random.default_rng(2).integers(40, 216, (classes, 3))
    noise = rng.normal(0, 40, (n, size, size, 3))
    images = np.clip(colours[labels][:, None, None, :] + noise, 0, 255).astype(np.uint8)
    return from_arrays(images, labels)


def projected_epoch_s(bench_file: Path, train_n: int, test_n: int, iterations: int) -> float | None:
    """One stage-1 epoch at bench_gpu's rates: score the training set and the two test sets,
    train ``iterations`` steps of the ``default`` 32-px variant, plus its per-epoch rest."""
    if not bench_file.exists():
        return None
    rows = [json.loads(line) for line in bench_file.read_text().splitlines() if line.strip()]
    default = next(
        (r for r in rows if r.get("size") == 32 and r.get("variant") == "default" and "step_s" in r), None
    )
    if default is None:
        return None
    score = (train_n + 2 * test_n) / default["score_img_s"]
    return score + iterations * default["step_s"] + default["epoch_overhead_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="/tmp/gpu_run_check", help="data and run folder")
    parser.add_argument("--train-images", type=int, default=50_000)
    parser.add_argument("--test-images", type=int, default=10_000)
    parser.add_argument("--bench", help="bench_gpu.jsonl to project from (default: beside --out-jsonl)")
    parser.add_argument("--out-jsonl", help="JSON lines file (default $OUT/gpu_run_check.jsonl)")
    parser.add_argument("--smoke", action="store_true", help="tiny, on the CPU")
    args = parser.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    out = Path(args.out_jsonl or out_dir / "gpu_run_check.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    bench = Path(args.bench or out.parent / "bench_gpu.jsonl")
    if args.smoke:
        args.train_images, args.test_images = 400, 100

    def emit(row: dict) -> None:
        line = json.dumps({"job": "gpu_run_check", **row})
        with out.open("a") as f:
            f.write(line + "\n")
        print(line, file=sys.stderr, flush=True)

    work = Path(args.work).absolute()
    if (work / "run").exists():
        sys.exit(
            f"gpu_run_check: {work / 'run'} exists; remove it or choose another --work (each check times a fresh run)"
        )
    start = time.perf_counter()
    sizes = {"train": args.train_images, "test": args.test_images}
    inputs = prepare_badnets(
        work / "data", lambda split: synthetic(split, sizes[split]), samples_per_shard=10_000
    )
    emit(
        {
            "event": "data",
            "train": args.train_images,
            "test": args.test_images,
            "seconds": time.perf_counter() - start,
        }
    )
    overrides = ["cluster.workers=1", "cluster.scorers=1"]
    if args.smoke:
        overrides += ["mixmatch.iterations=2", "mixmatch.batch_labeled=8", "mixmatch.batch_unlabeled=8"]
        overrides += ["scoring.batch_size=64"]
    else:  # one GPU, shared: Ray places both on it
        overrides += ["cluster.gpus_per_worker=0.5", "cluster.gpus_per_scorer=0.5"]
    config = load_config("cifar10", overrides=overrides)
    projection = projected_epoch_s(bench, args.train_images, args.test_images, config.mixmatch.iterations)

    def on_epoch(row: dict) -> None:
        figures = {
            k: row[k] for k in ("epoch", "stage", "acc", "score_s", "split_s", "train_s", "eval_s", "epoch_s")
        }
        emit({"event": "epoch", **figures, "projected_epoch_s": projection})

    from asd_ray.driver import run  # imports Ray: after the data, which needs none

    summary = run(
        config, inputs, work / "run", stop_after_epoch=1, progress=progress.write, on_epoch=on_epoch
    )
    emit(
        {
            "event": "summary",
            "epochs": summary["epochs"],
            "wall_s": time.perf_counter() - start,
            "projected_epoch_s": projection,
        }
    )


if __name__ == "__main__":
    main()
