"""Benchmark the pipeline's hot paths on this machine, fast path against plain fp32.

Every figure times asd-ray's own functions on synthetic data (ResNet-18), side
by side in one run, interleaved repeat by repeat so both sides see the same
machine; each timing is the best of ``--repeats``:

1. ``mixmatch``: s per MixMatch iteration (``steps.mixmatch_epoch``; 64 + 64,
   K = 2 at 32 px, ``--batch-224`` + ``--batch-224`` at 224 px), plain fp32 vs
   the fast path (bf16 autocast + channels_last), and their ratio;
2. ``virtual``: s per virtual-model step (``steps.virtual_epoch``; batch 128 at
   32 px, ``--virtual-batch-224`` at 224 px), likewise;
3. ``scoring``: images/s of the scoring actors (``ScoringPool``; batch 128,
   32 px, 1 CPU and 1 torch thread per actor) with 1 and 2 actors, and the ratio;
4. ``ray_overhead``: the same fast MixMatch step inside Ray Train (W = 1, one
   ``ray.train.report`` per epoch) against the bare in-process loop on the same
   tensors and thread count;
5. ``fixed_cost``: one epoch of each stage of ``mnist-quick`` (ASD on the
   BadNets quick-start data; the schedule compressed to T1 = 1, T2 = 2, T3 = 3,
   everything else as the preset) and the seconds of each epoch that are not
   model arithmetic (``metrics.fixed_s``), as a share of the epoch.

    python jobs/bench_pipeline.py [--repeats 2] [--steps 3] [--out DIR] [--only mixmatch,virtual,...]

Prints one line of JSON on stdout and a Markdown table on stderr. Targets on 2
CPU cores: fast MixMatch step <= 0.5x fp32, 2 actors >= 1.7x one, Ray overhead
<= 10%, fixed cost <= 5% of an epoch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from asd_ray.batches import WorkerData
from asd_ray.config import RunConfig, load_config
from asd_ray.models import ModelSpec
from asd_ray.steps import mixmatch_epoch, virtual_epoch

SECTIONS = ("mixmatch", "virtual", "scoring", "ray_overhead", "fixed_cost")
THREADS = 2
_FAST = ["compute.precision=bf16", "compute.channels_last=true"]
_PLAIN = ["compute.precision=fp32", "compute.channels_last=false"]


def synthetic_share(n: int, size: int, classes: int = 10, seed: int = 0) -> WorkerData:
    """n random uint8 images (n, size, size, 3), balanced labels."""
    rng = np.random.default_rng(seed)
    images = torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    labels = torch.arange(n) % classes
    return WorkerData(images, labels, np.arange(n))


def _config(size: int, mode: list[str], *, batch: int, virtual_batch: int, steps: int) -> RunConfig:
    preset = "cifar10" if size == 32 else "imagenet30"
    return load_config(
        preset,
        overrides=[
            *mode,
            f"mixmatch.iterations={steps}",
            f"mixmatch.batch_labeled={batch}",
            f"mixmatch.batch_unlabeled={batch}",
            f"virtual.batch_size={virtual_batch}",
            f"virtual.min_steps={steps}",
            "virtual.epochs=0",
            "cluster.workers=1",
        ],
    )


def _model(config: RunConfig, size: int) -> torch.nn.Module:
    from asd_ray import compute

    torch.manual_seed(0)
    return compute.prepare_model(ModelSpec("resnet18", 10, 3, size).build(), config.compute)


def time_mixmatch(config: RunConfig, data: WorkerData, model: torch.nn.Module) -> float:
    """Seconds per MixMatch iteration of ``mixmatch_epoch`` (one epoch of ``iterations`` steps)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.mixmatch.lr)
    clean = np.arange(len(data.sample_ids)) % 2 == 0
    start = time.perf_counter()
    mixmatch_epoch(model, optimizer, data, clean, config, epoch=0)
    return (time.perf_counter() - start) / config.mixmatch.iterations


def time_virtual(config: RunConfig, data: WorkerData, model: torch.nn.Module) -> float:
    """Seconds per virtual-model step of ``virtual_epoch`` (copy of the model included)."""
    start = time.perf_counter()
    virtual_epoch(model, data, config, epoch=0)
    return (time.perf_counter() - start) / config.virtual.min_steps


