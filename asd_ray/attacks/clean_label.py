"""Clean-label (label-consistent) backdoor: adversarial perturbation, then a trigger.

Turner, Tsipras and Madry, "Label-Consistent Backdoor Attacks", arXiv:1912.02771, 2019.

Target-class images keep their labels; an untargeted PGD perturbation against their true
label on a surrogate model makes them hard to learn from content, so the network leans on
the trigger (a checkerboard in the four corners, or the BadNets patch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from asd_ray.attacks.base import TARGET_CLASS, Attack, Modify, Param, PoisonPlan, Shape, Surrogate
from asd_ray.attacks.triggers import CHOSEN_TRIGGER_PARAMS, chosen_trigger
from asd_ray.config_ranges import finite, whole
from asd_ray.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from asd_ray.config import AttackConfig


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
    import torch  # here, not at the top: the config imports every attack and stays light
    import torch.nn.functional as F

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


# The PGD budget and steps; the Python API only, as PGD needs a surrogate model.
PGD_EPS = Param(
    "pgd_eps",
    float,
    16 / 255,
    "clean-label: PGD budget (L-inf, on [0, 1] images)",
    rule=finite(0, strict=True, high=1),
    flag=False,
)
PGD_STEP = Param(
    "pgd_step",
    float,
    1.5 / 255,
    "clean-label: PGD step size",
    rule=finite(0, strict=True, high=1),
    flag=False,
)
PGD_STEPS = Param("pgd_steps", int, 30, "clean-label: PGD steps", rule=whole(1, 10_000), flag=False)


def _train_images(
    config: AttackConfig, shape: Shape, plan: PoisonPlan, surrogate: Surrogate | None
) -> Modify:
    """The trigger on the poisoned samples, after PGD against their true label given a surrogate."""
    trigger = chosen_trigger(config, shape)

    def modify(ids: np.ndarray, images: np.ndarray) -> np.ndarray:
        if surrogate is None:
            return trigger(images)
        mean, std = surrogate.normalize or (None, None)
        perturbed = pgd_perturb(
            surrogate.model,
            images,
            plan.label_after[ids],
            eps=config.pgd_eps,
            step=config.pgd_step,
            steps=config.pgd_steps,
            mean=mean,
            std=std,
            seed=config.seed * 1_000_003 + int(ids[0]),  # independent starts per chunk
        )
        return trigger(perturbed)

    return modify


ATTACK = Attack(
    "clean-label",
    TARGET_CLASS,
    trigger=chosen_trigger,
    params=(*CHOSEN_TRIGGER_PARAMS, PGD_EPS, PGD_STEP, PGD_STEPS),
    train_images=_train_images,
    uses_surrogate=True,
)
