"""ACC and ASR from prediction passes (pure functions, no Ray).

The ASR test set (``asd-ray poison --test-out``) already carries the attacker's
labels (the target, or (y + 1) mod C for all2all) on triggered non-target
images, so ASR is the fraction of it predicted as labelled.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def accuracy(predictions: pa.Table) -> float:
    """Fraction of rows whose ``prediction`` equals ``label``."""
    if predictions.num_rows == 0:
        raise ValueError("cannot compute an accuracy over zero samples")
    hits = predictions.column("prediction").to_numpy() == predictions.column("label").to_numpy()
    return float(np.mean(hits))


def attack_success_rate(poisoned_predictions: pa.Table) -> float:
    """Fraction of the triggered test set predicted as the attacker's label."""
    return accuracy(poisoned_predictions)


def robust_accuracy(poisoned_predictions: pa.Table, original_labels: np.ndarray) -> float:
    """Fraction of the triggered test set still classified as its true (pre-attack) label.

    Args:
        poisoned_predictions: the triggered test set's pass, sorted by sample_id.
        original_labels: (N,) the clean labels, from that set's ground truth.
    """
    if poisoned_predictions.num_rows != len(original_labels):
        raise ValueError(
            f"{poisoned_predictions.num_rows} predictions for {len(original_labels)} original labels"
        )
    if poisoned_predictions.num_rows == 0:
        raise ValueError("cannot compute a robust accuracy over zero samples")
    return float(np.mean(poisoned_predictions.column("prediction").to_numpy() == original_labels))


def auroc(scores: np.ndarray, positives: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` for ``positives`` (ties count half), or None
    when either class is empty. The Mann-Whitney U statistic, in O(N log N)."""
    positives = np.asarray(positives, bool)
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    order = np.argsort(scores, kind="stable")
    sorted_scores = np.asarray(scores)[order]
    ranks = np.empty(len(scores), np.float64)
    # average ranks over ties (1-based)
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    u = ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def detection(flagged: np.ndarray, poisoned: np.ndarray, suspicion: np.ndarray) -> dict[str, float | None]:
    """How well one epoch's polluted pool finds the poisoned samples (ground truth known).

    Args:
        flagged: (N,) bool, in the polluted pool.
        poisoned: (N,) bool, ground truth.
        suspicion: (N,) the suspicion score (:func:`asd_ray.split.suspicion`).

    Returns:
        ``precision``, ``recall``, ``f1`` of the polluted pool for the poisoned
        samples and the suspicion score's ``auroc`` (None where undefined).
    """
    hits = int((flagged & poisoned).sum())
    precision = hits / flagged.sum() if flagged.any() else None
    recall = hits / poisoned.sum() if poisoned.any() else None
    f1 = (
        2 * precision * recall / (precision + recall)
        if precision is not None and recall is not None and precision + recall > 0
        else (0.0 if precision is not None and recall is not None else None)
    )
    return {
        "precision": None if precision is None else float(precision),
        "recall": None if recall is None else float(recall),
        "f1": None if f1 is None else float(f1),
        "auroc": auroc(suspicion, poisoned),
    }