def bench_steps(args, what: str) -> dict:
    """fp32 vs fast path per step, at 32 px and 224 px, interleaved repeat by repeat."""
    timer = time_mixmatch if what == "mixmatch" else time_virtual
    out = {}
    for size, batch, vbatch, n in ((32, 64, 128, 512), (224, args.batch_224, args.virtual_batch_224, 64)):
        data = synthetic_share(n, size)
        modes = {"fp32": _PLAIN, "fast": _FAST}
        configs = {
            m: _config(size, o, batch=batch, virtual_batch=vbatch, steps=args.steps) for m, o in modes.items()
        }
        models = {m: _model(c, size) for m, c in configs.items()}
        warm = {m: _config(size, modes[m], batch=batch, virtual_batch=vbatch, steps=1) for m in modes}
        for m in modes:  # first calls allocate and pick kernels
            timer(warm[m], data, models[m])
        best = {m: float("inf") for m in modes}
        for _ in range(args.repeats):
            for m in modes:
                best[m] = min(best[m], timer(configs[m], data, models[m]))
        key = f"{size}px"
        out[key] = {
            "batch": f"{batch}+{batch}" if what == "mixmatch" else vbatch,
            "fp32_s": round(best["fp32"], 3),
            "fast_s": round(best["fast"], 3),
            "ratio": round(best["fast"] / best["fp32"], 3),
        }
        _log(f"{what} {key}: {out[key]}")
    return out


def bench_scoring(args) -> dict:
    """Images/s of 1 and 2 scoring actors over the same shard set (fp32, batch 128)."""
    import ray

    from asd_ray.config import ComputeConfig, DataConfig, ScoringConfig
    from asd_ray.data.shard_writer import write_shards
    from asd_ray.data.shards import ShardSet
    from asd_ray.data.sources import from_arrays
    from asd_ray.models import to_numpy_weights
    from asd_ray.scoring_pool import ScoringPool

    n = args.scoring_images
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        write_shards(from_arrays(images, np.arange(n) % 10), Path(tmp) / "s", name="s", samples_per_shard=512)
        shards = ShardSet(Path(tmp) / "s")
        spec = ModelSpec("resnet18", 10, 3, 32)
        torch.manual_seed(0)
        ref = ray.put(to_numpy_weights(spec.build()))
        pools = {
            actors: ScoringPool(
                {"train": shards},
                spec,
                DataConfig(),
                ScoringConfig(batch_size=128),
                ComputeConfig(),
                num_actors=actors,
                cpus=1.0,
                threads=1,
            )
            for actors in (1, 2)
        }
        best = {a: float("inf") for a in pools}
        for pool in pools.values():
            pool.run("train", ref)  # warm-up
        for _ in range(args.repeats):
            for actors, pool in pools.items():
                start = time.perf_counter()
                pool.run("train", ref)
                best[actors] = min(best[actors], time.perf_counter() - start)
        for pool in pools.values():
            pool.shutdown()
    rate = {a: n / s for a, s in best.items()}
    out = {
        "images": n,
        "one_actor_img_s": round(rate[1], 1),
        "two_actors_img_s": round(rate[2], 1),
        "ratio": round(rate[2] / rate[1], 3),
    }
    _log(f"scoring: {out}")
    return out


def _ray_train_loop(loop_config: dict) -> None:
    """Ray Train worker: the bench's fast MixMatch step, timed inside the worker."""
    import ray.train

    from asd_ray.train import _quiet_ray_train_logs

    _quiet_ray_train_logs()
    torch.set_num_threads(loop_config["threads"])
    config = load_config(None, None, loop_config["overrides"])
    data = synthetic_share(512, 32)
    model = _model(config, 32)
    warm = load_config(None, None, [*loop_config["overrides"], "mixmatch.iterations=1"])
    time_mixmatch(warm, data, model)
    best = float("inf")
    for _ in range(loop_config["repeats"]):
        start = time.perf_counter()
        time_mixmatch(config, data, model)
        ray.train.report({"seconds": 0.0})  # the per-epoch barrier of the real loop
        best = min(best, (time.perf_counter() - start) / config.mixmatch.iterations)
    Path(loop_config["result"]).write_text(json.dumps({"step_s": best}))


def bench_ray_overhead(args) -> dict:
    """Per-step time of the same fast MixMatch step inside Ray Train (W = 1) and bare."""
    from ray.train import LoggingConfig, ScalingConfig
    from ray.train import RunConfig as TrainRunConfig
    from ray.train.torch import TorchTrainer

    overrides = [*_FAST, f"mixmatch.iterations={args.steps}", "cluster.workers=1"]
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"  # the worker runs on this machine (local Ray)
        loop_config = {
            "overrides": overrides,
            "threads": THREADS,
            "repeats": args.repeats,
            "result": str(result),
        }
        start = time.perf_counter()
        TorchTrainer(
            _ray_train_loop,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": THREADS}),
            run_config=TrainRunConfig(
                storage_path=tmp, name="bench", logging_config=LoggingConfig(log_level="WARNING")
            ),
        ).fit()
        fit_s = time.perf_counter() - start
        ray_step = json.loads(result.read_text())["step_s"]
    config = load_config(None, None, overrides)
    data, model = synthetic_share(512, 32), _model(config, 32)
    time_mixmatch(load_config(None, None, [*overrides, "mixmatch.iterations=1"]), data, model)
    bare = min(time_mixmatch(config, data, model) for _ in range(args.repeats))
    out = {
        "bare_step_s": round(bare, 3),
        "ray_train_step_s": round(ray_step, 3),
        "ratio": round(ray_step / bare, 3),
        "fit_wall_s": round(fit_s, 1),
    }
    _log(f"ray overhead: {out}")
    return out


