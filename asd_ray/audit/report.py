"""Audit a finished (or running) run: which samples were flagged, and a picture of the run.

Reads only run outputs (``RUN/splits``, ``RUN/metrics.parquet``) and writes
into ``RUN/audit/``:

- ``flags.parquet`` (schemas/flags.json): per sample, how many epochs it spent
  in the polluted pool and its pool in the last epoch, with ground truth when
  the split tables carry it;
- ``metrics.png``: ACC, ASR and the poisoned share of the clean pool per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
from PIL import Image, ImageDraw

from asd_ray import tables
from asd_ray.errors import DataError

AUDIT_DIR = "audit"


def load_splits(run: str | Path) -> pa.Table:
    """Every epoch's split table of ``run``, each part validated, with an ``epoch`` column."""
    folder = Path(run) / "splits"
    parts = sorted(folder.glob("epoch=*/part-0.parquet"))
    if not parts:
        raise DataError(f"{folder}: no split tables; is {run} an `asd-ray run --defense asd` folder?")
    for part in parts:
        tables.read_parquet(part, "splits")
    dataset = ds.dataset(folder, format="parquet", partitioning="hive")
    return dataset.to_table().sort_by([("epoch", "ascending"), ("sample_id", "ascending")])


def flag_history(splits: pa.Table) -> pa.Table:
    """Per-sample flag history (schemas/flags.json) from :func:`load_splits`."""
    epochs = splits.column("epoch").to_numpy()
    last_epoch = int(epochs.max())
    ids = splits.column("sample_id").to_numpy()
    n = int(ids.max()) + 1
    polluted = pc.equal(splits.column("pool"), "polluted").to_numpy(zero_copy_only=False)
    times_polluted = np.bincount(ids[polluted], minlength=n)
    last = splits.filter(pc.equal(splits.column("epoch"), last_epoch)).sort_by("sample_id")
    if last.num_rows != n:
        raise DataError(f"the split table of epoch {last_epoch} has {last.num_rows} rows for {n} samples")
    return tables.from_pydict(
        {
            "sample_id": np.arange(n),
            "label": last.column("label").to_numpy(),
            "epochs_seen": np.full(n, len(np.unique(epochs))),
            "epochs_polluted": times_polluted,
            "last_epoch": np.full(n, last_epoch),
            "last_pool": last.column("pool").to_pylist(),
            "last_rank": last.column("rank").to_numpy(),
            "is_poison": last.column("is_poison").to_pylist(),
            "original_label": last.column("original_label").to_pylist(),
        },
        "flags",
    )


def flag_summary(flags: pa.Table) -> dict[str, Any]:
    """Counts of flagged samples; with ground truth, how well the last split caught the poison."""
    flagged = pc.equal(flags.column("last_pool"), "polluted").to_numpy(zero_copy_only=False)
    summary: dict[str, Any] = {"samples": flags.num_rows, "flagged_last_epoch": int(flagged.sum())}
    truth = flags.column("is_poison")
    if truth.null_count == 0:
        poison = truth.to_numpy(zero_copy_only=False)
        summary |= {
            "poisoned": int(poison.sum()),
            "poisoned_flagged": int((poison & flagged).sum()),
            "poisoned_in_clean_pool": int((poison & ~flagged).sum()),
            "poison_recall_last_epoch": float((poison & flagged).sum() / max(poison.sum(), 1)),
        }
    return summary


def plot_metrics(metrics: pa.Table, path: str | Path, *, width: int = 900, height: int = 420) -> Path:
    """Draw ACC, ASR and the poisoned share of the clean pool per epoch as a PNG."""
    rows = metrics.to_pylist()
    if not rows:
        raise DataError("no metrics rows to plot yet")
    series = {
        "ACC %": ([100 * r["acc"] for r in rows], (31, 119, 180)),
        "ASR %": ([100 * r["asr"] if r["asr"] is not None else None for r in rows], (214, 39, 40)),
        "poisoned in clean pool %": (
            [
                100 * r["poison_fraction_clean"] if r["poison_fraction_clean"] is not None else None
                for r in rows
            ],
            (44, 160, 44),
        ),
    }
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 20, 40, height - 50
    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    epochs = [r["epoch"] for r in rows]
    span = max(epochs[-1] - epochs[0], 1)

    def x_of(epoch: int) -> float:
        return left + (epoch - epochs[0]) / span * (right - left)

    def y_of(value: float) -> float:
        return bottom - value / 100 * (bottom - top)

    for tick in range(0, 101, 20):
        draw.line([left - 4, y_of(tick), left, y_of(tick)], fill=(0, 0, 0))
        draw.text((left - 34, y_of(tick) - 6), f"{tick:>3}", fill=(0, 0, 0))
        draw.line([left, y_of(tick), right, y_of(tick)], fill=(230, 230, 230))
    for epoch in epochs[:: max(1, len(epochs) // 12)]:
        draw.text((x_of(epoch) - 6, bottom + 6), str(epoch), fill=(0, 0, 0))
    draw.text(((left + right) // 2 - 20, bottom + 24), "epoch", fill=(0, 0, 0))
    stage_changes = [r["epoch"] for a, r in zip(rows, rows[1:]) if r["stage"] != a["stage"]]
    for epoch in stage_changes:  # dashed stage boundaries
        for y in range(top, bottom, 8):
            draw.line([x_of(epoch) - 0.5, y, x_of(epoch) - 0.5, y + 4], fill=(150, 150, 150))
    for i, (name, (values, colour)) in enumerate(series.items()):
        points = [(x_of(e), y_of(v)) for e, v in zip(epochs, values) if v is not None]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for px, py in points:
            draw.ellipse([px - 2, py - 2, px + 2, py + 2], fill=colour)
        draw.rectangle([left + 10 + 230 * i, 12, left + 24 + 230 * i, 24], fill=colour)
        draw.text((left + 30 + 230 * i, 12), name, fill=(0, 0, 0))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tables.atomic_file(path) as tmp:
        image.save(tmp, format="PNG")
    return path


def report(run: str | Path) -> dict[str, Any]:
    """Write ``RUN/audit/flags.parquet`` and ``RUN/audit/metrics.png``; return a summary."""
    run = Path(run).absolute()
    metrics = tables.read_parquet(run / "metrics.parquet", "metrics")
    out = run / AUDIT_DIR
    summary: dict[str, Any] = {"command": "report", "run": str(run), "epochs": metrics.num_rows}
    summary["plot"] = str(plot_metrics(metrics, out / "metrics.png"))
    if (run / "splits").is_dir():
        flags = flag_history(load_splits(run))
        summary["flags"] = str(tables.write_parquet(flags, out / "flags.parquet", "flags"))
        summary |= flag_summary(flags)
    return summary
