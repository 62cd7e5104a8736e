"""The per-worker MixMatch and cross-entropy loops, without Ray."""

import numpy as np
import pytest
import torch

from asd_ray import compute
from asd_ray.config import load_config
from asd_ray.models import ModelSpec
from asd_ray.steps import (
    WorkerData,
    head_epochs,
    mixmatch_batches,
    mixmatch_epoch,
    transfer_pretraining,
    virtual_epoch,
)


def _share(n: int = 64, channels: int = 1) -> WorkerData:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (n, 16, 16, channels), dtype=np.uint8))
    return WorkerData(images, torch.arange(n) % 4, np.arange(n))


def _config(*overrides: str):
    return load_config(
        "mnist-quick",
        overrides=[
            "mixmatch.iterations=2",
            "mixmatch.batch_labeled=8",
            "mixmatch.batch_unlabeled=8",
            "virtual.batch_size=8",
            "virtual.min_steps=2",
            "cluster.workers=1",
            "data.crop_padding=2",
            *overrides,
        ],
    )


def _model(config) -> torch.nn.Module:
    torch.manual_seed(0)
    return compute.prepare_model(ModelSpec("small_cnn", 4, 1, 16).build(), config.compute)


FAST = ("compute.precision=bf16", "compute.channels_last=true")
PLAIN = ("compute.precision=fp32", "compute.channels_last=false")


def test_fast_path_computes_the_same_mixmatch_loss_as_fp32() -> None:
    clean = np.arange(64) % 2 == 0
    losses = {}
    for name, mode in (("fast", FAST), ("plain", PLAIN)):
        config = _config(*mode, "mixmatch.iterations=1")
        model = _model(config)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.mixmatch.lr)
        losses[name] = mixmatch_epoch(model, optimizer, _share(), clean, config, epoch=3)
    for key in ("train_loss", "loss_x", "loss_u"):
        assert np.isfinite(losses["fast"][key])
        assert losses["fast"][key] == pytest.approx(losses["plain"][key], rel=0.05, abs=1e-3)


def test_mixmatch_batches_are_seeded_and_in_the_model_memory_format() -> None:
    clean = np.arange(64) % 4 == 0
    config = _config(*FAST)
    first = next(mixmatch_batches(_share(), clean, config, epoch=1))
    again = next(mixmatch_batches(_share(), clean, config, epoch=1))
    other = next(mixmatch_batches(_share(), clean, config, epoch=2))
    x, y, u1, u2 = first.x, first.y, first.u1, first.u2
    assert x.shape == (8, 1, 16, 16) and u1.shape == u2.shape == (8, 1, 16, 16) and y.shape == (8,)
    rgb = _config(*FAST, "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]")
    x_rgb = next(mixmatch_batches(_share(channels=3), clean, rgb, epoch=1)).x
    assert x_rgb.is_contiguous(memory_format=torch.channels_last) and not x_rgb.is_contiguous()
    assert all(torch.equal(getattr(first, f), getattr(again, f)) for f in ("x", "y", "u1", "u2"))
    assert not torch.equal(first.x, other.x)
    assert set(y.tolist()) <= {0}  # only clean ids are labeled: every 4th sample, class 0


def test_virtual_epoch_updates_only_meta_parameters_on_the_fast_path() -> None:
    config = _config(*FAST)
    model = _model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    virtual = virtual_epoch(model, _share(), config, epoch=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    after = dict(virtual.named_parameters())  # batch-norm statistics move everywhere (train mode)
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("backbone.block4", "head")) for k in changed)


def test_head_epochs_fit_the_head_alone_with_the_backbone_frozen() -> None:
    config = _config(*PLAIN, "baseline_batch_size=16", "transfer.head_epochs=1")
    model = _model(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    probe = head_epochs(model, _share(), config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the model is untouched
    changed = {k for k, v in probe.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"head.weight", "head.bias"}  # batch-norm statistics included: nothing else moved


def test_transfer_pretraining_labels_only_the_seeds_and_ends_with_the_head_fit(monkeypatch) -> None:
    import asd_ray.steps as steps

    config = _config(*PLAIN, "transfer.semi_epochs=2", "transfer.head_epochs=0.5", "baseline_batch_size=16")
    model = _model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.mixmatch.lr)
    seeds = np.zeros(64, bool)
    seeds[[0, 1, 2, 3, 5]] = True
    calls = []
    real = steps.mixmatch_epoch

    def spy(model, optimizer, data, labeled, config, *, epoch, phase=0):
        calls.append((labeled.copy(), epoch, phase, config.mixmatch.rampup_epochs))
        return real(model, optimizer, data, labeled, config, epoch=epoch, phase=phase)

    monkeypatch.setattr(steps, "mixmatch_epoch", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcome = transfer_pretraining(model, model, optimizer, _share(), seeds, config)
    assert np.isfinite(outcome["train_loss"]) and outcome["head_steps"] == 390  # mnist-quick's floor
    assert [(e, ph, ramp) for _, e, ph, ramp in calls] == [(0, 1, 2), (1, 1, 2)]  # own ramp, own streams
    assert all(np.array_equal(labeled, seeds) for labeled, *_ in calls)
    assert not torch.equal(before["head.weight"], model.state_dict()["head.weight"])


def test_mixmatch_runs_a_users_own_module() -> None:
    """A custom model has no ``head`` attribute: MixMatch reads the class count off its logits."""
    from asd_ray.models import ModelSpec

    config = _config(*PLAIN)
    torch.manual_seed(0)
    model = ModelSpec("custom", 4, 1, 16, "custom_factory:tiny_net", ("5",)).build()
    optimizer = torch.optim.Adam(model.parameters(), lr=config.mixmatch.lr)
    losses = mixmatch_epoch(model, optimizer, _share(), np.arange(64) % 2 == 0, config, epoch=0)
    assert np.isfinite(losses["train_loss"])
    assert {id(p) for p in model.head_parameters()} == {id(p) for p in model.net[5].parameters()}
