"""The driver <-> Ray Train workers mailbox: one named actor per run.

One ``TorchTrainer.fit()`` runs the whole schedule, because a fit's start-up costs
more than an epoch on small data (jobs/BENCHMARKS.md, "Running cells alone"). The driver
posts one task at a time (:mod:`asd_ray.messages`: transfer pre-training, a
virtual-model epoch, a training epoch, stop); workers wait for a task newer than
the last one they ran, and rank 0 posts the result. Only the latest task is kept,
so a worker group restarted by ``FailureConfig`` simply re-runs the task in flight.

The mailbox also keeps the worker groups' story for the run log: where each group's
workers run, when Ray Train's controller reported a failure, and when the group
that replaced it was ready (one clock, the mailbox's, for both). The driver places it
on its own node, so losing another node never loses it.
"""

from __future__ import annotations

import asyncio
import time

import ray

from asd_ray.messages import Hello, Result, Task
from asd_ray.placement import Place, WorkerGroup

NAMESPACE = "asd-ray"


@ray.remote(num_cpus=0, max_restarts=0)
class Mailbox:
    """Tasks from the driver, results from rank 0 (async actor: waits cost nothing).

    Sequence 0 is rank 0's start-up :class:`~asd_ray.messages.Hello`; tasks count from 1.
    """

    def __init__(self) -> None:
        self._seq = 0
        self._task: Task | None = None
        self._results: dict[int, Result] = {}
        self._changed = asyncio.Condition()
        self._places: dict[int, Place] = {}  # the current worker group's, by rank
        self._answered = 0  # the last task rank 0 answered
        # the first failure reported since the last group started: (when, what, a task in hand)
        self._failure: tuple[float, str, bool] | None = None
        self._groups: list[WorkerGroup] = []  # ready groups the driver has not read yet

    async def post_task(self, task: Task) -> int:
        async with self._changed:
            self._seq += 1
            seq, self._task = self._seq, task
            self._results.clear()  # the driver has read every result it waits for
            self._changed.notify_all()
        return seq

    async def wait_task(self, after: int, timeout: float = 30.0) -> tuple[int, Task] | None:
        """(seq, task) once the current task's seq exceeds ``after``; None after ``timeout`` s
        (poll again)."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: self._seq > after), timeout)
            except asyncio.TimeoutError:
                return None
            return self._seq, self._task

    async def register(self, rank: int, place: Place) -> None:
        """A training worker's place, once its share is loaded (before rank 0's hello)."""
        self._places[rank] = place

    async def note_failure(self, what: str) -> None:
        """Ray Train's controller saw workers fail (:class:`asd_ray.failure_notes.FailureNotes`);
        the first report since the last group started is the one kept."""
        if self._failure is None:
            self._failure = (time.time(), what, self._seq > self._answered)

    async def groups(self) -> list[WorkerGroup]:
        """The worker groups that became ready since the last call (the first one, then one
        per restart), with the failure that preceded each restart."""
        groups, self._groups = self._groups, []
        return groups

    async def post_result(self, seq: int, result: Result) -> None:
        """Keep ``result`` if it answers the current task (stale ones, e.g. the start-up
        hello of a restarted worker group, are dropped, once its start is noted)."""
        async with self._changed:
            if seq == 0 and isinstance(result, Hello):
                failed_at, failure, in_task = self._failure or (None, None, True)
                self._groups.append(
                    WorkerGroup(
                        dict(self._places), time.time(), result.resumed_from, failed_at, failure, in_task
                    )
                )
                self._failure = None
            if seq != self._seq:
                return
            self._answered = seq
            self._results[seq] = result
            self._changed.notify_all()

    async def wait_result(self, seq: int, timeout: float = 5.0) -> Result | None:
        """The result of task ``seq`` (removed once read); None after ``timeout`` s."""
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(lambda: seq in self._results), timeout)
            except asyncio.TimeoutError:
                return None
            return self._results.pop(seq)
