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
