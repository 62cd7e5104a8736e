"""The driver's own path at scale: split tables and the audit on 1,000,000 samples.

Synthetic scores for N samples of C classes (losses drawn per sample, 10 seeds
per class, ground truth for 5% of the samples), then, timed one by one:
``split.make_split`` for a stage-1, a stage-2 and a stage-3 epoch (the meta
pass included), writing each split table (``tables.write_parquet``), and the
audit over those epochs (``audit.history.flag_history``: suspicion scores,
streaks). Peak memory is the process's maximum resident set size.
Targets: every split under 3 s, peak memory under 2 GB.

    python jobs/bench_driver.py [--samples 1000000] [--classes 30]

Prints one line of JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd_ray import tables
from asd_ray.audit.history import flag_history
from asd_ray.config import SplitConfig
from asd_ray.run_folder import EpochTimes, metrics_row, split_path, write_metrics
from asd_ray.split import make_split


def scores(n: int, classes: int, rng: np.random.Generator) -> pa.Table:
    labels = (np.arange(n) % classes).astype(np.int32)
    losses = rng.gamma(2.0, 0.5, n).astype(np.float32)
    return tables.from_pydict({"sample_id": np.arange(n), "label": labels, "loss": losses}, "scores")


def ground_truth(n: int, classes: int, rng: np.random.Generator) -> pa.Table:
    poison = rng.random(n) < 0.05
    labels = (np.arange(n) % classes).astype(np.int32)
    original = np.where(poison, (labels + 1) % classes, labels).astype(np.int32)
    return tables.from_pydict(
        {
            "sample_id": np.arange(n),
            "is_poison": poison,
            "is_modified": poison,
            "original_label": original,
            "label_after": labels,
            "attack": ["badnets"] * n,
            "params": ["{}"] * n,
        },
        "poison",
    )


def epoch_row(epoch: int, stage: int, split: pa.Table) -> dict:
    """The metrics row a run records beside each split table (the audit checks the pools);
    figures and timings are zero here."""
    clean = pc.sum(pc.equal(split.column("pool"), "clean")).as_py()
    pools = {"clean_pool": clean, "polluted_pool": split.num_rows - clean}
    zero_times = EpochTimes(*[0.0] * len(dataclasses.fields(EpochTimes)))
    head = {"epoch": epoch, "stage": stage, "defense": "asd", "acc": 0.0, "train_loss": 0.0}
    return metrics_row(head, pools, dataclasses.asdict(zero_times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1_000_000)
    parser.add_argument("--classes", type=int, default=30)
    args = parser.parse_args()
    n, classes = args.samples, args.classes
    rng = np.random.default_rng(0)
    config = SplitConfig(stage2_epoch=1, stage3_epoch=2)
    seed_ids = np.concatenate([np.flatnonzero(np.arange(n) % classes == c)[:10] for c in range(classes)])
    truth = ground_truth(n, classes, rng)
    result: dict = {"job": "bench_driver", "samples": n, "classes": classes, "split_s": {}, "write_s": {}}
    with tempfile.TemporaryDirectory() as tmp:
        run, rows = Path(tmp), []
        for epoch, stage in ((0, 1), (1, 2), (2, 3)):
            current = scores(n, classes, rng)
            meta = scores(n, classes, rng) if stage == 3 else None
            start = time.perf_counter()
            split = make_split(
                epoch,
                current,
                config=config,
                num_classes=classes,
                seed_ids=seed_ids,
                meta_scores=meta,
                ground_truth=truth,
            )
            result["split_s"][f"stage{stage}"] = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            tables.write_parquet(split, split_path(run, epoch), "splits")
            result["write_s"][f"stage{stage}"] = round(time.perf_counter() - start, 3)
            rows.append(epoch_row(epoch, stage, split))
            del split, current, meta
        write_metrics(run, rows)
        start = time.perf_counter()
        flags = flag_history(run, epochs=[0, 1, 2])
        result["audit_s"] = round(time.perf_counter() - start, 3)
        result["flag_rows"] = int(flags.num_rows)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # Linux: kilobytes
    result["peak_memory_gb"] = round(peak_kb / 1024**2, 3)
    result["meets_targets"] = max(result["split_s"].values()) < 3 and result["peak_memory_gb"] < 2
    print(json.dumps(result))


if __name__ == "__main__":
    main()
