"""Batched augmentation: seeded, index arithmetic equal to pad + crop + flip, and the same
for a row whichever worker augments it."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asd_ray.config import DataConfig
from asd_ray.data.augment import augment, draw, gather, noise_overlay, normalize

CONFIGS = [
    DataConfig(mean=(0.5,), std=(0.25,), crop_padding=2, flip=True),
    DataConfig(mean=(0.5,), std=(0.25,), augment="resized_crop", flip=True),
]


def _images(n: int = 12, size: int = 16, channels: int = 1) -> torch.Tensor:
    rng = np.random.default_rng(0)
    return torch.from_numpy(rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8))


@pytest.mark.parametrize("config", CONFIGS, ids=["crop", "resized_crop"])
def test_rows_of_a_batch_get_the_draws_of_the_whole_batch(config: DataConfig) -> None:
    whole = draw(config, torch.Generator().manual_seed(3), 16, 16, 12)
    rows = np.array([1, 4, 5, 11])
    part = draw(config, torch.Generator().manual_seed(3), 16, 16, 12, rows)
    assert whole.keys() == part.keys()
    for key in whole:
        assert np.array_equal(part[key], whole[key][rows]), key
    images = _images()
    first = augment(images, config, torch.Generator().manual_seed(3))
    assert torch.equal(first, augment(images, config, torch.Generator().manual_seed(3)))
    assert not torch.allclose(augment(images, config, torch.Generator().manual_seed(4)), first)


@pytest.mark.parametrize("padding", [1, 4])
def test_crop_and_flip_by_index_arithmetic_is_reflect_pad_then_crop_then_flip(padding: int) -> None:
    config = DataConfig(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3), crop_padding=padding, flip=True)
    images = _images(32, 8, 3)
    draws = draw(config, torch.Generator().manual_seed(0), 8, 8, 32)
    ours = gather(images, torch.arange(32), torch.from_numpy(draws["rows"]), torch.from_numpy(draws["cols"]))
    generator = torch.Generator().manual_seed(0)  # the same stream, drawn as the draw function does
    dy = torch.randint(0, 2 * padding + 1, (32, 1), generator=generator).flatten()
    dx = torch.randint(0, 2 * padding + 1, (32, 1), generator=generator).flatten()
    flipped = torch.rand(32, generator=generator) < 0.5
    padded = F.pad(images.permute(0, 3, 1, 2).float(), (padding,) * 4, mode="reflect")
    for i in range(32):
        crop = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        crop = crop.flip(2) if flipped[i] else crop
        assert torch.equal(ours[i].permute(2, 0, 1).float(), crop), i
    assert flipped.any() and not flipped.all() and len(set(dy.tolist())) > 1


def test_normalize_is_one_op_to_channels_last_and_standardises() -> None:
    config = DataConfig(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    images = _images(4, 8, 3)
    x = normalize(images, config)
    expected = (
        images.permute(0, 3, 1, 2).float() / 255 - torch.tensor(config.mean).view(1, 3, 1, 1)
    ) / torch.tensor(config.std).view(1, 3, 1, 1)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x, expected, atol=1e-6)


@pytest.mark.parametrize("config", CONFIGS, ids=["crop", "resized_crop"])
def test_a_worker_holding_no_rows_of_a_batch_draws_nothing_but_keeps_in_step(config: DataConfig) -> None:
    generator = torch.Generator().manual_seed(0)
    empty = draw(config, generator, 16, 16, 8, np.zeros(0, np.int64))
    assert all(len(v) == 0 for v in empty.values())
    advanced = torch.Generator().manual_seed(0)
    draw(config, advanced, 16, 16, 8)
    # the generator moved on by a whole batch's draws, like the other workers'
    assert torch.rand(1, generator=generator).item() == torch.rand(1, generator=advanced).item()


def test_a_crop_padding_as_wide_as_the_image_is_a_config_error() -> None:
    from asd_ray.errors import ConfigError

    config = DataConfig(mean=(0.5,), std=(0.25,), crop_padding=8)
    with pytest.raises(ConfigError, match="data.crop_padding 8 must be smaller than the images' side"):
        draw(config, torch.Generator().manual_seed(0), 8, 8, 4)


def test_the_noise_overlay_is_a_pixel_space_blend_of_uniform_noise_keyed_by_the_row() -> None:
    """MixMatch's noise overlay: (1 - w) pixel + w noise with noise uniform over [0, 255],
    the same for the same key wherever it is computed, different for another key."""
    config = DataConfig(mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
    x = normalize(_images(4, 16, 3), config)
    keys = torch.tensor([7, 7, 8, 2**31 - 1])
    whole = noise_overlay(x, keys, torch.ones(4, dtype=torch.float64), config)
    pixels = whole * torch.tensor(config.std).view(1, 3, 1, 1) + torch.tensor(config.mean).view(1, 3, 1, 1)
    pixels = pixels * 255
    assert torch.equal(whole[0], whole[1]) and not torch.allclose(whole[0], whole[2])
    assert pixels.min() >= -1e-3 and pixels.max() <= 255 + 1e-3
    assert abs(pixels.mean().item() - 127.5) < 8 and abs(pixels.std().item() - 255 / 12**0.5) < 5
    assert abs(np.corrcoef(pixels[0].flatten(), pixels[2].flatten())[0, 1]) < 0.1  # keys draw apart
    weights = torch.tensor([0.0, 0.25, 0.5, 1.0], dtype=torch.float64)
    blended = noise_overlay(x, keys, weights, config)
    assert torch.equal(blended[0], x[0])
    torch.testing.assert_close(blended[1], 0.75 * x[1] + 0.25 * whole[1])
    torch.testing.assert_close(noise_overlay(x[2:], keys[2:], weights[2:], config), blended[2:])
