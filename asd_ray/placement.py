"""Where a run's processes are, and what happened to them: the run log's placement and
recovery lines.

A multi-node run is audited like its data: the run log says on which node every
training worker and scoring actor ran, and when a node or process was lost, which
processes Ray replaced, where, and how long the run took to recover. Training workers
register with the run's mailbox (:mod:`asd_ray.mailbox`); Ray Train's controller tells
it of failed workers (:mod:`asd_ray.failure_notes`); scoring actors report their place
with every answer (:mod:`asd_ray.scoring_pool`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable

import ray


@dataclasses.dataclass(frozen=True)
class Place:
    """One process of the run: its node, address and process id, and when it became ready
    (``time.time()`` on its node)."""

    node_id: str
    address: str
    pid: int
    ready_at: float

    @classmethod
    def here(cls) -> Place:
        """This process's place (call it inside a Ray worker or actor, once it is ready)."""
        return cls(
            ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid(), time.time()
        )

    def label(self) -> str:
        return f"{self.address} (node {self.node_id[:8]})"


@dataclasses.dataclass(frozen=True)
class WorkerGroup:
    """The training workers of one worker group, by rank; ``failed_at`` (mailbox clock) is
    when Ray Train's controller reported the failure that ended the group before it."""

    places: dict[int, Place]
    ready_at: float  # mailbox clock: rank 0's hello
    resumed_from: str | None = None
    failed_at: float | None = None
    failure: str | None = None
    failed_in_task: bool = True  # the failure came while a task was in hand (else between tasks)


def placement_line(workers: dict[int, Place], scorers: Iterable[Place]) -> str:
    """One run-log line: the nodes, and which ranks and scoring actors each holds."""
    scorers = list(scorers)
    nodes: dict[str, list[str]] = {}
    for rank, place in sorted(workers.items()):
        nodes.setdefault(place.label(), []).append(f"worker {rank}")
    for index, place in enumerate(scorers):
        nodes.setdefault(place.label(), []).append(f"scorer {index}")
    where = "; ".join(f"{node}: {', '.join(held)}" for node, held in nodes.items())
    return f"asd-ray: placement on {len(nodes)} node(s): {where}"


def restart_line(group: WorkerGroup, number: int, max_failures: int, task: str) -> str:
    """The run-log line of a worker group Ray Train started again after a failure."""
    cause = f" ({group.failure})" if group.failure else ""
    if group.failed_at is not None:
        recovered = f"recovered in {group.ready_at - group.failed_at:.1f}s from the failure report to the new group's start-up"
    else:
        recovered = "the failure report did not reach the driver (the time to recover is unknown)"
    resumed = f"; {group.resumed_from}" if group.resumed_from else "; no checkpoint yet, started afresh"
    where = ", ".join(f"worker {rank} on {place.label()}" for rank, place in sorted(group.places.items()))
    return (
        f"asd-ray: training workers failed {'during' if group.failed_in_task else 'before'} {task}{cause}; "
        "Ray Train restarted them "
        f"(restart {number} of cluster.max_failures {max_failures}): {where}; {recovered}{resumed}"
    )


def scorer_restart_line(index: int, place: Place, what: str, pass_s: float) -> str:
    """The run-log line of a scoring actor Ray restarted (its node or process was lost)."""
    return (
        f"asd-ray: scoring actor {index} was lost during {what} and restarted on {place.label()}; "
        f"it read its share again and answered: the pass took {pass_s:.1f}s"
    )
