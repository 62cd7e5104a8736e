"""``asd-ray report RUN``: one self-contained HTML page about a run, for people.

Reads only run outputs (complete epochs, so a running run can be reported) and
the training shards for thumbnails, and writes into ``RUN/audit/`` (or the folder
``--out`` names, for a run the user may not write); the run and the output folder
may each be local or at an object-store URI (:mod:`asd_ray.storage`):

- ``report.html``: ACC, ASR and robust accuracy with the pools per epoch and the
  stage boundaries; per-stage loss histograms of clean against poisoned samples
  (ground truth known; else clean against polluted pool), like the paper's
  figures 1 and 3; thumbnails of the most suspicious samples and of the
  hardest samples kept clean; the config and inputs. Plots are PNGs embedded
  as data URIs, so the file can be mailed or archived alone.
- ``flags.parquet`` (schemas/flags.json): the per-sample flag history.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

from asd_ray import files, storage, tables
from asd_ray.audit import history
from asd_ray.errors import ConfigError, DataError
from asd_ray.run_folder import CONFIG_FILE, INPUTS_FILE, RESTORE
from asd_ray.split import POLLUTED, in_pool
from asd_ray.storage import Location

AUDIT_DIR = "audit"
THUMBNAILS = 24
# Frame colours of the thumbnails: the browser test looks for them in a screenshot.
FLAGGED_FRAME, KEPT_FRAME = "#ff00ff", "#00c8ff"  # used nowhere else on the page


def report(run: str | Path | Location, out: str | Path | Location | None = None) -> dict[str, Any]:
    """Write ``report.html`` and ``flags.parquet`` into ``out`` (default ``RUN/audit``);
    return what was written.

    Everything is read and checked first, so a run folder that fails a check gets
    no file at all. Reading needs no write access to the run: a read-only run (a
    shared result) is reported with ``out`` elsewhere.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    run = storage.absolute(storage.location(run))
    inside_run = out is None
    folder = run / AUDIT_DIR if inside_run else storage.absolute(storage.location(out))
    metrics = history.read_metrics(run).to_pylist()
    if not metrics:
        raise DataError(f"{run}: no complete epoch yet; report again after the first one")
    _check_output_folder(folder, inside_run=inside_run)
    summary: dict[str, Any] = {"command": "report", "run": str(run), "epochs": len(metrics)}
    sections = [_header(run, metrics), _figure("Metrics per epoch", _curves(metrics))]
    flags, epochs = None, history.complete_epochs(run)
    if epochs:
        sections.append(_figure("Losses per stage (the last epoch of each)", _histograms(run, metrics)))
        sections += _thumbnail_sections(run)
    sections.append(_text_section(run))
    page = _page(f"asd-ray report: {run.name}", sections)
    if epochs:  # after the pictures: the two are never held together
        flags = history.flag_history(run, epochs)
    _check_output_folder(folder, inside_run=inside_run)  # again: it may have changed meanwhile
    if folder.is_local:
        try:
            folder.local.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise _unwritable(folder, err.strerror, inside_run=inside_run) from None
    if flags is not None:
        summary["flags"] = str(tables.write_parquet(flags, folder / "flags.parquet", "flags"))
    path = folder / "report.html"
    with tables.atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    summary["report"] = str(path)
    return summary


def _check_output_folder(where: Location, *, inside_run: bool) -> None:
    """The report's folder must be one the user may write. RUN/audit must also be absent or
    a real folder inside the run, never a link out of it (a run folder is handed over; a
    ``--out`` the user names may be a link of theirs). At a URI, it must not be an object
    (write access shows when the files are published)."""
    if not where.is_local:
        if storage.is_file(where):
            raise _unwritable(where, f"{where} is an object, not a prefix", inside_run=inside_run)
        return
    folder = where.local
    if inside_run and (folder.is_symlink() or (folder.exists() and not folder.is_dir())):
        raise DataError(
            f"{folder} is a link or a file, not a folder; report writes only inside the run folder: "
            "remove it (or move it aside) and report again"
        )
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise _unwritable(folder, f"{existing} is a file", inside_run=inside_run)
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _unwritable(folder, f"no write access to {existing}", inside_run=inside_run)


def _unwritable(folder: Path | Location, why: str, *, inside_run: bool) -> ConfigError:
    fix = "pass --out FOLDER to write it elsewhere" if inside_run else "choose another --out"
    return ConfigError(f"cannot write the report in {folder} ({why}); {fix}")


