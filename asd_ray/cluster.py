"""The Ray a run works in: joined when one is running or reachable, else started here.

Everything about Ray's lifecycle for a driver lives here: the settings Ray Train's
controller must inherit, the start itself (with the reaper that cleans up a local Ray
whose driver was killed), keeping the command's SIGTERM handler through ``ray.init``,
and refusing a run that asks for more than the cluster has.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import ray

from asd_ray import worker_setup
from asd_ray.config import ClusterConfig, RunConfig
from asd_ray.errors import DataError
from asd_ray.reaper import Reaper

RAY_TRAIN_ENV = {
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",  # one log line less per run
    # Ray Train's controller drains each worker's one-slot report queue once per health
    # check (every 2 s by default), so ray.train.report blocked up to one interval once per
    # epoch. A short interval removes that wait for one small RPC per worker per check.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
}


@contextlib.contextmanager
def ray_for_run(config: RunConfig) -> Iterator[str | None]:
    """Ray for the run, stopped on the way out if this driver started it.

    Yields what :func:`connect` returns. The reaper starts before Ray: a kill or Ctrl-C may
    come while Ray starts, and only the reaper knows the processes of a start cut short.
    """
    with contextlib.ExitStack() as stack:
        if not ray.is_initialized() and not os.environ.get("RAY_ADDRESS"):
            stack.callback(Reaper.watch().close)
        connected = connect(config)
        if connected:
            stack.callback(ray.shutdown)
        check_resources(config.cluster)  # a request the cluster cannot meet would wait forever
        yield connected


def connect(config: RunConfig) -> str | None:
    """Connect to Ray, starting a local one sized for the run unless one is running or
    reachable (job submit).

    :data:`RAY_TRAIN_ENV` reaches Ray Train's controller through the environment a
    local Ray inherits, or the job's runtime env on a running cluster; a Ray that
    is already initialised keeps its own (set them before ``ray.init``). Every
    worker of the job sets itself up first (:mod:`asd_ray.worker_setup`).

    Returns:
        ``"local"`` (a Ray this driver started), ``"cluster"`` (a running one it
        joined) or None (Ray was already initialised: the caller owns it).
    """
    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    if ray.is_initialized():
        return None
    runtime_env: dict[str, Any] = {"worker_process_setup_hook": worker_setup.SETUP_HOOK}
    if os.environ.get("RAY_ADDRESS"):
        runtime_env["env_vars"] = {key: os.environ[key] for key in RAY_TRAIN_ENV}
        with keeping_sigterm_handler():  # a batch scheduler's SIGTERM on a cluster too
            ray.init(logging_level=logging.WARNING, runtime_env=runtime_env)
        return "cluster"
    c = config.cluster
    cpus = c.workers * c.cpus_per_worker + c.scorers * c.cpus_per_scorer
    with keeping_sigterm_handler():
        ray.init(
            num_cpus=max(int(np.ceil(cpus)), os.cpu_count() or 1),
            dashboard_host="127.0.0.1",
            logging_level=logging.WARNING,
            runtime_env=runtime_env,
        )
    return "local"


@contextlib.contextmanager
def keeping_sigterm_handler() -> Iterator[None]:
    """Give SIGTERM back to the handler it had before ``ray.init``, which replaces it twice:
    with ``sys.exit(15)`` at once, then in its C++ core with a handler that aborts the process
    (exit 134, no ``finally`` runs). The asd-ray command's handler turns SIGTERM into an
    interrupt that stops the run cleanly; a SIGTERM that Ray's Python handler took during
    ``ray.init`` is passed on to it (one in the short window under the C++ handler still
    aborts)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # Ray installs no handler from another thread
        return
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    except SystemExit as stop:
        if stop.code != signal.SIGTERM or not callable(before):
            raise
        before(signal.SIGTERM, None)  # the SIGTERM Ray's handler took
        raise
    finally:
        if before is not None:  # None: a handler not set from Python, which cannot be restored
            signal.signal(signal.SIGTERM, before)


def check_resources(cluster: ClusterConfig) -> None:
    """Refuse a run that asks for more CPUs, GPUs or custom resources than the Ray cluster
    has (Ray would wait)."""
    have = ray.cluster_resources()
    asks = {
        "GPU": (
            cluster.workers * cluster.gpus_per_worker + cluster.scorers * cluster.gpus_per_scorer,
            "--gpus-per-worker x --workers + --gpus-per-scorer x --scorers",
        ),
        "CPU": (
            cluster.workers * cluster.cpus_per_worker + cluster.scorers * cluster.cpus_per_scorer,
            "cluster.cpus_per_worker x --workers + cluster.cpus_per_scorer x --scorers",
        ),
    }
    for name in sorted({*cluster.worker_resources, *cluster.scorer_resources}):
        asks[name] = (
            cluster.workers * cluster.worker_resources.get(name, 0)
            + cluster.scorers * cluster.scorer_resources.get(name, 0),
            "cluster.worker_resources x --workers + cluster.scorer_resources x --scorers; nodes offer it "
            f"with ray start --resources '{{\"{name}\": N}}'",
        )
    for resource, (need, how) in asks.items():
        if need > have.get(resource, 0) + 1e-9:
            what = f"{resource}s" if resource in ("CPU", "GPU") else f"of the custom resource {resource}"
            raise DataError(
                f"the run asks for {need:g} {what} ({how}) but the Ray cluster has "
                f"{have.get(resource, 0):g}; lower those settings or add nodes (start them before the run)"
            )
