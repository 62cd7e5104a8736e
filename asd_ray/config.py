"""Typed configuration for every stage, validated on construction.

Defaults are the paper's settings, with the details it leaves open taken from the
authors' code; each field's comment says what it is.
:data:`PRESETS` hold the paper's settings per dataset; :func:`load_config`
layers a preset, an optional YAML file and ``section.field=value`` overrides.
The only I/O is reading that YAML.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from asd_ray.errors import ConfigError

ATTACKS = ("badnets", "blend", "wanet", "all2all", "clean-label", "sig", "adaptive-blend")
TRIGGERS = ("badnets", "blend", "checkerboard")


@dataclasses.dataclass(frozen=True)
class AttackConfig:
    """One backdoor attack: who is poisoned, how, and with which trigger.

    ``rate`` is a per-sample probability over the non-target classes for
    poison-label attacks (badnets, blend, wanet, adaptive-blend; all classes for
    all2all) and the fraction of the target class for clean-label and sig.
    """

    attack: str
    rate: float = 0.05
    target: int = 0  # target label y_t (ignored by all2all: y -> (y + 1) mod C)
    seed: int = 0  # draws the poisoned samples, noise patterns and WaNet grid
    trigger: str | None = None  # all2all / clean-label: badnets | blend | checkerboard
    pattern_file: str | None = None  # image file for the BadNets / Blend pattern
    location: tuple[int, int] | None = None  # (row, col) of the BadNets patch's corner
    size: int | None = None  # BadNets patch side in pixels (pattern resized, nearest)
    alpha: float = 0.1  # Blend weight of the pattern
    wanet_k: int = 4  # WaNet control-grid size
    wanet_s: float = 0.5  # WaNet warping strength
    wanet_noise: bool = True  # WaNet noise mode: extra samples warped with random noise, labels kept
    cross_ratio: float = 2.0  # WaNet noise samples per poisoned sample
    pgd_eps: float = 16 / 255  # clean-label PGD budget (L-inf, on [0, 1] images)
    pgd_step: float = 1.5 / 255
    pgd_steps: int = 30
    sig_delta: float = 20.0  # SIG amplitude on 0-255
    sig_frequency: float = 6.0  # SIG periods across the image width
    adaptive_grid: int = 4  # adaptive blend: the pattern is cut into grid x grid pieces
    adaptive_pieces: int = 8  # adaptive blend: pieces each training image gets, drawn per sample
    adaptive_train_alpha: float = 0.15  # adaptive blend: blend weight of the pieces at training
    adaptive_test_alpha: float = 0.2  # adaptive blend: blend weight of the full pattern at test
    conservatism_ratio: float = 1.0  # adaptive blend: cover samples (label kept) per poisoned one

    def __post_init__(self) -> None:
        _check_ranges(self, _ATTACK_RANGES, lambda key: "--" + key.replace("_", "-"))
        if self.attack not in ATTACKS:
            raise ConfigError(f"--attack {self.attack!r} is unknown; choose one of {', '.join(ATTACKS)}")
        if self.trigger is not None and self.trigger not in TRIGGERS:
            raise ConfigError(f"--trigger {self.trigger!r} is unknown; choose one of {', '.join(TRIGGERS)}")
        if self.location is not None and (len(self.location) != 2 or min(self.location) < 0):
            raise ConfigError(f"--location {self.location} must be two integers (row, col) >= 0")
        if self.attack == "wanet" and self.wanet_noise and self.rate * (1 + self.cross_ratio) > 1:
            raise ConfigError(
                f"--rate {self.rate} with --cross-ratio {self.cross_ratio} would modify more than "
                "every sample; lower one of them"
            )
        if self.attack == "adaptive-blend":
            if self.adaptive_pieces > self.adaptive_grid**2:
                raise ConfigError(
                    f"--adaptive-pieces {self.adaptive_pieces} is more than the {self.adaptive_grid**2} "
                    f"pieces of a {self.adaptive_grid}x{self.adaptive_grid} --adaptive-grid; lower it "
                    "or raise --adaptive-grid"
                )
            if self.rate * (1 + self.conservatism_ratio) > 1:
                raise ConfigError(
                    f"--rate {self.rate} with --conservatism-ratio {self.conservatism_ratio} would "
                    "modify more than every sample; lower one of them"
                )

    @property
    def trigger_kind(self) -> str:
        """The image trigger this attack applies."""
        if self.attack in ("all2all", "clean-label"):
            return self.trigger or "badnets"
        return self.attack

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

    seeds_per_class: int = 10  # w: trusted clean samples per class
    grow_every: int = 5  # t: epochs between growth steps of choice_num
    grow_by: int = 10  # n: samples per class added at each growth step
    stage2_epoch: int = 60  # T1: first epoch of stage 2
    stage3_epoch: int = 90  # T2: first epoch of stage 3
    clean_ratio: float = 0.5  # alpha: stage-2 fraction of samples in the clean pool
    meta_clean_ratio: float = 0.5  # gamma: stage-3 fraction of samples in the clean pool
    # Not in the paper: in stage 3 this fraction of all samples, the highest-loss ones, stays in
    # the polluted pool whatever its loss reduction (see split.clean_mask_stage3; on the defense
    # benchmark every poisoned sample the meta-split let in had a loss in the highest 11%;
    # 0: the paper's meta-split)
    meta_loss_guard: float = 0.2
    # Not in the paper: this fraction of all samples, the polluted pool's highest-loss ones, is
    # left out of MixMatch's unlabeled set (0: the paper's algorithm; see split.unlabeled_pool)
    holdout_ratio: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.stage2_epoch <= self.stage3_epoch:
            raise ConfigError(
                f"stage2_epoch {self.stage2_epoch} and stage3_epoch {self.stage3_epoch} must satisfy "
                "0 <= stage2_epoch <= stage3_epoch"
            )
        for name in ("clean_ratio", "meta_clean_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ConfigError(f"{name} {getattr(self, name)} must be in (0, 1)")
        if self.meta_clean_ratio + self.meta_loss_guard > 1.0:
            raise ConfigError(
                f"meta_clean_ratio {self.meta_clean_ratio} + meta_loss_guard {self.meta_loss_guard} "
                "is over 1: stage 3 could not fill its clean pool; lower one of them"
            )
        if self.grow_every < 1 or self.grow_by < 0 or self.seeds_per_class < 1:
            raise ConfigError("grow_every and seeds_per_class must be >= 1 and grow_by >= 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The classifier (see asd_ray.models)."""

    name: str = "resnet18"  # resnet18 | vgg11 | mobilenet_v2 | densenet121 | small_cnn | custom
    # custom: "package.module:function", called as function(num_classes=, in_channels=, image_size=)
    # and returning a torch.nn.Module; it must be importable on every node.
    factory: str | None = None
    # custom: module paths (as in named_modules) whose parameters ASD's virtual model updates
    # in stage 3: roughly the second half of the features plus the classifier layer.
    meta_layers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        names = ("resnet18", "vgg11", "mobilenet_v2", "densenet121", "small_cnn", "custom")
        if self.name not in names:
            raise ConfigError(f"model.name {self.name!r} is unknown; choose one of {', '.join(names)}")
        if (self.name == "custom") != (self.factory is not None):
            raise ConfigError("model.factory goes with model.name=custom (and only with it)")
        if self.factory is not None and (self.factory.count(":") != 1 or not self.meta_layers):
            raise ConfigError(
                f"model.factory {self.factory!r}: give 'package.module:function' and model.meta_layers "
                "(the module paths the stage-3 virtual model updates)"
            )


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Normalisation and training augmentation of the stored uint8 images."""

    mean: tuple[float, ...] = (0.4914, 0.4822, 0.4465)  # per channel, on [0, 1]
    std: tuple[float, ...] = (0.2470, 0.2435, 0.2616)
    augment: str = "crop"  # crop (pad + random crop) | resized_crop (224 px) | none
    crop_padding: int = 4  # reflect padding of the random crop
    flip: bool = True  # random horizontal flip (off for digits and traffic signs)

    def __post_init__(self) -> None:
        if self.augment not in ("crop", "resized_crop", "none"):
            raise ConfigError(f"data.augment {self.augment!r}: choose crop, resized_crop or none")
        if len(self.mean) != len(self.std) or any(s <= 0 for s in self.std):
            raise ConfigError("data.mean and data.std need one entry per channel, std > 0")


@dataclasses.dataclass(frozen=True)
class ScoringConfig:
    """The per-sample SCE scoring pass at the start of every epoch."""

    sce_alpha: float = 0.1  # weight of CE in SCE
    sce_beta: float = 1.0  # weight of reverse CE in SCE
    augment: bool = False  # score with training augmentation (the authors' code) instead of clean inputs
    batch_size: int = 512
    # fp32 (full fp32, TF32 off) | tf32 (GPUs; fp32 on a CPU) | bf16 (autocast): the split ranks
    # samples by small loss differences, so a faster mode must keep them on their side of each
    # cut (jobs/bench_scoring_precision.py measures that)
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in ("fp32", "tf32", "bf16"):
            raise ConfigError(f"scoring.precision {self.precision!r}: choose fp32, tf32 or bf16")


@dataclasses.dataclass(frozen=True)
class MixMatchConfig:
    """The semi-supervised epoch on the clean (labeled) and polluted (unlabeled) pools."""

    iterations: int = 1024  # optimizer steps per epoch
    batch_labeled: int = 64  # labeled samples per step (global, see batch_rule)
    batch_unlabeled: int = 64  # unlabeled samples per step (global, see batch_rule)
    # global: the paper's step whatever the worker count (one global batch of 64 + 64, served
    # by the workers that hold its samples); scaled: global batch W x (64 + 64), iterations / W
    # (the baseline too; the stage-3 virtual model keeps the paper's batch under both rules)
    batch_rule: str = "global"
    temperature: float = 0.5  # sharpening of guessed labels
    # every view of a MixMatch step gets a fresh uniform-noise picture blended in at a weight
    # drawn uniformly from [0, noise_overlay): the model learns that a faint overlay does not
    # decide the class, so a blended trigger cannot steer it (Blend on the defense benchmark:
    # 5 of 10 seeds collapse without it, none with it; 0: the paper's MixMatch)
    noise_overlay: float = 0.2
    mixup_alpha: float = 0.75  # Beta(a, a) of MixUp
    lambda_u: float = 15.0  # weight of the unlabeled loss, ramped up linearly over the run
    rampup_epochs: float | None = None  # ramp length; None = the whole run
    lr: float = 0.002  # Adam learning rate (no schedule, no weight decay)
    scaled_lr: str = (
        "sqrt"  # batch_rule scaled: lr x sqrt(W) (Adam's square-root rule) | linear (lr x W) | none
    )
    warmup_epochs: float = 1.0  # batch_rule scaled: linear warm-up to the scaled lr over these epochs

    def __post_init__(self) -> None:
        if self.batch_rule not in ("global", "scaled"):
            raise ConfigError(
                f"mixmatch.batch_rule {self.batch_rule!r}: choose global (the paper's step on any "
                "worker count) or scaled (W times the batch, W times fewer iterations)"
            )
        if self.scaled_lr not in ("sqrt", "linear", "none"):
            raise ConfigError(f"mixmatch.scaled_lr {self.scaled_lr!r}: choose sqrt, linear or none")
        if min(self.iterations, self.batch_labeled, self.batch_unlabeled) < 1:
            raise ConfigError("mixmatch.iterations and batch sizes must be >= 1")


@dataclasses.dataclass(frozen=True)
class VirtualConfig:
    """Stage 3's throw-away virtual model (meta-split): the same global batch, step count and
    learning rate under both batch rules and every worker count."""

    lr: float = 0.015  # Adam learning rate on the model's meta_parameters()
    batch_size: int = 128  # global batch
    epochs: float = 1.0  # passes over the whole poisoned set
    min_steps: int = 0  # at least this many steps (small data sets need ~250: see the README)


@dataclasses.dataclass(frozen=True)
class TransferConfig:
    """Transfer-based ASD (paper section 5.4), for seeds from another dataset.

    Before epoch 0 the model is pre-trained: ``semi_epochs`` MixMatch epochs with
    only the seeds labeled and the whole training set unlabeled, then
    ``head_epochs`` passes fitting the linear head alone on the whole training set
    (backbone frozen). ASD then starts from that model, its settings unchanged.
    The paper uses 10 and 1 (on CIFAR-10: 391 head steps). On a small set one
    epoch is too short a fit: on the MNIST subset with scikit-learn digits as
    seeds, 33 head steps left the pre-trained model at 67% test ACC, 161 at
    90% and 481 at 94%, so ``head_min_steps`` sets a floor, as
    ``virtual.min_steps`` does for the virtual model.
    """

    semi_epochs: int = 0  # 0: no pre-training
    head_epochs: float = 1.0
    # at least this many head steps: one epoch of a small set is too short a fit (see mnist-quick)
    head_min_steps: int = 0


@dataclasses.dataclass(frozen=True)
class ComputeConfig:
    """How training arithmetic runs (see asd_ray.compute); scoring has ``scoring.precision``."""

    # auto: what was measured faster on the device (GPU: tf32 up to 64 px, bf16 above; CPU: bf16
    # where native, else fp32) | fp32 (full fp32, no TF32) | tf32 (GPUs; fp32 on a CPU) | bf16
    precision: str = "auto"
    channels_last: bool = True  # NHWC memory format for models and batches
    compile: bool = False  # torch.compile the training model (first steps pay the compile time)
    # capture each training step as a CUDA graph and replay it (one worker, images on its GPU);
    # off by default until measured on a GPU (jobs/bench_gpu.py has the graphed variants)
    cuda_graphs: bool = False

    def __post_init__(self) -> None:
        if self.precision not in ("auto", "fp32", "tf32", "bf16"):
            raise ConfigError(f"compute.precision {self.precision!r}: choose auto, fp32, tf32 or bf16")
        if self.cuda_graphs and self.compile:
            raise ConfigError("compute.cuda_graphs and compute.compile exclude each other: choose one")


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """How the work is spread over Ray."""

    workers: int = 2  # Ray Train DDP workers
    scorers: int = 2  # scoring actors
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    cpus_per_scorer: float = 1.0
    gpus_per_scorer: float = 0.0  # fractional GPUs allowed
    threads_per_process: int = 1  # torch threads in every worker and actor
    max_failures: int = 0  # worker-group restarts inside one run (Ray Train FailureConfig)
    # batch norm over the global batch (all workers); None: on when workers > 1 under batch_rule global
    sync_batch_norm: bool | None = None
    # GB of decoded images one worker or scorer may hold in memory; a larger share is decoded
    # once into a local-disk cache (numpy.memmap) and read from there. None: no limit
    memory_budget_gb: float | None = None
    cache_dir: str | None = None  # where such caches live (default: the system's temp folder)

    @property
    def memory_budget_bytes(self) -> int | None:
        return None if self.memory_budget_gb is None else int(self.memory_budget_gb * 1024**3)

    def __post_init__(self) -> None:
        if self.workers < 1 or self.scorers < 1:
            raise ConfigError("cluster.workers and cluster.scorers must be >= 1")
        if self.gpus_per_worker > 1 and self.gpus_per_worker != int(self.gpus_per_worker):
            raise ConfigError("cluster.gpus_per_worker above 1 must be a whole number")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """Everything one ``asd-ray run`` needs besides the data paths."""

    preset: str = "cifar10"
    defense: str = "asd"  # asd | none (plain supervised training on the whole poisoned set)
    epochs: int = 120  # T3
    seed: int = 0
    baseline_batch_size: int = 128  # defense none: global batch of the supervised epochs
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    split: SplitConfig = SplitConfig()
    scoring: ScoringConfig = ScoringConfig()
    mixmatch: MixMatchConfig = MixMatchConfig()
    virtual: VirtualConfig = VirtualConfig()
    transfer: TransferConfig = TransferConfig()
    compute: ComputeConfig = ComputeConfig()
    cluster: ClusterConfig = ClusterConfig()

    def __post_init__(self) -> None:
        _check_ranges(self, _RANGES, str)
        if self.defense not in ("asd", "none"):
            raise ConfigError(f"defense {self.defense!r}: choose asd or none")
        if self.epochs < 1:
            raise ConfigError(f"epochs {self.epochs} must be >= 1")
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


def _check_ranges(obj: Any, ranges: dict[str, tuple[Any, str]], name: Any) -> None:
    """Refuse the first value of ``obj`` (a dotted key into it) outside its rule, naming it
    as ``name(key)`` says (a config key, or a command-line flag)."""
    for key, (ok, rule) in ranges.items():
        value = obj
        for part in key.split("."):
            value = getattr(value, part)
        if value is not None and not ok(value):
            raise ConfigError(f"{name(key)} = {value!r} is out of range: it must be {rule}")


def _finite(low: float, *, strict: bool, high: float | None = None) -> tuple[Any, str]:
    """A rule for a finite number above ``low`` (strictly or not), and at most ``high``."""
    top = math.inf if high is None else high
    above = (lambda v: v > low) if strict else (lambda v: v >= low)
    rule = f"a finite number {'>' if strict else '>='} {low}" + ("" if high is None else f" and <= {high}")
    return (lambda v: math.isfinite(v) and above(v) and v <= top), rule


def _whole(low: int, high: int) -> tuple[Any, str]:
    return (lambda v: low <= v <= high), f"an integer in {low}..{high}"


_AT_LEAST_ONE = ((lambda v: v >= 1), "an integer >= 1")
_NOT_NEGATIVE = ((lambda v: v >= 0), "an integer >= 0")
_FRACTION = ((lambda v: math.isfinite(v) and 0 <= v < 1), "a number in [0, 1)")
# Every numeric setting's range, checked where the config is built, named by its key.
_RANGES: dict[str, tuple[Any, str]] = {
    "seed": _NOT_NEGATIVE,
    "baseline_batch_size": _whole(2, 2**20),  # batch norm needs two values per channel
    "data.crop_padding": _NOT_NEGATIVE,
    "scoring.sce_alpha": _finite(0, strict=False),
    "scoring.sce_beta": _finite(0, strict=False),
    "scoring.batch_size": _AT_LEAST_ONE,
    "split.holdout_ratio": _FRACTION,
    "split.meta_loss_guard": _FRACTION,
    "mixmatch.temperature": _finite(0, strict=True),
    "mixmatch.noise_overlay": _FRACTION,
    "mixmatch.mixup_alpha": _finite(0, strict=True),
    "mixmatch.lambda_u": _finite(0, strict=False),
    "mixmatch.rampup_epochs": _finite(0, strict=True),
    "mixmatch.lr": _finite(0, strict=True),
    "mixmatch.warmup_epochs": _finite(0, strict=False),
    "virtual.lr": _finite(0, strict=True),
    "virtual.batch_size": _whole(2, 2**20),
    "virtual.epochs": _finite(0, strict=False),
    "virtual.min_steps": _NOT_NEGATIVE,
    "transfer.semi_epochs": _NOT_NEGATIVE,
    "transfer.head_epochs": _finite(0, strict=False),
    "transfer.head_min_steps": _NOT_NEGATIVE,
    "cluster.cpus_per_worker": _finite(0, strict=True),
    "cluster.gpus_per_worker": _finite(0, strict=False),
    "cluster.cpus_per_scorer": _finite(0, strict=True),
    "cluster.gpus_per_scorer": _finite(0, strict=False),
    "cluster.threads_per_process": _AT_LEAST_ONE,
    "cluster.max_failures": _NOT_NEGATIVE,
    "cluster.memory_budget_gb": _finite(0, strict=True),
}


# Every attack parameter's range, checked where the attack is built, named by its flag.
# A trigger must also fit the image; that is checked when the trigger is built.
_ATTACK_RANGES: dict[str, tuple[Any, str]] = {
    "rate": _finite(0, strict=True, high=1),
    "target": _NOT_NEGATIVE,
    "seed": _NOT_NEGATIVE,
    "size": _whole(1, 4096),  # a sanity bound; it must also fit the image (checked when built)
    "alpha": _finite(0, strict=True, high=1),
    "wanet_k": _whole(2, 64),
    "wanet_s": _finite(0, strict=True, high=16),  # 0.5 (32 px) and 1 (224 px) in the paper
    "cross_ratio": _finite(0, strict=False),
    "pgd_eps": _finite(0, strict=True, high=1),
    "pgd_step": _finite(0, strict=True, high=1),
    "pgd_steps": _whole(1, 10_000),
    "sig_delta": _finite(0, strict=True, high=255),
    "sig_frequency": _finite(0, strict=True),  # it must also stay below half the width (checked when built)
    "adaptive_grid": _whole(2, 64),  # it must also fit the image (checked when built)
    "adaptive_pieces": _whole(1, 64 * 64),  # at most adaptive_grid**2 (checked in __post_init__)
    "adaptive_train_alpha": _finite(0, strict=True, high=1),
    "adaptive_test_alpha": _finite(0, strict=True, high=1),
    "conservatism_ratio": _finite(0, strict=False),
}


_CIFAR = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
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


def preset(name: str) -> RunConfig:
    """The :class:`RunConfig` of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"preset {name!r} is unknown; choose one of {', '.join(PRESETS)}")
    return from_dict({"preset": name, **PRESETS[name]})


