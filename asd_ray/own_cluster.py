"""Every process of a run addresses its own Ray cluster, whatever else runs on the machine.

Ray's state API called without an address inside a worker (Ray Train 2.60's
placement-group cleaner asks it whether the controller lives) looks for "the"
local cluster among the GCS processes of the machine, and fails with
``ConnectionError: Found multiple active Ray instances`` when a second local Ray
runs beside the run's (another experiment, a benchmark). The driver names
:data:`SETUP_HOOK` as its job's ``worker_process_setup_hook``: each worker sets
``RAY_ADDRESS`` to its own cluster before it runs anything. This module is
imported by every worker, so it imports nothing heavy.
"""

from __future__ import annotations

import os

SETUP_HOOK = "asd_ray.own_cluster.address_own_cluster"


def address_own_cluster() -> None:
    """Point Ray's address lookups in this worker at the cluster it belongs to."""
    import ray

    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
