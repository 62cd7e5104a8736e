"""Typed configuration for every stage, validated on construction.

Defaults are the paper's settings, with the details it leaves open taken from the
authors' code. What each setting means, and its rule, is in
:data:`asd_ray.config_ranges.RUN_RANGES` (``asd-ray config show --explain`` prints both).
:data:`PRESETS` hold the paper's settings per dataset; :func:`load_config`
layers a preset, an optional YAML file and ``section.field=value`` overrides.
The only I/O is reading that YAML (through :mod:`asd_ray.files`' limits).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from asd_ray.attacks import ATTACKS
from asd_ray.attacks import PARAMS as ATTACK_PARAMS
from asd_ray.attacks.triggers import TRIGGERS
from asd_ray.config_ranges import check_ranges, check_section, is_number, one_of, shown
from asd_ray.errors import ConfigError, DataError, UserError
from asd_ray.files import decode_text, parse_yaml, read_file, read_regular_file

_IMAGENET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), augment="resized_crop")

# The settings that are not in the paper, at the values that turn them off: a run with these
# overrides is the paper's algorithm (asd-ray run --paper).
PAPER_ALGORITHM = ("split.meta_loss_guard=0", "split.holdout_ratio=0", "mixmatch.noise_overlay=0")

PRESETS: dict[str, dict[str, Any]] = {
    "cifar10": {},
    "gtsrb": {
        "epochs": 100,
        "data": dict(mean=(0.3403, 0.3121, 0.3214), std=(0.2724, 0.2608, 0.2669), flip=False),
    },
    "imagenet30": {"data": _IMAGENET},
    "vggface2_30": {"model": {"name": "densenet121"}, "data": _IMAGENET, "virtual": {"lr": 0.02}},
    "mnist-quick": {
        "epochs": 12,
        "model": {"name": "small_cnn"},
        "data": dict(mean=(0.1307,), std=(0.3081,), flip=False, crop_padding=2),
        "split": dict(grow_every=2, grow_by=40, stage2_epoch=6, stage3_epoch=9),
        "mixmatch": dict(iterations=128),
        "virtual": dict(min_steps=250),
        # CIFAR-10's one epoch of the head is 391 steps; one epoch here is 33 (see TransferConfig)
        "transfer": dict(head_min_steps=390),
    },
}


# One field per parameter of the registered attacks, in the order they are recorded.
_ATTACK_FIELDS = dataclasses.make_dataclass(
    "_AttackFields",
    [(p.name, p.type, dataclasses.field(default=p.default)) for p in ATTACK_PARAMS],
    frozen=True,
    namespace={"__module__": __name__},
)


@dataclasses.dataclass(frozen=True)
class AttackConfig(_ATTACK_FIELDS):
    """One backdoor attack: who is poisoned, how, and with which trigger.

    Its fields are every registered attack's parameters (:data:`asd_ray.attacks.PARAMS`,
    each with its type, default, range and help), whatever the attack: ``to_dict`` records
    them all. ``rate`` is a per-sample probability over the non-target classes for
    poison-label attacks (all classes for all2all) and the fraction of the target class
    for clean-label and sig.
    """

    def __post_init__(self) -> None:
        check_ranges(
            self, {p.name: p.rule for p in ATTACK_PARAMS if p.rule}, lambda key: "--" + key.replace("_", "-")
        )
        for param in ATTACK_PARAMS:
            value = getattr(self, param.name)
            if param.choices and value is not None and value not in param.choices:
                raise ConfigError(
                    f"{param.flag_name} {value!r} is unknown; choose one of {', '.join(param.choices)}"
                )
        for stamp in TRIGGERS.values():  # a trigger's parameters are recorded with every attack
            stamp.check(self)
        ATTACKS[self.attack].check(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able parameters (recorded in every ground-truth row)."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class SplitConfig:
    """How ASD splits the training set each epoch (paper Algorithm 1, epochs from 0).

    Stage 1 (epoch < stage2_epoch): seeds + the ``choice_num`` lowest-loss
    non-seed samples of each class, ``choice_num`` growing by ``grow_by`` at every
    epoch e > 0 with e % grow_every == 0. Stage 2 (< stage3_epoch): the
    ``clean_ratio`` lowest-loss samples, class-agnostic. Stage 3: the
    ``meta_clean_ratio`` samples with the lowest loss reduction after the
    virtual model's epoch, among all but the ``meta_loss_guard`` highest-loss ones.
    """

    seeds_per_class: int = 10
    grow_every: int = 5
    grow_by: int = 10
    stage2_epoch: int = 60
    stage3_epoch: int = 90
    clean_ratio: float = 0.5
    meta_clean_ratio: float = 0.5
    meta_loss_guard: float = 0.2  # split.clean_mask_stage3; why 0.2: README, Configuration and presets
    holdout_ratio: float = 0.0  # split.unlabeled_pool

    def __post_init__(self) -> None:
        check_section(self, "split")
        if self.stage2_epoch > self.stage3_epoch:
            raise ConfigError(
                f"split.stage2_epoch {self.stage2_epoch} is after split.stage3_epoch {self.stage3_epoch}; "
                "stage 2 must start no later than stage 3"
            )
        if self.meta_clean_ratio + self.meta_loss_guard > 1.0:
            raise ConfigError(
                f"split.meta_clean_ratio {self.meta_clean_ratio} + split.meta_loss_guard "
                f"{self.meta_loss_guard} is over 1: stage 3 could not fill its clean pool; lower one of them"
            )


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The classifier (see asd_ray.models)."""

    name: str = "resnet18"
    factory: str | None = None
    meta_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_section(self, "model")
        if (self.name == "custom") != (self.factory is not None):
            raise ConfigError("model.factory goes with model.name=custom (and only with it)")
        if (self.name == "custom") != bool(self.meta_layers):
            raise ConfigError(
                "model.meta_layers goes with model.name=custom (and only with it): the module paths "
                "the stage-3 virtual model updates"
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Normalisation and training augmentation of the stored uint8 images."""

    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
    augment: str = "crop"
    crop_padding: int = 4
    flip: bool = True

    def __post_init__(self) -> None:
        check_section(self, "data")
        if len(self.mean) != len(self.std):
            raise ConfigError(
                f"data.mean has {len(self.mean)} entries and data.std {len(self.std)}: give one per channel"
            )


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """The per-sample SCE scoring pass at the start of every epoch."""

    sce_alpha: float = 0.1
    sce_beta: float = 1.0
    augment: bool = False
    batch_size: int = 512
    precision: str = "fp32"

    def __post_init__(self) -> None:
        check_section(self, "scoring")
        if self.sce_alpha == self.sce_beta == 0:
            raise ConfigError("scoring.sce_alpha and scoring.sce_beta are both 0: every sample would score 0")


@dataclasses.dataclass(frozen=True)
class MixMatchConfig:
    """The semi-supervised epoch on the clean (labeled) and polluted (unlabeled) pools."""

    iterations: int = 1024
    batch_labeled: int = 64
    batch_unlabeled: int = 64
    batch_rule: str = "global"
    temperature: float = 0.5
    noise_overlay: float = 0.2  # why 0.2: README, Configuration and presets
    mixup_alpha: float = 0.75
    lambda_u: float = 15.0
    rampup_epochs: float | None = None
    lr: float = 0.002
    scaled_lr: str = "sqrt"
    warmup_epochs: float = 1.0

    def __post_init__(self) -> None:
        check_section(self, "mixmatch")


@dataclasses.dataclass(frozen=True)
class VirtualConfig:
    """Stage 3's throw-away virtual model (meta-split): the same global batch, step count and
    learning rate under both batch rules and every worker count."""

    lr: float = 0.015  # on the model's meta_parameters()
    batch_size: int = 128
    epochs: float = 1.0
    min_steps: int = 0

    def __post_init__(self) -> None:
        check_section(self, "virtual")


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Transfer-based ASD (paper section 5.4), for seeds from another dataset.

    Before epoch 0 the model is pre-trained: ``semi_epochs`` MixMatch epochs with
    only the seeds labeled and the whole training set unlabeled, then
    ``head_epochs`` passes fitting the linear head alone on the whole training set
    (backbone frozen). ASD then starts from that model, its settings unchanged.
    The paper uses 10 and 1 (on CIFAR-10: 391 head steps). On a small set one
    epoch is too short a fit (the README's *Seeds* has the measurements), so
    ``head_min_steps`` sets a floor, as ``virtual.min_steps`` does for the virtual model.
    """

    semi_epochs: int = 0
    head_epochs: float = 1.0
    head_min_steps: int = 0

    def __post_init__(self) -> None:
        check_section(self, "transfer")


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How training arithmetic runs (see asd_ray.compute); scoring has ``scoring.precision``."""

    precision: str = "auto"  # resolved by compute.resolve_precision
    channels_last: bool = True
    compile: bool = False
    cuda_graphs: bool = False  # jobs/bench_gpu.py has the graphed variants that would measure it

    def __post_init__(self) -> None:
        check_section(self, "compute")
        if self.cuda_graphs and self.compile:
            raise ConfigError("compute.cuda_graphs and compute.compile exclude each other: choose one")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How the work is spread over Ray."""

    workers: int = 2
    scorers: int = 2
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    cpus_per_scorer: float = 1.0
    gpus_per_scorer: float = 0.0
    threads_per_process: int = 1
    max_failures: int = 0
    sync_batch_norm: bool | None = None
    memory_budget_gb: float | None = None  # the cache is a numpy.memmap
    cache_dir: str | None = None  # made absolute in _with_overrides
    storage: str | None = None  # local: made absolute in _with_overrides
    worker_resources: dict[str, float] = dataclasses.field(default_factory=dict)
    scorer_resources: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 1024**3)

    def __post_init__(self) -> None:
        check_section(self, "cluster")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ConfigError("cluster.gpus_per_worker above 1 must be a whole number")


