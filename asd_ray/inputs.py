"""A run's inputs: the paths it reads, the data they open to, checked before any Ray work.

:class:`RunInputs` is what a user names (and RUN/inputs.json records);
:func:`open_inputs` opens and cross-checks it into :class:`RunData`;
:func:`add_trusted_seeds` appends the seeds' trusted copies as training ids
N.. N+E-1 (:mod:`asd_ray.training_set`). No Ray here: the driver, the demo data and the tests use it alike.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from asd_ray import __version__, storage, tables
from asd_ray.attacks.poison import original_labels, read_ground_truth
from asd_ray.config import RunConfig, load_recorded_config
from asd_ray.data.shard_writer import write_shards
from asd_ray.data.shards import ShardSet
from asd_ray.data.share import load_share
from asd_ray.data.sources import from_arrays
from asd_ray.errors import ConfigError, DataError
from asd_ray.models import ModelSpec
from asd_ray.resume import check_resumable
from asd_ray.run_folder import BEST_RULE, TRUSTED_SEEDS_DIR, failed_start, read_inputs, recorded_config
from asd_ray.seeds import SeedPlan, plan_seeds
from asd_ray.training_set import TrainingSet, trusted_ids


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """Where the things a run reads are (recorded in RUN/inputs.json): local paths, or
    s3:// / gs:// URIs."""

    train: str  # poisoned (untrusted) training shard folder
    test: str  # clean test shard folder (ACC)
    poison_test: str | None = None  # triggered test shard folder (ASR)
    seeds: str | None = None  # seeds table (required for defense asd)
    ground_truth: str | None = None  # poison.parquet of the training set: reporting only

    def __post_init__(self) -> None:
        for name, path in dataclasses.asdict(self).items():
            try:
                storage.location(path) if path else None
            except DataError as err:
                raise ConfigError(f"{name.replace('_', '-')} {err}") from None

    def absolute(self) -> RunInputs:
        """Local paths made absolute (URIs are absolute already), as RUN/inputs.json records them."""
        return RunInputs(**{k: _absolute(v) if v else None for k, v in dataclasses.asdict(self).items()})


def _absolute(path: str | os.PathLike) -> str:
    where = storage.location(path)
    return str(where.local.absolute()) if where.is_local else str(where)


@dataclasses.dataclass
class RunData:
    """The opened inputs. Training ids are the shard set's 0..N-1, then the trusted copies."""

    train: ShardSet
    test: ShardSet
    poison_test: ShardSet | None
    seeds: SeedPlan | None  # None without a defense
    ground_truth: pa.Table | None  # over the training ids, then the trusted copies
    spec: ModelSpec
    original_labels: np.ndarray | None  # the triggered test set's clean labels (robust accuracy)
    trusted: ShardSet | None = None  # RUN/trusted-seeds: seeds' trusted copies, ids N.. N+E-1

    @property
    def total(self) -> int:
        """Training samples including the trusted copies."""
        return len(self.train) + len(self.trusted_ids)

    @property
    def trusted_ids(self) -> np.ndarray:
        return trusted_ids(len(self.train), len(self.trusted) if self.trusted is not None else 0)

    def training_set(self) -> TrainingSet:
        """The training set as the workers and scorers get it (trusted copies decoded)."""
        return TrainingSet.of(self.train, self.trusted)

    @property
    def seed_ids(self) -> np.ndarray:
        return (
            np.concatenate([self.seeds.in_place, self.trusted_ids]) if self.seeds else np.empty(0, np.int64)
        )

    @property
    def tampered_ids(self) -> np.ndarray:
        return self.seeds.tampered if self.seeds else np.empty(0, np.int64)


def resolve_run(config: RunConfig, inputs: RunInputs, out: Path, resume: bool) -> tuple[RunConfig, RunInputs]:
    """The config and inputs of a new run, or those recorded in ``out`` for a resumed one.

    A resumed run keeps its algorithm and data settings
    (:func:`asd_ray.resume.check_resumable`). A new run needs an empty folder, or
    one a start cut short left (:func:`~asd_ray.run_folder.failed_start`: its leftovers
    are removed). Called by the driver holding the folder's lock.
    """
    if resume:
        check_resumable(load_recorded_config(recorded_config(out)), config, out)
        return config, RunInputs(**read_inputs(out))
    leftovers = failed_start(out)
    if leftovers is None:
        raise DataError(
            f"run folder {out} is not empty; pass --resume to continue it or choose another --out"
        )
    for path in leftovers:
        path.unlink(missing_ok=True)
    if config.defense == "asd" and not inputs.seeds:
        raise DataError("defense asd needs a seeds table: make one with `asd-ray seeds` and pass --seeds")
    return config, inputs.absolute()