def from_dict(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A RunConfig from nested plain values layered over ``base`` (defaults if None)."""
    return _build(RunConfig, values, base or RunConfig(), "")


def load_config(
    preset_name: str | None = None,
    yaml_path: str | Path | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
) -> RunConfig:
    """Layer a preset, a YAML file and ``section.field=value`` overrides, in that order.

    Override values are parsed as YAML scalars (``mixmatch.iterations=100``,
    ``data.flip=false``, ``data.mean=[0.5,0.5,0.5]``).
    """
    config = preset(preset_name) if preset_name else RunConfig()
    if yaml_path is not None:
        values = _yaml(Path(yaml_path), f"--config {yaml_path}") or {}
        if not isinstance(values, dict):
            raise ConfigError(f"{yaml_path}: expected a mapping of config sections")
        config = from_dict(values, config)
    if overrides:
        pairs = overrides.items() if isinstance(overrides, dict) else (_parse_override(o) for o in overrides)
        nested: dict[str, Any] = {}
        for key, value in pairs:
            *parents, leaf = key.split(".")
            node = nested
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = value
        config = from_dict(nested, config)
    return config


def load_recorded_config(path: Path, overrides: list[str] | None = None) -> RunConfig:
    """A run folder's recorded config (RUN/config.yaml), then ``overrides``. A setting not in
    the paper that the record lacks was added after the run began, which then ran the paper's
    algorithm there: it takes its PAPER_ALGORITHM value, not today's default."""
    values = _yaml(path, str(path))
    predates = []
    for override in PAPER_ALGORITHM:
        node = values
        for part in override.partition("=")[0].split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            predates.append(override)
    return load_config(None, path, [*predates, *(overrides or [])])


def with_overrides(obj: Any, overrides: list[str]) -> Any:
    """A copy of the config dataclass ``obj`` with ``field=value`` overrides, parsed and
    checked as :func:`load_config` parses and checks them."""
    return _build(type(obj), dict(_parse_override(o) for o in overrides), obj, "")


def config_yaml(config: RunConfig) -> str:
    """``config`` as YAML text (readable back with :func:`load_config`)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def _yaml(source: Path | str, what: str) -> Any:
    """YAML (safe: no tags that build objects) from a file or a string, or a one-line error."""
    try:
        return yaml.safe_load(source.read_text() if isinstance(source, Path) else source)
    except OSError as err:
        raise ConfigError(f"{what}: cannot read the file ({err.strerror}); check the path") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{what}: not UTF-8 text; save the file as UTF-8 YAML") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ConfigError(f"{what}: not valid YAML{line} ({problem}); fix the file") from None


def _parse_override(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} must look like section.field=value")
    return key.strip(), _yaml(value, f"override {text!r}")


def _build(cls: type, values: dict[str, Any], base: Any, prefix: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    changes = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key {prefix + key!r}; known: {', '.join(prefix + f for f in fields)}"
            )
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            changes[key] = _build(hint, value, getattr(base, key), f"{prefix}{key}.")
        else:
            changes[key] = _coerce(value, hint, prefix + key)
    return dataclasses.replace(base, **changes)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, options[0], name)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {value!r}")
        inner = typing.get_args(hint)[0]
        return tuple(_coerce(v, inner, name) for v in value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        return float(value)
    if hint in (int, str, bool) and type(value) is not hint:
        raise ConfigError(f"{name} must be {hint.__name__}, got {value!r}")
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
