"""``asd-ray run``, ``config show`` and ``evaluate``: training and judging a model."""

from __future__ import annotations

import argparse

from asd_ray.cli.common import add_quiet, format_table, local_place, place, say
from asd_ray.config import PAPER_ALGORITHM, PRESETS, StorageConfig
from asd_ray.errors import DataError


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--preset, --config, --set and --paper: how a config is layered (preset, YAML, overrides)."""
    parser.add_argument(
        "--preset",
        choices=list(PRESETS),
        help="paper preset (default: the --config file's preset, else cifar10)",
    )
    parser.add_argument(
        "--config",
        type=local_place,
        help="YAML file of config sections layered over the preset (its preset: line, if any, must "
        "match --preset); with --resume, changes to the run's config as --set makes them",
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override, e.g. --set mixmatch.iterations=256 --set data.flip=false",
    )
    parser.add_argument(
        "--paper",
        action="store_true",
        help="the paper's algorithm: turn off the settings not in the paper (split.meta_loss_guard, "
        "split.holdout_ratio, mixmatch.noise_overlay); --set applies after it",
    )


def config_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides that --paper and --set name, in that order."""
    return [*(PAPER_ALGORITHM if args.paper else ()), *args.set]


def command_storage(args: argparse.Namespace) -> StorageConfig:
    """The storage settings this command gives (its --config's ``storage:`` and --set
    storage.*). A resumed run uses these, never the ones its folder records: a run folder in
    a shared bucket must not send the user's signed requests to an endpoint of its choosing."""
    from asd_ray.config import load_config

    wanted = [o for o in args.set if o.partition("=")[0].strip().startswith("storage.")]
    return load_config(None, args.config, wanted).storage


def add_commands(commands) -> None:
    """``run``, ``config show`` and ``evaluate``."""
    run = commands.add_parser(
        "run",
        help="train with ASD (or the no-defense baseline) on Ray",
        description="Run ASD: every epoch score all samples (Ray actors), split into clean and "
        "polluted pools (RUN/splits/epoch=NNN/part-0.parquet), train one MixMatch epoch (Ray "
        "Train DDP), evaluate, and append to RUN/metrics.parquet. Config: --preset, then "
        "--config YAML, then --set overrides, then the dedicated flags.",
    )
    add_config_flags(run)
    run.add_argument("--train", type=place, help="poisoned (untrusted) training shard folder")
    run.add_argument("--test", type=place, help="clean test shard folder (ACC)")
    run.add_argument("--poison-test", type=place, help="triggered test shard folder (ASR)")
    run.add_argument("--seeds", type=place, help="seeds table from `asd-ray seeds` (needed by --defense asd)")
    run.add_argument(
        "--ground-truth",
        type=place,
        help="poison.parquet of --train, joined into split tables for reporting only (never used to split)",
    )
    run.add_argument("--out", type=place, required=True, help="run folder")
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
    run.add_argument(
        "--tensorboard", action="store_true", help="also log each epoch's metrics to RUN/tensorboard"
    )
    add_quiet(run)
    run.set_defaults(func=_run)

    config = commands.add_parser("config", help="show the resolved configuration")
    config_commands = config.add_subparsers(dest="config_command", required=True)
    show = config_commands.add_parser(
        "show",
        help="print the resolved config as YAML, or explained",
        description="Layer --preset, --config and --set as `asd-ray run` does and print the result "
        "as YAML (on stdout: it is the product; save it and pass it back with --config).",
    )
    add_config_flags(show)
    show.add_argument(
        "--explain",
        action="store_true",
        help="instead of YAML, every setting with its value, meaning and rule",
    )
    show.add_argument("--markdown", action="store_true", help="--explain as a markdown table (the README's)")
    show.set_defaults(func=_config_show)

    evaluate = commands.add_parser(
        "evaluate",
        help="ACC, ASR and robust accuracy of a saved model on shard sets",
        description="Load RUN/model/best.pt (or last.pt, or a .pt file) and report ACC on --test "
        "and, with --poison-test, ASR and robust accuracy (from that set's ground truth).",
    )
    evaluate.add_argument(
        "--model", type=place, required=True, help="run folder, its model/ folder, or a .pt file"
    )
    evaluate.add_argument("--kind", choices=("best", "last"), default="best", help="which model of a run")
    evaluate.add_argument(
        "--factory",
        help="package.module:function that builds a model trained with model.name=custom (code you "
        "trust: a model file never names code to run; its recorded factory must match)",
    )
    evaluate.add_argument("--test", type=place, required=True, help="clean test shard folder (ACC)")
    evaluate.add_argument(
        "--poison-test", type=place, help="triggered test shard folder (ASR, robust accuracy)"
    )
    evaluate.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    add_quiet(evaluate)
    evaluate.set_defaults(func=_evaluate)


def run_overrides(args: argparse.Namespace) -> list[str]:
    """The ``--set`` overrides of an ``asd-ray run`` command line, its dedicated flags
    (``--workers``, ``--gpus-per-worker``, ...) last: they win."""
    overrides = config_overrides(args)
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
    return overrides


def _run(args: argparse.Namespace) -> dict:
    from asd_ray.config import load_config
    from asd_ray.driver import run
    from asd_ray.inputs import RunInputs
    from asd_ray.resume import resumed_config

    overrides = run_overrides(args)
    if args.resume:  # the run's own config, with what this command changes (checked by the driver)
        config = resumed_config(
            args.out, command_storage(args), preset=args.preset, overrides=overrides, config_file=args.config
        )
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
        progress=say,
        tensorboard=args.tensorboard,
    )


def _config_show(args: argparse.Namespace) -> None:
    from asd_ray.config import config_yaml, load_config
    from asd_ray.config_explain import explain_markdown, explain_text

    config = load_config(args.preset, args.config, config_overrides(args))
    show = explain_markdown if args.markdown else explain_text if args.explain else config_yaml
    print(show(config), end="")


def _evaluate(args: argparse.Namespace) -> dict:
    from asd_ray.data.shards import ShardSet
    from asd_ray.evaluate import evaluate_model
    from asd_ray.models.saved import load_model

    if args.batch_size < 1:
        raise DataError(f"--batch-size {args.batch_size}: give at least 1")
    model = load_model(args.model, args.kind, factory=args.factory)
    test = ShardSet(args.test)
    poison_test = ShardSet(args.poison_test) if args.poison_test else None
    figures = evaluate_model(model, test, poison_test, batch_size=args.batch_size)
    card = model.card
    rows = [{"figure": name, "value": value} for name, value in figures.items()]
    say(f"model {card['file']} (epoch {card['epoch']}, {card['kind']})")
    say(format_table(rows, ["figure", "value"]))
    return {"command": "evaluate", "model": card["file"], "epoch": card["epoch"], **figures}