@dataclasses.dataclass(frozen=True)
class StorageConfig:
    """How object-store locations (s3://, gs://) are reached; credentials never go here (they
    come from AWS_* variables, ~/.aws, an instance role or Google's application credentials)."""

    endpoint: str | None = None
    region: str | None = None
    anonymous: bool = False
    retries: int = 5

    def __post_init__(self) -> None:
        check_section(self, "storage")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one ``asd-ray run`` needs besides the data paths."""

    preset: str = "cifar10"  # the base the other values started from (not a setting: see PRESETS)
    defense: str = "asd"
    epochs: int = 120
    seed: int = 0
    baseline_batch_size: int = 128
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    scoring: ScoringConfig = ScoringConfig()
    mixmatch: MixMatchConfig = MixMatchConfig()
    virtual: VirtualConfig = VirtualConfig()
    transfer: TransferConfig = TransferConfig()
    compute: ComputeConfig = ComputeConfig()
    cluster: ClusterConfig = ClusterConfig()
    storage: StorageConfig = StorageConfig()

    def __post_init__(self) -> None:
        check_ranges(self, {"preset": one_of(*PRESETS)}, str)  # the presets are defined here
        check_section(self, "")
        if self.transfer.semi_epochs and self.defense != "asd":
            raise ConfigError("transfer.semi_epochs pre-trains on the seeds: it goes with defense asd")
        if self.compute.cuda_graphs and self.cluster.workers > 1:
            raise ConfigError(
                "compute.cuda_graphs replays steps of fixed shapes, which only one training worker "
                "has (with several, a worker's share of each batch varies): set cluster.workers=1"
            )
        if self.split.stage3_epoch > self.epochs:
            raise ConfigError(
                f"split.stage3_epoch {self.split.stage3_epoch} is after the last epoch "
                f"({self.epochs}); lower it or raise epochs"
            )

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))


def preset(name: str) -> RunConfig:
    """The :class:`RunConfig` of a named preset."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"preset {shown(name)} is unknown; choose one of {', '.join(PRESETS)}")
    return from_dict({"preset": name, **PRESETS[name]})


