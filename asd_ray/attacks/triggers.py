"""The triggers all2all and clean-label stamp, as ``--trigger`` names them: BadNets' patch,
Blend's picture and the checkerboard in the four corners."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from asd_ray.attacks import badnets, blend
from asd_ray.attacks.base import ImageTransform, Param, Shape, Stamp
from asd_ray.attacks.trigger import Trigger
from asd_ray.errors import ConfigError

if TYPE_CHECKING:
    from asd_ray.config import AttackConfig


def checkerboard_corners_trigger(height: int, width: int, channels: int, *, size: int = 3) -> Trigger:
    """A size x size black/white checkerboard replacing the pixels of all four corners.

    Cell (i, j) of the board is white when i + j is even, counted from the image corner,
    so the four patches are mirror images of one another with a white corner pixel.

    Args:
        height, width, channels: the image shape; channels 1 or 3.
        size: side of each corner patch, at most half the shorter image side.

    Returns:
        A :class:`Trigger` with weight 1 on the four patches and 0 elsewhere.
    """
    if size < 1 or 2 * size > min(height, width):
        raise ConfigError(
            f"checkerboard size={size} must be in [1, {min(height, width) // 2}] so the four "
            f"corner patches fit in a {height}x{width} image without overlapping"
        )
    board = 255.0 * ((np.arange(size)[:, None] + np.arange(size)[None, :]) % 2 == 0)  # (size, size)
    pattern = np.zeros((height, width, channels), dtype=np.float32)
    weight = np.zeros((height, width, 1), dtype=np.float32)
    for rows in (slice(0, size), slice(height - size, height)):
        for cols in (slice(0, size), slice(width - size, width)):
            # Flip so cell (0, 0) of the board sits at the image corner in every patch.
            flipped = board[:: 1 if rows.start == 0 else -1, :: 1 if cols.start == 0 else -1]
            pattern[rows, cols] = flipped[..., None]
            weight[rows, cols] = 1.0
    return Trigger(pattern=pattern, weight=weight)


CHECKERBOARD = Stamp(
    "checkerboard", params=(), build=lambda config, shape: checkerboard_corners_trigger(*shape)
)
TRIGGERS: dict[str, Stamp] = {stamp.name: stamp for stamp in (badnets.STAMP, blend.STAMP, CHECKERBOARD)}
DEFAULT_TRIGGER = badnets.STAMP

TRIGGER_CHOICE = Param(
    "trigger",
    str | None,
    None,
    f"all2all/clean-label: the trigger (default {DEFAULT_TRIGGER.name})",
    choices=tuple(TRIGGERS),
)
# What an attack that stamps the chosen trigger reads: the choice and every trigger's parameters.
CHOSEN_TRIGGER_PARAMS = tuple(
    dict.fromkeys((TRIGGER_CHOICE, *(param for stamp in TRIGGERS.values() for param in stamp.params)))
)


def chosen_trigger(config: AttackConfig, shape: Shape) -> ImageTransform:
    """The trigger ``--trigger`` names, for images of ``shape``."""
    stamp = TRIGGERS[config.trigger] if config.trigger is not None else DEFAULT_TRIGGER
    return stamp.transform(config, shape)
