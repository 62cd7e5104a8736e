"""Batched augmentation: seeded, and the same for a row whichever worker augments it."""

import numpy as np
import pytest
import torch

from asd_ray.config import DataConfig
from asd_ray.data.augment import augment


@pytest.mark.parametrize(
    "config",
    [
        DataConfig(mean=(0.5,), std=(0.25,), crop_padding=2, flip=True),
        DataConfig(mean=(0.5,), std=(0.25,), augment="resized_crop", flip=True),
    ],
    ids=["crop", "resized_crop"],
)
def test_rows_of_a_batch_get_the_draws_of_the_whole_batch(config: DataConfig) -> None:
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (12, 16, 16, 1), dtype=np.uint8))
    whole = augment(images, config, torch.Generator().manual_seed(3))
    rows = torch.tensor([1, 4, 5, 11])
    part = augment(images[rows], config, torch.Generator().manual_seed(3), rows=rows, total=12)
    assert torch.allclose(part, whole[rows], atol=1e-6)
    other = augment(images, config, torch.Generator().manual_seed(4))
    assert not torch.allclose(other, whole)


@pytest.mark.parametrize("augment_kind", ["crop", "resized_crop"])
def test_a_worker_holding_no_rows_of_a_batch_gets_an_empty_batch(augment_kind: str) -> None:
    config = DataConfig(mean=(0.5,), std=(0.25,), augment=augment_kind, crop_padding=2)
    generator = torch.Generator().manual_seed(0)
    empty = augment(
        torch.zeros(0, 16, 16, 1, dtype=torch.uint8),
        config,
        generator,
        rows=torch.zeros(0, dtype=torch.long),
        total=8,
    )
    assert empty.shape == (0, 1, 16, 16)
    assert generator.initial_seed() == 0 and torch.rand(1, generator=generator).item() == pytest.approx(
        torch.rand(1, generator=_advanced(config)).item()
    )  # the generator moved on by a whole batch's draws, like the other workers'


def _advanced(config: DataConfig) -> torch.Generator:
    generator = torch.Generator().manual_seed(0)
    augment(torch.zeros(8, 16, 16, 1, dtype=torch.uint8), config, generator)
    return generator