def _png(figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _figure(title: str, png: str) -> str:
    return (
        f'<h2>{html.escape(title)}</h2>\n<img alt="{html.escape(title)}" src="data:image/png;base64,{png}">'
    )


def _stage_lines(axis, metrics: list[dict]) -> None:
    for before, row in zip(metrics, metrics[1:]):
        if row["stage"] != before["stage"]:
            axis.axvline(row["epoch"] - 0.5, color="grey", linestyle="--", linewidth=1)
            axis.text(
                row["epoch"] - 0.4,
                0.98,
                f"stage {row['stage']}",
                transform=axis.get_xaxis_transform(),
                va="top",
                fontsize=8,
                color="grey",
            )


def _curves(metrics: list[dict]) -> str:
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in metrics]
    figure, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6.5), sharex=True)
    for key, label, colour in (
        ("acc", "ACC", "#1f77b4"),
        ("asr", "ASR", "#d62728"),
        ("robust_acc", "robust accuracy", "#9467bd"),
    ):
        values = [np.nan if r[key] is None else 100 * r[key] for r in metrics]
        if not np.all(np.isnan(values)):
            top.plot(epochs, values, marker="o", markersize=3, color=colour, label=label)
    top.set_ylabel("%")
    top.set_ylim(-2, 102)
    top.legend(loc="center right")
    top.grid(alpha=0.3)
    _stage_lines(top, metrics)
    bottom.plot(epochs, [r["clean_pool"] for r in metrics], color="#2ca02c", label="clean pool")
    bottom.plot(epochs, [r["polluted_pool"] for r in metrics], color="#ff7f0e", label="polluted pool")
    if any(r["poison_in_clean"] is not None for r in metrics):
        poisoned = [np.nan if r["poison_in_clean"] is None else r["poison_in_clean"] for r in metrics]
        bottom.plot(epochs, poisoned, color="#8c564b", label="poisoned in clean pool")
    bottom.set_ylabel("samples")
    bottom.set_xlabel("epoch")
    bottom.legend(loc="center right")
    bottom.grid(alpha=0.3)
    _stage_lines(bottom, metrics)
    return _png(figure)


def _histograms(run: Location, metrics: list[dict]) -> str:
    import matplotlib.pyplot as plt

    complete = set(history.complete_epochs(run))
    last_of_stage = {r["stage"]: r["epoch"] for r in metrics if r["epoch"] in complete}  # rows ascend
    figure, axes = plt.subplots(1, len(last_of_stage), figsize=(4.2 * len(last_of_stage), 3.4), squeeze=False)
    for axis, (stage, epoch) in zip(axes[0], sorted(last_of_stage.items())):
        column = "loss_reduction" if stage == 3 else "loss"
        split = history.read_split(run, epoch, columns=(column, "is_poison", "pool"))
        values = split.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
        truth = split.column("is_poison")
        if truth.null_count == 0:
            bad = truth.to_numpy(zero_copy_only=False)
            names = ("clean", "poisoned")
        else:
            bad = in_pool(split, POLLUTED)
            names = ("clean pool", "polluted pool")
        bins = np.histogram_bin_edges(values[np.isfinite(values)], bins=40)
        axis.hist(values[~bad], bins=bins, alpha=0.6, color="#1f77b4", label=names[0], density=True)
        axis.hist(values[bad], bins=bins, alpha=0.6, color="#d62728", label=names[1], density=True)
        axis.set_title(f"stage {stage} (epoch {epoch})")
        axis.set_xlabel("loss reduction (virtual model)" if stage == 3 else "SCE loss")
        axis.legend(fontsize=8)
    figure.tight_layout()
    return _png(figure)


_THUMBNAIL_COLUMNS = ("suspicion", "pool", "is_seed", "pinned", "label", "is_poison", "original_label")