def from_dict(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from nested plain values layered over ``base`` (defaults if None)."""
    return _build(RunConfig, values, base or RunConfig(), "")


CONFIG_FILE_BYTES = 1024**2  # far above what `asd-ray config show` writes (README, Configuration)
_CONFIG_FIX = "give a UTF-8 YAML file of config sections (asd-ray config show prints one)"
_RECORD_FIX = "restore the run's own file"


def load_config(
    preset_name: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> RunConfig:
    """Layer a preset, a YAML file and ``section.field=value`` overrides, in that order.

    The file's ``preset:`` (every ``config show`` output has one) is the base preset
    when ``preset_name`` is None, and must equal it otherwise: a preset is a set of
    values, not a label to put on others. Override values are parsed as YAML
    scalars (``mixmatch.iterations=100``, ``data.flip=false``, ``mixmatch.lr=1e-3``,
    ``data.mean=[0.5,0.5,0.5]``); an override cannot name ``preset``. A relative
    ``cluster.cache_dir`` or local ``cluster.storage`` is made absolute here, so every process
    means the same folder.
    """
    values = read_config_file(yaml_path) if yaml_path is not None else {}
    if "preset" in values:
        _same_preset(values["preset"], preset_name, f"--preset {preset_name}", yaml_path)
        preset_name = values["preset"]
    config = _from_file(values, preset(preset_name) if preset_name else RunConfig(), yaml_path)
    return _with_overrides(config, overrides)


def load_recorded_config(
    path: Path, overrides: list[str] | None = None, config_file: str | Path | None = None
) -> RunConfig:
    """A run folder's recorded config (RUN/config.yaml), then ``config_file`` (whose
    preset, if it names one, must be the run's) and ``overrides``. A setting not in the
    paper that the record lacks was added after the run began, which then ran the paper's
    algorithm there: it takes its PAPER_ALGORITHM value, not today's default.

    Raises:
        DataError: the record is unreadable or holds a setting out of range.
        ConfigError: ``config_file`` or ``overrides`` are.
    """
    values = _read_mapping(path, what=str(path), fix=_RECORD_FIX, error=DataError)
    predates = []
    for override in PAPER_ALGORITHM:
        node = values
        for part in override.partition("=")[0].split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            predates.append(override)
    try:
        config = _with_overrides(from_dict(values), predates)
    except ConfigError as err:
        raise DataError(f"{path}: {err}; {_RECORD_FIX}") from None
    if config_file is not None:
        changes = read_config_file(config_file)
        if "preset" in changes:
            _same_preset(changes["preset"], config.preset, f"the run's preset {config.preset}", config_file)
        config = _from_file(changes, config, config_file)
    return _with_overrides(config, overrides)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings of a ``--config`` YAML file (regular, UTF-8, within the size and
    nesting limits of :mod:`asd_ray.files`), as nested plain values."""
    return _read_mapping(path, what=f"--config {path}", fix=_CONFIG_FIX, error=ConfigError, follow_links=True)


def _read_mapping(
    path: str | Path, *, what: str, fix: str, error: type[UserError], follow_links: bool = False
) -> dict[str, Any]:
    if getattr(path, "scheme", ""):  # a run's record in a bucket (a storage Location)
        data = read_file(path, what=what, fix=fix, limit=CONFIG_FILE_BYTES)
    else:
        data = read_regular_file(
            path, what=what, fix=fix, limit=CONFIG_FILE_BYTES, error=error, follow_links=follow_links
        )
    values = parse_yaml(decode_text(data, what=what, fix=fix, error=error), what=what, fix=fix, error=error)
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise error(f"{what}: holds a {type(values).__name__}, not a mapping of config sections; {fix}")
    return values


def _from_file(values: dict[str, Any], base: RunConfig, path: str | Path | None) -> RunConfig:
    """:func:`from_dict`, its refusal naming the ``--config`` file too."""
    try:
        return from_dict(values, base)
    except ConfigError as err:
        raise ConfigError(f"--config {path}: {err}") from None


def _same_preset(named: Any, chosen: str | None, chosen_as: str, path: str | Path) -> None:
    """Refuse a config file whose ``preset:`` is unknown or differs from the one chosen."""
    if not isinstance(named, str) or named not in PRESETS:
        raise ConfigError(
            f"--config {path}: preset {shown(named)} is unknown; choose one of {', '.join(PRESETS)}"
        )
    if chosen is not None and named != chosen:
        raise ConfigError(
            f"--config {path}: preset {named} differs from {chosen_as}; a preset is a set of values, "
            "not a label: drop --preset or the file's preset line, or use a file made from that preset"
        )


def with_overrides(obj: Any, overrides: list[str]) -> Any:
    """A copy of the config dataclass ``obj`` with ``field=value`` overrides, parsed and
    checked as :func:`load_config` parses and checks them."""
    return _build(type(obj), dict(_parse_override(o) for o in overrides), obj, "")


def config_yaml(config: RunConfig) -> str:
    """``config`` as YAML text (readable back with :func:`load_config`)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _with_overrides(config: RunConfig, overrides: list[str] | dict[str, Any] | None) -> RunConfig:
    """``config`` with ``section.field=value`` overrides, its local folders made absolute."""
    pairs = overrides.items() if isinstance(overrides, dict) else map(_parse_override, overrides or ())
    nested: dict[str, Any] = {}
    for key, value in pairs:
        if key == "preset":
            raise ConfigError(
                "preset cannot be overridden (it would relabel another preset's settings): "
                "choose it with --preset"
            )
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(
                    f"override {shown(key)}: {shown(part)} is set both as a value and as a section"
                )
        node[leaf] = value
    config = from_dict(nested, config)
    folders = {
        key: str(Path(value).absolute())
        for key in ("cache_dir", "storage")
        if (value := getattr(config.cluster, key)) is not None
        and "://" not in value
        and not Path(value).is_absolute()
    }
    return (
        dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, **folders))
        if folders
        else config
    )


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {shown(text)} must look like section.field=value")
    what = f"--set {shown(key)}"
    return key, parse_yaml(
        value, what=what, fix="give a YAML value, e.g. 0.5, true, [1, 2]", error=ConfigError
    )


def _build(cls: type, values: dict[str, Any], base: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(
            f"{prefix.rstrip('.') or 'config'} must be a mapping of settings, got {shown(values)}"
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key {shown(prefix + str(key))}; known: {', '.join(prefix + f for f in fields)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            changes[key] = _build(hint, value, getattr(base, key), f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, hint, prefix + key)
    return dataclasses.replace(base, **changes)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """``value`` as the type ``hint`` wants (ints as floats, lists as tuples), or one line;
    the ranges are checked by the dataclass itself."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], name)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping of names to amounts, got {shown(value)}")
        key_type, inner = typing.get_args(hint)
        return {
            _coerce(k, key_type, f"{name} key"): _coerce(v, inner, f"{name}.{k}") for k, v in value.items()
        }
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {shown(value)}")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(v, inner, f"{name} entry") for v in value)
    if hint is float:
        if not is_number(value):
            raise ConfigError(f"{name} must be a number, got {shown(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{name} = {shown(value)} is out of range: it is beyond any float") from None
    kinds = {int: "an integer", str: "text", bool: "true or false"}
    if hint in kinds and type(value) is not hint:
        raise ConfigError(f"{name} must be {kinds[hint]}, got {shown(value)}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
