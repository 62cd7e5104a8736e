"""The KubeRay RayJob in deploy/kuberay: the fields KubeRay's v1 RayJob requires, credentials
and Ray's token only from Secrets, an entrypoint that asd-ray's own parser accepts, and a cluster whose pods
hold exactly the workers, scorers, GPUs and CPUs that the run's settings ask for."""

from __future__ import annotations

import importlib.util
import json
import shlex
from pathlib import Path

import pytest
import yaml

from asd_ray.cli import build_parser
from asd_ray.cli.run import run_overrides
from asd_ray.config import load_config

REPO = Path(__file__).resolve().parents[1]
MANIFEST = REPO / "deploy" / "kuberay" / "rayjob.yaml"
SECRET_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


@pytest.fixture(scope="module")
def job() -> dict:
    return yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))


def _containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def _groups(job: dict) -> list[dict]:
    return job["spec"]["rayClusterSpec"]["workerGroupSpecs"]


def _run_command(job: dict):
    """The entrypoint's job script, and its arguments as the script hands them to ``asd-ray``."""
    python, script, *rest = shlex.split(job["spec"]["entrypoint"])
    assert python == "python" and script.endswith("/jobs/imagenet_asd.py"), script
    local = REPO / "jobs" / Path(script).name
    spec = importlib.util.spec_from_file_location("imagenet_asd", local)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # our own job script: it runs nothing on import
    return [*module.COMMAND, *rest]


def test_the_rayjob_has_the_fields_kuberay_requires(job):
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert isinstance(spec["entrypoint"], str) and spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    cluster = spec["rayClusterSpec"]
    assert _containers(cluster["headGroupSpec"])
    assert _groups(job)
    for group in _groups(job):
        assert group["groupName"] and group["template"]
        assert isinstance(group["minReplicas"], int) and isinstance(group["maxReplicas"], int)
        assert 0 < group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        for container in _containers(group):
            gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
            assert isinstance(gpus, int) and gpus >= 1, container["name"]  # GPUs as container limits


def test_credentials_and_rays_token_come_only_from_secrets(job):
    spec = job["spec"]
    ray_containers = [*_containers(spec["rayClusterSpec"]["headGroupSpec"])]
    ray_containers += [c for group in _groups(job) for c in _containers(group)]
    submitters = spec["submitterPodTemplate"]["spec"]["containers"]
    for container in ray_containers + submitters:
        env = {item["name"]: item for item in container.get("env", [])}
        # token authentication on every node and on the pod that runs ray job submit
        assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"], container["name"]
        for name in (*SECRET_VARIABLES, "RAY_AUTH_TOKEN"):
            assert "value" not in env.get(name, {}), f"{container['name']}: {name} is inline"
    for container in ray_containers:  # the driver (head) and every worker read the bucket
        env = {item["name"]: item for item in container.get("env", [])}
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[name]["valueFrom"]["secretKeyRef"]["name"], (container["name"], name)


def test_the_entrypoint_parses_and_the_pods_hold_exactly_what_the_run_asks_for(job):
    argv = _run_command(job)
    args = build_parser().parse_args(argv)  # a renamed or removed flag fails here
    config = load_config(args.preset, args.config, run_overrides(args))
    c = config.cluster
    for flag in (args.train, args.test, args.poison_test, args.seeds, args.out, c.storage):
        assert str(flag).startswith("s3://"), flag  # no pod shares a folder with another
    # Ray's view of each worker pod: rayStartParams num-cpus and resources, the container's GPUs.
    pods = []
    for group in _groups(job):
        params = group["rayStartParams"]
        (container,) = _containers(group)
        limits = container["resources"]["limits"]
        offers = {"CPU": float(params["num-cpus"]), "GPU": float(limits["nvidia.com/gpu"])}
        offers |= json.loads(json.loads(params.get("resources", '"{}"')))  # KubeRay's quoted JSON
        assert offers["CPU"] <= float(limits["cpu"]), group[
            "groupName"
        ]  # Ray is told no more than the pod has
        pods += [offers] * group["minReplicas"]
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the driver's pod holds no work
    worker = {"CPU": c.cpus_per_worker, "GPU": c.gpus_per_worker, **c.worker_resources}
    scorer = {"CPU": c.cpus_per_scorer, "GPU": c.gpus_per_scorer, **c.scorer_resources}
    processes = [worker] * c.workers + [scorer] * c.scorers
    assert sum(p["GPU"] for p in processes) == sum(p["GPU"] for p in pods), "GPUs asked for != GPUs requested"
    free = [dict(pod) for pod in pods]
    for process in processes:  # Ray places each on one pod that has all it asks for
        pod = next((p for p in free if all(p.get(k, 0) >= v - 1e-9 for k, v in process.items())), None)
        assert pod is not None, f"a process asking {process} fits no pod: {free}"
        for key, amount in process.items():
            pod[key] -= amount
    # Fractional GPUs: no pod may take more training workers than it has GPUs (two DDP ranks
    # on one GPU fail under NCCL); the custom resources cap them.
    if 0 < c.gpus_per_worker < 1:
        assert c.worker_resources, "workers with a fraction of a GPU need a custom resource per pod"
        for pod in pods:
            assert min(pod.get(k, 0) // v for k, v in c.worker_resources.items()) <= pod["GPU"], pod
