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

from typing import TYPE_CHECKING

import numpy as np

from asd_ray.attacks.base import (
    PATTERN_FILE,
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
from asd_ray.attacks.blend import blend_pattern_trigger
from asd_ray.attacks.trigger import Trigger, apply_trigger
from asd_ray.config_ranges import finite, whole
from asd_ray.errors import ConfigError, DataError

if TYPE_CHECKING:
    from asd_ray.config import AttackConfig


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


ADAPTIVE_GRID = Param(
    "adaptive_grid",
    int,
    4,
    "adaptive-blend: the pattern is cut into a grid of N x N pieces (default %(default)g)",
    rule=whole(2, 64),  # it must also fit the image (checked when built)
)
ADAPTIVE_PIECES = Param(
    "adaptive_pieces",
    int,
    8,
    "adaptive-blend: pieces each training image gets, drawn per image (default %(default)g)",
    rule=whole(1, 64 * 64),  # at most adaptive_grid**2 (checked with the other parameters)
)
ADAPTIVE_TRAIN_ALPHA = Param(
    "adaptive_train_alpha",
    float,
    0.15,
    "adaptive-blend: blend weight of the pieces in training images (default %(default)g)",
    rule=finite(0, strict=True, high=1),
)
ADAPTIVE_TEST_ALPHA = Param(
    "adaptive_test_alpha",
    float,
    0.2,
    "adaptive-blend: blend weight of the full pattern in the test set (default %(default)g)",
    rule=finite(0, strict=True, high=1),
)
CONSERVATISM_RATIO = Param(
    "conservatism_ratio",
    float,
    1.0,
    "adaptive-blend: cover samples (pieces of the trigger, true label kept) per "
    "poisoned sample (default %(default)g)",
    rule=finite(0, strict=False),
)


def _check(config: AttackConfig) -> None:
    if config.adaptive_pieces > config.adaptive_grid**2:
        raise ConfigError(
            f"--adaptive-pieces {config.adaptive_pieces} is more than the {config.adaptive_grid**2} "
            f"pieces of a {config.adaptive_grid}x{config.adaptive_grid} --adaptive-grid; lower it "
            "or raise --adaptive-grid"
        )
    check_covers_fit(config, CONSERVATISM_RATIO)


def _covers(
    labels: np.ndarray, is_poison: np.ndarray, config: AttackConfig, rng: np.random.Generator
) -> np.ndarray:
    """Exactly round(conservatism_ratio x poisoned) of the non-target samples left."""
    candidates = np.flatnonzero((labels != config.target) & ~is_poison)
    count = round(config.conservatism_ratio * int(is_poison.sum()))
    if count > len(candidates):
        raise DataError(
            f"--conservatism-ratio {config.conservatism_ratio} asks for {count} cover samples "
            f"but only {len(candidates)} non-target samples are left unpoisoned; lower it or --rate"
        )
    is_cover = np.zeros(len(labels), bool)
    is_cover[rng.choice(candidates, size=count, replace=False)] = True
    return is_cover


def _trigger(config: AttackConfig, shape: Shape) -> ImageTransform:
    """The test-time trigger: the full pattern at the test alpha."""
    trigger = blend_pattern_trigger(config, shape, config.adaptive_test_alpha)
    return lambda images: apply_trigger(images, trigger)


def _train_images(
    config: AttackConfig, shape: Shape, plan: PoisonPlan, surrogate: Surrogate | None
) -> Modify:
    """Poisoned and cover samples alike get their own pieces of the pattern at the training
    alpha. The pieces are drawn once for the whole set, in sample-id order, so a sample's
    pieces do not depend on how the shards are chunked."""
    trigger = blend_pattern_trigger(config, shape, config.adaptive_train_alpha)
    cells = piece_index(shape[0], shape[1], config.adaptive_grid)
    modified = plan.is_modified
    kept = draw_pieces(
        np.random.default_rng([config.seed, 2]),
        int(modified.sum()),
        grid=config.adaptive_grid,
        pieces=config.adaptive_pieces,
    )
    row = np.cumsum(modified) - 1  # a modified sample's row of kept

    def modify(ids: np.ndarray, images: np.ndarray) -> np.ndarray:
        return apply_pieces(images, trigger, kept[row[ids]], cells)

    return modify


ATTACK = Attack(
    "adaptive-blend",
    POISON_LABEL,
    trigger=_trigger,
    params=(
        PATTERN_FILE,
        ADAPTIVE_GRID,
        ADAPTIVE_PIECES,
        ADAPTIVE_TRAIN_ALPHA,
        ADAPTIVE_TEST_ALPHA,
        CONSERVATISM_RATIO,
    ),
    check=_check,
    covers=_covers,
    train_images=_train_images,
)
