"""Clean-label (label-consistent) backdoor: adversarial perturbation, then a trigger.

Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks", arXiv:1912.02771, 2019.

Target-class images keep their labels; an untargeted PGD perturbation against their true
label on a surrogate model makes them hard to learn from content, so the network leans on
the trigger (a checkerboard in the four corners, or the BadNets patch).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from asd_ray.attacks.trigger import Trigger
from asd_ray.errors import ConfigError


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


def pgd_perturb(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    *,
    eps: float = 16 / 255,
    step: float = 1.5 / 255,
    steps: int = 30,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    batch_size: int = 128,
    device: str | torch.device = "cpu",
    seed: int = 0,
) -> np.ndarray:
    """Untargeted L-inf PGD away from the true labels on a surrogate model.

    Works on [0, 1] images, starting at a uniform random point of the eps-ball (drawn on
    the CPU from a ``torch.Generator`` seeded with ``seed``, so results do not depend on
    ``device``), and ascends the cross-entropy with signed gradient steps. The model runs
    in eval mode (its training flag is restored afterwards); only input gradients are
    computed, so its parameters, buffers and ``.grad`` stay untouched.

    Args:
        model: surrogate classifier taking (B, C, H, W) float inputs; must already be on
            ``device``.
        images: (N, H, W, C) uint8.
        labels: (N,) integer true labels.
        eps: L-inf budget on [0, 1] images.
        step: PGD step size.
        steps: number of PGD steps.
        mean, std: per-channel normalisation the model expects on [0, 1] inputs (both or
            neither).
        batch_size: images per forward/backward pass.
        device: where the attack runs.
        seed: seeds the random start.

    Returns:
        (N, H, W, C) uint8 perturbed images.
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"images must be (N, H, W, C) uint8, got {images.dtype} of shape {images.shape}")
    if labels.shape != (len(images),):
        raise ValueError(f"labels of shape {labels.shape} must be ({len(images)},), one per image")
    if eps <= 0 or step <= 0 or steps < 1 or batch_size < 1:
        raise ConfigError(
            f"eps={eps}, step={step}, steps={steps}, batch_size={batch_size} must all be positive"
        )
    if (mean is None) != (std is None):
        raise ValueError("pass both mean and std, or neither")
    shift = scale = None
    if mean is not None:
        shift = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        scale = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.train(False)  # eval mode
    out = np.empty_like(images)
    try:
        for start in range(0, len(images), batch_size):
            chunk = slice(start, start + batch_size)
            x0 = torch.from_numpy(images[chunk]).to(device).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(labels[chunk]).to(device=device, dtype=torch.long)
            noise = torch.rand(x0.shape, generator=generator).to(device) * 2 - 1
            x = (x0 + eps * noise).clamp(0, 1)  # (B, C, H, W)
            for _ in range(steps):
                x.requires_grad_(True)
                inputs = x if shift is None else (x - shift) / scale
                loss = F.cross_entropy(model(inputs), y)
                (grad,) = torch.autograd.grad(loss, x)
                x = x.detach() + step * grad.sign()
                x = torch.minimum(torch.maximum(x, x0 - eps), x0 + eps).clamp(0, 1)
            pixels = (x * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
            out[chunk] = pixels.cpu().numpy()
    finally:
        model.train(was_training)
    return out
