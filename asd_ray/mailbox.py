"""The driver <-> Ray Train workers mailbox: one named actor per run.

One ``TorchTrainer.fit()`` runs the whole schedule, because a fit costs ~20 s of
start-up (measured on Ray 2.60) and an epoch on small data costs less. The driver
posts one task at a time (:mod:`asd_ray.messages`: transfer pre-training, a
virtual-model epoch, a training epoch, stop); workers wait for a task newer than
the last one they ran, and rank 0 posts the result. Only the latest task is kept,
so a worker group restarted by ``FailureConfig`` simply re-runs the task in flight.
"""

from __future__ import annotations

import asyncio

import ray

from asd_ray.messages import Result, Task

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

    async def post_result(self, seq: int, result: Result) -> None:
        """Keep ``result`` if it answers the current task (stale ones, e.g. the start-up
        hello of a restarted worker group, are dropped)."""
        async with self._changed:
            if seq != self._seq:
                return
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
