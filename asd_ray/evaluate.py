"""What a run is judged by: ACC, ASR, robust accuracy and how well the flags find the poison.

Pure functions over prediction passes, no Ray. The ASR test set (``asd-ray poison
--test-out``) already carries the attacker's labels (the target, or (y + 1) mod C
for all2all) on triggered non-target images, so ASR is the fraction of it
predicted as labelled; its ground truth keeps each image's original label, which
robust accuracy asks for. :func:`evaluate_model` applies a saved model to shard
sets (``asd-ray evaluate``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa

from asd_ray.data.shards import ShardSet
from asd_ray.errors import DataError

if TYPE_CHECKING:
    import torch


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


def evaluate_model(
    model: torch.nn.Module, test: ShardSet, poison_test: ShardSet | None = None, *, batch_size: int = 512
) -> dict[str, float | None]:
    """ACC on ``test`` and, with ``poison_test``, ASR and robust accuracy (when that set has
    its ground truth), for a model from :func:`asd_ray.models.saved.load_model`."""
    import torch  # here only: the audit reads the figures above (via asd_ray.split) without torch

    from asd_ray.attacks.poison import original_labels
    from asd_ray.config import ComputeConfig, DataConfig, ScoringConfig
    from asd_ray.scores import PASS_SCHEMA, score_images

    card = model.card["input"]
    data = DataConfig(mean=tuple(card["mean"]), std=tuple(card["std"]))
    config = (
        data,
        ScoringConfig(batch_size=batch_size),
        ComputeConfig(precision="fp32", channels_last=False),
    )

    def predictions(shards: ShardSet) -> pa.Table:
        if shards.info.num_classes != model.card["architecture"]["num_classes"]:
            raise DataError(
                f"{shards.folder} has {shards.info.num_classes} classes, the model "
                f"{model.card['architecture']['num_classes']}; evaluate on the model's dataset"
            )
        shape = shards.require_uniform_size("evaluate")  # from the checked manifest, before loading
        if shape != (card["height"], card["width"], card["channels"]):
            raise DataError(
                f"{shards.folder}: images are {shape}, the model takes "
                f"{(card['height'], card['width'], card['channels'])}"
            )
        images, labels = shards.load_arrays()
        _, prediction = score_images(model, torch.from_numpy(images), torch.from_numpy(labels), *config)
        columns = [np.arange(len(labels)), labels.astype(np.int32), np.zeros(len(labels), np.float32)]
        return pa.Table.from_arrays(
            [*map(pa.array, columns), pa.array(prediction.numpy().astype(np.int32))], schema=PASS_SCHEMA
        )

    figures: dict[str, float | None] = {"acc": accuracy(predictions(test)), "asr": None, "robust_acc": None}
    if poison_test is not None:
        triggered = predictions(poison_test)
        figures["asr"] = attack_success_rate(triggered)
        original = original_labels(poison_test)
        if original is not None:
            figures["robust_acc"] = robust_accuracy(triggered, original)
    return figures
