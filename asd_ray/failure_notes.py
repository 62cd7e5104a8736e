"""The Ray Train callback that tells a run's mailbox that training workers failed.

It runs in Ray Train's controller (on the driver's node), which calls it when it finds
failed workers; the mailbox keeps the first report until the worker group that replaces
them is ready, and the driver logs both (:mod:`asd_ray.placement`). A module of its own:
it imports Ray Train, which the processes that only log placement need not load.
"""

from __future__ import annotations

import ray
from ray.train import UserCallback


class FailureNotes(UserCallback):
    """Ray Train callback (it runs in the controller): tells the run's mailbox that workers
    failed, so the driver can log what failed and how long the recovery took."""

    def __init__(self, mailbox_name: str, namespace: str):
        self.mailbox_name, self.namespace = mailbox_name, namespace

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        causes = sorted({_cause(err) for err in worker_exceptions.values()})
        ranks = ", ".join(str(rank) for rank in sorted(worker_exceptions))
        try:
            mailbox = ray.get_actor(self.mailbox_name, namespace=self.namespace)
            mailbox.note_failure.remote(f"worker(s) {ranks}: {'; '.join(causes)}")
        except Exception:  # noqa: BLE001 - a note must never stop the recovery it describes
            pass


def _cause(err: BaseException) -> str:
    """A failure in one short line: its type and the first line of its message."""
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:160]}" if first else type(err).__name__
