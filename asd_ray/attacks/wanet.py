"""WaNet warping trigger (poisoning form).

Nguyen and Tran, "WaNet - Imperceptible Warping-based Backdoor Attack", ICLR 2021.

A fixed smooth warping field, made by bicubic upsampling of random k x k control
offsets, is added to the identity sampling grid; ``grid_sample`` applies it. Noise mode
adds per-pixel random offsets so the network learns to ignore other warps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from asd_ray.attacks.base import (
    POISON_LABEL,
    Attack,
    ImageTransform,
    Modify,
    Param,
    PoisonPlan,
    Shape,
    Surrogate,
    check_covers_fit,
)
from asd_ray.config_ranges import finite, whole
from asd_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    import torch

    from asd_ray.config import AttackConfig


def wanet_grid(size: int, *, k: int = 4, s: float = 0.5, seed: int = 0) -> torch.Tensor:
    """The attack's fixed warping grid for square images of side ``size``.

    Args:
        size: image height = width in pixels.
        k: side of the random control grid.
        s: warping strength.
        seed: seeds the control grid (a ``torch.Generator``).

    Returns:
        (1, size, size, 2) float32 grid in [-1, 1]; ``[..., 0]`` is x (column), ``[..., 1]`` y.
    """
    if size < 2 or k < 2:
        raise ConfigError(f"size={size} and k={k} must both be at least 2")
    import torch  # here, not at the top: the config imports every attack and stays light
    import torch.nn.functional as F

    generator = torch.Generator().manual_seed(seed)
    ins = torch.rand(1, 2, k, k, generator=generator) * 2 - 1  # (1, 2, k, k)
    ins = ins / ins.abs().mean()
    noise_grid = F.interpolate(ins, size=size, mode="bicubic", align_corners=True)
    noise_grid = noise_grid.permute(0, 2, 3, 1)  # (1, size, size, 2)
    axis = torch.linspace(-1, 1, steps=size)
    rows, cols = torch.meshgrid(axis, axis, indexing="ij")
    identity = torch.stack((cols, rows), dim=2)[None]  # (1, size, size, 2), x first
    return torch.clamp(identity + s * noise_grid / size, -1, 1)


def apply_wanet(
    images: np.ndarray, grid: torch.Tensor, *, noise_rng: np.random.Generator | None = None
) -> np.ndarray:
    """Warp a batch with ``grid`` (bilinear ``grid_sample``, align_corners=True).

    Args:
        images: (N, H, W, C) uint8 with H = W = the grid's size.
        grid: (1, H, W, 2) from :func:`wanet_grid`.
        noise_rng: noise mode: each image's grid gets its own U(-1, 1) / H offset per
            pixel, shape (N, H, W, 2), drawn from this generator, then clamped to [-1, 1].

    Returns:
        (N, H, W, C) uint8, rounded and clipped.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) uint8, got {images.dtype} of shape {images.shape}")
    import torch  # here, not at the top: the config imports every attack and stays light
    import torch.nn.functional as F

    n, height, width, _ = images.shape
    if height != width:
        raise ConfigError(f"WaNet needs square images, got {height}x{width}; resize them first")
    if grid.shape != (1, height, width, 2):
        raise ValueError(
            f"grid of shape {tuple(grid.shape)} does not fit {height}x{width} images; "
            f"build it with wanet_grid({height})"
        )
    grids = grid.expand(n, -1, -1, -1)
    if noise_rng is not None:
        offsets = noise_rng.uniform(-1, 1, size=(n, height, width, 2)).astype(np.float32)
        grids = torch.clamp(grids + torch.from_numpy(offsets).to(grid.device) / height, -1, 1)
    x = torch.from_numpy(images).to(grid.device).permute(0, 3, 1, 2).float()  # (N, C, H, W)
    warped = F.grid_sample(x, grids, mode="bilinear", align_corners=True)
    warped = warped.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return warped.cpu().numpy()


WANET_K = Param("wanet_k", int, 4, "wanet: control grid size (default %(default)g)", rule=whole(2, 64))
WANET_S = Param(
    "wanet_s",
    float,
    0.5,
    "wanet: warp strength (default %(default)g)",
    rule=finite(0, strict=True, high=16),  # 0.5 (32 px) and 1 (224 px) in the paper
)
# noise mode: extra samples warped with random noise, labels kept
WANET_NOISE = Param("wanet_noise", bool, True, "wanet: disable noise mode")
CROSS_RATIO = Param(
    "cross_ratio",
    float,
    2.0,
    "wanet: noise-mode samples per poisoned sample (default %(default)g)",
    rule=finite(0, strict=False),
)


def _check(config: AttackConfig) -> None:
    if config.wanet_noise:
        check_covers_fit(config, CROSS_RATIO)


def _noise_samples(
    labels: np.ndarray, is_poison: np.ndarray, config: AttackConfig, rng: np.random.Generator
) -> np.ndarray:
    """Noise mode: each sample left with probability cross_ratio x rate."""
    if not config.wanet_noise:
        return np.zeros(len(labels), bool)
    return ~is_poison & (rng.random(len(labels)) < config.cross_ratio * config.rate)


def _grid(config: AttackConfig, shape: Shape) -> torch.Tensor:
    height, width, _ = shape
    if height != width:
        raise DataError(
            f"WaNet needs square images, these are {height}x{width}; re-make the shards with --image-size"
        )
    return wanet_grid(height, k=config.wanet_k, s=config.wanet_s, seed=config.seed)


def _trigger(config: AttackConfig, shape: Shape) -> ImageTransform:
    grid = _grid(config, shape)
    return lambda images: apply_wanet(images, grid)


def _train_images(
    config: AttackConfig, shape: Shape, plan: PoisonPlan, surrogate: Surrogate | None
) -> Modify:
    """The warp on poisoned samples; noise samples get it with per-image noise, drawn in
    sample-id order from one generator for the whole set."""
    grid = _grid(config, shape)
    noise_rng = np.random.default_rng([config.seed, 1])

    def modify(ids: np.ndarray, images: np.ndarray) -> np.ndarray:
        noise = plan.is_cover[ids]
        out = images.copy()
        if noise.any():
            out[noise] = apply_wanet(images[noise], grid, noise_rng=noise_rng)
        if not noise.all():
            out[~noise] = apply_wanet(images[~noise], grid)
        return out

    return modify


ATTACK = Attack(
    "wanet",
    POISON_LABEL,
    trigger=_trigger,
    params=(WANET_K, WANET_S, WANET_NOISE, CROSS_RATIO),
    check=_check,
    covers=_noise_samples,
    train_images=_train_images,
)
