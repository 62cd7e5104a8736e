"""The driver's scoring passes: the training set's (ASD's losses), and the evaluation.

Every pass runs on the run's :class:`~asd_ray.scoring_pool.ScoringPool`. The end of an
epoch's evaluation also scores the training set for the next epoch with the same
weights, so the weights are broadcast once per epoch instead of twice.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import pyarrow as pa
import ray

from asd_ray import messages
from asd_ray.config import RunConfig
from asd_ray.evaluate import accuracy, attack_success_rate, robust_accuracy
from asd_ray.inputs import RunData
from asd_ray.placement import Place, scorer_restart_line
from asd_ray.scores import PASS_SCHEMA
from asd_ray.scoring_pool import Held, PassResult, ScoringPool
from asd_ray.training_set import TRAIN, TRUSTED, TrainingSet

Figures = dict[str, float | None]  # acc, asr, robust_acc (None: no triggered test set / no labels)


@dataclasses.dataclass(frozen=True)
class TrainingPass:
    """One pass over the training set: its table (ids 0..N-1, then the trusted copies) and
    the model arithmetic on the slowest actor."""

    table: pa.Table
    compute_s: float


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """An evaluation pass: the test figures and, when asked, the next epoch's training pass."""

    figures: Figures
    compute_s: float  # the whole pass's model arithmetic, the next epoch's part included
    next_epoch: TrainingPass | None


class ScoringPasses:
    """The run's scoring actors, and the passes the epoch loop asks of them."""

    def __init__(self, config: RunConfig, data: RunData, training: TrainingSet, cache_dir: str):
        self.config, self.data, self.training = config, data, training
        self.progress: Callable[[str], None] = lambda _: None  # the run log, once the loop starts
        datasets = {"test": data.test}
        if config.defense == "asd":
            held = {TRUSTED: Held.of(*training.trusted)} if training.trusted is not None else {}
            datasets = {TRAIN: data.train, **held, **datasets}
        if data.poison_test is not None:
            datasets["poison_test"] = data.poison_test
        c = config.cluster
        self.pool = ScoringPool(
            datasets,
            data.spec,
            config.data,
            config.scoring,
            config.compute,
            num_actors=c.scorers,
            cpus=c.cpus_per_scorer,
            gpus=c.gpus_per_scorer,
            resources=c.scorer_resources,
            threads=c.threads_per_process,
            memory=(c.memory_budget_bytes, cache_dir),
        )

    @property
    def places(self) -> list[Place]:
        return self.pool.places

    @property
    def storage_retries(self) -> int:
        return self.pool.storage_retries

    def training_pass(self, epoch: int, weights: messages.Weights) -> TrainingPass:
        """Score the training set (and the trusted copies) with ``weights``."""
        result = self._run(
            list(self.training.scored), weights, self._augment_seeds(epoch), f"epoch {epoch} scoring"
        )
        return self._training_part(result)

    def evaluate(self, weights: messages.Weights, *, next_epoch: int | None = None) -> Evaluation:
        """ACC on the clean test set and, when given, ASR and robust accuracy on the
        triggered one; with ``next_epoch`` (ASD), the same pass scores the training set
        for that epoch."""
        scored = list(self.training.scored) if next_epoch is not None and self.config.defense == "asd" else []
        names = ["test", *(["poison_test"] if self.data.poison_test is not None else []), *scored]
        seeds = self._augment_seeds(next_epoch) if scored else None
        result = self._run(names, weights, seeds, "evaluation")
        figures: Figures = {"acc": accuracy(result.tables["test"]), "asr": None, "robust_acc": None}
        if "poison_test" in result.tables:
            figures["asr"] = attack_success_rate(result.tables["poison_test"])
            if self.data.original_labels is not None:
                figures["robust_acc"] = robust_accuracy(
                    result.tables["poison_test"], self.data.original_labels
                )
        ahead = self._training_part(result) if scored else None
        return Evaluation(figures, sum(result.compute_s.values()), ahead)

    def shutdown(self) -> None:
        self.pool.shutdown()

    def _run(
        self, names: list[str], weights: messages.Weights, augment_seeds: dict[str, int] | None, what: str
    ) -> PassResult:
        """One pass, once its restarted scoring actors (a lost node or process) are logged."""
        result = self.pool.run_many(names, ray.put(weights), augment_seeds=augment_seeds)
        for index, place in result.restarted.items():
            self.progress(scorer_restart_line(index, place, what, result.wall_s))
        return result

    def _training_part(self, result: PassResult) -> TrainingPass:
        names = self.training.scored
        table = self.training.pass_table({name: result.tables[name] for name in names}, PASS_SCHEMA)
        return TrainingPass(table, sum(result.compute_s[name] for name in names))

    def _augment_seeds(self, epoch: int) -> dict[str, int] | None:
        """Scoring under training augmentation (the authors' variant) draws per epoch."""
        if not self.config.scoring.augment:
            return None
        return {name: self.config.seed * 100_003 + epoch + i for i, name in enumerate(self.training.scored)}
