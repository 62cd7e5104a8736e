"""What the driver writes to the run folder after each epoch, in an order a kill cannot tear.

The model files come first, then the metrics row, which commits the epoch: a driver
killed in between leaves an epoch that a resume re-evaluates and records again
(:func:`asd_ray.resume.repair_needed`), never a row whose model was not saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from asd_ray.messages import Weights
from asd_ray.model_card import MODEL_DIR, write_card
from asd_ray.models.saved import save_model
from asd_ray.run_folder import MODEL_FIGURES, PRETRAIN_FILE, best_row, write_metrics, write_text


class RunRecords:
    """The run folder's model files, metrics and pre-training record.

    Args:
        folder: the run folder on this node (a staging folder when the run is at a URI).
        publish: sends what changed to the run's location (a no-op when it is local).
        card: what every model file says about itself besides its epoch and figures.
    """

    def __init__(self, folder: Path, publish: Callable[[], None], card: dict[str, Any]):
        self.folder, self.publish, self.card = folder, publish, card

    @property
    def model_folder(self) -> Path:
        return self.folder / MODEL_DIR

    def record(self, weights: Weights, rows: list[dict[str, Any]]) -> None:
        """The last row's model files, then the metrics (the epoch's commit)."""
        self.keep_model(weights, rows)
        write_metrics(self.folder, rows)
        self.publish()  # a run at a URI: this epoch's records, its metrics rows last

    def keep_model(self, weights: Weights, rows: list[dict[str, Any]]) -> None:
        """RUN/model/last.pt every epoch, best.pt when this epoch is the best so far, card.json."""
        row, best = rows[-1], best_row(rows)
        figures = {k: row[k] for k in MODEL_FIGURES}
        save_model(self.model_folder, "last", weights, {**self.card, "kind": "last", **figures})
        if best is row:
            save_model(self.model_folder, "best", weights, {**self.card, "kind": "best", **figures})
        best_figures = {k: best[k] for k in MODEL_FIGURES}
        write_card(self.model_folder, {**self.card, "last": figures, "best": best_figures})

    def record_pretraining(self, record: dict[str, Any]) -> None:
        """RUN/pretrain.json: the transfer pre-training's model figures and cost."""
        write_text(self.folder / PRETRAIN_FILE, json.dumps(record) + "\n")
        self.publish()
