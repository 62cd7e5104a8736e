"""Adaptive blend: a blended trigger applied through random partial masks, plus cover samples.

Qi, Xie, Li, Wang and Mittal, "Revisiting the Assumption of Latent Separability for Backdoor
Defenses", ICLR 2023 ("Adaptive-Blend").

Made against defenses that separate poisoned samples by loss or latent features. The Blend
pattern is cut into a k x k grid of pieces; each poisoned training image gets only a random
subset of them, blended at a low training alpha, so no single trigger is learned strongly
enough to stand out. At test time the full pattern at a higher alpha activates the backdoor.
"Conservatism" adds regularization (cover) samples: further images with partial triggers
that keep their true labels, so the trigger alone does not predict the target and poisoned
samples do not stand out by loss. Defaults follow the paper: 8 of 16 pieces, alpha 0.15 at
training and 0.2 at test, as many cover samples as poisoned ones.
"""

from __future__ import annotations

import numpy as np

from asd_ray.attacks.trigger import Trigger, apply_trigger
from asd_ray.errors import ConfigError


def draw_pieces(rng: np.random.Generator, n: int, *, grid: int = 4, pieces: int = 8) -> np.ndarray:
    """Which pieces each of ``n`` images gets: exactly ``pieces`` of the ``grid``**2, uniformly.

    Args:
        rng: the draw's generator.
        n: number of images.
        grid: side of the grid of pieces.
        pieces: pieces kept per image, 1..grid**2.

    Returns:
        (n, grid**2) bool, piece r * grid + c being row r, column c of the grid.
    """
    total = grid * grid
    if not 1 <= pieces <= total:
        raise ConfigError(
            f"--adaptive-pieces {pieces} must be in 1..{total} (the pieces of a {grid}x{grid} "
            "--adaptive-grid); lower it or raise --adaptive-grid"
        )
    rank = rng.random((n, total)).argsort(axis=1).argsort(axis=1)  # a random permutation per image
    return rank < pieces


def piece_index(height: int, width: int, grid: int) -> np.ndarray:
    """The piece each pixel belongs to, piece r * grid + c being row r, column c of the grid.

    Image row y falls in grid row ``y * grid // height`` (columns alike), so the pieces
    also tile images whose sides ``grid`` does not divide, each at least a pixel wide.

    Args:
        height, width: the image size; both at least ``grid``, so every piece has a pixel.
        grid: side of the grid of pieces.

    Returns:
        (height, width) int64 in 0..grid**2 - 1.
    """
    if grid > min(height, width):
        raise ConfigError(
            f"--adaptive-grid {grid} is larger than these {height}x{width} images: some pieces "
            f"would have no pixel; pick at most {min(height, width)}"
        )
    rows = np.arange(height) * grid // height  # the grid row of each image row
    cols = np.arange(width) * grid // width
    return rows[:, None] * grid + cols[None, :]


def apply_pieces(images: np.ndarray, trigger: Trigger, kept: np.ndarray, cells: np.ndarray) -> np.ndarray:
    """Stamp each image with its own pieces of ``trigger``: the weight is zeroed outside them.

    Args:
        images: (N, H, W, C) uint8.
        trigger: the full Blend trigger (at the training alpha) for shape (H, W, C).
        kept: (N, grid**2) bool from :func:`draw_pieces`, image i's pieces.
        cells: (H, W) from :func:`piece_index`.

    Returns:
        (N, H, W, C) uint8, a new array; pixels outside an image's pieces are unchanged.
    """
    if kept.shape != (len(images), cells.max() + 1):
        raise ValueError(
            f"kept of shape {kept.shape} must be ({len(images)}, {cells.max() + 1}): one row per "
            "image, one column per piece"
        )
    out = np.empty_like(images)
    for i, row in enumerate(kept):
        weight = trigger.weight * row[cells][..., None]  # (H, W, 1), 0 outside the pieces
        out[i] = apply_trigger(images[i : i + 1], Trigger(pattern=trigger.pattern, weight=weight))[0]
    return out
