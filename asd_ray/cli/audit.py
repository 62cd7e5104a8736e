"""``asd-ray audit`` and ``report``: what a run flagged, for people and for pipelines.

Audit commands print a readable table on stdout (the table is their product) or,
with ``--json``, JSON for scripts; they read complete epochs only, so they work
while the run goes on.
"""

from __future__ import annotations

import argparse
from typing import Any

from asd_ray import storage
from asd_ray.cli.common import add_quiet, place, print_table, say, shown
from asd_ray.errors import DataError

SUMMARY_COLUMNS = (
    "epoch",
    "stage",
    "clean_pool",
    "polluted_pool",
    "acc",
    "asr",
    "robust_acc",
    "poison_in_clean",
    "flag_precision",
    "flag_recall",
    "flag_f1",
    "flag_auroc",
)
FLAGGED_COLUMNS = ("sample_id", "label", "suspicion", "loss", "loss_reduction", "flagged_streak", "is_poison")
SAMPLE_COLUMNS = ("epoch", "stage", "pool", "rank", "suspicion", "loss", "meta_loss", "loss_reduction")


def add_commands(commands) -> None:
    """``audit summary|flagged|sample|export|manifest`` and ``report``."""
    audit = commands.add_parser(
        "audit",
        help="what a run flagged: per epoch, per class, per sample; exports for data cleaning",
        description="Read a run folder's complete epochs (also while it runs). The suspicion score "
        "of a sample in an epoch is its place in that epoch's splitting order: 0 = most trusted, "
        "1 = least (per class in stage 1, over all samples in stages 2 and 3).",
    )
    audit_commands = audit.add_subparsers(dest="audit_command", required=True)

    def command(name: str, help_text: str, func) -> argparse.ArgumentParser:
        parser = audit_commands.add_parser(name, help=help_text, description=help_text)
        parser.add_argument("run", type=place, help="run folder")
        parser.set_defaults(func=func)
        return parser

    summary = command("summary", "per epoch: stage, pools, ACC, ASR, robust accuracy, detection", _summary)
    summary.add_argument("--json", action="store_true", help="JSON on stdout instead of tables")
    flagged = command("flagged", "one epoch's polluted pool, most suspicious first", _flagged)
    flagged.add_argument("--epoch", default="last", help="epoch number or 'last' (default)")
    flagged.add_argument("--top", type=int, help="only the K most suspicious")
    flagged.add_argument(
        "--class", dest="label", type=int, help="only samples labelled C (one of the run's classes)"
    )
    flagged.add_argument("--json", action="store_true", help="JSON lines on stdout instead of a table")
    sample = command("sample", "one sample's history: pool, rank, suspicion and losses per epoch", _sample)
    sample.add_argument("sample_id", type=int, help="sample id")
    sample.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    export = command("export", "the per-sample flag history as a Parquet or CSV file", _export)
    export.add_argument("--format", choices=("parquet", "csv"), default="parquet")
    export.add_argument("--out", type=place, required=True, help="output file")
    manifest = command(
        "manifest", "ids and record keys to drop or review: suspicion >= X in the last epoch", _manifest
    )
    manifest.add_argument("--threshold", type=float, required=True, help="suspicion threshold in [0, 1]")
    manifest.add_argument(
        "--out", type=place, required=True, help="output CSV (sample_id, key, shard, label, ...)"
    )
    for parser in (export, manifest):
        parser.add_argument("--overwrite", action="store_true", help="replace --out if it is a file")
        add_quiet(parser)

    report = commands.add_parser(
        "report",
        help="one self-contained HTML page about a run (RUN/audit/report.html)",
        description="Write report.html (curves with stage boundaries, per-stage loss "
        "histograms, thumbnails of the most suspicious and of the hardest kept-clean samples, "
        "config and inputs; images embedded) and flags.parquet into RUN/audit, or --out.",
    )
    report.add_argument("run", type=place, help="run folder")
    report.add_argument(
        "--out", type=place, help="folder to write into (default RUN/audit; for a run you may not write)"
    )
    add_quiet(report)
    report.set_defaults(func=_report)


def _summary(args: argparse.Namespace) -> dict | None:
    from asd_ray.audit import history

    metrics = history.read_metrics(args.run).to_pylist()
    classes = history.per_class(args.run) if history.complete_epochs(args.run) else []
    if args.json:
        return {
            "command": "audit summary",
            "run": shown(args.run),
            "epochs": metrics,
            "classes": classes,
        }
    print_table(metrics, SUMMARY_COLUMNS, title=f"{args.run}: {len(metrics)} complete epoch(s)")
    if classes:
        print()
        columns = [
            c
            for c in ("class", "name", "samples", "clean", "polluted", "poisoned", "poisoned_in_clean")
            if c in classes[0]
        ]
        print_table(classes, columns, title=f"per class, epoch {metrics[-1]['epoch']}")
    return None


