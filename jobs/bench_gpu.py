"""GPU throughput of asd-ray's training and scoring functions, and what it implies for a full run.

Times the engine's own functions on synthetic data already on the device as
uint8 (ResNet-18, 32 px and 224 px), on the fast path (``compute.precision=auto``
as a run resolves it for each image size, channels_last; ``--compile`` adds
``torch.compile``; ``--fp32`` times full fp32 (no TF32) in NCHW instead, for the
side-by-side ratio):

- ``train_img_s``: MixMatch training images/s, counting every forward-backward
  image (labeled + both unlabeled views per step: ``steps.mixmatch_epoch``);
- ``score_img_s``: scoring images/s in ``scoring.precision`` (``scoring.score_images``), from
  pinned host memory as the scoring actors hold their share;
- ``virtual_step_s``: one virtual-model step (``steps.virtual_epoch``);
- ``data_wait_share``: the share of a MixMatch step spent assembling its batch
  (indexing + augmentation on the device: ``steps.mixmatch_batches`` alone,
  against whole steps);
- ``ops_per_step`` / ``optimizer_ops``: aten ops dispatched by one MixMatch step
  (forward, backward, copies) and by its optimizer step, counted apart with a
  dispatch counter (not under ``--compile``);
- ``projection_s``: a full ASD run of the ``cifar10`` preset (50,000 training,
  10,000 + 9,000 test images) and of the ``imagenet30`` preset (38,859
  training, 3,000 + 2,900 test images) on one GPU, from those rates and the
  preset's schedule: every epoch scores the training set and evaluates, trains
  ``mixmatch.iterations`` steps; stage-3 epochs add the virtual model's steps
  and a second scoring pass.

Needs no Ray (the device machine may lack it). On a machine without CUDA it runs
on the CPU; ``--smoke`` shrinks everything so the suite runs it in seconds.

    python jobs/bench_gpu.py [--steps 50] [--batch-224 64] [--compile] [--fp32] [--smoke]

Prints one line of JSON on stdout and a table on stderr.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from asd_ray import compute
from asd_ray.config import RunConfig, load_config
from asd_ray.models import ModelSpec
from asd_ray.scoring import score_images
from asd_ray.split import stage_of
from asd_ray.steps import WorkerData, mixmatch_batches, mixmatch_epoch, virtual_epoch

# Dataset sizes of the projections: CIFAR-10, and the ImageNet-30 subset of the ASD paper.
PRESET_SIZES = {"cifar10": (50_000, 10_000, 9_000), "imagenet30": (38_859, 3_000, 2_900)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (forward, backward, copies), except
    while ``paused``: each is a kernel launch on a GPU, where a small step waits on
    the host that dispatches them."""

    def __init__(self) -> None:
        super().__init__()
        self.count, self.paused = 0, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += not self.paused
        return func(*args, **(kwargs or {}))


