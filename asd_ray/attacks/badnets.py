"""BadNets patch trigger.

Gu, Dolan-Gavitt and Garg, "BadNets: Identifying Vulnerabilities in the Machine Learning
Model Supply Chain", arXiv:1708.06733, 2017.

A small patch replaces the image pixels (weight 1 on the patch, 0 elsewhere). Defaults
follow the ASD reference: on images up to 64 px a fixed 2x2 colour patch at rows 4-5,
columns 4-5; on larger images a 32x32 pattern in the upper-left corner.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from asd_ray.attacks.base import PATTERN_FILE, POISON_LABEL, Attack, Param, Shape, Stamp
from asd_ray.attacks.trigger import Trigger, check_pattern, load_pattern, resize_pattern, to_channels
from asd_ray.config_ranges import optional, whole
from asd_ray.errors import ConfigError

if TYPE_CHECKING:
    from asd_ray.config import AttackConfig

BADNETS_32PX_PATCH = np.array(
    [[(180, 249, 112), (155, 50, 126)], [(234, 82, 68), (187, 201, 219)]], dtype=np.uint8
)  # (2, 2, 3) RGB, placed at rows 4-5, columns 4-5 of small images
_SMALL_MAX_SIDE = 64  # images up to this size get the 2x2 patch, larger ones a 32x32 pattern
_SMALL_LOCATION = (4, 4)
_LARGE_SIDE = 32


def white_square_pattern(size: int = 3) -> np.ndarray:
    """The all-white square other toolkits use at the bottom-right corner.

    Pass it as ``pattern`` with ``location=(height - size, width - size)``.

    Args:
        size: side in pixels.

    Returns:
        (size, size, 3) uint8, all 255.
    """
    if size < 1:
        raise ConfigError(f"white square size={size} must be at least 1")
    return np.full((size, size, 3), 255, dtype=np.uint8)


def check_patch_size(size: int, height: int, width: int) -> None:
    """Refuse a patch side outside 1..the image's shorter side, before a pattern is resized to it."""
    if not 1 <= size <= min(height, width):
        raise ConfigError(
            f"--size {size}: the badnets patch side must be 1..{min(height, width)} on these "
            f"{height}x{width} images; pick a smaller --size"
        )


def badnets_trigger(
    height: int,
    width: int,
    channels: int,
    *,
    pattern: np.ndarray | None = None,
    location: tuple[int, int] | None = None,
    size: int | None = None,
    seed: int = 0,
) -> Trigger:
    """The BadNets trigger for images of shape (height, width, channels).

    Defaults: images with both sides <= 64 px get :data:`BADNETS_32PX_PATCH` at (4, 4)
    (grayscale: its luminance, rounded). Larger images get a 32x32 pattern at (0, 0):
    i.i.d. uniform integers 0-255 of shape (32, 32, channels) drawn from
    ``np.random.default_rng(seed)``.

    Args:
        height, width, channels: the image shape; channels 1 or 3.
        pattern: (h, w, channels) or (h, w, 3) RGB values in [0, 255], replacing the default.
        location: (row, col) of the pattern's upper-left corner.
        size: resize the pattern to size x size (nearest neighbour).
        seed: seeds the default large-image pattern (unused otherwise).

    Returns:
        A :class:`Trigger` with weight 1 on the patch and 0 elsewhere.
    """
    small = max(height, width) <= _SMALL_MAX_SIDE
    if pattern is None:
        if small:
            pattern = np.rint(to_channels(BADNETS_32PX_PATCH, channels))
        else:
            rng = np.random.default_rng(seed)
            pattern = rng.integers(0, 256, size=(_LARGE_SIDE, _LARGE_SIDE, channels))
    check_pattern(pattern)
    pattern = to_channels(pattern, channels)
    if size is not None:
        check_patch_size(size, height, width)
        pattern = resize_pattern(pattern, size, size, nearest=True)
    if location is None:
        location = _SMALL_LOCATION if small else (0, 0)
    row, col = location
    h, w = pattern.shape[:2]
    if row < 0 or col < 0 or row + h > height or col + w > width:
        raise ConfigError(
            f"a {h}x{w} pattern at location (row, col)={location} does not fit in a "
            f"{height}x{width} image; pick a location in [0, {height - h}] x [0, {width - w}] "
            "or a smaller size"
        )
    full = np.zeros((height, width, channels), dtype=np.float32)
    weight = np.zeros((height, width, 1), dtype=np.float32)
    full[row : row + h, col : col + w] = pattern
    weight[row : row + h, col : col + w] = 1.0
    return Trigger(pattern=full, weight=weight)


LOCATION = Param(
    "location",
    tuple[int, int] | None,
    None,
    "badnets: upper-left corner of the patch (default 4 4 up to 64 px, else 0 0)",
    metavar=("ROW", "COL"),
)
SIZE = Param(
    "size",
    int | None,
    None,
    "badnets: patch side in pixels (default 2 up to 64 px, else 32)",
    # a sanity bound; it must also fit the image (checked when built)
    rule=optional(whole(1, 4096)),
)


def _check_location(config: AttackConfig) -> None:
    if config.location is not None and (len(config.location) != 2 or min(config.location) < 0):
        raise ConfigError(f"--location {config.location} must be two integers (row, col) >= 0")


def _build(config: AttackConfig, shape: Shape) -> Trigger:
    """The patch of ``config``: its pattern file (resized to ``--size``) or the default."""
    height, width, channels = shape
    pattern = None
    if config.size is not None:
        check_patch_size(config.size, height, width)
    if config.pattern_file:
        side = config.size or (
            len(BADNETS_32PX_PATCH) if max(height, width) <= _SMALL_MAX_SIDE else _LARGE_SIDE
        )
        pattern = load_pattern(config.pattern_file, side, side, channels)
    return badnets_trigger(
        height,
        width,
        channels,
        pattern=pattern,
        location=config.location,
        size=config.size,
        seed=config.seed,
    )


STAMP = Stamp("badnets", params=(PATTERN_FILE, LOCATION, SIZE), build=_build, check=_check_location)
ATTACK = Attack("badnets", POISON_LABEL, trigger=STAMP.transform, params=STAMP.params)
