"""Start-up: the commands that only read tables or settings against torch's import.

Every command here runs in a fresh process, as a user starts it: ``python -c "import
torch"`` (the bar: what every command that trains pays first), then ``asd-ray
--version``, ``asd-ray config show`` and ``asd-ray audit summary RUN`` (``python -m
asd_ray``, this checkout), where RUN is a small run folder this job writes first with the
project's own writers (``--samples`` samples of ``--classes`` classes, ``--epochs`` split
tables over drawn losses, metrics rows, the model card and the training shards it names).

Side by side and interleaved: each of ``--rounds`` rounds runs every command once, the
order turned by one each round, after one untimed round that warms the page cache and
writes the bytecode (the children run with ``PYTHONDONTWRITEBYTECODE`` removed: an
installed package starts from its cached bytecode, as torch does). Wall time per command
is the median over the rounds; ``ratio`` is a command's median over torch's, and the
issue's bar is a ratio under 1/3. Peak RSS is each child's ``ru_maxrss`` (this parent
imports nothing heavy, so no child inherits a larger peak through ``fork``).

    python jobs/bench_startup.py [--rounds 10] [--samples 2000] [--classes 10] [--epochs 3] [--smoke]

``--smoke`` is 1 round on 200 samples (about 15 s here, most of it torch's two imports).
Prints a table on stderr and one line of JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BAR = 1 / 3


def make_run(folder: Path, samples: int, classes: int, epochs: int) -> None:
    """A finished run folder of ``epochs`` epochs (stages 1, 2 and 3 when there are three)
    with its model card and training shards, from the project's writers (in a child, so
    that this process stays small)."""
    import dataclasses

    import numpy as np

    from asd_ray import tables
    from asd_ray.config import SplitConfig
    from asd_ray.data.shard_writer import write_shards
    from asd_ray.data.shards import ShardSet
    from asd_ray.data.sources import from_arrays
    from asd_ray.model_card import MODEL_DIR, write_card
    from asd_ray.run_folder import INPUTS_FILE, EpochTimes, metrics_row, split_path, write_metrics
    from asd_ray.split import make_split, split_summary

    rng = np.random.default_rng(0)
    side = 8
    labels = np.arange(samples) % classes
    images = rng.integers(0, 256, (samples, side, side, 3), dtype=np.uint8)
    names = [f"c{c}" for c in range(classes)]
    write_shards(from_arrays(images, labels, class_names=names), folder / "train", name="train")
    train = ShardSet(folder / "train")
    run = folder / "run"
    poison = rng.random(samples) < 0.05
    truth = tables.from_pydict(
        {
            "sample_id": np.arange(samples),
            "is_poison": poison,
            "is_modified": poison,
            "original_label": labels,
            "label_after": labels,
            "attack": ["badnets"] * samples,
            "params": ["{}"] * samples,
        },
        "poison",
    )
    config = SplitConfig(stage2_epoch=min(1, epochs - 1), stage3_epoch=min(2, epochs - 1))
    seeds = np.arange(classes)  # one per class
    times = dataclasses.asdict(EpochTimes(*[0.0] * len(dataclasses.fields(EpochTimes))))
    rows = []
    for epoch in range(epochs):
        loss = (rng.gamma(2.0, 0.5, samples) + 3.0 * poison).astype(np.float32)
        scores = tables.from_pydict(
            {"sample_id": np.arange(samples), "label": labels, "loss": loss}, "scores"
        )
        meta = None
        if epoch >= config.stage3_epoch:
            meta_loss = loss - (rng.random(samples) + 3.0 * poison).astype(np.float32)
            meta = tables.from_pydict(
                {"sample_id": np.arange(samples), "label": labels, "loss": meta_loss}, "scores"
            )
        split = make_split(
            epoch,
            scores,
            config=config,
            num_classes=classes,
            seed_ids=seeds,
            meta_scores=meta,
            ground_truth=truth,
        )
        tables.write_parquet(split, split_path(run, epoch), "splits")
        figures = {"epoch": epoch, "defense": "asd", "acc": 0.5 + 0.01 * epoch, "asr": 0.1, "robust_acc": 0.6}
        rows.append(metrics_row(figures, split_summary(split), {"train_loss": 1.0}, times))
    write_metrics(run, rows)
    architecture = {"name": "small_cnn", "num_classes": classes, "in_channels": 3, "image_size": side}
    card = {
        "architecture": architecture | {"factory": None, "meta_layers": []},
        "classes": names,
        "input": {"height": side, "width": side, "channels": 3, "mean": [0.5] * 3, "std": [0.25] * 3},
        "best": {"epoch": epochs - 1},
        "last": {"epoch": epochs - 1},
        "data": {"train": {"identity_sha256": train.identity()}},
    }
    write_card(run / MODEL_DIR, card)
    (run / INPUTS_FILE).write_text(
        json.dumps({"train": str(folder / "train"), "test": str(folder / "train")})
    )


def _child_env() -> dict[str, str]:
    """This checkout importable, bytecode cached as an installed package's is."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one child process; it must succeed."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    error = child.stderr.read().decode(errors="replace")
    child.stderr.close()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[1:])} exited {child.returncode}: {error[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--make-run":
        make_run(Path(sys.argv[2]), *map(int, sys.argv[3:6]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--smoke", action="store_true", help="1 round on 200 samples")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.samples = 1, 200
    if args.rounds < 1 or args.epochs < 1 or not 2 <= args.classes <= args.samples:
        parser.error("--rounds and --epochs must be at least 1, --classes between 2 and --samples")
    env = _child_env()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        folder = Path(tmp)
        made = [__file__, "--make-run", tmp, str(args.samples), str(args.classes), str(args.epochs)]
        subprocess.run([sys.executable, *made], env=env, cwd=REPO, check=True, stdout=subprocess.DEVNULL)
        asd_ray = [sys.executable, "-m", "asd_ray"]
        commands = {
            "import torch": [sys.executable, "-c", "import torch"],
            "asd-ray --version": [*asd_ray, "--version"],
            "asd-ray config show": [*asd_ray, "config", "show"],
            "asd-ray audit summary": [*asd_ray, "audit", "summary", str(folder / "run")],
        }
        names = list(commands)
        for name in names:  # warm-up: page cache and bytecode
            timed(commands[name], env)
        walls: dict[str, list[float]] = {name: [] for name in names}
        peaks: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(args.rounds):
            for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
                wall, peak = timed(commands[name], env)
                walls[name].append(wall)
                peaks[name].append(peak)
    torch_s = statistics.median(walls["import torch"])
    figures = {}
    for name in names:
        median = statistics.median(walls[name])
        figures[name] = {
            "median_s": round(median, 3),
            "min_s": round(min(walls[name]), 3),
            "max_s": round(max(walls[name]), 3),
            "peak_rss_mb": round(max(peaks[name]), 1),
        }
        if name != "import torch":
            figures[name] |= {"ratio": round(median / torch_s, 3), "under_third": median < BAR * torch_s}
    print("| command | median wall | ratio to `import torch` | peak RSS |", file=sys.stderr)
    print("| --- | --- | --- | --- |", file=sys.stderr)
    for name, line in figures.items():
        ratio = f"{line['ratio']:.2f}" if "ratio" in line else "1"
        print(
            f"| `{name}` | {line['median_s']:.2f} s | {ratio} | {line['peak_rss_mb']:.0f} MB |",
            file=sys.stderr,
        )
    summary = {
        "bench": "startup",
        "smoke": args.smoke,
        "rounds": args.rounds,
        "run": {"samples": args.samples, "classes": args.classes, "epochs": args.epochs},
        "machine": f"{os.cpu_count()}-core {platform.machine()}, {platform.python_implementation()} "
        f"{platform.python_version()}",
        "load_average": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "commands": figures,
        "all_under_third": all(line.get("under_third", True) for line in figures.values()),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
