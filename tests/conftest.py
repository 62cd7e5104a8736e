"""Tiny synthetic shard sets shared by the tests (built in tmp folders, never committed), and
the independent computations that tests check the code's figures against."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from asd_ray.data.shards import GROUND_TRUTH_FILE, ShardSet, write_shards
from asd_ray.data.sources import from_arrays


def synthetic_arrays(n: int = 200, size: int = 32, channels: int = 3, classes: int = 4, seed: int = 0):
    """Random uint8 images (n, size, size, channels) and balanced labels (n,)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = np.arange(n) % classes
    return images, labels


def make_shards(
    folder: Path,
    n: int = 200,
    *,
    size: int = 32,
    channels: int = 3,
    classes: int = 4,
    per_shard: int = 64,
    seed: int = 0,
    name: str = "train",
) -> ShardSet:
    images, labels = synthetic_arrays(n, size, channels, classes, seed)
    write_shards(
        from_arrays(images, labels, class_names=[f"c{i}" for i in range(classes)]),
        folder,
        name=name,
        samples_per_shard=per_shard,
    )
    return ShardSet(folder)


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    """A raw tar with the given (name, data) members, for malformed-shard tests."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def train_set(tmp_path) -> ShardSet:
    return make_shards(tmp_path / "train")


@pytest.fixture
def test_set(tmp_path) -> ShardSet:
    return make_shards(tmp_path / "test", n=80, seed=1, name="test")


_SHARED_RAY: dict[str, str] = {}  # the temp dir of the session's local Ray while it runs


@pytest.fixture(scope="module")
def ray_cluster():
    """The session's one local Ray, started on first use (start-up ~5 s on 2 cores) and
    kept for every later module; a test that needs a Ray of its own takes ``own_ray``."""
    import logging
    import os
    import tempfile

    import ray

    from asd_ray.driver import RAY_TRAIN_ENV

    if not _SHARED_RAY:
        for key, value in RAY_TRAIN_ENV.items():  # the raylet, and so Ray Train's controller, inherit them
            os.environ.setdefault(key, value)
        temp_dir = tempfile.mkdtemp(
            prefix="ray-", dir="/tmp"
        )  # short: Ray's socket paths have a length limit
        ray.init(
            num_cpus=4,
            object_store_memory=200 * 1024**2,
            dashboard_host="127.0.0.1",
            dashboard_port=8266,
            _temp_dir=temp_dir,
            logging_level=logging.WARNING,
        )
        _SHARED_RAY["temp_dir"] = temp_dir
    yield ray


def _stop_shared_ray() -> None:
    import shutil

    import ray

    if _SHARED_RAY:
        ray.shutdown()
        shutil.rmtree(_SHARED_RAY.pop("temp_dir"), ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def _shared_ray_stops_at_the_end():
    yield
    _stop_shared_ray()


@pytest.fixture
def own_ray():
    """For a test that starts its own Ray (a ``ray start`` head, a two-node cluster): the
    shared one stops first, so no two clusters compete for ports or auto-discovery; the
    next module that takes ``ray_cluster`` starts it again."""
    _stop_shared_ray()


@pytest.fixture(scope="session")
def poisoned_data(tmp_path_factory):
    """Tiny 16x16 grey shards, BadNets-poisoned, with test sets and oracle seeds."""
    from asd_ray import tables
    from asd_ray.attacks.poison import poison_shards, poison_test_shards
    from asd_ray.config import AttackConfig
    from asd_ray.inputs import RunInputs
    from asd_ray.seeds import pick_seeds

    root = tmp_path_factory.mktemp("poisoned")
    make_shards(root / "clean", n=240, size=16, channels=1, classes=4, per_shard=50)
    make_shards(root / "clean_test", n=60, size=16, channels=1, classes=4, seed=2, name="test")
    attack = AttackConfig("badnets", rate=0.1, target=1)
    poison_shards(root / "clean", root / "train", attack)
    poison_test_shards(root / "clean_test", root / "poison_test", attack)
    truth = tables.read_parquet(root / "train" / "poison.parquet", "poison")
    exclude = np.asarray(truth.column("is_modified").to_numpy(zero_copy_only=False))
    seeds = pick_seeds(ShardSet(root / "train"), 10, exclude=exclude, method="ground-truth-clean")
    tables.write_parquet(seeds, root / "seeds.parquet", "seeds")
    return RunInputs(
        train=str(root / "train"),
        test=str(root / "clean_test"),
        poison_test=str(root / "poison_test"),
        seeds=str(root / "seeds.parquet"),
        ground_truth=str(root / "train" / "poison.parquet"),
    )


TINY_RUN = [
    "epochs=3",
    "split.stage2_epoch=1",
    "split.stage3_epoch=2",
    "mixmatch.iterations=4",
    "virtual.min_steps=4",
    "data.crop_padding=2",
]


def figures_of(model, inputs) -> dict:
    """ACC, ASR and robust accuracy of ``model`` (trained under mnist-quick's normalisation),
    from its logits computed here (no scoring actors, no evaluate module): the count behind
    each figure over its own denominator."""
    import torch

    from asd_ray import tables

    mean, std = 0.1307, 0.3081

    def predict(folder: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = ShardSet(folder).load_arrays()
        x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std
        with torch.no_grad():
            return model.train(False)(x).argmax(1).numpy(), labels

    predicted, labels = predict(inputs.test)
    triggered, attackers = predict(inputs.poison_test)
    truth = tables.read_parquet(Path(inputs.poison_test) / GROUND_TRUTH_FILE, "poison")
    original = truth.column("original_label").to_numpy()
    assert len(labels) == 60 and len(attackers) == 45  # poisoned_data's ASR set: the non-target images
    return {
        "acc": (predicted == labels).sum() / 60,
        "asr": (triggered == attackers).sum() / 45,
        "robust_acc": (triggered == original).sum() / 45,
    }


def auroc_by_pairs(scores: np.ndarray, positives: np.ndarray) -> float:
    """The definition: the chance a positive outscores a negative, ties counting half."""
    pos, neg = scores[positives], scores[~positives]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))
