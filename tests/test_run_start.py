"""The start of a run: the local Ray a driver starts, whose processes address their own cluster."""

import json
import os
import subprocess
import sys

import pytest

_ASK_THE_STATE_API = """
import json, os, ray
from asd_ray.config import load_config
from asd_ray.driver import _init_ray

assert _init_ray(load_config("mnist-quick", overrides=["cluster.workers=1", "cluster.scorers=1"])) == "local"
try:
    @ray.remote(num_cpus=0)
    def ask():
        from ray.util.state import list_nodes  # no address: as Ray Train's placement-group cleaner asks

        return os.environ.get("RAY_ADDRESS"), len(list_nodes())

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"ASD_RAY_TEST": "1"}})
    class Controller:  # as Ray Train's: env vars of its own, and its children ask the state API
        def ask(self):
            return ray.get(ask.remote())

    answers = [ray.get(ask.remote()), ray.get(Controller.remote().ask.remote())]
    print(json.dumps({"own": ray.get_runtime_context().gcs_address, "answers": answers}))
finally:
    ray.shutdown()
"""


@pytest.mark.ray
def test_the_processes_of_a_local_ray_address_their_own_cluster(ray_cluster):
    """With another local Ray running (the session's), the workers of the Ray a driver
    starts ask the state API of their own cluster, never "Found multiple active Ray instances"."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", _ASK_THE_STATE_API], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["own"] != ray_cluster.get_runtime_context().gcs_address
    assert found["answers"] == [[found["own"], 1]] * 2
