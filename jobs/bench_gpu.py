"""GPU throughput of asd-ray's training step beside a plain one, and what it implies for full runs.

Made for one short device session: one process, no Ray (the device machine may
lack it), and each variant's figures appended as one JSON line to ``--out``
(default ``$OUT/bench_gpu.jsonl``) the moment it finishes, so a session cut short
still returns what it measured. ResNet-18 on synthetic uint8 images already on
the device, at 32 px (the ``cifar10`` preset's step, 64 + 64) and 224 px
(``imagenet30``'s, ``--batch-224`` + the same).

Variants, per image size (the compiled ones run last, after both sizes' others):

- ``plain``: the plain reference step (:mod:`asd_ray.reference`: eager, full
  fp32, NCHW, multi-tensor Adam, a host read of the loss per step), on the same
  data and draws; every other variant reports its speed as a ratio to it;
- ``default``: the step as a run sets it up (``compute.precision=auto`` resolved
  for the device and size, channels_last, fused Adam);
- ``{fp32,tf32,bf16}-{eager,graphed,compiled}``: each precision, eager, replayed
  as a CUDA graph (``compute.cuda_graphs``; CUDA only) or ``torch.compile``-d;
- ``score-{fp32,tf32,bf16}``: scoring images/s in each ``scoring.precision``.

Figures of a training variant:

- ``train_img_s`` (every forward-backward image: labeled + both unlabeled
  views) and ``ratio_to_plain``; ``step_s`` is the marginal time of a step (two
  epoch lengths timed, so per-epoch costs such as a graph capture drop out) and
  ``epoch_overhead_s`` the rest;
- ``kernels_per_step`` and ``gpu_busy_share`` from the profiler on a GPU (on a
  CPU: aten ops that launch kernels, from a dispatch counter, and null), as the
  difference of epochs of n and 2n steps, so a graph's warm-up and capture drop out;
- ``plan_share``: host time to draw and pack the steps' plans, against the steps;
- ``after_5_steps`` / ``after_20_steps``: from the same weights, the difference
  of the epoch's mean loss, the largest of any parameter and the relative one of
  all against ``compared_with`` (eager variants against ``plain``, graphed and
  compiled ones against the eager step of their precision); a figure that fails
  is noted under ``errors`` and the others stay;
- ``projection_min``: a full ASD run of the preset on one device at these rates
  (every epoch scores the training set and evaluates on clean and poisoned test
  images, trains ``mixmatch.iterations`` steps; stage-3 epochs add the virtual
  model and a second scoring pass), beside ``floor_min``, the same run's FLOPs
  (counted on the step) at the device's dense bf16 peak, and the ``targets``.

    python jobs/bench_gpu.py [--steps 30] [--batch-224 64] [--out FILE] [--smoke]

``--smoke`` runs a few tiny steps of the eager variants on the CPU (the test
suite runs it with ``--sizes 32``). Prints a table on stderr and, last, one JSON summary line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from asd_ray import compute
from asd_ray.batches import WorkerData, mixmatch_plans
from asd_ray.config import RunConfig, load_config
from asd_ray.messages import EpochLosses
from asd_ray.models import ModelSpec
from asd_ray.reference import plain_mixmatch_epoch
from asd_ray.scores import score_images
from asd_ray.split import stage_of
from asd_ray.steps import mixmatch_epoch, virtual_epoch, virtual_schedule

# Dataset sizes of the projections: CIFAR-10, and the ImageNet-30 subset of the ASD paper.
PRESET_SIZES = {"cifar10": (50_000, 10_000, 9_000), "imagenet30": (38_859, 3_000, 2_900)}
TARGETS = {  # issue 21's targets for one H100 or H200
    32: {
        "train_img_s": 30_000,
        "ratio_to_plain": 2.0,
        "score_img_s": 60_000,
        "plan_share": 0.05,
        "run_min": 15,
    },
    224: {"train_img_s": 9_500, "run_min": 60},
}
# Dense bf16 tensor-core peaks (FLOP/s) by device name, for the FLOP floor.
BF16_PEAK = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}
PRECISIONS = ("fp32", "tf32", "bf16")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


@dataclasses.dataclass
class Bench:
    """The data and settings of one image size, shared by its variants."""

    preset: str
    size: int
    args: argparse.Namespace
    device: torch.device
    data: WorkerData
    host_images: torch.Tensor
    clean: np.ndarray

    def config(
        self, precision: str = "auto", *, graphs: bool = False, compiled: bool = False, **extra
    ) -> RunConfig:
        """The preset at this size, resolved as a run's worker resolves it."""
        args, batch = self.args, (self.args.batch_224 if self.size != 32 else 64)
        if args.smoke:
            batch = 4
        overrides = [
            f"mixmatch.batch_labeled={batch}",
            f"mixmatch.batch_unlabeled={batch}",
            f"virtual.batch_size={2 * batch}",
            f"scoring.batch_size={4 * batch}",
            "virtual.epochs=0",
            "cluster.workers=1",
            "mixmatch.noise_overlay=0",  # the paper's step, which the plain reference computes
            f"compute.precision={precision}",
            f"compute.cuda_graphs={str(graphs).lower()}",
            f"compute.compile={str(compiled).lower()}",
            *(f"{k.replace('__', '.')}={v}" for k, v in extra.items()),
        ]
        config = load_config(self.preset, overrides=overrides)
        resolved = compute.configure_training(config.compute, self.device, self.size)
        return dataclasses.replace(config, compute=resolved)

    def model(self, config: RunConfig) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(model as trained, bare model), the same initial weights every time."""
        torch.manual_seed(0)
        base = ModelSpec("resnet18", 10, 3, self.size).build()
        base = compute.prepare_model(base, config.compute).to(self.device)
        return compute.maybe_compile(base, config.compute), base

    def epoch(self, model, optimizer, config: RunConfig, steps: int, epoch: int = 0) -> EpochLosses:
        one = dataclasses.replace(config, mixmatch=dataclasses.replace(config.mixmatch, iterations=steps))
        return mixmatch_epoch(model, optimizer, self.data, self.clean, one, epoch=epoch)


def make_bench(preset: str, size: int, args, device: torch.device) -> Bench:
    n = 32 if args.smoke else args.images
    rng = np.random.default_rng(0)
    host_images = torch.from_numpy(rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8))
    if device.type == "cuda":
        host_images = host_images.pin_memory()  # as the scoring actors hold them
    labels = (torch.arange(n) % 10).to(device)
    data = WorkerData(host_images.to(device), labels, np.arange(n))
    return Bench(preset, size, args, device, data, host_images, np.arange(n) % 2 == 0)


def _params(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().flatten() for p in model.parameters()])


def check_steps(bench: Bench, config: RunConfig | None):
    """The mean loss and the parameters after the first epoch (5 steps: past a graphed
    step's warm-up and capture) and after ``--check-steps`` steps in all, from the shared
    initial weights; then the model and optimizer (a compiled model keeps its compilation)."""
    plain = config is None
    if plain:  # the plain reference: full fp32, NCHW, multi-tensor Adam
        config = bench.config("fp32", compute__channels_last="false")
    model, base = bench.model(config)
    if plain:
        optimizer = torch.optim.Adam(base.parameters(), lr=config.mixmatch.lr, foreach=True)
    else:
        optimizer = compute.adam(base.parameters(), config.mixmatch.lr)
    checkpoints, done = {}, 0
    for epoch, steps in enumerate(_check_epochs(bench.args.check_steps)):
        one = dataclasses.replace(config, mixmatch=dataclasses.replace(config.mixmatch, iterations=steps))
        if plain:
            images, labels = bench.data.images, bench.data.labels
            loss = float(
                np.mean(plain_mixmatch_epoch(model, optimizer, images, labels, bench.clean, one, epoch=epoch))
            )
        else:
            loss = mixmatch_epoch(model, optimizer, bench.data, bench.clean, one, epoch=epoch).train_loss
        done += steps
        checkpoints[done] = (loss, _params(base))
    return checkpoints, model, optimizer, config


def _check_epochs(total: int) -> list[int]:
    first = min(5, total)
    return [first] if total == first else [first, total - first]


def _differences(ours: dict, theirs: dict) -> dict:
    """Loss and parameter differences at each checkpoint (steps done -> loss, parameters).

    The first shows the arithmetic; later ones also Adam's sensitivity: its first updates
    are lr x sign(gradient), so a near-zero gradient rounded the other way moves a weight
    by 2 lr, and training spreads that (measured on the CPU, ResNet-18 at 4 + 4 in fp32
    against the plain step: 1.4e-4 relative after 1 step, 0.02 after 5, 0.12 after 20)."""
    out = {}
    for steps, (loss, params) in ours.items():
        ref_loss, ref_params = theirs[steps]
        diff = params - ref_params
        out[f"after_{steps}_steps"] = {
            "loss_diff": abs(loss - ref_loss),
            "param_max_diff": diff.abs().max().item(),
            "param_rel_diff": (diff.norm() / ref_params.norm()).item(),
        }
    return out


def step_rates(bench: Bench, model, optimizer, config: RunConfig, *, plain: bool) -> dict:
    """Marginal step time and the per-epoch rest, from epochs of ``steps`` and 2 x ``steps``."""
    steps = bench.args.steps

    def run(n: int) -> None:
        if plain:
            one = dataclasses.replace(config, mixmatch=dataclasses.replace(config.mixmatch, iterations=n))
            plain_mixmatch_epoch(
                model, optimizer, bench.data.images, bench.data.labels, bench.clean, one, epoch=1
            )
        else:
            bench.epoch(model, optimizer, config, n, epoch=1)

    run(steps)  # warm-up: allocator, cuDNN's autotuner
    short = min(_timed(lambda: run(steps), bench.device) for _ in range(bench.args.repeats))
    long = min(_timed(lambda: run(2 * steps), bench.device) for _ in range(bench.args.repeats))
    step_s = max((long - short) / steps, 1e-9)
    mm = config.mixmatch
    return {
        "step_s": step_s,
        "epoch_overhead_s": max(short - steps * step_s, 0.0),
        "train_img_s": (mm.batch_labeled + 2 * mm.batch_unlabeled) / step_s,
    }


def kernel_profile(bench: Bench, model, optimizer, config: RunConfig) -> dict:
    """Kernels per step and the GPU-busy share, from the profiler on a GPU (copies count as
    busy, not as kernels), or dispatched kernel ops on a CPU (host planning included).
    Marginal: epochs of n and 2n steps are measured, so a graph's warm-up and capture drop out."""
    n = bench.args.steps
    if bench.device.type != "cuda":
        counts = []
        for steps in (n, 2 * n):
            counter = compute.DispatchCounter()
            with counter:
                bench.epoch(model, optimizer, config, steps, epoch=2)
            counts.append(counter.kernels)
        return {"kernels_per_step": (counts[1] - counts[0]) / n, "gpu_busy_share": None}
    from torch.profiler import ProfilerActivity, profile

    measured = []
    for steps in (n, 2 * n):
        _sync(bench.device)
        start = time.perf_counter()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            bench.epoch(model, optimizer, config, steps, epoch=2)
            _sync(bench.device)
        wall_us = (time.perf_counter() - start) * 1e6
        events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
        kernels = [e for e in events if not e.name.startswith(("Memcpy", "Memset"))]
        measured.append((len(kernels), sum(e.device_time for e in events), wall_us))
    (k1, busy1, wall1), (k2, busy2, wall2) = measured
    return {
        "kernels_per_step": (k2 - k1) / n,
        "gpu_busy_share": min((busy2 - busy1) / max(wall2 - wall1, 1e-9), 1.0),
    }


def plan_share(bench: Bench, config: RunConfig, step_s: float) -> float:
    """Host time to draw and pack a step's plan, against a whole step."""
    steps = bench.args.steps
    plans = mixmatch_plans(bench.data, bench.clean, config, epoch=1, iterations=steps)
    start = time.perf_counter()
    for _ in range(steps):
        next(plans)
    return (time.perf_counter() - start) / steps / step_s


def virtual_step_s(bench: Bench, model_base: torch.nn.Module, config: RunConfig) -> float:
    """Marginal time of a virtual-model step (copies and captures per call drop out)."""
    steps = bench.args.steps

    def run(n: int) -> None:
        virtual_epoch(
            model_base,
            bench.data,
            dataclasses.replace(config, virtual=dataclasses.replace(config.virtual, min_steps=n)),
            epoch=0,
        )

    run(steps)
    short = min(_timed(lambda: run(steps), bench.device) for _ in range(bench.args.repeats))
    long = min(_timed(lambda: run(2 * steps), bench.device) for _ in range(bench.args.repeats))
    if long > short:
        return (long - short) / steps
    # A busy machine's noise swamped the difference (measured on 2 shared cores): the long
    # run's average per step, fixed costs included, bounds the marginal step from above.
    return long / (2 * steps)


def flops(bench: Bench, config: RunConfig) -> dict:
    """FLOPs of one MixMatch step (forward and backward) and of one scored image, counted."""
    model, base = bench.model(
        dataclasses.replace(config, compute=dataclasses.replace(config.compute, compile=False))
    )
    optimizer = compute.adam(base.parameters(), config.mixmatch.lr)
    with FlopCounterMode(display=False) as counter:
        bench.epoch(model, optimizer, config, 1)
    step = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        base.train(False)(bench.data.images[:1].permute(0, 3, 1, 2).float())
    return {"step_flops": step, "image_flops": counter.get_total_flops()}


def score_rate(bench: Bench, precision: str) -> float:
    """Scoring images/s in ``scoring.precision`` from pinned host memory, as the scoring actors run."""
    config = bench.config(scoring__precision=precision)
    _, base = bench.model(config)
    base.train(False)
    labels = bench.data.labels.cpu()

    def score() -> None:
        score_images(base, bench.host_images, labels, config.data, config.scoring, config.compute)

    score()
    return len(bench.host_images) / min(_timed(score, bench.device) for _ in range(bench.args.repeats))


def project(bench: Bench, config: RunConfig, rates: dict, flop: dict, peak: float | None) -> dict:
    """Minutes of a full ASD run of the preset at these rates, and at the FLOP floor."""
    preset = load_config(bench.preset)
    train_n, test_n, poison_n = PRESET_SIZES[bench.preset]
    mm = preset.mixmatch
    images_per_step = mm.batch_labeled + 2 * mm.batch_unlabeled
    step_s = images_per_step / rates["train_img_s"]
    measured_batch = config.mixmatch.batch_labeled + 2 * config.mixmatch.batch_unlabeled
    step_flops = flop["step_flops"] * images_per_step / measured_batch
    v_steps, v_batch, _ = virtual_schedule(preset, train_n)
    v_step_s = rates["virtual_step_s"] * v_batch / config.virtual.batch_size
    seconds = work = 0.0
    for epoch in range(preset.epochs):
        passes = 2 if stage_of(epoch, preset.split) == 3 else 1
        scored = passes * train_n + test_n + poison_n
        seconds += scored / rates["score_img_s"] + mm.iterations * step_s + rates["epoch_overhead_s"]
        work += scored * flop["image_flops"] + mm.iterations * step_flops
        if passes == 2:
            seconds += v_steps * v_step_s
            work += v_steps * v_batch * 3 * flop["image_flops"]  # forward + backward: about 3 forwards
    return {"projection_min": seconds / 60, "floor_min": work / peak / 60 if peak else None}


def _meets(size: int, figures: dict) -> dict:
    targets = TARGETS[size]
    got = {**figures, "run_min": figures.get("projection_min")}
    meets = {}
    for key, target in targets.items():
        if got.get(key) is None:
            continue
        meets[key] = got[key] <= target if key in ("plan_share", "run_min") else got[key] >= target
    return {"targets": targets, "meets": meets}


def _variants() -> list[tuple[str, str | None, str, str | None]]:
    """(name, precision, mode, compared_with) in the order they run."""
    out = [("plain", None, "plain", None), ("default", "auto", "eager", "plain")]
    out += [(f"{p}-eager", p, "eager", "plain") for p in PRECISIONS]
    out += [(f"{p}-graphed", p, "graphed", f"{p}-eager") for p in PRECISIONS]
    out += [(f"{p}-compiled", p, "compiled", f"{p}-eager") for p in PRECISIONS]
    return out


def _skip_reason(size: int, variant: str, mode: str, args, device: torch.device) -> str | None:
    if mode == "graphed" and device.type != "cuda":
        return "CUDA graphs need a GPU"
    if mode == "graphed" and args.steps <= 3:
        return "--steps must exceed a graphed step's 3 warm-up steps"
    if variant.startswith("tf32") and device.type != "cuda":
        return "tf32 is fp32 on a CPU"
    if args.smoke and mode == "compiled":
        return "--smoke: compiling takes minutes on a CPU"
    if args.smoke and variant == "bf16-eager":
        return "--smoke: the eager variants run are fp32 and the default"
    return None


@dataclasses.dataclass
class SizeRun:
    """One image size's bench and what its variants share: FLOPs, scoring rates, checkpoints."""

    bench: Bench
    flop: dict
    peak: float | None
    scoring: dict
    checked: dict = dataclasses.field(default_factory=dict)
    plain_rate: float | None = None


def start_size(preset: str, size: int, args, device: torch.device, emit) -> SizeRun:
    bench = make_bench(preset, size, args, device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    scoring = {}
    for precision in PRECISIONS:
        scoring[precision] = score_rate(bench, precision)
        emit({"size": size, "variant": f"score-{precision}", "score_img_s": scoring[precision]})
    return SizeRun(bench, flops(bench, bench.config()), peak, scoring)


def run_variant(
    run: SizeRun, variant: str, precision: str | None, mode: str, compared_with: str | None
) -> dict:
    """A training variant's figures: the check and the step rate first (a failure there
    is the variant's error), then each further figure on its own (its failure is noted)."""
    bench, size = run.bench, run.bench.size
    config = None
    if mode != "plain":
        config = bench.config(precision, graphs=mode == "graphed", compiled=mode == "compiled")
    checkpoints, model, optimizer, config = check_steps(bench, config)
    run.checked[variant] = checkpoints
    figures = {
        "precision": config.compute.precision,
        "batch": f"{config.mixmatch.batch_labeled}+{config.mixmatch.batch_unlabeled}",
    }
    if compared_with in run.checked:
        figures["compared_with"] = compared_with
        figures.update(_differences(checkpoints, run.checked[compared_with]))
    figures.update(step_rates(bench, model, optimizer, config, plain=mode == "plain"))
    if mode == "plain":
        run.plain_rate = figures["train_img_s"]
        return figures
    figures["ratio_to_plain"] = figures["train_img_s"] / run.plain_rate if run.plain_rate else None
    figures["score_img_s"] = run.scoring["fp32"]  # the default scoring precision
    base = model._orig_mod if hasattr(model, "_orig_mod") else model
    optional = {
        "kernels": lambda: kernel_profile(bench, model, optimizer, config),
        "plan": lambda: {"plan_share": plan_share(bench, config, figures["step_s"])},
        "virtual": lambda: {"virtual_step_s": virtual_step_s(bench, base, config)},
        "projection": lambda: project(bench, config, figures, run.flop, run.peak),
        "targets": lambda: _meets(size, figures),
    }
    for name, measure in optional.items():
        try:
            figures.update(measure())
        except Exception as err:  # the figures measured so far still count
            figures.setdefault("errors", {})[name] = f"{type(err).__name__}: {err}"[:300]
    return figures


def _variant_line(run: SizeRun, variant: str, precision, mode: str, compared_with, args, emit) -> dict:
    size = run.bench.size
    head = {"size": size, "variant": variant}
    reason = _skip_reason(size, variant, mode, args, run.bench.device)
    if reason:
        row = {**head, "skipped": reason}
    else:
        try:
            row = {**head, **run_variant(run, variant, precision, mode, compared_with)}
        except Exception as err:  # one variant failing must not lose the others' lines
            row = {**head, "error": f"{type(err).__name__}: {err}"[:500]}
    emit(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30, help="steps per timed epoch (also 2x that)")
    parser.add_argument("--repeats", type=int, default=2, help="timings per figure; the best counts")
    parser.add_argument("--images", type=int, default=4096, help="synthetic images on the device")
    parser.add_argument(
        "--batch-224", type=int, default=64, help="MixMatch labeled/unlabeled batch at 224 px"
    )
    parser.add_argument("--check-steps", type=int, default=20, help="steps of the difference check")
    parser.add_argument("--sizes", default="32,224", help="image sizes to run, in order")
    parser.add_argument(
        "--out", help="JSON lines file (default: $OUT/bench_gpu.jsonl, else ./bench_gpu.jsonl)"
    )
    parser.add_argument("--smoke", action="store_true", help="tiny eager runs on the CPU (the test suite's)")
    args = parser.parse_args()
    if args.smoke:
        args.steps, args.repeats, args.check_steps = 1, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "bench_gpu.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"

    def emit(row: dict) -> None:
        row = {"job": "bench_gpu", "device": name, **row}
        rounded = {k: round(v, 5) if isinstance(v, float) else v for k, v in row.items()}
        with out.open("a") as f:
            f.write(json.dumps(rounded) + "\n")
        print(json.dumps(rounded), file=sys.stderr, flush=True)

    presets = {32: "cifar10", 224: "imagenet30"}
    summary = {"job": "bench_gpu", "device": name, "smoke": args.smoke, "out": str(out)}
    table = [
        "| size | variant | precision | train img/s | x plain | kernels/step | GPU busy | run min | floor min |"
    ]
    table.append("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    sizes = [int(s) for s in args.sizes.split(",")]
    runs, rows = {}, {size: [] for size in sizes}
    # eager and graphed variants of every size first, compiled ones last: compiling takes
    # minutes, and a session cut short should still hold both sizes' other figures
    for size in sizes:
        runs[size] = start_size(presets[size], size, args, device, emit)
        for variant in (v for v in _variants() if v[2] != "compiled"):
            rows[size].append(_variant_line(runs[size], *variant, args, emit))
    for size in sizes:
        for variant in (v for v in _variants() if v[2] == "compiled"):
            rows[size].append(_variant_line(runs[size], *variant, args, emit))
    for size in sizes:
        summary[f"{size}px"] = {r["variant"]: r for r in rows[size]}
        for r in rows[size]:
            if "train_img_s" not in r:
                continue
            table.append(
                f"| {size} px | {r['variant']} | {r['precision']} | {r['train_img_s']:,.0f} | "
                f"{_ratio(r.get('ratio_to_plain', 1.0))} | {r.get('kernels_per_step', float('nan')):.0f} | "
                f"{_share(r.get('gpu_busy_share'))} | {_minutes(r.get('projection_min'))} | "
                f"{_minutes(r.get('floor_min'))} |"
            )
    print("\n".join(table), file=sys.stderr)
    print(json.dumps(summary, default=str))


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.0f}%"


def _minutes(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


if __name__ == "__main__":
    main()