def _thumbnail_sections(run: Location) -> list[str]:
    """The most suspicious flagged samples and the hardest kept ones, drawn from only their
    own records (:meth:`~asd_ray.data.shards.ShardSet.iter_samples` reads just the byte
    ranges that hold them): the page costs the same for 10 k samples as for 14 M."""
    split = history.read_split(run, history.complete_epochs(run)[-1], columns=_THUMBNAIL_COLUMNS)
    score = split.column("suspicion").to_numpy()
    polluted = in_pool(split, POLLUTED)
    seeds = split.column("is_seed").to_numpy(zero_copy_only=False)
    flagged = _most_suspicious(score, polluted, THUMBNAILS)
    kept = _most_suspicious(score, ~polluted & ~seeds, THUMBNAILS)
    shards = history.train_shards(run, split)
    if shards is None:
        return [
            "<h2>Samples</h2>\n<p>The training shards are no longer where the run read them; no thumbnails.</p>"
        ]
    wanted = np.zeros(len(shards), bool)
    wanted[np.concatenate([flagged, kept])] = True
    images = {s.sample_id: s.image for s in shards.iter_samples(keep=wanted)}
    return [  # read_split gives row i to sample i
        _figure(
            f"The {len(flagged)} most suspicious samples (polluted pool, last epoch)",
            _grid([images[i] for i in flagged], split.take(flagged).to_pylist(), FLAGGED_FRAME),
        ),
        _figure(
            f"The {len(kept)} hardest samples kept clean (highest suspicion in the clean pool)",
            _grid([images[i] for i in kept], split.take(kept).to_pylist(), KEPT_FRAME),
        ),
    ]


def _most_suspicious(score: np.ndarray, among: np.ndarray, k: int) -> np.ndarray:
    """Up to ``k`` sample ids of ``among`` ((N,) bool), highest ``score`` first, ties by
    id: the order of a stable sort, without sorting all N."""
    ids = np.flatnonzero(among)
    if len(ids) > k:
        kth = np.partition(score[ids], len(ids) - k)[len(ids) - k]  # the k-th highest score
        ids = ids[score[ids] >= kth]
    return ids[np.lexsort((ids, -score[ids]))][:k]


def _grid(images: list[np.ndarray], rows: list[dict], frame: str) -> str:
    import matplotlib.pyplot as plt

    columns = 8
    lines = max(1, -(-len(images) // columns))
    figure, axes = plt.subplots(lines, columns, figsize=(columns * 1.25, lines * 1.55), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    for axis, image, row in zip(axes.flat, images, rows):
        axis.imshow(image.squeeze(), cmap="gray" if image.shape[-1] == 1 else None, vmin=0, vmax=255)
        axis.axis("on")
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_edgecolor(frame)
            spine.set_linewidth(4)
        truth = ""
        if row.get("is_poison"):
            truth = f" P{row['original_label']}"
        axis.set_title(f"#{row['sample_id']} y={row['label']}{truth}\n{row['suspicion']:.3f}", fontsize=7)
    figure.tight_layout()
    return _png(figure)


def _header(run: Location, metrics: list[dict]) -> str:
    last = metrics[-1]
    asrs = [r["asr"] for r in metrics if r["asr"] is not None]
    facts = {
        "run": str(run),
        "defense": last["defense"],
        "complete epochs": len(metrics),
        "last epoch": f"{last['epoch']} (stage {last['stage']})",
        "ACC (last)": _percent(last["acc"]),
        "ASR (last / worst)": f"{_percent(last['asr'])} / {_percent(max(asrs) if asrs else None)}",
        "robust accuracy (last)": _percent(last["robust_acc"]),
        "pools (last)": f"{last['clean_pool']} clean, {last['polluted_pool']} polluted",
        "poisoned in the clean pool (last)": "-"
        if last["poison_in_clean"] is None
        else last["poison_in_clean"],
    }
    card = history.read_card(run)
    if card is not None:
        facts["model"] = (
            f"{run / 'model'} (best: epoch {card['best']['epoch']}, last: epoch {card['last']['epoch']})"
        )
    rows = "\n".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(str(v))}</td></tr>" for k, v in facts.items()
    )
    return f"<table class=facts>\n{rows}\n</table>"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _text_section(run: Location) -> str:
    """The run's config.yaml and inputs.json as they are, escaped: read as regular files (or
    objects) of at most :data:`~asd_ray.files.MAX_TEXT_BYTES` and never through a link, so a
    run folder cannot copy a file from elsewhere (a private key) into a page meant to be mailed."""
    parts = []
    for name in (CONFIG_FILE, INPUTS_FILE):
        path = run / name
        if storage.lexists(path):
            data = files.read_file(path, what=str(path), fix=RESTORE)
            text = data.decode("utf-8", errors="replace")
            parts.append(f"<h3>{name}</h3>\n<pre>{html.escape(text)}</pre>")
    return "<h2>Config and inputs</h2>\n" + "\n".join(parts)


def _page(title: str, sections: list[str]) -> str:
    style = (
        "body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "img{max-width:100%}table.facts th{text-align:left;padding-right:1em}"
        "pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:12px}"
    )
    body = "\n".join(sections)
    return (
        f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head>\n<body>\n<h1>{html.escape(title)}</h1>\n{body}\n</body></html>\n"
    )
