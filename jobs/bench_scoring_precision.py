"""Does a faster scoring precision keep ASD's split? fp32 against tf32 (GPUs) and bf16.

The split ranks samples by small loss differences, so a precision is only worth its
speed if samples stay on the same side of every stage's cut. On a trained run's
model (default: the quick start's ASD run) this scores the whole training set in
each precision, trains one virtual model (stage 3, as the run would) and compares
with full fp32:

- ``spearman``: rank correlation of the losses (and of stage 3's loss reductions);
- ``same_side_stage1|2|3``: the share of samples on the same side of the stage's cut
  (stage 1: the largest per-class choice of the run's schedule, no seeds; stage 2:
  ``split.clean_ratio`` of the lowest losses; stage 3: ``split.meta_clean_ratio`` of the
  lowest loss reductions);
- ``score_img_s``: scoring images/s on this machine.

A precision may become the default only if it keeps >= 99.9% of samples on their side
in every stage and the defense's figures do not change.

Usage::

    python jobs/quickstart.py                      # once: the trained run it reads
    python jobs/bench_scoring_precision.py [--run runs/quickstart/run-asd] [--repeats 3]

Prints one JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

import asd_ray
from asd_ray import run_folder, split
from asd_ray.batches import WorkerData
from asd_ray.config import ScoringConfig, load_config
from asd_ray.data.shards import ShardSet
from asd_ray.scores import score_images
from asd_ray.steps import virtual_epoch


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Rank correlation of two (N,) arrays (ties broken by position, as the split does)."""
    ranks = [np.argsort(np.argsort(x, kind="stable"), kind="stable").astype(np.float64) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def cuts(labels: np.ndarray, losses: np.ndarray, meta: np.ndarray, config, classes: int) -> dict:
    """(N,) clean masks of the three stages' cuts, from the model's and the virtual model's losses."""
    sc = config.split
    choice = max(split.choice_num(sc.stage2_epoch - 1, sc), 1)
    no_seeds = np.zeros(len(labels), bool)
    return {
        "stage1": split.clean_mask_stage1(labels, losses, no_seeds, classes, choice)[0],
        "stage2": split.clean_mask_stage2(losses, sc.clean_ratio)[0],
        "stage3": split.clean_mask_stage3(losses, meta, sc.meta_clean_ratio)[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/quickstart/run-asd", help="a finished ASD run folder")
    parser.add_argument("--repeats", type=int, default=3, help="timed scoring passes per precision (best)")
    args = parser.parse_args()
    run = Path(args.run)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    config = load_config(None, run / run_folder.CONFIG_FILE)
    model = asd_ray.load_model(run, "last").to(device)
    train = ShardSet(run_folder.read_inputs(run)["train"])
    images, labels = train.load_arrays()
    pixels, targets = torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))
    data = WorkerData(pixels.to(device), targets.to(device), np.arange(len(labels)))
    torch.manual_seed(config.seed)
    virtual = virtual_epoch(model.train(), data, config, epoch=config.split.stage3_epoch).train(False)
    model.train(False)
    precisions = ["fp32", "tf32", "bf16"] if device.type == "cuda" else ["fp32", "bf16"]
    results, reference = {}, None
    for precision in precisions:
        scoring = ScoringConfig(**{**vars(config.scoring), "precision": precision})
        times, losses = [], None
        for _ in range(args.repeats):
            start = time.perf_counter()
            losses = score_images(model, pixels, targets, config.data, scoring, config.compute)[0].numpy()
            times.append(time.perf_counter() - start)
        meta = score_images(virtual, pixels, targets, config.data, scoring, config.compute)[0].numpy()
        masks = cuts(labels, losses, meta, config, train.info.num_classes)
        reference = reference or (losses, losses - meta, masks)
        results[precision] = {
            "score_img_s": round(len(labels) / min(times), 1),
            "spearman_loss": spearman(losses, reference[0]),
            "spearman_reduction": spearman(losses - meta, reference[1]),
            **{f"same_side_{k}": float((m == reference[2][k]).mean()) for k, m in masks.items()},
        }
    print(
        json.dumps(
            {
                "job": "bench_scoring_precision",
                "run": str(run),
                "samples": int(len(labels)),
                "device": torch.cuda.get_device_name()
                if device.type == "cuda"
                else platform.processor() or "cpu",
                "threads": torch.get_num_threads(),
                "precisions": results,
            }
        )
    )


if __name__ == "__main__":
    main()
