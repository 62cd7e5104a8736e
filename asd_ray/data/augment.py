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
from asd_ray.errors import ConfigError


def normalize(images: torch.Tensor, config: DataConfig) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32, scaled to [0, 1] and standardised."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)  # (B, C, H, W)
    if x.shape[1] != len(config.mean):
        raise ConfigError(
            f"images have {x.shape[1]} channels but data.mean has {len(config.mean)} entries; "
            "set data.mean/data.std for this dataset"
        )
    mean = to_device(torch.tensor(config.mean).view(1, -1, 1, 1), x.device)
    std = to_device(torch.tensor(config.std).view(1, -1, 1, 1), x.device)
    return (x - mean) / std


def augment(
    images: torch.Tensor,
    config: DataConfig,
    generator: torch.Generator,
    *,
    rows: torch.Tensor | None = None,
    total: int | None = None,
) -> torch.Tensor:
    """Training augmentation of a uint8 batch, returned normalised (B, C, H, W) float32.

    With ``rows`` and ``total``, ``images`` are rows ``rows`` of a batch of
    ``total``: the random draws are made for the whole batch and these rows take
    theirs, so W workers that each augment their rows of a global batch apply
    exactly what one process would.
    """
    x = normalize(images, config)
    select = (rows, total or x.shape[0])
    if config.augment == "crop":
        x = random_crop_flip(x, config.crop_padding, config.flip, generator, select)
    elif config.augment == "resized_crop":
        x = random_resized_crop(x, config.flip, generator, select=select)
    elif config.flip:
        x = random_crop_flip(x, 0, True, generator, select)
    return x


def _take(draw: torch.Tensor, select: tuple[torch.Tensor | None, int]) -> torch.Tensor:
    rows, _ = select
    return draw if rows is None else draw[rows]


def random_crop_flip(
    x: torch.Tensor,
    padding: int,
    flip: bool,
    generator: torch.Generator,
    select: tuple[torch.Tensor | None, int] = (None, 0),
) -> torch.Tensor:
    """Random crop after reflect padding, plus an optional horizontal flip (p = 0.5).

    Args:
        x: (B, C, H, W) float.
        select: (rows, total) as in :func:`augment`; (None, 0): draw for x alone.
    """
    b, _, h, w = x.shape
    n = select[1] or b
    if padding:
        x = F.pad(x, (padding,) * 4, mode="reflect")
    dy = _take(torch.randint(0, 2 * padding + 1, (n, 1), generator=generator), select)
    dx = _take(torch.randint(0, 2 * padding + 1, (n, 1), generator=generator), select)
    rows = dy + torch.arange(h)  # (B, H)
    cols = dx + torch.arange(w)  # (B, W)
    if flip:
        flipped = _take(torch.rand(n, generator=generator) < 0.5, select)
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
    select: tuple[torch.Tensor | None, int] = (None, 0),
) -> torch.Tensor:
    """RandomResizedCrop (area ``scale``, aspect ``ratio``, bicubic) to the input size.

    Crops are drawn per sample like torchvision's (area and log-aspect uniform,
    clipped to the image) and resampled with one batched ``grid_sample``.
    ``select`` as in :func:`random_crop_flip`.
    """
    b = x.shape[0]
    n = select[1] or b
    area = torch.empty(n).uniform_(*scale, generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fraction of the image width
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (torch.rand(n, generator=generator) * 2 - 1) * (1 - width)  # centre in [-1, 1] coords
    cy = (torch.rand(n, generator=generator) * 2 - 1) * (1 - height)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(torch.rand(n, generator=generator) < 0.5, -1.0, 1.0)
    width, height, cx, cy, sign = (_take(v, select) for v in (width, height, cx, cy, sign))
    if b == 0:  # a worker holding none of this batch's rows (the draws above keep it in step)
        return x
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = width * sign, cx
    theta[:, 1, 1], theta[:, 1, 2] = height, cy
    grid = F.affine_grid(to_device(theta, x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
