"""Scale: CPU seconds and peak memory of every command at N = 10 k, 100 k and 1.28 M samples.

Synthetic 16 x 16 x 3 uint8 images (seeded), 1,000 classes, labels i % 1000. At each size,
every command runs as its own process through a small wrapper (``--child``) that reads its
own resident set right after its imports (the baseline), runs the command in-process and
reports CPU seconds (user + sys) and peak RSS (``VmHWM``, reset after the imports) of the
command alone, so the start-up (measured once, ``asd-ray --version``) and the command's
cost are apart:

- ``shards make`` (``--source arrays`` from ``.npy`` files, memory-mapped) and ``shards inspect``;
- ``ShardSet`` open in a process that holds no share of it: resident bytes per sample;
- the driver's records: ``--epochs`` epochs of split tables from ``split.make_split`` (stages
  1, 2 and 3), metrics rows, ``inputs.json``, ``config.yaml`` and the model card, each from
  the project's own writers. This builds the run folder the audit reads (setup), measured as
  the driver's share of a run (it trains nothing);
- a training worker's share (``ShardSet`` + ``load_share`` of every 2nd sample);
- the scoring pool: one pass of 2 ``ScoringActor`` (small_cnn, 1 CPU each, Ray with 2 CPUs)
  over the whole set: samples/s and each actor's peak RSS;
- every audit command (summary, flagged top and per class, sample, export parquet and csv,
  manifest) and ``report``; at the largest size again on the first half of the epochs, which
  separates a per-epoch cost from a per-sample one.

Output: a JSON line per measurement as it goes, then a summary line: per-sample cost ratios
between consecutive sizes ((cost(N2) / N2) / (cost(N1) / N1), CPU and memory), the targets as
booleans, and the extrapolation of every process kind's memory to 14 M samples x 120 epochs
on 64 GPUs (formula in the summary's ``extrapolation.formula``). Targets at the largest size
(2-core machine): memory added by an audit command <= 300 MB, by ``shards make`` <= 500 MB;
``ShardSet`` <= 32 B/sample; ``report`` <= 5 CPU s beyond its start-up; per-sample cost from
the next smaller size within 1.2x; every process of the extrapolated run within 8 GB.

    python jobs/bench_scale.py [--sizes 10000 100000 1280000] [--epochs 10] [--classes 1000]
                               [--out FILE] [--work DIR] [--smoke]

``--smoke`` is one size of 2,000 samples, 3 epochs (one per stage) and 20 classes: about
two minutes here, most of it the start-up (torch's import) of each command's process.
``--work`` is where the data goes (default: a temporary folder); each size's folder is
removed once measured (1.28 M: about 2 GB of .npy and shards at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGE = (16, 16, 3)
SEEDS_PER_CLASS = 2  # 10 k samples of 1,000 classes have 10 per class: most must stay unseeded
WORLD = 2  # training workers and scorers the shares are measured for
TARGET = {"samples": 14_000_000, "epochs": 120, "gpus": 64, "process_gb": 8.0}
AUDIT_COMMANDS = (
    "audit summary",
    "audit flagged --top",
    "audit flagged --class",
    "audit sample",
    "audit export parquet",
    "audit export csv",
    "audit manifest",
    "report",
)
MB = 1024**2


# ---------------------------------------------------------------- the measured child processes


def _rss_kb(field: str = "VmRSS") -> int:
    """This process's resident set now (``VmRSS``) or its peak (``VmHWM``), Linux."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    """Start this process's peak (VmHWM) afresh at its resident set now. ``ru_maxrss`` cannot
    serve: Linux keeps it across ``execve``, so a child reports at least the RSS its parent
    had when it forked (the bench's parent holds the images of the largest size)."""
    Path("/proc/self/clear_refs").write_text("5")


def _cpu_s() -> float:
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _child(kind: str, report: Path, argv: list[str]) -> None:
    """Run one measured command in this process and write its figures to ``report`` as JSON:
    the baseline is taken after every import the command needs, so only its own work counts."""
    from asd_ray import freed_memory

    freed_memory.prepare_command(argv if kind == "cli" else [])  # what `asd-ray` does before its imports
    import matplotlib

    import asd_ray.audit.history  # noqa: F401  (imported before the baseline: start-up, not work)
    import asd_ray.audit.report  # noqa: F401
    import asd_ray.cli
    import asd_ray.data.shards  # noqa: F401
    import asd_ray.data.share  # noqa: F401
    import asd_ray.data.sources  # noqa: F401

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401

    if kind in ("driver", "pool"):
        import asd_ray.inputs  # noqa: F401
        import asd_ray.split  # noqa: F401
    if kind == "pool":
        import ray  # noqa: F401

        import asd_ray.scoring_pool  # noqa: F401
    _reset_peak()
    import_cpu, base_kb, start = _cpu_s(), _rss_kb(), time.perf_counter()
    extra: dict[str, Any] = {}
    rc = 0
    if kind == "cli":
        rc = asd_ray.cli.main(argv)
    elif kind == "shardset":
        shards = asd_ray.data.shards.ShardSet(argv[0])
        extra["held_kb"] = _rss_kb() - base_kb
        extra["samples"] = len(shards)
    elif kind == "worker":
        shards = asd_ray.data.shards.ShardSet(argv[0])
        images, _, _ = asd_ray.data.share.load_share(shards, keep=np.arange(len(shards)) % WORLD == 0)
        extra["held_kb"] = _rss_kb() - base_kb
        extra["share"] = len(images)
    elif kind == "driver":
        extra["rss_by_epoch_kb"] = [kb - base_kb for kb in _driver_records(*argv)]
    elif kind == "pool":
        extra |= _pool_pass(argv[0])
    result = {
        "rc": rc,
        "cpu_s": _cpu_s() - import_cpu,
        "wall_s": time.perf_counter() - start,
        "import_cpu_s": import_cpu,
        "base_kb": base_kb,
        "peak_kb": _rss_kb("VmHWM"),
        **extra,
    }
    report.write_text(json.dumps(result))


def _driver_records(run: str, train: str, test: str, seeds: str, epochs: str) -> list[int]:
    """What a run's driver writes, epoch by epoch, with the project's writers (training
    replaced by drawn losses); this process's RSS after each epoch."""
    import dataclasses

    import pyarrow as pa

    from asd_ray import tables
    from asd_ray.config import config_yaml, from_dict
    from asd_ray.inputs import RunInputs, model_card, open_inputs
    from asd_ray.model_card import MODEL_DIR, write_card
    from asd_ray.run_folder import (
        CONFIG_FILE,
        INPUTS_FILE,
        MODEL_FIGURES,
        EpochTimes,
        best_row,
        metrics_row,
        split_path,
        write_metrics,
        write_text,
    )
    from asd_ray.split import make_split, split_summary

    out, total = Path(run), int(epochs)
    stage2, stage3 = max(1, total * 3 // 10), max(2, total * 6 // 10)  # 10 epochs: 3 + 3 + 4
    split = {"seeds_per_class": SEEDS_PER_CLASS, "stage2_epoch": stage2, "stage3_epoch": stage3}
    config = from_dict({"preset": "cifar10", "epochs": total, "split": split})
    inputs = RunInputs(train=train, test=test, seeds=seeds).absolute()
    data = open_inputs(config, inputs)
    out.mkdir(parents=True)
    write_text(out / INPUTS_FILE, json.dumps(dataclasses.asdict(inputs), indent=2) + "\n")
    write_text(out / CONFIG_FILE, config_yaml(config))
    card = model_card(config, data)
    n, classes = len(data.train), data.train.info.num_classes
    labels = data.train.labels.astype(np.int32)
    rng = np.random.default_rng(1)
    poison = rng.random(n) < 0.05
    truth = tables.from_pydict(
        {
            "sample_id": np.arange(n),
            "is_poison": poison,
            "is_modified": poison,
            "original_label": np.where(poison, (labels + 1) % classes, labels).astype(np.int32),
            "label_after": labels,
            "attack": ["badnets"] * n,
            "params": ["{}"] * n,
        },
        "poison",
    )

    def scores(shift: np.ndarray | float = 0.0) -> pa.Table:
        loss = (rng.gamma(2.0, 0.5, n) + 3.0 * poison - shift).astype(np.float32)
        return tables.from_pydict({"sample_id": np.arange(n), "label": labels, "loss": loss}, "scores")

    rows, rss = [], []
    times = dataclasses.asdict(EpochTimes(*[0.0] * len(dataclasses.fields(EpochTimes))))
    for epoch in range(total):
        current = scores()
        meta = scores(rng.random(n) + 3.0 * poison) if epoch >= stage3 else None
        table = make_split(
            epoch,
            current,
            config=config.split,
            num_classes=classes,
            seed_ids=data.seed_ids,
            meta_scores=meta,
            ground_truth=truth,
        )
        tables.write_parquet(table, split_path(out, epoch), "splits")
        figures = {"epoch": epoch, "defense": "asd", "acc": 0.5 + 0.01 * epoch, "asr": 0.1, "robust_acc": 0.6}
        rows.append(metrics_row(figures, split_summary(table), {"train_loss": 1.0}, times))
        last, best = ({k: row[k] for k in MODEL_FIGURES} for row in (rows[-1], best_row(rows)))
        write_card(out / MODEL_DIR, {**card, "last": last, "best": best})
        write_metrics(out, rows)
        del table, current, meta
        rss.append(_rss_kb())
    return rss


def _pool_pass(folder: str) -> dict[str, Any]:
    """One scoring pass of :class:`~asd_ray.scoring_pool.ScoringPool` over the whole set."""
    import ray
    import torch

    from asd_ray.config import ComputeConfig, DataConfig, ScoringConfig
    from asd_ray.data.shards import ShardSet
    from asd_ray.models import ModelSpec, to_numpy_weights
    from asd_ray.scoring_pool import ScoringPool

    shards = ShardSet(folder)
    spec = ModelSpec("small_cnn", shards.info.num_classes, IMAGE[2], IMAGE[0])
    ray.init(
        num_cpus=WORLD,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        _temp_dir=tempfile.mkdtemp(prefix="ray-", dir="/tmp"),  # short: socket paths have a limit
        logging_level="WARNING",
        log_to_driver=False,
    )
    try:
        torch.manual_seed(0)
        weights = ray.put(to_numpy_weights(spec.build()))
        start = time.perf_counter()
        pool = ScoringPool(
            {"train": shards}, spec, DataConfig(), ScoringConfig(), ComputeConfig(), num_actors=WORLD
        )
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        pool.run("train", weights)
        pass_s = time.perf_counter() - start
        actors = [_status_kb(pid, "VmHWM") for pid in _descendants(os.getpid(), "ray::ScoringActor")]
        pool.shutdown()
    finally:
        ray.shutdown()
    return {
        "load_s": load_s,
        "pass_s": pass_s,
        "samples_per_s": len(shards) / pass_s,
        "actor_peak_kb": max(actors) if actors else None,
    }


def _descendants(root: int, title: str) -> list[int]:
    """Processes under ``root`` whose command line starts with ``title`` (Ray's actor names)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        parents[int(stat.parent.name)] = int(fields[1])
    found = []
    for pid in parents:
        up = pid
        while up in parents and up != root:
            up = parents[up]
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if up == root and pid != root and command.startswith(title):
            found.append(pid)
    return found


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for process {pid}")


# ---------------------------------------------------------------- the parent: sizes and figures


class Bench:
    """Runs the children, writes a JSON line per measurement and keeps them for the summary."""

    def __init__(self, out: Path | None, parallel: int) -> None:
        self.out = out.open("w") if out else None
        self.executor = ThreadPoolExecutor(parallel)
        self.lock = threading.Lock()
        self.results: dict[tuple[str, int, int], dict[str, Any]] = {}  # (command, N, epochs) -> figures
        self.errors: list[dict[str, Any]] = []

    def emit(self, line: dict[str, Any]) -> None:
        text = json.dumps(line)
        with self.lock:
            print(text, flush=True)
            if self.out:
                self.out.write(text + "\n")
                self.out.flush()

    def together(self, tasks: list) -> list:
        """Run the callables ``parallel`` at a time (1: one after the other); their results."""
        return [future.result() for future in [self.executor.submit(task) for task in tasks]]

    def setup(self, n: int, command: list[str]) -> bool:
        """A command whose cost is not measured (the test set, the seeds); False if it failed."""
        done = subprocess.run(
            command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=_child_env()
        )
        if done.returncode:
            self.fail({"command": f"setup: {' '.join(command[2:5])}", "samples": n}, done.stderr)
        return done.returncode == 0

    def fail(self, line: dict[str, Any], stderr: str) -> None:
        line["error"] = stderr.strip().splitlines()[-3:]
        with self.lock:
            self.errors.append(line)
        self.emit(line)

    def measure(self, name: str, n: int, epochs: int, kind: str, argv: list[str], work: Path) -> dict | None:
        """Run ``--child kind`` with ``argv``; its figures, or None (the failure is reported)."""
        slug = "".join(c if c.isalnum() else "-" for c in f"{name}-{epochs}")
        report, errors = work / f"{slug}.json", work / f"{slug}.err"
        command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(report), *argv]
        start = time.perf_counter()
        with open(errors, "w") as stderr:
            child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, env=_child_env())
            _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        figures = json.loads(report.read_text()) if report.exists() else {}
        if os.waitstatus_to_exitcode(status) != 0 or figures.get("rc", 1) != 0:
            self.fail({"command": name, "samples": n, "epochs": epochs}, errors.read_text())
            return None
        line = {
            "command": name,
            "samples": n,
            "epochs": epochs,
            "cpu_s": round(figures["cpu_s"], 3),
            "wall_s": round(figures["wall_s"], 3),
            "peak_added_mb": round((figures["peak_kb"] - figures["base_kb"]) / 1024, 1),
            "peak_rss_mb": round(figures["peak_kb"] / 1024, 1),
            "startup_rss_mb": round(figures["base_kb"] / 1024, 1),
            "startup_cpu_s": round(figures["import_cpu_s"], 3),
            "process_cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "process_wall_s": round(wall, 3),
        }
        if "held_kb" in figures:
            line["held_mb"] = round(figures["held_kb"] / 1024, 2)
            line["held_bytes_per_sample"] = round(figures["held_kb"] * 1024 / n, 1)
        if "rss_by_epoch_kb" in figures:
            line["rss_by_epoch_mb"] = [round(kb / 1024, 1) for kb in figures["rss_by_epoch_kb"]]
        for key in ("samples_per_s", "load_s", "pass_s"):
            if key in figures:
                line[key] = round(figures[key], 2)
        if figures.get("actor_peak_kb"):
            line["actor_peak_mb"] = round(figures["actor_peak_kb"] / 1024, 1)
        with self.lock:
            self.results[(name, n, epochs)] = line
        self.emit(line)
        return line

    def startup(self) -> dict[str, Any]:
        """``asd-ray --version``: what every command pays before it starts."""
        start = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "asd_ray", "--version"], stdout=subprocess.DEVNULL, env=_child_env()
        )
        _, _, usage = os.wait4(child.pid, 0)
        line = {
            "command": "startup (asd-ray --version)",
            "wall_s": round(time.perf_counter() - start, 3),
            "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        }
        self.emit(line)
        return line


def _child_env() -> dict[str, str]:
    """One thread per library (the machine's cores are shared) and this checkout importable."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def _write_npy(path: Path, shape: tuple[int, ...], fill) -> None:
    """An .npy file written a chunk at a time (this process never holds the whole array)."""
    array = np.lib.format.open_memmap(
        path, mode="w+", dtype=np.uint8 if len(shape) > 1 else np.int64, shape=shape
    )
    for lo in range(0, shape[0], 100_000):
        array[lo : lo + 100_000] = fill(lo, min(shape[0], lo + 100_000))
    array.flush()
    del array


def run_size(bench: Bench, n: int, classes: int, epochs: int, work: Path, *, halves: bool) -> None:
    """Every measurement at one size (``halves``: the audit again on the first half of the epochs)."""
    folder = work / f"n{n}"
    shutil.rmtree(folder, ignore_errors=True)  # an earlier run's, cut short
    folder.mkdir()
    rng = np.random.default_rng(n)
    _write_npy(folder / "images.npy", (n, *IMAGE), lambda lo, hi: _images(rng, hi - lo))
    _write_npy(folder / "labels.npy", (n,), lambda lo, hi: np.arange(lo, hi) % classes)
    _write_npy(folder / "test-images.npy", (classes, *IMAGE), lambda lo, hi: _images(rng, hi - lo))
    _write_npy(folder / "test-labels.npy", (classes,), lambda lo, hi: np.arange(lo, hi))
    train, test, seeds, run = folder / "train", folder / "test", folder / "seeds.parquet", folder / "run"

    def measure(name: str, kind: str, argv: list[str], e: int = epochs):
        return lambda: bench.measure(name, n, e, kind, argv, folder)

    def setup(argv: list[str]):
        return lambda: bench.setup(n, [sys.executable, "-m", "asd_ray", *argv, "--quiet"])

    arrays = ["--images", str(folder / "images.npy"), "--labels", str(folder / "labels.npy")]
    if not bench.together(
        [
            measure(
                "shards make",
                "cli",
                ["shards", "make", "--source", "arrays", *arrays, "--out", str(train), "--quiet"],
            )
        ]
    )[0]:
        return
    (folder / "images.npy").unlink()
    pool = bench.executor.submit(measure("scoring pool", "pool", [str(train)]))  # the longest: first
    arrays = ["--images", str(folder / "test-images.npy"), "--labels", str(folder / "test-labels.npy")]
    *_, test_made, seeds_made = bench.together(
        [
            measure("shards inspect", "cli", ["shards", "inspect", str(train), "--quiet"]),
            measure("ShardSet open", "shardset", [str(train)]),
            measure("training worker share", "worker", [str(train)]),
            setup(["shards", "make", "--source", "arrays", *arrays, "--split", "test", "--out", str(test)]),
            setup(["seeds", "--in", str(train), "--out", str(seeds), "--per-class", str(SEEDS_PER_CLASS)]),
        ]
    )
    driver = [str(run), str(train), str(test), str(seeds), str(epochs)]
    tasks = []
    if test_made and seeds_made and bench.together([measure("driver records", "driver", driver)])[0]:
        tasks += [
            measure(name, "cli", argv, epochs) for name, argv in _audit(run, folder / "audit", n, classes)
        ]
        if halves and epochs >= 2:
            half, e = folder / "run-half", epochs // 2
            if bench.setup(n, [sys.executable, __file__, "--first-epochs", str(run), str(half), str(e)]):
                tasks += [
                    measure(name, "cli", argv, e)
                    for name, argv in _audit(half, folder / "audit-half", n, classes)
                ]
    bench.together(tasks)
    pool.result()
    shutil.rmtree(folder)


def _images(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 256, (count, *IMAGE), dtype=np.uint8)


def _audit(run: Path, out: Path, n: int, classes: int) -> list[tuple[str, list[str]]]:
    """Each audit command's argv, in :data:`AUDIT_COMMANDS` order, writing under ``out``."""
    out.mkdir()
    argv = {
        "audit summary": ["audit", "summary", str(run)],
        "audit flagged --top": ["audit", "flagged", str(run), "--top", "100"],
        "audit flagged --class": ["audit", "flagged", str(run), "--class", str(classes // 2)],
        "audit sample": ["audit", "sample", str(run), str(n // 2)],
        "audit export parquet": ["audit", "export", str(run), "--out", str(out / "flags.parquet"), "-q"],
        "audit export csv": ["audit", "export", str(run), "--format", "csv", "--out", str(out / "flags.csv"), "-q"],
        "audit manifest": ["audit", "manifest", str(run), "--threshold", "0.9", "--out", str(out / "review.csv"), "-q"],
        "report": ["report", str(run), "--out", str(out / "report"), "-q"],
    }  # fmt: skip
    return [(name, argv[name]) for name in AUDIT_COMMANDS]


def _first_epochs(run: str, half: str, epochs: str) -> None:
    """A copy of ``run`` as it was after its first ``epochs`` epochs."""
    from asd_ray.run_folder import SPLITS_DIR, read_metric_rows, split_path, write_metrics

    keep = {split_path(Path(run), e).parent.name for e in range(int(epochs))}
    shutil.copytree(
        run, half, ignore=lambda d, names: [x for x in names if Path(d).name == SPLITS_DIR and x not in keep]
    )
    write_metrics(Path(half), read_metric_rows(Path(run), int(epochs) - 1))


# ---------------------------------------------------------------- the summary


def summarize(bench: Bench, sizes: list[int], epochs: int, startup: dict[str, Any]) -> dict[str, Any]:
    """Per-sample ratios, targets and the extrapolation from the measured lines."""
    at = {(name, n): line for (name, n, e), line in bench.results.items() if e == epochs}
    names = list(dict.fromkeys(name for name, _ in at))
    ratios: dict[str, dict[str, Any]] = {}
    for small, large in zip(sizes, sizes[1:]):
        pair = f"{small}->{large}"
        for name in names:
            if (name, small) in at and (name, large) in at:
                a, b = at[(name, small)], at[(name, large)]
                ratios.setdefault(pair, {})[name] = _ratio(a, b, small, large)
    largest = sizes[-1]
    audit = [at[(c, largest)] for c in AUDIT_COMMANDS if (c, largest) in at]
    make = at.get(("shards make", largest))
    shardset = _marginal_bytes(at, sizes)
    report = at.get(("report", largest))
    last_pair = ratios.get(f"{sizes[-2]}->{largest}", {}) if len(sizes) > 1 else {}
    targets = {
        "audit_peak_added_le_300mb": bool(audit) and max(x["peak_added_mb"] for x in audit) <= 300,
        "shards_make_peak_added_le_500mb": make is not None and make["peak_added_mb"] <= 500,
        "shardset_le_32_bytes_per_sample": shardset is not None and shardset <= 32,
        "report_cpu_le_5s_plus_startup": report is not None and report["cpu_s"] <= 5,
        "per_sample_cost_within_1_2x": bool(last_pair)
        and all(v <= 1.2 for r in last_pair.values() for v in r.values() if v is not None),
    }
    extrapolation = extrapolate(bench, sizes, epochs)
    targets["extrapolated_processes_le_8gb"] = bool(extrapolation["processes"]) and all(
        p["peak_gb"] <= TARGET["process_gb"] for p in extrapolation["processes"].values()
    )
    return {
        "job": "bench_scale",
        "sizes": sizes,
        "epochs": epochs,
        "startup": startup,
        "errors": bench.errors,
        "largest": {name: at[(name, largest)] for name in names if (name, largest) in at},
        "per_sample_ratio": ratios,
        "shardset_bytes_per_sample": shardset,
        "targets_at": largest,
        "targets": targets,
        "extrapolation": extrapolation,
    }


def _marginal_bytes(at: dict, sizes: list[int]) -> float | None:
    """Resident bytes an opened ShardSet adds per sample between the two largest sizes (what
    the first use of pyarrow and numpy keeps whatever the size cancels out); with one size,
    its whole held memory over N."""
    lines = [at.get(("ShardSet open", n)) for n in sizes[-2:]]
    if lines[-1] is None or (len(lines) == 2 and lines[0] is None):
        return None
    if len(lines) == 1:
        return lines[0]["held_bytes_per_sample"]
    (n1, n2), (a, b) = sizes[-2:], lines
    return round((b["held_mb"] - a["held_mb"]) * MB / (n2 - n1), 1)


def _ratio(a: dict, b: dict, n1: int, n2: int) -> dict[str, float | None]:
    """(cost(N2) / N2) / (cost(N1) / N1) of CPU and of memory added; a pass's rate inverted."""

    def per_sample(x: float, y: float) -> float | None:
        return round((y / n2) / (x / n1), 3) if x > 0 and y > 0 else None

    if "samples_per_s" in a:
        return {"cpu": round(a["samples_per_s"] / b["samples_per_s"], 3)}
    return {
        "cpu": per_sample(a["cpu_s"], b["cpu_s"]),
        "memory": per_sample(a["peak_added_mb"], b["peak_added_mb"]),
    }


def extrapolate(bench: Bench, sizes: list[int], epochs: int) -> dict[str, Any]:
    """Each process kind's peak memory at 14 M samples x 120 epochs on 64 GPUs.

    M(N, E) = a + b*N + c*N*E, fitted per process kind: b from the two largest sizes at
    ``epochs``, c from the largest size at ``epochs`` against half as many (audit, report) or
    from the driver's RSS after each epoch (0: it keeps nothing of past epochs beyond their
    rows). A worker or scorer holds its share: of b, the image and id bytes of a sample of its
    share scale with N/64 instead of N (measured with shares of N/2).
    """
    if len(sizes) < 2:
        sizes = [0, *sizes]  # one size (smoke): the line through the origin's start-up
    n1, n2, e = sizes[-2], sizes[-1], epochs
    nt, et, world = TARGET["samples"], TARGET["epochs"], TARGET["gpus"]
    share_bytes = float(np.prod(IMAGE)) + 16  # decoded pixels + int64 id and label
    kinds = ["driver records", "ShardSet open", "shards make", "shards inspect", *AUDIT_COMMANDS]
    kinds += ["training worker share", "scoring pool"]
    processes = {}
    for name in kinds:
        big = bench.results.get((name, n2, e))
        if big is None:
            continue
        total2 = big["actor_peak_mb"] if name == "scoring pool" else big["peak_rss_mb"]
        small = bench.results.get((name, n1, e))
        if small is None and n1:
            continue
        total1 = (
            (small["actor_peak_mb"] if name == "scoring pool" else small["peak_rss_mb"]) if small else None
        )
        if total1 is None:  # smoke: start-up at N = 0
            total1 = big["startup_rss_mb"] if name != "scoring pool" else total2 - big["peak_added_mb"]
        b = max(0.0, (total2 - total1) * MB / (n2 - n1))  # bytes per sample at e epochs
        c = 0.0
        half = bench.results.get((name, n2, e // 2))
        if half is not None and e // 2 < e:
            c = max(0.0, (big["peak_rss_mb"] - half["peak_rss_mb"]) * MB / (n2 * (e - e // 2)))
        elif name == "driver records" and len(big["rss_by_epoch_mb"]) > 1:
            trace = big["rss_by_epoch_mb"]
            mid = len(trace) // 2 - 1
            c = max(0.0, (trace[-1] - trace[mid]) * MB / (n2 * (len(trace) - 1 - mid)))
        full = b
        if name in ("training worker share", "scoring pool"):
            full = max(0.0, b - share_bytes / WORLD)  # what each holds of the whole set
        peak = total2 * MB + full * (nt - n2) + c * nt * (et - e)
        if name in ("training worker share", "scoring pool"):
            peak += share_bytes * (nt / world - n2 / WORLD)
        processes[name] = {
            "bytes_per_sample": round(b, 1),
            "bytes_per_sample_epoch": round(c, 3),
            "peak_gb": round(peak / 1024**3, 2),
        }
    return {
        "target": TARGET,
        "formula": "peak(14M, 120) = peak(N2, E) + b' * (14M - N2) + c * 14M * (120 - E), b = slope of peak "
        "RSS over the two largest sizes, c = per sample-epoch slope (audit: E against E/2 epochs; driver: "
        "RSS after each epoch), b' = b, or for a worker/scorer b - (pixels + 16 B)/2 plus (pixels + 16 B) "
        "* (14M/64 - N2/2) for its share; 16 px images (a share over cluster.memory_budget_gb goes to a "
        "disk cache). c resolves about 1 MB of RSS over N2 * E/2 sample-epochs (1.28 M x 5: 0.16 B, 0.27 GB at "
        "the target): measure at 1.28 M before trusting it",
        "from_sizes": [n1, n2],
        "processes": processes,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], Path(sys.argv[3]), sys.argv[4:])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--first-epochs":
        _first_epochs(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_280_000])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--out", type=Path, help="also write the JSON lines here")
    parser.add_argument("--work", type=Path, help="data folder (default: a temporary one, removed)")
    parser.add_argument(
        "--parallel", type=int, default=1, help="commands measured at once (CPU and memory are per process)"
    )
    parser.add_argument("--smoke", action="store_true", help="2,000 samples, 3 epochs, 20 classes, 2 at once")
    args = parser.parse_args()
    if args.smoke:
        args.sizes, args.epochs, args.classes, args.parallel = [2_000], 3, 20, 2
    sizes = sorted(args.sizes)
    bench = Bench(args.out, args.parallel)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        startup = bench.startup()
        for n in sizes:
            run_size(bench, n, args.classes, args.epochs, work, halves=not args.smoke and n == sizes[-1])
    bench.emit({**summarize(bench, sizes, args.epochs, startup), "smoke": args.smoke})


if __name__ == "__main__":
    main()
