"""The driver <-> worker protocol: every task has a handler and a result type."""

import typing

from asd_ray import messages
from asd_ray.train import HANDLERS


def test_every_task_but_stop_has_a_worker_handler_and_a_result_type():
    tasks = set(typing.get_args(messages.Task))
    assert tasks == {messages.Pretrain, messages.Virtual, messages.Train, messages.Stop}
    assert set(HANDLERS) == tasks - {messages.Stop}  # stop ends the loop itself
    answers = {task: messages.result_of(task.__new__(task)) for task in HANDLERS}
    assert answers == {
        messages.Pretrain: messages.Pretrained,
        messages.Virtual: messages.VirtualModel,
        messages.Train: messages.Trained,
    }
    assert set(answers.values()) | {messages.Hello} == set(typing.get_args(messages.Result))


def test_a_pretraining_re_sent_after_a_restart_is_answered_from_the_checkpoint():
    """A worker group restarted after the pre-training's checkpoint must not pre-train
    again on top of the pre-trained weights: it answers with what the checkpoint holds."""
    import torch

    from asd_ray.resume import Restored
    from asd_ray.train import _Worker

    base = torch.nn.Linear(2, 3)
    state = {"train_loss": 0.5, "loss_x": 0.4, "loss_u": 0.1, "head_steps": 7.0}  # as checkpointed
    for rank in (0, 1):
        worker = _Worker(None, base, base, None, None, rank, Restored(-1, state, pretrained=True))
        answer = worker.pretrain(messages.Pretrain(labeled=[0, 1]))  # no data: training would fail
        assert (answer.train_loss, answer.head_steps) == (0.5, 7)
        if rank == 0:
            assert set(answer.weights) == {"weight", "bias"}
            assert (answer.weights["weight"] == base.weight.detach().numpy()).all()
        else:
            assert answer.weights == {}  # only rank 0's answer is posted, so only it copies weights


def test_pools_round_trip_through_their_packed_bits_at_any_n():
    """N not a multiple of 8 (the last byte's padding must not read as samples), N = 1, N = 0."""
    import numpy as np

    rng = np.random.default_rng(0)
    for n in (0, 1, 7, 8, 9, 241, 50_001):
        clean = rng.random(n) < 0.3
        unlabeled = ~clean & (rng.random(n) < 0.8)  # a holdout: polluted samples left out
        pools = messages.Pools.pack(clean, unlabeled)
        assert pools.total == n and len(pools.clean) == len(pools.unlabeled) == (n + 7) // 8
        got_clean, got_unlabeled = pools.masks()
        assert got_clean.dtype == bool and np.array_equal(got_clean, clean)
        assert np.array_equal(got_unlabeled, unlabeled)
    one = messages.Pools.pack(np.array([True] * 9), np.zeros(9, bool))
    other = messages.Pools.pack(np.array([True] * 9), np.eye(1, 9, 8, dtype=bool)[0])
    assert one.digest != other.digest  # the checkpoint's record tells the pools apart
    assert one.digest == messages.Pools.pack(np.ones(9, bool), np.zeros(9, bool)).digest


def test_a_training_task_at_50000_samples_is_a_few_kilobytes():
    """What the driver posts each epoch (the pools travel with it, not a path to a table)."""
    import pickle

    import numpy as np

    clean = np.arange(50_000) % 2 == 0
    task = messages.Train(7, messages.Pools.pack(clean, ~clean), {"eval_acc": 0.9, "eval_asr": 0.1})
    assert 12_500 <= len(pickle.dumps(task)) < 13_500
