"""The rule of every setting (its type and range, list of choices or format) and its meaning.

:data:`RUN_RANGES` is the one table of the run settings: it validates them and explains
them (``asd-ray config show --explain`` and the README's table are made from it, by
:mod:`asd_ray.config_explain`). Each config section, and each attack parameter, is
checked against its rules where it is built (:mod:`asd_ray.config`), so no value
reaches Ray or torch unchecked. A bound says what the value feeds (a seed enters
torch's 64 bits, Ray counts resources in steps of 0.0001); a refusal is one line
naming the key, and quotes a giant value by its start only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any, NamedTuple

from asd_ray.errors import ConfigError

Rule = tuple[Callable[[Any], bool], str]  # (accepts the value?, what it must be)


class Setting(NamedTuple):
    """One config key: the rule its value must follow, and what it means (one line of help)."""

    rule: Rule
    meaning: str


def finite(low: float, *, strict: bool, high: float | None = None) -> Rule:
    """A finite number above ``low`` (strictly or not), and at most ``high``."""
    top = math.inf if high is None else high
    above = (lambda v: v > low) if strict else (lambda v: v >= low)
    rule = f"a finite number {'>' if strict else '>='} {low}" + ("" if high is None else f" and <= {high}")
    return (lambda v: is_number(v) and math.isfinite(v) and above(v) and v <= top), rule


def whole(low: int, high: int) -> Rule:
    return (lambda v: type(v) is int and low <= v <= high), f"an integer in {low}..{high}"


def _resource(*, strict: bool, high: int) -> Rule:
    """A Ray resource quantity: Ray counts in steps of 0.0001 and refuses finer ones (and
    totals over 1e14, which ``high`` times the process counts stays far below)."""
    ok, rule = finite(0, strict=strict, high=high)
    return (lambda v: ok(v) and round(v, 4) == v), f"{rule}, in steps of 0.0001"


# Ray's own resources have settings of their own (cpus_per_*, gpus_per_*); a custom one is a
# name as `ray start --resources` takes it, `node:<ip>` (Ray's resource of one node) included.
_RAY_OWN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")
_RESOURCE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.:/-]{0,127}")


def _custom_resources() -> Rule:
    """Up to 32 custom Ray resources, by name, each an amount Ray accepts."""
    amount, amount_rule = _resource(strict=True, high=10_000)
    return (
        lambda v: (
            len(v) <= 32
            and all(
                _RESOURCE_NAME.fullmatch(name) and name not in _RAY_OWN_RESOURCES and amount(x)
                for name, x in v.items()
            )
        ),
        "a mapping of up to 32 custom resource names (letters, digits, _.:/-; not CPU, GPU, memory or "
        f"object_store_memory, which have settings of their own) to amounts, each {amount_rule}",
    )


def one_of(*choices: str) -> Rule:
    return (lambda v: v in choices), "one of " + ", ".join(choices)


def optional(rule: Rule) -> Rule:
    ok, text = rule
    return (lambda v: v is None or ok(v)), f"{text} (or null)"


def _entries(rule: Rule, most: int) -> Rule:
    """A list of 1..``most`` values that each follow ``rule``."""
    ok, text = rule
    return (
        lambda v: 1 <= len(v) <= most and all(ok(x) for x in v)
    ), f"a list of 1..{most} entries, each {text}"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_factory(value: str) -> bool:
    module, sep, function = value.partition(":")
    return bool(sep) and all(p.isidentifier() for p in (*module.split("."), function))


_ENDPOINT = re.compile(r"https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?")
_REGION = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")
_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def _is_storage_place(value: str) -> bool:
    """A local path, or an s3:// or gs:// URI without query or fragment (checked in full
    where it is opened)."""
    return _URI.match(value) is None or (value.startswith(("s3://", "gs://")) and not {"?", "#"} & set(value))


def _is_module_path(value: str) -> bool:
    return all(p.isidentifier() or (p.isascii() and p.isdigit()) for p in value.split("."))


_BOOL: Rule = ((lambda v: isinstance(v, bool)), "true or false")
_FRACTION = ((lambda v: is_number(v) and 0 <= v < 1), "a number in [0, 1)")
_OPEN_FRACTION: Rule = ((lambda v: is_number(v) and 0 < v < 1), "a number in (0, 1)")
_LR = finite(0, strict=True, high=1)  # Adam diverges long before a step of 1
_EPOCHS = 100_000
_STEPS = 1_000_000
_BATCH = 2**20
# torch.manual_seed takes 64 bits, and the driver seeds each epoch's scoring with
# seed * 100_003 + epoch + i: 32 bits keep that far inside 64
SEED_RULE = whole(0, 2**32 - 1)
_PATH_CHARACTERS = 4096  # the usual PATH_MAX

# Every setting's rule and meaning, by section ("" for the top level): the rule is checked where
# the config is built and named by its key, so no value reaches Ray or torch unchecked; the
# meaning is the setting's help (`asd-ray config show --explain`, the README's table). The
# preset is not a setting (--set cannot change it): config.PRESETS holds its choices.
RUN_RANGES: dict[str, dict[str, Setting]] = {
    "": {
        "defense": Setting(
            one_of("asd", "none"), "asd, or none: plain supervised training on the whole poisoned set"
        ),
        "epochs": Setting(whole(1, _EPOCHS), "T3: epochs of the whole run"),
        "seed": Setting(
            SEED_RULE, "the run's base seed: every epoch's and process's random draws derive from it"
        ),
        "baseline_batch_size": Setting(
            whole(2, _BATCH),  # batch norm needs two values per channel
            "global batch of defense none's supervised epochs and of transfer's head fit "
            "(batch_rule scaled: times the worker count)",
        ),
    },
    "model": {
        "name": Setting(
            one_of("resnet18", "vgg11", "mobilenet_v2", "densenet121", "small_cnn", "custom"),
            "the classifier; custom: your own, built by model.factory",
        ),
        "factory": Setting(
            optional(
                (
                    lambda v: len(v) <= _PATH_CHARACTERS and _is_factory(v),
                    "package.module:function (Python names joined by dots, a colon, a function name)",
                )
            ),
            "custom: the function called as function(num_classes=, in_channels=, image_size=) that "
            "returns a torch.nn.Module; it must be importable on every node",
        ),
        "meta_layers": Setting(
            (
                lambda v: (
                    len(v) <= 10_000 and all(0 < len(x) <= _PATH_CHARACTERS and _is_module_path(x) for x in v)
                ),
                "a list of module paths as named_modules() gives them (names and indices joined by dots)",
            ),
            "custom: the modules whose parameters stage 3's virtual model updates, roughly the second "
            "half of the features plus the classifier layer",
        ),
    },
    "data": {
        "mean": Setting(
            _entries(finite(0, strict=False, high=1), 64),  # pixels are on [0, 1]
            "per-channel mean of the images on [0, 1], subtracted before the model",
        ),
        "std": Setting(
            # below 0.001 a normalised pixel would exceed 1000
            _entries(finite(0.001, strict=False, high=1), 64),
            "per-channel standard deviation of the images on [0, 1], divided out before the model",
        ),
        "augment": Setting(
            one_of("crop", "resized_crop", "none"),
            "training augmentation: crop (pad, then a random crop), resized_crop (random resized crop "
            "to 224 px) or none",
        ),
        "crop_padding": Setting(whole(0, 1024), "reflect padding of the random crop, in pixels"),
        "flip": Setting(_BOOL, "random horizontal flip in training (off for digits and traffic signs)"),
    },
    "split": {
        "seeds_per_class": Setting(whole(1, _STEPS), "w: trusted clean samples per class"),
        "grow_every": Setting(whole(1, _EPOCHS), "t: epochs between growth steps of stage 1's choice_num"),
        "grow_by": Setting(whole(0, _STEPS), "n: samples per class added to choice_num at each growth step"),
        "stage2_epoch": Setting(whole(0, _EPOCHS), "T1: first epoch of stage 2 (epochs count from 0)"),
        "stage3_epoch": Setting(whole(0, _EPOCHS), "T2: first epoch of stage 3"),
        "clean_ratio": Setting(_OPEN_FRACTION, "alpha: stage 2's fraction of all samples in the clean pool"),
        "meta_clean_ratio": Setting(
            _OPEN_FRACTION, "gamma: stage 3's fraction of all samples in the clean pool"
        ),
        "meta_loss_guard": Setting(
            _FRACTION,
            "not in the paper: in stage 3 this fraction of all samples, the highest-loss ones, stays in "
            "the polluted pool whatever its loss reduction (0: the paper's meta-split)",
        ),
        "holdout_ratio": Setting(
            _FRACTION,
            "not in the paper: this fraction of all samples, the polluted pool's highest-loss ones, is "
            "left out of MixMatch's unlabeled set (0: the paper's algorithm)",
        ),
    },
    "scoring": {
        "sce_alpha": Setting(
            finite(0, strict=False, high=100),
            "weight of CE in the SCE loss that every epoch's split ranks by",
        ),
        "sce_beta": Setting(finite(0, strict=False, high=100), "weight of reverse CE in that SCE loss"),
        "augment": Setting(
            _BOOL, "score with training augmentation (the authors' code) instead of the clean inputs"
        ),
        "batch_size": Setting(whole(1, _BATCH), "images per scoring pass of each scoring actor"),
        "precision": Setting(
            one_of("fp32", "tf32", "bf16"),
            "what the scoring passes compute in: fp32 (full fp32, TF32 off), tf32 (GPUs; fp32 on a CPU) "
            "or bf16 (autocast); the split ranks samples by small loss differences, so a faster mode "
            "must keep them on their side of each cut (jobs/bench_scoring_precision.py measures that)",
        ),
    },
    "mixmatch": {
        "iterations": Setting(
            whole(1, _STEPS), "optimizer steps per epoch (batch_rule scaled: divided by the worker count)"
        ),
        "batch_labeled": Setting(
            whole(1, _BATCH), "labeled samples per step, over all workers (batch_rule scaled: per worker)"
        ),
        "batch_unlabeled": Setting(
            whole(1, _BATCH), "unlabeled samples per step, over all workers (batch_rule scaled: per worker)"
        ),
        "batch_rule": Setting(
            one_of("global", "scaled"),
            "global: the paper's step whatever the worker count (one global batch, served by the "
            "workers that hold its samples); scaled: a batch per worker, iterations divided by the "
            "worker count, the baseline too (the virtual model keeps the paper's batch under both)",
        ),
        "temperature": Setting(
            # sharpening raises probabilities to 1/T: below 0.1 a near-uniform row of 1,000
            # classes underflows to zeros in float32 (and 0/0)
            finite(0.1, strict=False, high=10),
            "sharpening temperature of the guessed labels",
        ),
        "noise_overlay": Setting(
            _FRACTION,
            "not in the paper: every view of a MixMatch step gets a fresh uniform-noise picture "
            "blended in at a weight drawn from [0, noise_overlay), so a faint overlay, such as a blended "
            "trigger, cannot decide the class (0: the paper's MixMatch)",
        ),
        "mixup_alpha": Setting(finite(0, strict=True, high=100), "a of MixUp's Beta(a, a)"),
        "lambda_u": Setting(
            finite(0, strict=False, high=1000),
            "weight of the unlabeled loss, ramped up linearly over rampup_epochs",
        ),
        "rampup_epochs": Setting(
            optional(finite(0, strict=True, high=_EPOCHS)),
            "epochs of lambda_u's linear ramp-up (null: the whole run)",
        ),
        "lr": Setting(_LR, "Adam learning rate (no schedule, no weight decay)"),
        "scaled_lr": Setting(
            one_of("sqrt", "linear", "none"),
            "batch_rule scaled: the learning rate becomes lr x sqrt(W) (sqrt, Adam's square-root "
            "rule), lr x W (linear) or lr (none), for W workers",
        ),
        "warmup_epochs": Setting(
            finite(0, strict=False, high=_EPOCHS),
            "batch_rule scaled: epochs of linear warm-up to the scaled learning rate",
        ),
    },
    "virtual": {
        "lr": Setting(_LR, "Adam learning rate of stage 3's virtual model on its meta layers"),
        "batch_size": Setting(whole(2, _BATCH), "the virtual model's global batch"),
        "epochs": Setting(
            finite(0, strict=False, high=1000), "the virtual model's passes over the whole poisoned set"
        ),
        "min_steps": Setting(
            whole(0, _STEPS),
            "at least this many virtual-model steps: an epoch of a small set is too short a fit "
            "(mnist-quick sets it)",
        ),
    },
    "transfer": {
        "semi_epochs": Setting(
            whole(0, _EPOCHS),
            "transfer pre-training (seeds from another dataset): MixMatch epochs with only the seeds "
            "labeled, before epoch 0 (0: no pre-training; the paper: 10)",
        ),
        "head_epochs": Setting(
            finite(0, strict=False, high=_EPOCHS),
            "transfer pre-training: passes then fitting the linear head alone on the whole training set "
            "(the paper: 1)",
        ),
        "head_min_steps": Setting(
            whole(0, _STEPS),
            "at least this many head steps: an epoch of a small set is too short a fit (mnist-quick sets it)",
        ),
    },
    "compute": {
        "precision": Setting(
            one_of("auto", "fp32", "tf32", "bf16"),
            "what training computes in: auto (what was measured faster on the device: on GPUs tf32 up to "
            "64 px, bf16 above; on CPUs bf16 where native, else fp32), fp32 (full fp32, TF32 off), tf32 "
            "(GPUs; fp32 on a CPU) or bf16 (autocast)",
        ),
        "channels_last": Setting(_BOOL, "NHWC memory format for models and batches"),
        "compile": Setting(_BOOL, "torch.compile the training model (its first steps pay the compile time)"),
        "cuda_graphs": Setting(
            _BOOL,
            "capture each training step as a CUDA graph and replay it (one worker, images on its GPU, "
            "not with compile); off until measured on a GPU",
        ),
    },
    "cluster": {
        "workers": Setting(whole(1, 10_000), "Ray Train DDP training workers"),
        "scorers": Setting(whole(1, 10_000), "scoring actors"),
        "cpus_per_worker": Setting(
            _resource(strict=True, high=10_000), "CPUs each training worker asks Ray for"
        ),
        "gpus_per_worker": Setting(
            _resource(strict=False, high=1_000),
            "GPUs each training worker asks Ray for (a fraction, or a whole number above 1)",
        ),
        "cpus_per_scorer": Setting(
            _resource(strict=True, high=10_000), "CPUs each scoring actor asks Ray for"
        ),
        "gpus_per_scorer": Setting(
            _resource(strict=False, high=1_000), "GPUs each scoring actor asks Ray for (fractions allowed)"
        ),
        "threads_per_process": Setting(whole(1, 4096), "torch threads in every worker and actor"),
        "max_failures": Setting(
            whole(0, 1000), "worker-group restarts allowed inside one run (Ray Train's FailureConfig)"
        ),
        "sync_batch_norm": Setting(
            optional(_BOOL),
            "batch norm over the global batch of all workers (null: on when workers > 1 under batch_rule "
            "global)",
        ),
        "memory_budget_gb": Setting(
            optional(finite(0, strict=True, high=1_000_000)),
            "GB of decoded images one worker or scorer may hold in memory; a larger share is decoded "
            "once into a local-disk cache and read from there (null: no limit)",
        ),
        "cache_dir": Setting(
            optional(
                (
                    lambda v: 0 < len(v) <= _PATH_CHARACTERS and "\0" not in v and _URI.match(v) is None,
                    f"a local folder path of 1..{_PATH_CHARACTERS} characters without NUL (caches are per node)",
                )
            ),
            "where those disk caches live (null: the system's temp folder); a relative path is made "
            "absolute where the config is built, so every process means the same folder",
        ),
        "storage": Setting(
            optional(
                (
                    lambda v: 0 < len(v) <= _PATH_CHARACTERS and "\0" not in v and _is_storage_place(v),
                    f"a shared folder path, s3://bucket/prefix or gs://bucket/prefix, 1..{_PATH_CHARACTERS} characters",
                )
            ),
            "where Ray Train keeps its checkpoints, a place every node reaches (null: RUN/train, inside "
            "the run folder: one node for a local run folder)",
        ),
        "worker_resources": Setting(
            _custom_resources(),
            "custom Ray resources each training worker also asks for, e.g. {trainer: 1} with nodes "
            "started by ray start --resources '{\"trainer\": 1}': workers go only to nodes that offer them",
        ),
        "scorer_resources": Setting(
            _custom_resources(), "custom Ray resources each scoring actor also asks for, as worker_resources"
        ),
    },
    "storage": {
        "endpoint": Setting(
            optional(
                (
                    lambda v: len(v) <= 253 and _ENDPOINT.fullmatch(v) is not None,
                    "http(s)://host[:port], nothing after it",
                )
            ),
            "the S3-compatible or GCS endpoint (null: AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL for s3, "
            "STORAGE_EMULATOR_HOST for gs, else the provider's own)",
        ),
        "region": Setting(
            optional(((lambda v: _REGION.fullmatch(v) is not None), "a region name such as us-east-1")),
            "the object store's region (null: AWS_REGION or AWS_DEFAULT_REGION, else the SDK's default)",
        ),
        "anonymous": Setting(_BOOL, "send no credentials (public buckets)"),
        "retries": Setting(whole(0, 20), "retries of a failed request or dropped read, with backoff"),
    },
}


def check_ranges(obj: Any, ranges: dict[str, Rule], name: Callable[[str], str]) -> None:
    """Refuse the first field of ``obj`` outside its rule, naming it as ``name(field)`` says
    (a config key, or a command-line flag)."""
    for key, (ok, rule) in ranges.items():
        value = getattr(obj, key)
        try:
            good = ok(value)
        except (TypeError, ValueError):  # a value of the wrong type, given through the Python API
            good = False
        if not good:
            raise ConfigError(f"{name(key)} = {shown(value)} is out of range: it must be {rule}")


def check_section(obj: Any, section: str) -> None:
    rules = {key: setting.rule for key, setting in RUN_RANGES[section].items()}
    check_ranges(obj, rules, lambda key: f"{section}.{key}" if section else key)


def shown(value: Any, limit: int = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters: a message quotes a 4,000-digit number or
    a long path by its start, never whole (Python will not even print an int of 4,300 digits)."""
    if isinstance(value, int) and value.bit_length() > 200:
        return f"<an integer of about {round(value.bit_length() * math.log10(2))} digits>"
    try:
        text = repr(value)
    except ValueError:  # an int over Python's digit limit inside a list
        return f"<a {type(value).__name__} too large to show>"
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
