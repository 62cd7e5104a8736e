"""Seeded, batched augmentation of stored uint8 images (airbench style).

Images stay uint8 until a batch is drawn; the random crop + flip is one gather
over the whole batch, and the 224-px RandomResizedCrop is one ``grid_sample``.
All randomness comes from an explicit CPU ``torch.Generator``, so changing the
pools or the device never changes other random streams.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from asd_ray.compute import to_device
from asd_ray.config import DataConfig


def normalize(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32, scaled to [0, 1] and standardised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W)
    if x.shape[1] != len(config.mean):
        raise ValueError(
            f"images have {x.shape[1]} channels but data.mean has {len(config.mean)} entries; "
            "set data.mean/data.std for this dataset"
        )
    mean = to_device(torch.tensor(config.mean).view(1, -1, 1, 1), x.device)
    std = to_device(torch.tensor(config.std).view(1, -1, 1, 1), x.device)
    return (x - mean) / std


def augment(images: torch.Tensor, config: DataConfig, generator: torch.Generator) -> torch.Tensor:
    """Training augmentation of a uint8 batch, returned normalised (B, C, H, W) float32."""
    x = normalize(images, config)
    if config.augment == "crop":
        x = random_crop_flip(x, config.crop_padding, config.flip, generator)
    elif config.augment == "resized_crop":
        x = random_resized_crop(x, config.flip, generator)
    elif config.flip:
        x = random_crop_flip(x, 0, True, generator)
    return x


def random_crop_flip(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop after reflect padding, plus an optional horizontal flip (p = 0.5).

    Args:
        x: (B, C, H, W) float.
    """
    b, _, h, w = x.shape
    if padding:
        x = F.pad(x, (padding,) * 4, mode="reflect")
    dy = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    dx = torch.randint(0, 2 * padding + 1, (b, 1), generator=generator)
    rows = dy + torch.arange(h)  # (B, H)
    cols = dx + torch.arange(w)  # (B, W)
    if flip:
        flipped = torch.rand(b, generator=generator) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    rows, cols = to_device(rows, x.device), to_device(cols, x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    out = x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


def random_resized_crop(
    x: torch.Tensor,
    flip: bool,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """RandomResizedCrop (area ``scale``, aspect ``ratio``, bicubic) to the input size.

    Crops are drawn per sample like torchvision's (area and log-aspect uniform,
    clipped to the image) and resampled with one batched ``grid_sample``.
    """
    b = x.shape[0]
    area = torch.empty(b).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(b).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the image width
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(b, generator=generator) * 2 - 1) * (1 - width)  # centre in [-1, 1] coords
    cy = (torch.rand(b, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.ones(b)
    if flip:
        sign = torch.where(torch.rand(b, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(to_device(theta, x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
