"""The driver's side of the training workers: one Ray Train ``fit()`` for the whole run.

``TorchTrainer.fit()`` runs in a background thread and serves every epoch: the driver
posts tasks (:mod:`asd_ray.messages`) to the run's :class:`~asd_ray.mailbox.Mailbox`
and waits for rank 0's answer. A worker group that Ray Train restarts after a failure
picks the next task up from the same mailbox, and the run log says where each group ran.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from asd_ray import messages, storage
from asd_ray.errors import user_error_of
from asd_ray.mailbox import NAMESPACE, Mailbox
from asd_ray.placement import Place, placement_line, restart_line

_RESULT_POLL_S = 5.0
_STOP_WAIT_S = 5.0  # how long an interrupted run waits for idle workers to stop cleanly


class TrainingWorkers:
    """The run's worker group, its mailbox and the thread that runs ``fit()``.

    Args:
        setup: what every worker starts with (:class:`asd_ray.messages.WorkerSetup`, whose
            ``mailbox`` names the mailbox made here).
        scorer_places: where the scoring actors run, for the run log's placement line.
    """

    def __init__(self, setup: messages.WorkerSetup, scorer_places: Callable[[], list[Place]]):
        self.setup, self.scorer_places = setup, scorer_places
        self.cluster = setup.config.cluster
        # On this node (the driver's, as Ray Train's controller): losing another node never loses it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.mailbox = Mailbox.options(
            name=setup.mailbox, namespace=NAMESPACE, scheduling_strategy=here
        ).remote()
        self.progress: Callable[[str], None] = lambda _: None  # the run log, once the loop starts
        self.groups = self.restarts = 0  # worker groups ready so far, and started again after a failure
        trainer = self._trainer()
        self.fit_error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, args=(trainer,), name="asd-ray-fit", daemon=True)
        self.started = time.perf_counter()
        self.thread.start()

    def hello(self) -> messages.Hello:
        """The workers' first message, once every rank has loaded its share (and checkpoint)."""
        return self._await(0, "start-up")

    def ask(self, task: messages.Task, what: str) -> Any:
        """Post ``task`` to the workers and wait for rank 0's answer."""
        seq = ray.get(self.mailbox.post_task.remote(task))
        result = self._await(seq, what)
        self.report_groups(what)
        assert isinstance(result, messages.result_of(task)), (task, type(result))
        return result

    def close(self, *, finish_task: bool = True) -> None:
        """Stop the workers and the mailbox.

        Args:
            finish_task: let the workers end the task in hand and stop. False: workers that
                wait for a task stop at once, and one in the middle of a task is left to the
                ``ray.shutdown`` that follows (an interrupted run does not wait for an epoch
                to end); a resume starts from the last checkpoint.
        """
        if self.thread.is_alive():
            ray.get(self.mailbox.post_task.remote(messages.Stop()))
            self.thread.join(timeout=120 if finish_task else _STOP_WAIT_S)
        if not self.thread.is_alive():  # else ray.shutdown ends it: a worker waiting on it would fail loudly
            ray.kill(self.mailbox)

    def _trainer(self):
        """The TorchTrainer whose one ``fit()`` serves every epoch (:mod:`asd_ray.train`)."""
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
        from ray.train import RunConfig as TrainRunConfig
        from ray.train.torch import TorchTrainer

        from asd_ray.failure_notes import FailureNotes
        from asd_ray.train import train_loop_per_worker

        c, checkpoints = self.cluster, self.setup.checkpoints
        storage_path, storage_filesystem = storage.for_ray_train(checkpoints.parent)
        return TorchTrainer(
            train_loop_per_worker,
            train_loop_config=self.setup.as_loop_config(),
            scaling_config=ScalingConfig(
                num_workers=c.workers,
                use_gpu=c.gpus_per_worker > 0,
                resources_per_worker={
                    "CPU": c.cpus_per_worker,
                    **({"GPU": c.gpus_per_worker} if c.gpus_per_worker else {}),
                    **c.worker_resources,
                },
            ),
            run_config=TrainRunConfig(
                name=checkpoints.name,
                storage_path=storage_path,
                storage_filesystem=storage_filesystem,
                failure_config=FailureConfig(max_failures=c.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=2),
                logging_config=LoggingConfig(log_level="WARNING"),
                callbacks=[FailureNotes(self.setup.mailbox, NAMESPACE)],
            ),
        )

    def _fit(self, trainer) -> None:
        try:
            trainer.fit()
        except BaseException as err:  # reported by _await in the driver thread
            self.fit_error = err

    def _await(self, seq: int, what: str) -> messages.Result:
        while True:
            result = ray.get(self.mailbox.wait_result.remote(seq, _RESULT_POLL_S))
            if result is not None:
                return result
            if not self.thread.is_alive():
                users_error = user_error_of(self.fit_error) if self.fit_error else None
                if users_error:
                    raise users_error from None  # the workers stopped on bad input: its one line
                raise RuntimeError(f"Ray Train stopped during {what}: {self.fit_error!r}") from self.fit_error

    def report_groups(self, what: str) -> None:
        """Log the workers' placement (the first group) and every restart since the last call."""
        for group in ray.get(self.mailbox.groups.remote()):
            self.groups += 1
            if self.groups > 1 or group.failed_at is not None:
                self.restarts += 1
                self.progress(restart_line(group, self.restarts, self.cluster.max_failures, what))
            if self.groups == 1:
                self.progress(placement_line(group.places, self.scorer_places()))