def _flagged(args: argparse.Namespace) -> dict | None:
    from asd_ray.audit import history

    if args.top is not None and args.top < 1:
        raise DataError(f"--top {args.top}: give at least 1")
    rows = history.flagged_samples(args.run, args.epoch, top=args.top, label=args.label)
    if args.json:
        return {"command": "audit flagged", "run": shown(args.run), "samples": rows.to_pylist()}
    epoch = rows.column("epoch")[0].as_py() if rows.num_rows else args.epoch
    print_table(
        rows.select(FLAGGED_COLUMNS),
        FLAGGED_COLUMNS,
        title=f"epoch {epoch}: {rows.num_rows} flagged sample(s), most suspicious first",
    )
    return None


def _sample(args: argparse.Namespace) -> dict | None:
    from asd_ray.audit import history

    rows = history.sample_history(args.run, args.sample_id)
    if args.json:
        return {"command": "audit sample", "sample_id": args.sample_id, "epochs": rows}
    first = rows[0] if rows else {}
    truth = (
        f", poisoned: {first['is_poison']} (original label {first['original_label']})"
        if first.get("is_poison") is not None
        else ""
    )
    print_table(rows, SAMPLE_COLUMNS, title=f"sample {args.sample_id}: label {first.get('label')}{truth}")
    return None


def _export(args: argparse.Namespace) -> dict:
    import pyarrow.csv as pacsv

    from asd_ray import tables
    from asd_ray.audit import history

    out = storage.location(args.out)
    # refused before the work, checked again when written
    tables.check_output(out, overwrite=args.overwrite)
    flags = history.flag_history(args.run)  # Arrow columns, no Python object per sample
    if args.format == "parquet":
        tables.write_parquet(flags, out, "flags", overwrite=args.overwrite)
    else:
        with tables.atomic_file(out, overwrite=args.overwrite) as tmp:
            pacsv.write_csv(flags, tmp)  # a batch of rows at a time
    say(f"wrote {flags.num_rows} rows to {out}")
    return {
        "command": "audit export",
        "out": shown(out),
        "rows": flags.num_rows,
        "format": args.format,
    }


MANIFEST_COLUMNS = (
    "sample_id",
    "key",
    "shard",
    "label",
    "suspicion",
    "last_pool",
    "pinned",
    "flagged_streak",
    "epochs_polluted",
)


def _manifest(args: argparse.Namespace) -> dict:
    """The chosen rows are picked, joined to their records' keys and shards, and written
    by pyarrow (the CSV a batch at a time): no Python object per sample."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from asd_ray import run_folder, tables
    from asd_ray.audit import history

    if not 0.0 <= args.threshold <= 1.0:
        raise DataError(f"--threshold {args.threshold}: give a suspicion in [0, 1]")
    out = storage.location(args.out)
    tables.check_output(out, overwrite=args.overwrite)
    flags = history.flag_history(args.run)
    trusted = pc.fill_null(pc.equal(flags.column("pinned"), "trusted"), False)
    chosen = flags.filter(  # training ids: a seed's trusted copy is no record of the set
        pc.and_(pc.greater_equal(flags.column("suspicion"), args.threshold), pc.invert(trusted))
    )
    last = history.resolve_epoch(args.run, "last")
    shards = history.train_shards(args.run, history.read_split(args.run, last, ("pinned", "is_seed")))
    if shards is None:
        folder = run_folder.read_inputs(args.run)["train"]
        raise DataError(
            f"{folder}: the run's training shards are no longer there; put them back to list keys"
        )
    ids = chosen.column("sample_id").to_numpy()
    records = shards.manifest_rows(ids, ("key", "shard"))
    if not np.array_equal(records.column("sample_id").to_numpy(), ids):  # flags are in id order
        raise DataError(
            f"{shards.folder}: its manifest does not list samples {ids[:3]}...; re-make the shard set"
        )
    six_places = pc.cast(pc.cast(chosen.column("suspicion"), pa.decimal128(16, 6), safe=False), pa.string())
    columns = {
        name: records.column(name)
        if name in ("key", "shard")
        else six_places
        if name == "suspicion"
        else chosen.column(name)
        for name in MANIFEST_COLUMNS
    }
    _write_csv(pa.table(columns), out, overwrite=args.overwrite)
    say(f"{chosen.num_rows} of {flags.num_rows} samples have suspicion >= {args.threshold}; wrote {out}")
    return {
        "command": "audit manifest",
        "out": shown(out),
        "samples": chosen.num_rows,
        "threshold": args.threshold,
    }


def _write_csv(table, out: storage.Location, *, overwrite: bool) -> None:
    """``table`` as CSV the way Python's csv module writes it (CRLF line ends, no quotes),
    a batch of rows at a time; if a string holds a comma, quote or line end, every string
    is quoted (pyarrow quotes all strings or none)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.csv as pacsv

    from asd_ray import tables

    special = any(
        pc.any(pc.match_substring_regex(table.column(i), r'[",\r\n]')).as_py()
        for i, field in enumerate(table.schema)
        if pa.types.is_string(field.type)
    )
    quoting = "needed" if special else "none"
    options = pacsv.WriteOptions(eol="\r\n", quoting_style=quoting, quoting_header="none")
    with tables.atomic_file(out, overwrite=overwrite) as tmp:
        pacsv.write_csv(table, tmp, write_options=options)


def _report(args: argparse.Namespace) -> dict[str, Any]:
    from asd_ray.audit.report import report

    summary = report(args.run, args.out)
    say(f"wrote {summary['report']}")
    return summary
