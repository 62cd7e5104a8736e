"""The pool of scoring actors against ``score_images`` run in the test process: every sample
once, the same losses and predictions, for 1 and 2 actors (one pool of each for the module:
an actor takes seconds to start)."""

import numpy as np
import pytest
import ray
import torch
from conftest import make_shards

from asd_ray import compute
from asd_ray.config import ComputeConfig, DataConfig, ScoringConfig
from asd_ray.errors import DataError
from asd_ray.models import ModelSpec, load_numpy_weights, to_numpy_weights
from asd_ray.scores import PASS_SCHEMA, score_images
from asd_ray.scoring_pool import ScoringPool

pytestmark = pytest.mark.ray

SPEC = ModelSpec("small_cnn", 4, 1, 16)
DATA = DataConfig(mean=(0.5,), std=(0.25,), crop_padding=2)
SCORING = ScoringConfig(batch_size=16)  # several batches per actor
COMPUTE = ComputeConfig()


def _weights(seed: int) -> dict:
    torch.manual_seed(seed)
    return to_numpy_weights(SPEC.build())


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    """Grey 16x16 sets: 90 training samples in 4 uneven shards, 30 test samples in one."""
    root = tmp_path_factory.mktemp("scoring_pool")
    return {
        "train": make_shards(root / "train", n=90, size=16, channels=1, per_shard=25),
        "test": make_shards(root / "test", n=30, size=16, channels=1, seed=1, name="test"),
    }


@pytest.fixture(scope="module")
def pools(ray_cluster, datasets):
    made = {}
    try:
        for actors in (1, 2):
            made[actors] = ScoringPool(datasets, SPEC, DATA, SCORING, COMPUTE, num_actors=actors)
        yield made
    finally:
        for pool in made.values():
            pool.shutdown()


def _direct(shards, weights, generator=None) -> tuple[np.ndarray, np.ndarray]:
    """Loss and prediction of every sample, by score_images in this process."""
    model = compute.prepare_model(SPEC.build(), COMPUTE)
    load_numpy_weights(model, weights)
    images, labels = shards.load_arrays()
    loss, prediction = score_images(
        model.train(False),
        torch.from_numpy(images),
        torch.from_numpy(labels),
        DATA,
        SCORING,
        COMPUTE,
        generator=generator,
    )
    return loss.numpy(), prediction.numpy()


@pytest.mark.parametrize("actors", [1, 2])
def test_every_sample_once_with_the_losses_of_score_images(pools, datasets, actors):
    pool = pools[actors]
    assert len(pool.actors) == actors
    for seed in (0, 1, 0):  # the weights travel with every call: nothing stale from the last one
        weights = _weights(seed)
        for name, shards in datasets.items():
            table = pool.run(name, weights)
            assert table.schema.equals(PASS_SCHEMA)
            assert table.column("sample_id").to_pylist() == list(range(len(shards)))  # each once, sorted
            assert np.array_equal(table.column("label").to_numpy(), shards.labels)
            loss, prediction = _direct(shards, weights)
            np.testing.assert_allclose(table.column("loss").to_numpy(), loss, rtol=1e-5, atol=1e-6)
            assert np.array_equal(table.column("prediction").to_numpy(), prediction)


def test_two_seeds_give_different_scores(pools):
    """The comparison above is not vacuous: other weights score the set otherwise."""
    first, second = (pools[1].run("train", _weights(seed)).column("loss").to_numpy() for seed in (0, 1))
    assert np.abs(first - second).max() > 1e-3


@pytest.mark.parametrize("actors", [1, 2])
def test_a_fused_pass_equals_separate_passes(pools, actors):
    pool = pools[actors]
    weights = ray.put(_weights(0))  # as the driver hands them over: one object for every actor
    fused = pool.run_many(["train", "test"], weights)
    assert set(fused.tables) == set(fused.compute_s) == {"train", "test"}
    assert min(fused.compute_s.values()) > 0
    for name in ("train", "test"):
        assert fused.tables[name].equals(pool.run(name, weights))
        assert fused.tables[name].equals(pool.run(name, _weights(0)))  # a reference or the arrays


def test_one_actor_scores_under_augmentation_as_score_images_does_with_its_seed(pools, datasets):
    """scoring.augment: the actor draws its share's augmentation from the seed it is given."""
    weights = _weights(0)
    augmented = pools[1].run("train", weights, augment_seed=7)
    loss, prediction = _direct(datasets["train"], weights, torch.Generator().manual_seed(7))
    np.testing.assert_allclose(augmented.column("loss").to_numpy(), loss, rtol=1e-5, atol=1e-6)
    assert np.array_equal(augmented.column("prediction").to_numpy(), prediction)
    clean, _ = _direct(datasets["train"], weights)
    assert np.abs(loss - clean).max() > 1e-3  # the augmentation did change the inputs
    two = pools[2].run("train", weights, augment_seed=7)  # per-actor streams: its own draws, each id once
    assert two.column("sample_id").to_pylist() == list(range(90))
    assert two.equals(pools[2].run("train", weights, augment_seed=7))


def test_a_pass_that_misses_samples_is_one_data_error(pools, monkeypatch):
    pool = pools[2]
    shards = pool.datasets["test"]
    grown = np.arange(len(shards) + 1)  # as if the shard set had grown under the running pool
    monkeypatch.setattr(shards, "share_ids", lambda *args, **kwargs: grown)
    with pytest.raises(DataError) as caught:
        pool.run("test", _weights(0))
    message = str(caught.value)
    assert message.startswith("scoring test: read 30 records where the manifest lists 31: 1 missing")
    assert "id 30 (outside the set's 0..29)" in message and "keep a shard set unchanged" in message
    assert len(message.splitlines()) == 1


def test_an_actor_restarted_after_its_process_is_lost_scores_the_same_and_is_reported(ray_cluster):
    """A scoring actor killed between passes is restarted by Ray from its held data (over
    Ray's 100 KB inline limit, so from the object store), scores the same table, and the pass
    names it with its new process. (The same on another node, after a node was lost:
    tests/test_two_hosts.py.)"""
    import os
    import signal

    from asd_ray.scoring_pool import Held

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(600, 16, 16, 1), dtype=np.uint8)  # 150 KB
    held = Held(images, rng.integers(0, 4, size=600).astype(np.int64), np.arange(600, dtype=np.int64))
    pool = ScoringPool({"held": held}, SPEC, DATA, SCORING, COMPUTE, num_actors=1)
    try:
        before = pool.run("held", _weights(0))
        lost = pool.places[0].pid
        os.kill(lost, signal.SIGKILL)
        result = pool.run_many(["held"], _weights(0))  # its call waits for the restarted actor
        assert list(result.restarted) == [0] and result.restarted[0].pid != lost
        assert result.tables["held"].equals(before)
    finally:
        pool.shutdown()
