"""ASD's losses as pure torch functions: no loops, no devices chosen, no global RNG.

``sce_loss`` scores samples for the split (ASD's L1, the symmetric cross-entropy
of Wang et al., ICCV 2019); the rest is MixMatch (Berthelot et al., NeurIPS 2019)
as ASD trains with it (the authors' code fixes what the paper leaves open). Shapes: B batch,
C classes.
"""

from __future__ import annotations

import numpy as np
import torch.nn.functional as F
from torch import Tensor

_PROB_FLOOR = 1e-7  # SCE clamps predicted probabilities to [1e-7, 1] ...
_ONEHOT_FLOOR = 1e-4  # ... and the one-hot label to [1e-4, 1], so log(0) never occurs


def sce_loss(logits: Tensor, labels: Tensor, *, alpha: float = 0.1, beta: float = 1.0) -> Tensor:
    """Per-sample symmetric cross-entropy ``alpha * CE + beta * RCE``.

    Per sample, not averaged: the split ranks samples by it. With the clamps,
    RCE = -log(1e-4) * (1 - p_y) whenever no probability falls below 1e-7: it is
    bounded by about 9.2, unlike CE, so the score is less dominated by a few
    confidently wrong samples.

    Args:
        logits: (B, C) float.
        labels: (B,) int64 class indices.

    Returns:
        (B,) float losses.
    """
    if logits.ndim != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} must be (B, C) and (B,)"
        )
    ce = F.cross_entropy(logits, labels, reduction="none")  # (B,)
    probs = F.softmax(logits, dim=1).clamp(min=_PROB_FLOOR, max=1.0)  # (B, C)
    onehot = F.one_hot(labels, logits.shape[1]).to(probs.dtype)  # (B, C)
    onehot = onehot.clamp(min=_ONEHOT_FLOOR, max=1.0)
    rce = -(probs * onehot.log()).sum(dim=1)  # (B,)
    return alpha * ce + beta * rce


def sharpen(probs: Tensor, temperature: float = 0.5) -> Tensor:
    """MixMatch's label sharpening ``p^(1/T) / sum_k p_k^(1/T)``: T < 1 lowers the entropy.

    Args:
        probs: (B, C) rows of probabilities.
        temperature: T > 0.

    Returns:
        (B, C) rows summing to 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature {temperature} must be > 0 (MixMatch uses 0.5)")
    powered = probs ** (1.0 / temperature)  # (B, C)
    return powered / powered.sum(dim=1, keepdim=True)


def mixmatch_loss(
    logits_x: Tensor,
    targets_x: Tensor,
    logits_u: Tensor,
    targets_u: Tensor,
    lambda_u: float | Tensor,
    *,
    labeled_total: int | None = None,
    unlabeled_total: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """MixMatch's loss on a mixed batch: soft cross-entropy on the labeled part, squared error on the rest.

    The unlabeled term is the squared error between probabilities, not a
    cross-entropy, because guessed labels are noisy and the bounded L2 loss is
    less sensitive to wrong guesses.

    Args:
        logits_x: (Bx, C) logits of the mixed labeled inputs; targets_x (Bx, C) their mixed soft targets.
        logits_u: (Bu, C) logits of the mixed unlabeled inputs; targets_u (Bu, C) their mixed guessed targets.
        lambda_u: weight of the unlabeled term (see :func:`rampup_weight`).
        labeled_total, unlabeled_total: row counts of the whole batch when these rows
            are one worker's part of it (default Bx and Bu): the terms are then this
            part's share of the batch's means, and the shares add up to them.

    Returns:
        (total, Lx, Lu), scalars: Lx is the mean over labeled rows of -sum_k t_k log softmax_k;
        Lu the mean over unlabeled rows and classes of (softmax - t)^2; total = Lx + lambda_u * Lu.
    """
    if logits_x.shape != targets_x.shape or logits_u.shape != targets_u.shape:
        raise ValueError(
            f"logits and targets must have equal shapes (B, C): labeled {tuple(logits_x.shape)} vs "
            f"{tuple(targets_x.shape)}, unlabeled {tuple(logits_u.shape)} vs {tuple(targets_u.shape)}"
        )
    labeled_total = labeled_total or logits_x.shape[0]
    unlabeled_total = unlabeled_total or logits_u.shape[0]
    loss_x = -(targets_x * F.log_softmax(logits_x, dim=1)).sum() / labeled_total  # (Bx, C) -> ()
    loss_u = ((F.softmax(logits_u, dim=1) - targets_u) ** 2).sum() / (unlabeled_total * logits_u.shape[1])
    return loss_x + lambda_u * loss_u, loss_x, loss_u


def rampup_weight(progress: float, *, max_weight: float = 15.0, length: float) -> float:
    """MixMatch's unlabeled-loss weight, ramped linearly so early wrong guesses weigh little.

    Args:
        progress: t = epoch + iteration / iterations_per_epoch.
        max_weight: weight reached at t = length (ASD: 15).
        length: ramp length in epochs (ASD: the whole run, T3).

    Returns:
        max_weight * clip(t / length, 0, 1).
    """
    if length <= 0:
        raise ValueError(f"ramp length {length} must be > 0 epochs (ASD uses the total epochs, T3)")
    return max_weight * min(max(progress / length, 0.0), 1.0)


def mixup_draw(rng: np.random.Generator, batch: int, alpha: float = 0.75) -> tuple[float, np.ndarray]:
    """MixMatch's MixUp draw for a batch: lam ~ Beta(alpha, alpha), lam = max(lam, 1 - lam),
    and a random partner for every row (a permutation of the whole batch). Each row is
    then mixed as lam * itself + (1 - lam) * its partner, inputs and targets alike:
    lam >= 0.5 keeps a mixed row closer to its own input, so it keeps its labeled or
    unlabeled role.

    Both come from ``rng`` only, so a seed fixes them on any device and on every
    worker (torch has no generator-aware Beta sampler, and a CUDA generator would
    permute differently from a CPU one).

    Returns:
        lam in [0.5, 1] and the (batch,) int64 partner permutation.
    """
    if alpha <= 0:
        raise ValueError(f"mixup alpha {alpha} must be > 0 (MixMatch uses 0.75)")
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam), rng.permutation(batch)
