"""Blend trigger.

Chen, Liu, Li, Lu and Song, "Targeted Backdoor Attacks on Deep Learning Systems Using
Data Poisoning", arXiv:1712.05526, 2017.

The pattern is blended over the whole image: ``x' = (1 - alpha) x + alpha p``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from asd_ray.attacks.base import PATTERN_FILE, POISON_LABEL, Attack, Param, Shape, Stamp
from asd_ray.attacks.trigger import Trigger, check_pattern, load_pattern, resize_pattern, to_channels
from asd_ray.config_ranges import finite
from asd_ray.errors import ConfigError

if TYPE_CHECKING:
    from asd_ray.config import AttackConfig


def blend_trigger(
    height: int,
    width: int,
    channels: int,
    *,
    alpha: float = 0.1,
    pattern: np.ndarray | None = None,
    seed: int = 0,
) -> Trigger:
    """The Blend trigger for images of shape (height, width, channels).

    The ASD reference blends a picture on 32x32 images and noise on 224x224 ones; with no
    picture shipped, the default here is noise at every size: i.i.d. uniform integers
    0-255 of shape (height, width, channels) drawn from ``np.random.default_rng(seed)``.

    Args:
        height, width, channels: the image shape; channels 1 or 3.
        alpha: blend weight of the pattern, in (0, 1].
        pattern: (h, w, channels) or (h, w, 3) RGB values in [0, 255]; resized
            (bilinear) to the image when its size differs.
        seed: seeds the default noise pattern (unused when ``pattern`` is given).

    Returns:
        A :class:`Trigger` with weight ``alpha`` everywhere.
    """
    if not 0.0 < alpha <= 1.0:
        raise ConfigError(f"alpha={alpha} must be in (0, 1]; the reference uses 0.1")
    if pattern is None:
        rng = np.random.default_rng(seed)
        pattern = rng.integers(0, 256, size=(height, width, channels))
    check_pattern(pattern)
    pattern = resize_pattern(to_channels(pattern, channels), height, width, nearest=False)
    weight = np.full((height, width, 1), alpha, dtype=np.float32)
    return Trigger(pattern=pattern, weight=weight)


def blend_pattern_trigger(config: AttackConfig, shape: Shape, alpha: float) -> Trigger:
    """The Blend trigger of ``config`` (its pattern file or seeded noise) at ``alpha``."""
    height, width, channels = shape
    pattern = load_pattern(config.pattern_file, height, width, channels) if config.pattern_file else None
    return blend_trigger(height, width, channels, alpha=alpha, pattern=pattern, seed=config.seed)


ALPHA = Param(
    "alpha", float, 0.1, "blend: pattern weight (default %(default)g)", rule=finite(0, strict=True, high=1)
)
STAMP = Stamp(
    "blend",
    params=(PATTERN_FILE, ALPHA),
    build=lambda config, shape: blend_pattern_trigger(config, shape, config.alpha),
)
ATTACK = Attack("blend", POISON_LABEL, trigger=STAMP.transform, params=STAMP.params)
