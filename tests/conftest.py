"""Tiny synthetic shard sets shared by the tests (built in tmp folders, never committed)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest

from asd_ray.data.shards import ShardSet, write_shards
from asd_ray.data.sources import from_arrays


def synthetic_arrays(n: int = 200, size: int = 32, channels: int = 3, classes: int = 4, seed: int = 0):
    """Random uint8 images (n, size, size, channels) and balanced labels (n,)."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, size, size, channels), dtype=np.uint8)
    labels = np.arange(n) % classes
    return images, labels


def make_shards(folder: Path, n: int = 200, *, size: int = 32, channels: int = 3, classes: int = 4,
                per_shard: int = 64, seed: int = 0, name: str = "train") -> ShardSet:
    images, labels = synthetic_arrays(n, size, channels, classes, seed)
    write_shards(from_arrays(images, labels, class_names=[f"c{i}" for i in range(classes)]),
                 folder, name=name, samples_per_shard=per_shard)
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