def dispatched_ops(model, optimizer, data: WorkerData, clean: np.ndarray, config: RunConfig) -> dict:
    """Aten ops of one MixMatch step, the optimizer's step counted apart."""
    one = dataclasses.replace(config, mixmatch=dataclasses.replace(config.mixmatch, iterations=1))
    step, optimizer_ops = optimizer.step, _OpCounter()

    def counted_step(*args, **kwargs):
        counter.paused = True
        try:
            with optimizer_ops:
                return step(*args, **kwargs)
        finally:
            counter.paused = False

    counter = _OpCounter()
    optimizer.step = counted_step
    try:
        with counter:
            mixmatch_epoch(model, optimizer, data, clean, one, epoch=0)
    finally:
        optimizer.step = step
    return {"ops_per_step": counter.count, "optimizer_ops": optimizer_ops.count}


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def bench_size(preset: str, size: int, args, device: torch.device) -> dict:
    """Rates of one image size: train, score, virtual step, data wait."""
    overrides = [
        f"mixmatch.iterations={args.steps}",
        f"virtual.min_steps={args.steps}",
        "virtual.epochs=0",
        "cluster.workers=1",
        f"compute.compile={str(args.compile).lower()}",
    ]
    if args.fp32:
        overrides += ["compute.precision=fp32", "compute.channels_last=false"]
    if size != 32:
        batch = args.batch_224
        overrides += [f"mixmatch.batch_labeled={batch}", f"mixmatch.batch_unlabeled={batch}"]
        overrides += [f"virtual.batch_size={2 * batch}", f"scoring.batch_size={4 * batch}"]
    if args.smoke:
        overrides += ["mixmatch.batch_labeled=4", "mixmatch.batch_unlabeled=4", "virtual.batch_size=8"]
        overrides += ["scoring.batch_size=8"]
    config = load_config(preset, overrides=overrides)
    # as a run's workers do: the precision resolved for this image size, TF32 set to match
    config = dataclasses.replace(config, compute=compute.configure_training(config.compute, device, size))
    n = args.images if not args.smoke else 32
    rng = np.random.default_rng(0)
    host_images = torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    if device.type == "cuda":
        host_images = host_images.pin_memory()  # as the scoring actors hold them
    images, labels = host_images.to(device), (torch.arange(n) % 10).to(device)
    data = WorkerData(images, labels, np.arange(n))
    torch.manual_seed(0)
    base = compute.prepare_model(ModelSpec("resnet18", 10, 3, size).build(), config.compute).to(device)
    model = compute.maybe_compile(base, config.compute)
    optimizer = compute.adam(base.parameters(), config.mixmatch.lr, device)
    clean = np.arange(n) % 2 == 0
    mm = config.mixmatch

    def train() -> None:
        mixmatch_epoch(model, optimizer, data, clean, config, epoch=0)

    def batches_only() -> None:
        stream = mixmatch_batches(data, clean, config, epoch=0)
        for _ in range(mm.iterations):
            next(stream)

    def virtual() -> None:
        virtual_epoch(base, data, config, epoch=0)

    def score() -> None:  # in scoring.precision (full fp32 by default), as the scoring actors run
        score_images(
            base.train(False), host_images, labels.cpu(), config.data, config.scoring, config.compute
        )
        base.train()

    for fn in (train, batches_only, virtual, score):  # warm-up: kernels, allocator, compilation
        fn()
    ops = {} if args.compile else dispatched_ops(model, optimizer, data, clean, config)
    train_s = min(_timed(train, device) for _ in range(args.repeats))
    data_s = min(_timed(batches_only, device) for _ in range(args.repeats))
    virtual_s = min(_timed(virtual, device) for _ in range(args.repeats))
    score_s = min(_timed(score, device) for _ in range(args.repeats))
    per_step_images = mm.batch_labeled + 2 * mm.batch_unlabeled
    return {
        "batch": f"{mm.batch_labeled}+{mm.batch_unlabeled}",
        "precision": config.compute.precision,
        "train_step_s": train_s / mm.iterations,
        "train_img_s": per_step_images * mm.iterations / train_s,
        "score_img_s": n / score_s,
        "virtual_step_s": virtual_s / config.virtual.min_steps,
        "virtual_batch": config.virtual.batch_size,
        "data_wait_share": data_s / train_s,
        **ops,
    }


def project(preset: str, rates: dict) -> float:
    """Seconds of a full ASD run of ``preset`` on one device at the measured rates.

    The step times are scaled to the preset's batch sizes by images per step.
    """
    config: RunConfig = load_config(preset)
    train_n, test_n, poison_n = PRESET_SIZES[preset]
    mm = config.mixmatch
    images_per_step = mm.batch_labeled + 2 * mm.batch_unlabeled
    step_s = images_per_step / rates["train_img_s"]
    virtual_steps = max(
        config.virtual.min_steps, math.ceil(config.virtual.epochs * train_n / config.virtual.batch_size)
    )
    virtual_step_s = rates["virtual_step_s"] * config.virtual.batch_size / rates["virtual_batch"]
    total = 0.0
    for epoch in range(config.epochs):
        passes = 2 if stage_of(epoch, config.split) == 3 else 1
        total += passes * train_n / rates["score_img_s"] + (test_n + poison_n) / rates["score_img_s"]
        total += mm.iterations * step_s
        if passes == 2:
            total += virtual_steps * virtual_step_s
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="MixMatch/virtual steps per timing")
    parser.add_argument("--repeats", type=int, default=3, help="timings per figure; the best counts")
    parser.add_argument("--images", type=int, default=4096, help="synthetic images on the device")
    parser.add_argument(
        "--batch-224", type=int, default=64, help="MixMatch labeled/unlabeled batch at 224 px"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the training model")
    parser.add_argument("--fp32", action="store_true", help="the plain fp32 path, not the fast one")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's CPU run)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats = 2, 1
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = {}
    for preset, size in (("cifar10", 32), ("imagenet30", 224)):
        results[f"{size}px"] = bench_size(preset, size, args, device)
        results[f"{size}px"]["projection_s"] = project(preset, results[f"{size}px"])
    rows = [
        "| size | batch | precision | train img/s | score img/s | virtual step s | data wait | full ASD run |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, r in results.items():
        rows.append(
            f"| {size} | {r['batch']} | {r['precision']} | {r['train_img_s']:,.0f} | {r['score_img_s']:,.0f} | "
            f"{r['virtual_step_s']:.4f} | {100 * r['data_wait_share']:.1f}% | {r['projection_s'] / 60:,.1f} min |"
        )
    print("\n".join(rows), file=sys.stderr)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    out = {
        "job": "bench_gpu",
        "device": name,
        "compile": args.compile,
        "fp32": args.fp32,
        "smoke": args.smoke,
    }
    rounded = {
        size: {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}
        for size, r in results.items()
    }
    print(json.dumps({**out, **rounded}))


if __name__ == "__main__":
    main()
