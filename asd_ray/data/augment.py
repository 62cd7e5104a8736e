"""Training augmentation of stored uint8 images: draws on the host, one pass on the device.

A batch's random draws come from an explicit CPU ``torch.Generator`` (so the
device, the pools and the worker count never change another random stream) and
are turned into source coordinates on the host: a random crop after reflect
padding plus a horizontal flip is index arithmetic, a per-row source row and
source column (:func:`draw`). The device then gathers the uint8 pixels of every
view of a step with one indexing op (:func:`gather`) and
standardises them with one fused multiply-add, channels_last out
(:func:`normalize`). The 224-px RandomResizedCrop is one affine grid per row,
resampled by one ``grid_sample`` (:func:`resample`). MixMatch's optional noise
overlay (:func:`noise_overlay`) is computed on the device from per-row keys.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch
import torch.nn.functional as F

from asd_ray.compute import to_device
from asd_ray.config import DataConfig
from asd_ray.errors import ConfigError


@functools.lru_cache(maxsize=32)
def _affine_constants(
    mean: tuple[float, ...], std: tuple[float, ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (1, C, 1, 1) on ``device``: ``x * scale + shift`` is
    ``(x / 255 - mean) / std``; made once per device, not once per batch."""
    std64 = np.asarray(std, np.float64)
    scale = torch.tensor(1.0 / (255.0 * std64), dtype=torch.float32).view(1, -1, 1, 1)
    shift = torch.tensor(-np.asarray(mean, np.float64) / std64, dtype=torch.float32).view(1, -1, 1, 1)
    return to_device(scale, device), to_device(shift, device)


def normalize(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1], standardised: one op, and
    channels_last (the NHWC storage of the pixels is kept)."""
    if images.shape[-1] != len(config.mean):
        raise ConfigError(
            f"images have {images.shape[-1]} channels but data.mean has {len(config.mean)} entries; "
            "set data.mean/data.std for this dataset"
        )
    scale, shift = _affine_constants(tuple(config.mean), tuple(config.std), images.device)
    return torch.addcmul(shift, images.permute(0, 3, 1, 2), scale)


def draw(
    config: DataConfig,
    generator: torch.Generator,
    height: int,
    width: int,
    total: int,
    rows: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """The augmentation draws of a batch of ``total`` images, for the rows ``rows`` of it
    (None: all), so W workers that each take their rows apply exactly what one process would.

    Returns:
        for a crop or flip, ``{"rows": (b, H), "cols": (b, W)}`` int64 source coordinates
        of every output pixel; for ``resized_crop``, ``{"theta": (b, 2, 3)}`` float32
        affine maps in ``affine_grid``'s coordinates; nothing else (``{}``: images as stored).
    """
    take = (lambda v: v.numpy()) if rows is None else (lambda v: v.numpy()[rows])
    if config.augment == "resized_crop":
        return {"theta": take(_resized_crop_theta(total, config.flip, generator))}
    padding = config.crop_padding if config.augment == "crop" else 0
    if config.augment != "crop" and not config.flip:
        return {}
    if padding >= min(height, width):
        raise ConfigError(
            f"data.crop_padding {padding} must be smaller than the images' side ({min(height, width)} px): "
            "lower it (the paper pads 32-px images by 4)"
        )
    dy = take(torch.randint(0, 2 * padding + 1, (total, 1), generator=generator))
    dx = take(torch.randint(0, 2 * padding + 1, (total, 1), generator=generator))
    cols = dx + np.arange(width)  # in padded coordinates
    if config.flip:
        flipped = take(torch.rand(total, generator=generator) < 0.5)
        cols = np.where(flipped[:, None], cols[:, ::-1], cols)
    return {
        "rows": _reflect(dy + np.arange(height) - padding, height),
        "cols": _reflect(cols - padding, width),
    }


def _reflect(index: np.ndarray, size: int) -> np.ndarray:
    """Coordinates of a reflect-padded axis (edge not repeated: -1 -> 1) in the unpadded one."""
    last = size - 1
    return last - np.abs(last - np.abs(index))


def _resized_crop_theta(
    n: int,
    flip: bool,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """(n, 2, 3) affine maps of RandomResizedCrop (area ``scale``, aspect ``ratio``), drawn per
    sample like torchvision's (area and log-aspect uniform, clipped to the image)."""
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the image width
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)  # centre in [-1, 1] coordinates
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    return theta


def resample(x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """RandomResizedCrop's resampling of normalised (B, C, H, W) ``x`` by (B, 2, 3) ``theta``
    (bicubic, reflection at the border), one ``grid_sample`` for the batch."""
    if x.shape[0] == 0:  # a worker holding none of this batch's rows
        return x
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=False)


_MASK31 = 0x7FFFFFFF  # 31-bit arithmetic: products of two such values stay inside int64


def _hash31(values: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer mixing function (multiply-xorshift rounds), elementwise on int64."""
    for multiplier in (0x45D9F3B, 0x2C1B3C6D, 0x297A2D39):
        values = ((values ^ (values >> 15)) * multiplier) & _MASK31
    return values ^ (values >> 15)


def noise_overlay(
    x: torch.Tensor, keys: torch.Tensor, weights: torch.Tensor, config: DataConfig
) -> torch.Tensor:
    """Blend a fresh uniform-noise picture into each normalised (B, C, H, W) view:
    ``(1 - w) pixel + w noise`` in pixel space, noise uniform over [0, 255].

    Row i's noise is a hash of ``keys[i]`` and the pixel position, computed where ``x``
    lives: it depends on the row's draw alone, not on the device or on which worker
    serves the row, and a captured CUDA graph recomputes it from the step's buffer.

    Args:
        keys: (B,) int64 in [0, 2^31); weights: (B,) float, the overlay's weight per row.
    """
    b, c, h, w = x.shape
    pixels = torch.arange(c * h * w, device=x.device).view(1, c, h, w)
    noise = _hash31((keys.view(b, 1, 1, 1) * 0x3C6EF35F + pixels) & _MASK31)  # (B, C, H, W)
    scale, shift = _affine_constants(tuple(config.mean), tuple(config.std), x.device)
    noise = torch.addcmul(shift, noise.to(x.dtype), scale * (255.0 / _MASK31))  # standardised like x
    return torch.lerp(x, noise, weights.to(x.dtype).view(b, 1, 1, 1))


def gather(images: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(b, H, W, C) uint8: pixel ``(rows[i, h], cols[i, w])`` of image ``index[i]``, one indexing op.

    All four tensors on the same device (the images may also be a host memmap view).
    """
    return images[index[:, None, None], rows[:, :, None], cols[:, None, :]]


def augment(
    images: torch.Tensor,
    config: DataConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """Training augmentation of a whole uint8 batch (B, H, W, C) on its device, returned
    normalised (B, C, H, W) float32 (scoring under augmentation uses it); channels_last
    except after a resized crop."""
    b, h, w, _ = images.shape
    draws = {
        k: to_device(torch.from_numpy(v), images.device) for k, v in draw(config, generator, h, w, b).items()
    }
    if "rows" in draws:
        images = gather(images, to_device(torch.arange(b), images.device), draws["rows"], draws["cols"])
    x = normalize(images, config)
    return resample(x, draws["theta"]) if "theta" in draws else x
