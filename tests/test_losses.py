"""ASD's losses against hand computations in numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from asd_ray.losses import mixmatch_loss, mixup_draw, rampup_weight, sce_loss, sharpen

# Rows: uncertain, confident-right (label 0), confident-wrong (label 2, predicted 0), tiny probabilities.
LOGITS = np.array([[0.2, -0.1, 0.4], [6.0, 0.0, -1.0], [8.0, 1.0, -3.0], [30.0, 0.0, -20.0]])
LABELS = np.array([1, 0, 2, 1])


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _sce_numpy(logits: np.ndarray, labels: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    p = _softmax(logits)
    ce = -np.log(p[np.arange(len(labels)), labels])
    onehot = np.clip(np.eye(logits.shape[1])[labels], 1e-4, 1.0)
    rce = -(np.clip(p, 1e-7, 1.0) * np.log(onehot)).sum(axis=1)
    return alpha * ce + beta * rce


@pytest.mark.parametrize(("alpha", "beta"), [(0.1, 1.0), (1.0, 0.5)])
def test_sce_matches_numpy(alpha: float, beta: float) -> None:
    got = sce_loss(torch.tensor(LOGITS), torch.tensor(LABELS), alpha=alpha, beta=beta)
    assert got.shape == (4,)
    np.testing.assert_allclose(got.numpy(), _sce_numpy(LOGITS, LABELS, alpha, beta), rtol=1e-10)
    assert got[2] > got[0] > got[1]  # confident-wrong scores highest, confident-right lowest


def test_sce_parts() -> None:
    logits, labels = torch.tensor(LOGITS), torch.tensor(LABELS)
    ce = sce_loss(logits, labels, alpha=1.0, beta=0.0)
    torch.testing.assert_close(ce, F.cross_entropy(logits, labels, reduction="none"))
    # log(clamped onehot) is 0 at the label and log(1e-4) elsewhere, so
    # RCE = -log(1e-4) * sum_{k != y} p_k = -log(1e-4) * (1 - p_y) while no p_k is clamped to 1e-7.
    rce = sce_loss(logits, labels, alpha=0.0, beta=1.0)
    p_y = torch.softmax(logits, dim=1)[torch.arange(4), labels]
    expected = -math.log(1e-4) * (1 - p_y)
    torch.testing.assert_close(rce[:3], expected[:3])
    # Row 3 has p_2 ~ 1e-22 clamped up to 1e-7: RCE exceeds the formula by exactly that floor's share.
    torch.testing.assert_close(rce[3], expected[3] + -math.log(1e-4) * (1e-7 - math.exp(-50.0)))
    assert float(rce.max()) <= -math.log(1e-4) * (1 + 3e-7)  # bounded, unlike CE


def test_sce_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="labels"):
        sce_loss(torch.zeros(4, 3), torch.zeros(3, dtype=torch.long))


def test_sharpen() -> None:
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    sharp = sharpen(probs, 0.5)
    torch.testing.assert_close(sharp.sum(dim=1), torch.ones(2))
    assert (sharp.max(dim=1).values > probs.max(dim=1).values).all()
    torch.testing.assert_close(sharp[0], torch.tensor([0.25, 0.09, 0.04]) / 0.38)
    torch.testing.assert_close(sharpen(probs, 1.0), probs)
    with pytest.raises(ValueError, match="temperature 0"):
        sharpen(probs, 0.0)


def test_mixmatch_loss_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    logits_x, logits_u = rng.normal(size=(3, 4)), rng.normal(size=(5, 4))
    targets_x, targets_u = _softmax(rng.normal(size=(3, 4))), _softmax(rng.normal(size=(5, 4)))
    expected_x = np.mean(-(targets_x * np.log(_softmax(logits_x))).sum(axis=1))
    expected_u = np.mean((_softmax(logits_u) - targets_u) ** 2)
    total, loss_x, loss_u = mixmatch_loss(
        torch.tensor(logits_x),
        torch.tensor(targets_x),
        torch.tensor(logits_u),
        torch.tensor(targets_u),
        7.5,
    )
    assert math.isclose(loss_x.item(), expected_x, rel_tol=1e-10)
    assert math.isclose(loss_u.item(), expected_u, rel_tol=1e-10)
    assert math.isclose(total.item(), expected_x + 7.5 * expected_u, rel_tol=1e-10)
    with pytest.raises(ValueError, match="equal shapes"):
        mixmatch_loss(torch.zeros(3, 4), torch.zeros(3, 5), torch.zeros(5, 4), torch.zeros(5, 4), 1.0)


def test_rampup_weight() -> None:
    assert rampup_weight(0.0, length=120) == 0.0
    assert rampup_weight(-1.0, length=120) == 0.0
    assert rampup_weight(60.0, length=120) == 7.5
    assert rampup_weight(120.0, length=120) == 15.0
    assert rampup_weight(500.0, max_weight=6.0, length=120) == 6.0
    with pytest.raises(ValueError, match="ramp length 0"):
        rampup_weight(1.0, length=0)


def test_mixup_draw_is_seeded_keeps_lambda_at_least_half_and_permutes_the_batch() -> None:
    lam, partner = mixup_draw(np.random.default_rng(11), 8)
    again = mixup_draw(np.random.default_rng(11), 8)
    assert lam == again[0] and np.array_equal(partner, again[1])
    assert sorted(partner.tolist()) == list(range(8))
    rng = np.random.default_rng(0)
    assert all(mixup_draw(rng, 8)[0] >= 0.5 for _ in range(50))
    with pytest.raises(ValueError, match="alpha 0"):
        mixup_draw(rng, 8, alpha=0.0)
