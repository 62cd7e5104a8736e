"""The shared trigger formula of BadNets-style and Blend attacks: a (pattern, weight) pair.

Following BackdoorBox, an additive trigger is ``x' = (1 - w) x + w p``: a weight of 1
replaces the pixel (BadNets patch), a constant weight alpha blends the pattern over the
whole image (Blend). Everything here works on stored uint8 images (N, H, W, C), C in {1, 3}.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from asd_ray.errors import ConfigError, DataError

# ITU-R BT.601 luma weights (the ones PIL's "L" mode uses).
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
# Patterns no larger than this (per side) are resized with nearest neighbour so that
# a few-pixel patch keeps its exact colours; larger ones are resized bilinearly.
_NEAREST_MAX_SIDE = 8


@dataclass(frozen=True)
class Trigger:
    """An additive trigger for images of one shape (H, W, C).

    Attributes:
        pattern: (H, W, C) float32 in [0, 255], the trigger's pixel values.
        weight: (H, W, 1) float32 in [0, 1]; 1 replaces the pixel by the pattern, 0 keeps it.
    """

    pattern: np.ndarray
    weight: np.ndarray


def check_pattern(pattern: np.ndarray) -> None:
    """Raise ValueError unless ``pattern`` is (h, w, C) with values in [0, 255]."""
    if pattern.ndim != 3 or pattern.min() < 0 or pattern.max() > 255:
        raise ValueError(
            f"pattern must be (h, w, C) with values in [0, 255], got shape {pattern.shape} "
            f"and range [{pattern.min()}, {pattern.max()}]"
        )


def apply_trigger(images: np.ndarray, trigger: Trigger) -> np.ndarray:
    """Stamp ``trigger`` on a batch: ``x' = (1 - w) x + w p`` in float32, rounded and clipped.

    Where the weight is exactly 1 the result equals the (integer-valued) pattern exactly.

    Args:
        images: (N, H, W, C) uint8.
        trigger: a trigger built for shape (H, W, C).

    Returns:
        (N, H, W, C) uint8, a new array.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(
            f"images must be (N, H, W, C) uint8, got {images.dtype} of shape {images.shape}; "
            "pass the decoded stored images"
        )
    if images.shape[1:] != trigger.pattern.shape:
        raise ValueError(
            f"images of shape {images.shape} do not fit a trigger built for {trigger.pattern.shape}; "
            f"build the trigger with height, width, channels = {images.shape[1:]}"
        )
    x = images.astype(np.float32)
    out = (1.0 - trigger.weight) * x + trigger.weight * trigger.pattern
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def to_channels(rgb: np.ndarray, channels: int) -> np.ndarray:
    """Convert an RGB array (..., 3) to ``channels`` channels.

    Args:
        rgb: (..., 3) RGB values in [0, 255], or (..., channels) already.
        channels: 1 (ITU-R 601 luminance 0.299 R + 0.587 G + 0.114 B) or 3 (unchanged).

    Returns:
        (..., channels) float32, not rounded.
    """
    if channels not in (1, 3):
        raise ConfigError(f"channels={channels} is not supported; use 1 (grayscale) or 3 (RGB)")
    if rgb.shape[-1] == channels:
        return rgb.astype(np.float32)
    if rgb.shape[-1] != 3:
        raise ConfigError(
            f"pattern of shape {rgb.shape} has neither 3 nor {channels} channels; pass an RGB pattern"
        )
    return (rgb.astype(np.float32) @ _LUMA)[..., None]


def resize_pattern(pattern: np.ndarray, height: int, width: int, *, nearest: bool) -> np.ndarray:
    """Resize a pattern (h, w, C) float in [0, 255] to (height, width, C) float32.

    Each channel is resized as a float PIL image (no rounding), with nearest neighbour
    or bilinear (antialiased when shrinking) interpolation.
    """
    if pattern.shape[:2] == (height, width):
        return pattern.astype(np.float32)
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    planes = [
        np.asarray(
            Image.fromarray(np.ascontiguousarray(pattern[..., c], dtype=np.float32)).resize(
                (width, height), resample
            )
        )
        for c in range(pattern.shape[-1])
    ]
    return np.stack(planes, axis=-1).astype(np.float32)


def load_pattern(path: str | Path, height: int, width: int, channels: int) -> np.ndarray:
    """Read a trigger pattern from an image file.

    The picture is converted to RGB, resized to (height, width) (nearest neighbour when
    both sides are at most 8 px so small patches keep exact colours, else bilinear), then
    converted to ``channels`` channels with :func:`to_channels`.

    Args:
        path: any image file PIL can read.
        height, width: the pattern's size in pixels.
        channels: 1 or 3.

    Returns:
        (height, width, channels) float32 in [0, 255].
    """
    if height < 1 or width < 1:
        raise ConfigError(f"pattern size {height}x{width} must be positive")
    try:
        with Image.open(path) as image:
            rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(
            f"--pattern-file {path}: not a readable image ({type(err).__name__}); pass a PNG or JPEG"
        ) from None
    nearest = max(height, width) <= _NEAREST_MAX_SIDE
    return to_channels(resize_pattern(rgb, height, width, nearest=nearest), channels)
