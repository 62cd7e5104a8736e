"""MixMatch written plainly, one worker: the oracle the fast step is tested against, and the
baseline ``jobs/bench_gpu.py`` reports its speed against.

Eager, in whatever precision the caller sets (the benchmark: full fp32, NCHW, Adam's
multi-tensor step), one op after another as the authors' code and most tutorials
write it: the batch normalised and padded in float, cropped and flipped by a
gather, each view augmented and forwarded on its own, MixUp and the losses
spelled out. Its random draws come from the same streams, in the same order, as
:func:`asd_ray.batches.mixmatch_plans` draws them, so both compute the same steps.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from asd_ray.batches import Cycler, Phase, Purpose, generator
from asd_ray.config import RunConfig
from asd_ray.data.augment import draw


def plain_augment(images: torch.Tensor, config: RunConfig, gen: torch.Generator) -> torch.Tensor:
    """(B, H, W, C) uint8 -> (B, C, H, W) float32: normalise, reflect-pad, crop, flip."""
    data = config.data
    b, h, w, c = images.shape
    mean = torch.tensor(data.mean, device=images.device).view(1, c, 1, 1)
    std = torch.tensor(data.std, device=images.device).view(1, c, 1, 1)
    x = (images.permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    if data.augment == "resized_crop":
        theta = torch.from_numpy(draw(data, gen, h, w, b)["theta"]).to(x.device)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bicubic", padding_mode="reflection", align_corners=False)
    pad = data.crop_padding if data.augment == "crop" else 0
    if data.augment != "crop" and not data.flip:
        return x
    x = F.pad(x, (pad, pad, pad, pad), mode="reflect") if pad else x
    dy = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen)
    rows, cols = dy + torch.arange(h), dx + torch.arange(w)
    if data.flip:
        flipped = torch.rand(b, generator=gen) < 0.5
        cols = torch.where(flipped[:, None], cols.flip(1), cols)
    rows, cols = rows.to(x.device), cols.to(x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return x.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def plain_mixmatch_epoch(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    clean: np.ndarray,
    config: RunConfig,
    *,
    epoch: int,
) -> list[float]:
    """``mixmatch.iterations`` plain MixMatch steps on one worker; the loss of each step.

    Args:
        images: (N, H, W, C) uint8, the whole training set on the model's device.
        labels: (N,) int64 on the same device.
        clean: (N,) bool pool mask (True: labeled).

    Raises:
        ValueError: ``mixmatch.noise_overlay`` is set; the plain step is the paper's, without it.
    """
    mm, device = config.mixmatch, images.device
    if mm.noise_overlay:
        raise ValueError(
            f"mixmatch.noise_overlay={mm.noise_overlay}: the plain reference step is the paper's "
            "MixMatch; set mixmatch.noise_overlay=0 to compare with it"
        )
    keys = (config.seed, epoch, Phase.RUN)
    labeled = Cycler(np.flatnonzero(clean), generator(*keys, Purpose.LABELED_BATCHES))
    unlabeled = Cycler(np.flatnonzero(~clean), generator(*keys, Purpose.UNLABELED_BATCHES))
    aug = generator(*keys, Purpose.AUGMENT)
    mix = np.random.default_rng([*keys, Purpose.MIXUP])
    ramp = mm.rampup_epochs or config.epochs
    model.train()
    losses = []
    for step in range(mm.iterations):
        li = torch.from_numpy(labeled.next(mm.batch_labeled)).to(device)
        ui = torch.from_numpy(unlabeled.next(mm.batch_unlabeled)).to(device)
        x = plain_augment(images[li], config, aug)
        u1 = plain_augment(images[ui], config, aug)
        u2 = plain_augment(images[ui], config, aug)
        with torch.no_grad():
            p = (torch.softmax(model(u1), dim=1) + torch.softmax(model(u2), dim=1)) / 2
            pt = p ** (1 / mm.temperature)
            guess = pt / pt.sum(dim=1, keepdim=True)
        all_inputs = torch.cat([x, u1, u2])
        all_targets = torch.cat([F.one_hot(labels[li], guess.shape[1]).float(), guess, guess])
        lam = mix.beta(mm.mixup_alpha, mm.mixup_alpha)
        lam = max(lam, 1 - lam)
        perm = torch.from_numpy(mix.permutation(len(all_inputs))).to(device)
        mixed_input = lam * all_inputs + (1 - lam) * all_inputs[perm]
        mixed_target = lam * all_targets + (1 - lam) * all_targets[perm]
        logits = model(mixed_input)
        bl = mm.batch_labeled
        loss_x = -torch.mean(torch.sum(F.log_softmax(logits[:bl], dim=1) * mixed_target[:bl], dim=1))
        loss_u = torch.mean((torch.softmax(logits[bl:], dim=1) - mixed_target[bl:]) ** 2)
        weight = mm.lambda_u * float(np.clip((epoch + step / mm.iterations) / ramp, 0.0, 1.0))
        loss = loss_x + weight * loss_u
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses
