"""Two Ray nodes: scoring actors and training workers spread over both, same split tables
as on one node (same W and seed)."""

import logging
import os
import shutil
import tempfile

import pytest
from conftest import TINY_RUN

from asd_ray import tables
from asd_ray.cluster import RAY_TRAIN_ENV
from asd_ray.config import load_config
from asd_ray.driver import run
from asd_ray.run_folder import split_path

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a whole cluster per test: run with -m slow


def _run(inputs, out):
    config = load_config("mnist-quick", overrides=[*TINY_RUN, "cluster.workers=2", "cluster.scorers=2"])
    return run(config, inputs, out, progress=lambda _: None)


def test_two_nodes_give_the_single_node_split_tables(own_ray, poisoned_data, tmp_path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    for key, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(key, value)
    temp_dir = tempfile.mkdtemp(prefix="rayn-", dir="/tmp")
    # One node: 4 CPUs hold both workers and both scorers.
    ray.init(
        num_cpus=4,
        object_store_memory=150 * 1024**2,
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level=logging.WARNING,
    )
    try:
        _run(poisoned_data, tmp_path / "one")
    finally:
        ray.shutdown()
    # Two nodes of 2 CPUs: 2 workers + 2 scorers of 1 CPU each cannot fit on one, so both hold work.
    cluster = Cluster(
        initialize_head=True,
        head_node_args={
            "num_cpus": 2,
            "object_store_memory": 150 * 1024**2,
            "include_dashboard": False,
            "temp_dir": temp_dir,
        },
    )
    cluster.add_node(num_cpus=2, object_store_memory=150 * 1024**2)
    try:
        ray.init(address=cluster.address, logging_level=logging.WARNING)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        _run(poisoned_data, tmp_path / "two")
    finally:
        ray.shutdown()
        cluster.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    for epoch in range(3):
        two = tables.read_parquet(split_path(tmp_path / "two", epoch), "splits")
        assert two.equals(tables.read_parquet(split_path(tmp_path / "one", epoch), "splits")), epoch
