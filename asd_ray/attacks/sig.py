"""SIG: a sinusoidal signal on target-class images, labels kept (a clean-label attack).

Barni, Kallas and Tondi, "A new backdoor attack in CNNs by training set corruption without
label poisoning", ICIP 2019.

The horizontal signal ``v(i, j) = delta sin(2 pi j f / W)`` (j the column, W the width)
is added to every row and channel, then the image is clipped to [0, 255]. Training adds it
to target-class images only, so the labels stay correct; the network learns the signal as
a feature of the target class and, at test time, follows it on images of other classes.
Defaults delta = 20 (on 0-255) and f = 6 are the paper's and BackdoorBench's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from asd_ray.attacks.base import TARGET_CLASS, Attack, ImageTransform, Param, Shape
from asd_ray.config_ranges import finite
from asd_ray.errors import ConfigError

if TYPE_CHECKING:
    from asd_ray.config import AttackConfig


def sig_signal(
    height: int, width: int, channels: int, *, delta: float = 20.0, frequency: float = 6.0
) -> np.ndarray:
    """The SIG signal for images of shape (height, width, channels).

    Args:
        height, width, channels: the image shape.
        delta: amplitude on the 0-255 scale.
        frequency: periods across the image width, below width / 2: at width / 2 and
            above, the sampled sine vanishes or aliases to a lower frequency.

    Returns:
        (height, width, channels) float32, constant down each column.
    """
    if not 0 < frequency < width / 2:
        raise ConfigError(
            f"--sig-frequency {frequency} must be in (0, {width / 2:g}) on images {width} px wide: "
            "at half the width or more the sampled sine vanishes or aliases; pick a lower one"
        )
    row = delta * np.sin(2 * np.pi * np.arange(width) * frequency / width)  # (W,)
    return np.broadcast_to(row[None, :, None], (height, width, channels)).astype(np.float32)


def add_signal(images: np.ndarray, signal: np.ndarray) -> np.ndarray:
    """Add ``signal`` to a batch in float32, then round and clip to [0, 255].

    Args:
        images: (N, H, W, C) uint8.
        signal: (H, W, C) from :func:`sig_signal`.

    Returns:
        (N, H, W, C) uint8, a new array.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) uint8, got {images.dtype} of shape {images.shape}")
    if images.shape[1:] != signal.shape:
        raise ValueError(
            f"images of shape {images.shape} do not fit a signal built for {signal.shape}; "
            f"build it with height, width, channels = {images.shape[1:]}"
        )
    return np.clip(np.rint(images.astype(np.float32) + signal), 0, 255).astype(np.uint8)


SIG_DELTA = Param(
    "sig_delta",
    float,
    20.0,
    "sig: signal amplitude on 0-255 (default %(default)g)",
    rule=finite(0, strict=True, high=255),
)
SIG_FREQUENCY = Param(
    "sig_frequency",
    float,
    6.0,
    "sig: periods of the sine across the image width (default %(default)g)",
    rule=finite(0, strict=True),  # it must also stay below half the width (checked when built)
)


def _trigger(config: AttackConfig, shape: Shape) -> ImageTransform:
    signal = sig_signal(*shape, delta=config.sig_delta, frequency=config.sig_frequency)
    return lambda images: add_signal(images, signal)


ATTACK = Attack("sig", TARGET_CLASS, trigger=_trigger, params=(SIG_DELTA, SIG_FREQUENCY))