def bench_fixed_cost(args) -> dict:
    """Fixed (non-arithmetic) seconds of one mnist-quick epoch per stage, as a share."""
    from asd_ray import tables
    from asd_ray.demo import prepare_mnist_badnets
    from asd_ray.driver import run
    from asd_ray.run_folder import METRICS_FILE

    root = Path(args.out or tempfile.mkdtemp(prefix="bench-pipeline-"))
    inputs = prepare_mnist_badnets(root / "data")
    config = load_config(
        "mnist-quick", overrides=["epochs=3", "split.stage2_epoch=1", "split.stage3_epoch=2"]
    )
    run_dir = root / f"fixed-{int(time.time())}"
    summary = run(config, inputs, run_dir, progress=_log)
    rows = tables.read_parquet(run_dir / METRICS_FILE, "metrics").to_pylist()
    per_stage = {
        f"stage{r['stage']}": {
            "epoch_s": round(r["epoch_s"], 2),
            "fixed_s": round(r["fixed_s"], 3),
            "share": round(r["fixed_s"] / r["epoch_s"], 4),
        }
        for r in rows
    }
    total_fixed, total_epoch = sum(r["fixed_s"] for r in rows), sum(r["epoch_s"] for r in rows)
    out = {
        "per_stage": per_stage,
        "mean_fixed_s": round(total_fixed / len(rows), 3),
        "mean_epoch_s": round(total_epoch / len(rows), 2),
        "share": round(total_fixed / total_epoch, 4),
        "train_startup_s": summary["train_startup_s"],
        "precision": summary["precision"],
    }
    _log(f"fixed cost: {out}")
    return out


def _log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _table(results: dict) -> str:
    rows = ["| figure | plain fp32 | fast path | ratio | target |", "| --- | --- | --- | --- | --- |"]
    for what, unit in (("mixmatch", "s/iteration"), ("virtual", "s/step")):
        for size, r in results.get(what, {}).items():
            rows.append(
                f"| {what} {size} (batch {r['batch']}) {unit} | {r['fp32_s']} | {r['fast_s']} | "
                f"{r['ratio']} | {'<= 0.5' if what == 'mixmatch' else '-'} |"
            )
    if "scoring" in results:
        r = results["scoring"]
        rows.append(
            f"| scoring img/s, 1 vs 2 actors | {r['one_actor_img_s']} | {r['two_actors_img_s']} | "
            f"{r['ratio']} | >= 1.7 |"
        )
    if "ray_overhead" in results:
        r = results["ray_overhead"]
        rows.append(
            f"| MixMatch s/iteration, bare vs Ray Train W=1 | {r['bare_step_s']} | {r['ray_train_step_s']} | "
            f"{r['ratio']} | <= 1.10 |"
        )
    if "fixed_cost" in results:
        r = results["fixed_cost"]
        rows.append(
            f"| mnist-quick fixed s / epoch s | {r['mean_fixed_s']} | {r['mean_epoch_s']} | {r['share']} | "
            "<= 0.05 |"
        )
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2, help="timings per figure; the best counts")
    parser.add_argument("--steps", type=int, default=3, help="steps per timing")
    parser.add_argument("--batch-224", type=int, default=8, help="MixMatch labeled/unlabeled batch at 224 px")
    parser.add_argument("--virtual-batch-224", type=int, default=32, help="virtual-model batch at 224 px")
    parser.add_argument("--scoring-images", type=int, default=2048, help="images per scoring pass")
    parser.add_argument("--out", help="folder for the fixed-cost run's data and run (default: a temp dir)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    args = parser.parse_args()
    only = args.only.split(",")
    torch.set_num_threads(THREADS)
    results: dict = {}
    if "mixmatch" in only:
        results["mixmatch"] = bench_steps(args, "mixmatch")
    if "virtual" in only:
        results["virtual"] = bench_steps(args, "virtual")
    if {"scoring", "ray_overhead", "fixed_cost"} & set(only):
        import logging

        import ray

        from asd_ray.cluster import RAY_TRAIN_ENV

        for key, value in RAY_TRAIN_ENV.items():  # before ray.init: its processes inherit them
            os.environ.setdefault(key, value)
        ray.init(num_cpus=4, dashboard_host="127.0.0.1", logging_level=logging.WARNING)
        try:
            if "scoring" in only:
                results["scoring"] = bench_scoring(args)
            if "ray_overhead" in only:
                results["ray_overhead"] = bench_ray_overhead(args)
            if "fixed_cost" in only:
                results["fixed_cost"] = bench_fixed_cost(args)
        finally:
            ray.shutdown()
    _log(_table(results))
    machine = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": THREADS,
    }
    print(json.dumps({"job": "bench_pipeline", "machine": machine, **results}))


if __name__ == "__main__":
    main()
