"""Does ASD stay the same algorithm on more workers? And does a share larger than memory cost speed?

``defense``: ASD with the ``mnist-quick`` preset on the quick-start data
(embedded MNIST subset, BadNets 5%, target 3) at W = 1, 2, 4, 8 training
workers under ``batch_rule=global`` and W = 4 under ``batch_rule=scaled``, one
torch thread per worker, 2 scoring actors, for each of ``--seeds`` seeds
(``config.seed``: model initialisation, batch draws, augmentation). Targets:
at every W, mean last-epoch ASR <= 2% and mean ACC within 1 point of W = 1.

``memory``: MixMatch s/iteration (``steps.mixmatch_epoch``, ResNet-18 at 32 px,
64 + 64, fast path, 2 threads) on a share held in memory against the same share
served from the local-disk cache that ``cluster.memory_budget_gb`` switches to
(budget one tenth of the share). Target: the cached rate >= 0.8x in memory.

    python jobs/bench_scaling.py [--seeds 3] [--workers 1,2,4,8] [--only defense,memory] [--out DIR]

Prints one line of JSON on stdout and Markdown tables on stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def bench_defense(args, root: Path) -> list[dict]:
    """One mnist-quick ASD run per (W, rule, seed); the summary figures of each."""
    import ray

    from asd_ray import tables
    from asd_ray.cluster import RAY_TRAIN_ENV
    from asd_ray.config import load_config
    from asd_ray.demo import prepare_mnist_badnets
    from asd_ray.driver import run
    from asd_ray.run_folder import METRICS_FILE

    inputs = prepare_mnist_badnets(root / "data")
    cells = [(w, "global") for w in args.workers] + [(4, "scaled")]
    widest = max(w for w, _ in cells)
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    ray.init(num_cpus=widest + 2, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
    rows = []
    try:
        for seed in range(args.seeds):
            for workers, rule in cells:
                config = load_config(
                    "mnist-quick",
                    overrides=[
                        f"seed={seed}",
                        f"cluster.workers={workers}",
                        "cluster.scorers=2",
                        "cluster.threads_per_process=1",
                        f"mixmatch.batch_rule={rule}",
                    ],
                )
                out = root / f"w{workers}-{rule}-seed{seed}"
                start = time.perf_counter()
                summary = run(
                    config, inputs, out, resume=(out / "config.yaml").exists(), progress=lambda _: None
                )
                metrics = tables.read_parquet(out / METRICS_FILE, "metrics").to_pylist()
                after_stage1 = [m["asr"] for m in metrics if m["stage"] > 1]
                row = {
                    "workers": workers,
                    "rule": rule,
                    "seed": seed,
                    "acc": summary["acc"],
                    "asr": summary["asr"],
                    "worst_asr_after_stage1": max(after_stage1),
                    "max_poison_fraction_clean": summary["max_poison_fraction_clean"],
                    "wall_s": round(time.perf_counter() - start, 1),
                }
                rows.append(row)
                _log(json.dumps(row))
    finally:
        ray.shutdown()
    return rows


def bench_memory(args, root: Path) -> dict:
    """MixMatch step rate with the share in memory vs served from the disk cache (budget 1/10)."""
    import torch

    from asd_ray import compute
    from asd_ray.batches import WorkerData
    from asd_ray.config import load_config
    from asd_ray.data.shard_writer import write_shards
    from asd_ray.data.shards import ShardSet
    from asd_ray.data.share import load_share
    from asd_ray.data.sources import from_arrays
    from asd_ray.models import ModelSpec
    from asd_ray.steps import mixmatch_epoch

    torch.set_num_threads(2)
    n = args.memory_images
    folder = root / "memory-shards"
    if not folder.exists():
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        write_shards(from_arrays(images, np.arange(n) % 10), folder, name="m", samples_per_shard=5000)
    shards = ShardSet(folder)
    share_bytes = n * 32 * 32 * 3
    config = load_config(
        "cifar10", overrides=[f"mixmatch.iterations={args.memory_steps}", "cluster.workers=1"]
    )
    clean = np.arange(n) % 2 == 0
    shares = {}
    with tempfile.TemporaryDirectory(dir=root) as cache:
        for name, budget in (("memory", None), ("cached", share_bytes // 10)):
            images, ids, labels = load_share(shards, budget_bytes=budget, cache_dir=cache)
            assert isinstance(images, np.memmap) == (budget is not None)
            shares[name] = WorkerData(torch.from_numpy(images), torch.from_numpy(labels), ids)
        models = {}
        for name in shares:
            torch.manual_seed(0)
            models[name] = compute.prepare_model(ModelSpec("resnet18", 10, 3, 32).build(), config.compute)
        optimizers = {k: torch.optim.Adam(m.parameters(), lr=0.002) for k, m in models.items()}
        best = {k: float("inf") for k in shares}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, data in shares.items():
                start = time.perf_counter()
                mixmatch_epoch(models[name], optimizers[name], data, clean, config, epoch=repeat)
                if repeat:
                    best[name] = min(best[name], (time.perf_counter() - start) / args.memory_steps)
        shares.clear()
    return {
        "images": n,
        "share_mb": round(share_bytes / 1e6, 1),
        "budget_mb": round(share_bytes / 10 / 1e6, 1),
        "in_memory_step_s": round(best["memory"], 3),
        "cached_step_s": round(best["cached"], 3),
        "ratio": round(best["memory"] / best["cached"], 3),
    }


def summarise(rows: list[dict]) -> list[dict]:
    """Mean (and spread) over seeds per (W, rule), with the targets checked against W = 1."""
    cells = sorted({(r["workers"], r["rule"]) for r in rows}, key=lambda c: (c[1] != "global", c[0]))
    base = np.mean([r["acc"] for r in rows if r["workers"] == 1 and r["rule"] == "global"])
    out = []
    for workers, rule in cells:
        group = [r for r in rows if r["workers"] == workers and r["rule"] == rule]
        acc, asr = np.array([r["acc"] for r in group]), np.array([r["asr"] for r in group])
        out.append(
            {
                "workers": workers,
                "rule": rule,
                "seeds": len(group),
                "acc_mean": round(float(acc.mean()), 4),
                "acc_sd": round(float(acc.std()), 4),
                "asr_mean": round(float(asr.mean()), 4),
                "asr_max": round(float(asr.max()), 4),
                "worst_asr_after_stage1": round(max(r["worst_asr_after_stage1"] for r in group), 4),
                "max_poison_fraction_clean": round(max(r["max_poison_fraction_clean"] for r in group), 4),
                "wall_s_mean": round(float(np.mean([r["wall_s"] for r in group])), 1),
                "meets_targets": bool(asr.mean() <= 0.02 and abs(acc.mean() - base) <= 0.01),
            }
        )
    return out


def defense_table(summary: list[dict]) -> str:
    lines = [
        "| W | rule | seeds | ACC | last-epoch ASR (mean / max) | worst ASR after stage 1 | max poisoned share of D_C | wall s | targets |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summary:
        lines.append(
            f"| {s['workers']} | {s['rule']} | {s['seeds']} | {100 * s['acc_mean']:.1f}% ± {100 * s['acc_sd']:.1f} | "
            f"{100 * s['asr_mean']:.2f}% / {100 * s['asr_max']:.2f}% | {100 * s['worst_asr_after_stage1']:.2f}% | "
            f"{100 * s['max_poison_fraction_clean']:.2f}% | {s['wall_s_mean']} | {'met' if s['meets_targets'] else 'missed'} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per cell (default 3)")
    parser.add_argument("--workers", default="1,2,4,8", help="worker counts under the global rule")
    parser.add_argument("--only", default="defense,memory", help="comma list of defense, memory")
    parser.add_argument("--out", help="folder for data and runs (default: a temp dir); re-runs resume")
    parser.add_argument("--memory-images", type=int, default=50_000, help="memory: images in the share")
    parser.add_argument("--memory-steps", type=int, default=5, help="memory: MixMatch steps per timing")
    parser.add_argument("--repeats", type=int, default=2, help="memory: timings per side; the best counts")
    args = parser.parse_args()
    args.workers = [int(w) for w in args.workers.split(",")]
    root = Path(args.out or tempfile.mkdtemp(prefix="bench-scaling-")).absolute()
    result: dict = {"job": "bench_scaling", "cores": os.cpu_count()}
    if "defense" in args.only:
        rows = bench_defense(args, root)
        result["defense_runs"] = rows
        result["defense"] = summarise(rows)
        _log(defense_table(result["defense"]))
    if "memory" in args.only:
        result["memory"] = bench_memory(args, root)
        m = result["memory"]
        _log(
            "| share | budget | MixMatch s/iteration | ratio to in memory |\n| --- | --- | --- | --- |\n"
            f"| {m['share_mb']} MB in memory | none | {m['in_memory_step_s']} | 1.0 |\n"
            f"| {m['share_mb']} MB from the disk cache | {m['budget_mb']} MB | {m['cached_step_s']} | {m['ratio']} |"
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