def open_inputs(config: RunConfig, inputs: RunInputs) -> RunData:
    """Open and cross-check every input (class counts, image sizes, channels, seeds)."""

    def place(path: str) -> storage.Location:
        return storage.location(path, config.storage)

    train, test = ShardSet(place(inputs.train)), ShardSet(place(inputs.test))
    poison_test = ShardSet(place(inputs.poison_test)) if inputs.poison_test else None
    height, width, channels = train.require_uniform_size("training")
    for name, other in (("test", test), ("poison-test", poison_test)):
        if other is None:
            continue
        if other.info.num_classes != train.info.num_classes:
            raise DataError(
                f"class-count mismatch: {other.folder} ({name}) has {other.info.num_classes} classes, "
                f"{train.folder} (train) has {train.info.num_classes}; make both from the same dataset"
            )
        if other.require_uniform_size(name) != (height, width, channels):
            raise DataError(
                f"{other.folder} ({name}) images are {other.require_uniform_size(name)}, training images "
                f"are {(height, width, channels)}; make both with the same --image-size"
            )
    if channels != len(config.data.mean):
        raise DataError(
            f"{train.folder} images have {channels} channel(s) but data.mean has {len(config.data.mean)} "
            "entries; pick the preset of this dataset or set data.mean/data.std"
        )
    seeds = None
    if config.defense == "asd":
        table = tables.read_parquet(place(inputs.seeds), "seeds")
        seeds = plan_seeds(train, table, config.split.seeds_per_class, where=inputs.seeds)
    truth = read_ground_truth(place(inputs.ground_truth), train) if inputs.ground_truth else None
    m = config.model
    spec = ModelSpec(m.name, train.info.num_classes, channels, max(height, width), m.factory, m.meta_layers)
    original = original_labels(poison_test) if poison_test is not None else None
    return RunData(train, test, poison_test, seeds, truth, spec, original)


def add_trusted_seeds(data: RunData, out: Path) -> RunData:
    """Write the seeds' trusted copies as RUN/trusted-seeds (once; a resume reads them back)
    and extend the ground truth over them (never poisoned)."""
    if data.seeds is None or not data.seeds.num_extras:
        return data
    folder = out / TRUSTED_SEEDS_DIR
    if not (folder / "dataset.json").is_file():
        images, labels = [], []
        for source, ids, trusted_labels in data.seeds.extras:
            keep = np.zeros(len(ShardSet(source)), bool)
            keep[ids] = True
            pixels, _, _ = load_share(ShardSet(source), keep=keep)
            images.append(pixels)
            labels.append(trusted_labels)
        records = from_arrays(
            np.concatenate(images), np.concatenate(labels), class_names=data.train.info.class_names
        )
        write_shards(records, folder, name="trusted", samples_per_shard=10_000, overwrite=False)
    trusted = ShardSet(folder)
    truth = data.ground_truth
    if truth is not None:
        n, labels = len(data.train), trusted.labels.astype(np.int32)
        extra = {
            "sample_id": trusted_ids(n, len(trusted)),
            "is_poison": np.zeros(len(trusted), bool),
            "is_modified": np.zeros(len(trusted), bool),
            "original_label": labels,
            "label_after": labels,
            "attack": ["trusted-seed"] * len(trusted),
            "params": ["{}"] * len(trusted),
        }
        truth = pa.concat_tables([truth, tables.from_pydict(extra, "poison")])
    return dataclasses.replace(data, trusted=trusted, ground_truth=truth)


def model_card(config: RunConfig, data: RunData) -> dict[str, Any]:
    """What a model file says about itself besides its epoch and figures."""
    height, width, channels = data.train.require_uniform_size("training")
    datasets = {"train": data.train, "test": data.test, "poison_test": data.poison_test}
    return {
        "asd_ray_version": __version__,
        "architecture": dataclasses.asdict(data.spec),
        "classes": list(data.train.info.class_names),
        "input": {
            "height": height,
            "width": width,
            "channels": channels,
            "mean": list(config.data.mean),
            "std": list(config.data.std),
            "normalise": "x = (pixels / 255 - mean) / std per channel, as (B, C, H, W) float32",
        },
        "preset": config.preset,
        "defense": config.defense,
        "epochs": config.epochs,
        "data": {
            name: {"folder": str(shards.folder), "identity_sha256": shards.identity()}
            for name, shards in datasets.items()
            if shards is not None
        },
        "selection": BEST_RULE,
    }
