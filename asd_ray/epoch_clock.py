"""What each epoch is charged for: wall seconds by phase, and the model arithmetic in them.

The next epoch's scores are computed in this epoch's evaluation pass (one weight
broadcast for both). Their share of that pass belongs to the next epoch: it moves out of
this epoch's ``eval_s`` and ``epoch_s`` and into the next one's ``score_s`` and
``epoch_s``, so each epoch's row says what its own work cost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator

import pyarrow as pa

from asd_ray.run_folder import EpochTimes


@dataclasses.dataclass(frozen=True)
class ScoredAhead:
    """The next epoch's training-set scores, computed in this epoch's evaluation pass."""

    table: pa.Table  # the training set's pass table (sample_id, label, loss, prediction)
    wall_s: float  # its share of the pass's wall time
    compute_s: float  # its model arithmetic on the slowest actor


@dataclasses.dataclass
class EpochClock:
    """Wall seconds of one epoch's phases and the model arithmetic inside them."""

    carried_in_s: float = 0.0  # this epoch's scoring, done in the previous evaluation pass
    carried_out_s: float = 0.0  # the next epoch's scoring, done in this evaluation pass
    # Model arithmetic of every phase: rank 0's in training, the slowest actor's per scoring pass.
    compute_s: float = 0.0
    wall: dict[str, float] = dataclasses.field(default_factory=lambda: dict.fromkeys(EpochTimes.PHASES, 0.0))
    started: float = dataclasses.field(default_factory=time.perf_counter)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Charge the wall time of the block to phase ``name`` (an :class:`EpochTimes` column)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.wall[name] += time.perf_counter() - start

    def carry_in(self, ahead: ScoredAhead) -> None:
        """Charge this epoch for its scores, computed in the previous evaluation pass."""
        self.carried_in_s = ahead.wall_s
        self.compute_s += ahead.compute_s

    def carry_out(self, total_compute_s: float, next_compute_s: float) -> float:
        """Move the next epoch's share of this evaluation pass (by arithmetic: its
        ``next_compute_s`` of the pass's ``total_compute_s``) out of this epoch; that
        share of the pass's wall seconds."""
        share = next_compute_s / max(total_compute_s, 1e-9)
        self.carried_out_s = self.wall["eval_s"] * share
        self.compute_s += total_compute_s - next_compute_s
        return self.carried_out_s

    def times(self) -> EpochTimes:
        epoch_s = time.perf_counter() - self.started + self.carried_in_s - self.carried_out_s
        return EpochTimes(
            score_s=self.wall["score_s"] + self.carried_in_s,
            virtual_s=self.wall["virtual_s"],
            split_s=self.wall["split_s"],
            train_s=self.wall["train_s"],
            eval_s=self.wall["eval_s"] - self.carried_out_s,
            epoch_s=epoch_s,
            fixed_s=max(epoch_s - self.compute_s, 0.0),
        )
