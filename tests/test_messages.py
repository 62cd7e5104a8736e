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
