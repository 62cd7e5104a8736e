"""The rule of every setting: its type and range, list of choices or format.

Each config section, and each attack parameter, is checked against its rules where
it is built (:mod:`asd_ray.config`), so no value reaches Ray or torch unchecked. A
bound says what the value feeds (a seed enters torch's 64 bits, Ray counts resources
in steps of 0.0001); a refusal is one line naming the key, and quotes a giant value
by its start only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from typing import Any

from asd_ray.errors import ConfigError

Rule = tuple[Callable[[Any], bool], str]  # (accepts the value?, what it must be)


def _finite(low: float, *, strict: bool, high: float | None = None) -> Rule:
    """A finite number above ``low`` (strictly or not), and at most ``high``."""
    top = math.inf if high is None else high
    above = (lambda v: v > low) if strict else (lambda v: v >= low)
    rule = f"a finite number {'>' if strict else '>='} {low}" + ("" if high is None else f" and <= {high}")
    return (lambda v: is_number(v) and math.isfinite(v) and above(v) and v <= top), rule


def _whole(low: int, high: int) -> Rule:
    return (lambda v: type(v) is int and low <= v <= high), f"an integer in {low}..{high}"


def _resource(*, strict: bool, high: int) -> Rule:
    """A Ray resource quantity: Ray counts in steps of 0.0001 and refuses finer ones (and
    totals over 1e14, which ``high`` times the process counts stays far below)."""
    ok, rule = _finite(0, strict=strict, high=high)
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


def _optional(rule: Rule) -> Rule:
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
_LR = _finite(0, strict=True, high=1)  # Adam diverges long before a step of 1
_EPOCHS = 100_000
_STEPS = 1_000_000
_BATCH = 2**20
# torch.manual_seed takes 64 bits, and the driver seeds each epoch's scoring with
# seed * 100_003 + epoch + i: 32 bits keep that far inside 64
_SEED = _whole(0, 2**32 - 1)
_PATH_CHARACTERS = 4096  # the usual PATH_MAX

# Every setting's rule, by section ("" for the top level), checked where the config is built
# and named by its key, so no value reaches Ray or torch unchecked.
RUN_RANGES: dict[str, dict[str, Rule]] = {
    "": {
        "defense": one_of("asd", "none"),
        "epochs": _whole(1, _EPOCHS),
        "seed": _SEED,
        "baseline_batch_size": _whole(2, _BATCH),  # batch norm needs two values per channel
    },
    "model": {
        "name": one_of("resnet18", "vgg11", "mobilenet_v2", "densenet121", "small_cnn", "custom"),
        "factory": _optional(
            (
                lambda v: len(v) <= _PATH_CHARACTERS and _is_factory(v),
                "package.module:function (Python names joined by dots, a colon, a function name)",
            )
        ),
        "meta_layers": (
            lambda v: (
                len(v) <= 10_000 and all(0 < len(x) <= _PATH_CHARACTERS and _is_module_path(x) for x in v)
            ),
            "a list of module paths as named_modules() gives them (names and indices joined by dots)",
        ),
    },
    "data": {
        "mean": _entries(_finite(0, strict=False, high=1), 64),  # pixels are on [0, 1]
        # below 0.001 a normalised pixel would exceed 1000
        "std": _entries(_finite(0.001, strict=False, high=1), 64),
        "augment": one_of("crop", "resized_crop", "none"),
        "crop_padding": _whole(0, 1024),
        "flip": _BOOL,
    },
    "split": {
        "seeds_per_class": _whole(1, _STEPS),
        "grow_every": _whole(1, _EPOCHS),
        "grow_by": _whole(0, _STEPS),
        "stage2_epoch": _whole(0, _EPOCHS),
        "stage3_epoch": _whole(0, _EPOCHS),
        "clean_ratio": _OPEN_FRACTION,
        "meta_clean_ratio": _OPEN_FRACTION,
        "meta_loss_guard": _FRACTION,
        "holdout_ratio": _FRACTION,
    },
    "scoring": {
        "sce_alpha": _finite(0, strict=False, high=100),
        "sce_beta": _finite(0, strict=False, high=100),
        "augment": _BOOL,
        "batch_size": _whole(1, _BATCH),
        "precision": one_of("fp32", "tf32", "bf16"),
    },
    "mixmatch": {
        "iterations": _whole(1, _STEPS),
        "batch_labeled": _whole(1, _BATCH),
        "batch_unlabeled": _whole(1, _BATCH),
        "batch_rule": one_of("global", "scaled"),
        # sharpening raises probabilities to 1/T: below 0.1 a near-uniform row of 1,000
        # classes underflows to zeros in float32 (and 0/0)
        "temperature": _finite(0.1, strict=False, high=10),
        "noise_overlay": _FRACTION,
        "mixup_alpha": _finite(0, strict=True, high=100),
        "lambda_u": _finite(0, strict=False, high=1000),
        "rampup_epochs": _optional(_finite(0, strict=True, high=_EPOCHS)),
        "lr": _LR,
        "scaled_lr": one_of("sqrt", "linear", "none"),
        "warmup_epochs": _finite(0, strict=False, high=_EPOCHS),
    },
    "virtual": {
        "lr": _LR,
        "batch_size": _whole(2, _BATCH),
        "epochs": _finite(0, strict=False, high=1000),
        "min_steps": _whole(0, _STEPS),
    },
    "transfer": {
        "semi_epochs": _whole(0, _EPOCHS),
        "head_epochs": _finite(0, strict=False, high=_EPOCHS),
        "head_min_steps": _whole(0, _STEPS),
    },
    "compute": {
        "precision": one_of("auto", "fp32", "tf32", "bf16"),
        "channels_last": _BOOL,
        "compile": _BOOL,
        "cuda_graphs": _BOOL,
    },
    "cluster": {
        "workers": _whole(1, 10_000),
        "scorers": _whole(1, 10_000),
        "cpus_per_worker": _resource(strict=True, high=10_000),
        "gpus_per_worker": _resource(strict=False, high=1_000),
        "cpus_per_scorer": _resource(strict=True, high=10_000),
        "gpus_per_scorer": _resource(strict=False, high=1_000),
        "threads_per_process": _whole(1, 4096),
        "max_failures": _whole(0, 1000),
        "sync_batch_norm": _optional(_BOOL),
        "memory_budget_gb": _optional(_finite(0, strict=True, high=1_000_000)),
        "cache_dir": _optional(
            (
                lambda v: 0 < len(v) <= _PATH_CHARACTERS and "\0" not in v and _URI.match(v) is None,
                f"a local folder path of 1..{_PATH_CHARACTERS} characters without NUL (caches are per node)",
            )
        ),
        "storage": _optional(
            (
                lambda v: 0 < len(v) <= _PATH_CHARACTERS and "\0" not in v and _is_storage_place(v),
                f"a shared folder path, s3://bucket/prefix or gs://bucket/prefix, 1..{_PATH_CHARACTERS} characters",
            )
        ),
        "worker_resources": _custom_resources(),
        "scorer_resources": _custom_resources(),
    },
    "storage": {
        "endpoint": _optional(
            (
                lambda v: len(v) <= 253 and _ENDPOINT.fullmatch(v) is not None,
                "http(s)://host[:port], nothing after it",
            )
        ),
        "region": _optional(
            ((lambda v: _REGION.fullmatch(v) is not None), "a region name such as us-east-1")
        ),
        "anonymous": _BOOL,
        "retries": _whole(0, 20),
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
    check_ranges(obj, RUN_RANGES[section], lambda key: f"{section}.{key}" if section else key)


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
