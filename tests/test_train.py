"""The per-worker MixMatch and cross-entropy loops, without Ray."""

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from asd_ray import compute
from asd_ray.batches import CrossEntropyDraw, Phase, Purpose, WorkerData, cross_entropy_plans, mixmatch_plans
from asd_ray.config import load_config
from asd_ray.data.augment import noise_overlay
from asd_ray.data.share import load_share
from asd_ray.messages import WorkerSetup
from asd_ray.models import ModelSpec
from asd_ray.reference import plain_mixmatch_epoch
from asd_ray.resume import Restored
from asd_ray.steps import head_epochs, mixmatch_epoch, step_inputs, transfer_pretraining, virtual_epoch
from asd_ray.training_set import TrainingSet


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
    fast, plain = losses["fast"].to_row(), losses["plain"].to_row()
    for key in ("train_loss", "loss_x", "loss_u"):
        assert np.isfinite(fast[key])
        assert fast[key] == pytest.approx(plain[key], rel=0.05, abs=1e-3)


def _first_step(data: WorkerData, clean: np.ndarray, config, epoch: int):
    """The augmented rows (labeled, unlabeled view 1, view 2) and labels of an epoch's first step."""
    plan = next(mixmatch_plans(data, clean, config, epoch=epoch, iterations=2))
    tensors = plan.tensors()
    return step_inputs(data, config, plan, tensors), data.labels[tensors.index[: plan.labeled]]


def test_the_random_streams_keep_their_keys() -> None:
    """The keys are part of every run's reproducibility: a renumbered purpose or phase
    would silently change the batches, augmentations and mixes of every run."""
    assert {p.name: p.value for p in Purpose} == {
        "LABELED_BATCHES": 1,
        "UNLABELED_BATCHES": 2,
        "AUGMENT": 3,
        "MIXUP": 4,
        "BASELINE": 5,
        "VIRTUAL": 7,
        "HEAD": 8,
    }
    assert {p.name: p.value for p in Phase} == {"RUN": 0, "PRETRAIN": 1}
    assert {d.name: d.value for d in CrossEntropyDraw} == {"BATCHES": 1, "AUGMENT": 2}


def test_a_steps_tensors_hold_what_its_plan_drew() -> None:
    """A step reads which features it runs off its tensors: a crop or a resized crop, a
    noise overlay, MixMatch's draws; a feature not drawn is None."""
    clean = np.arange(64) % 4 == 0
    config = _config(*PLAIN, "mixmatch.noise_overlay=0.2")
    mixmatch = next(mixmatch_plans(_share(), clean, config, epoch=1, iterations=2)).tensors()
    assert mixmatch.index.shape == (24,) and mixmatch.theta is None
    assert mixmatch.crop.rows.shape == mixmatch.crop.cols.shape == (24, 16)
    assert mixmatch.overlay.key.dtype == torch.int64 and mixmatch.overlay.weight.dtype == torch.float32
    assert mixmatch.mixmatch.partner.shape == (24,) and mixmatch.mixmatch.lr.item() == pytest.approx(
        config.mixmatch.lr
    )
    resized = _config(*PLAIN, "data.augment=resized_crop")
    plans = cross_entropy_plans(
        _share(), resized, batch=8, epoch=0, phase=Phase.RUN, purpose=Purpose.BASELINE
    )
    plain = next(plans).tensors()
    assert plain.index.shape == (8,) and plain.theta.shape == (8, 2, 3) and plain.theta.dtype == torch.float32
    assert plain.crop is None and plain.overlay is None and plain.mixmatch is None


def test_mixmatch_steps_are_seeded_and_in_the_model_memory_format() -> None:
    clean = np.arange(64) % 4 == 0
    config = _config(*FAST)
    first, y = _first_step(_share(), clean, config, epoch=1)
    again, _ = _first_step(_share(), clean, config, epoch=1)
    other, _ = _first_step(_share(), clean, config, epoch=2)
    assert first.shape == (24, 1, 16, 16) and y.shape == (8,)
    rgb = _config(*FAST, "data.mean=[0.5,0.5,0.5]", "data.std=[0.25,0.25,0.25]")
    x_rgb, _ = _first_step(_share(channels=3), clean, rgb, epoch=1)
    assert x_rgb.is_contiguous(memory_format=torch.channels_last) and not x_rgb.is_contiguous()
    assert torch.equal(first, again) and not torch.equal(first[:8], other[:8])
    assert not torch.equal(first[8:16], first[16:])  # the two unlabeled views differ
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

    def spy(model, optimizer, data, labeled, config, *, epoch, phase=Phase.RUN):
        calls.append((labeled.copy(), epoch, phase, config.mixmatch.rampup_epochs))
        return real(model, optimizer, data, labeled, config, epoch=epoch, phase=phase)

    monkeypatch.setattr(steps, "mixmatch_epoch", spy)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    losses, head_steps = transfer_pretraining(model, model, optimizer, _share(), seeds, config)
    assert np.isfinite(losses.train_loss) and head_steps == 390  # mnist-quick's floor
    pretrain = Phase.PRETRAIN  # own ramp, own streams
    assert [(e, ph, ramp) for _, e, ph, ramp in calls] == [(0, pretrain, 2), (1, pretrain, 2)]
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
    assert np.isfinite(losses.train_loss)
    assert {id(p) for p in model.head_parameters()} == {id(p) for p in model.net[5].parameters()}


def test_the_fast_step_computes_the_plain_steps() -> None:
    """Twenty steps of the fast step (one upload, index-math augmentation, lerp MixUp, fused
    Adam) against the plain MixMatch step on the same draws, both in full fp32: the same
    losses and parameters up to rounding (measured: loss 2e-7, parameters 7e-6 relative)."""
    config = _config(
        *PLAIN,
        "mixmatch.iterations=20",
        "data.flip=true",
        "data.mean=[0.5,0.4,0.3]",
        "data.std=[0.25,0.2,0.3]",
        "mixmatch.noise_overlay=0",  # the plain step is the paper's
    )
    data, clean = _share(channels=3), np.arange(64) % 3 == 0

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return compute.prepare_model(ModelSpec("small_cnn", 4, 3, 16).build(), config.compute)

    fast, plain = model(), model()
    start = torch.cat([p.detach().flatten() for p in plain.parameters()])
    fast_loss = mixmatch_epoch(
        fast, compute.adam(fast.parameters(), config.mixmatch.lr), data, clean, config, epoch=3
    )
    reference = torch.optim.Adam(plain.parameters(), lr=config.mixmatch.lr, foreach=True)
    plain_losses = plain_mixmatch_epoch(plain, reference, data.images, data.labels, clean, config, epoch=3)
    assert fast_loss.train_loss == pytest.approx(np.mean(plain_losses), rel=1e-5)
    ours, theirs = (torch.cat([p.detach().flatten() for p in m.parameters()]) for m in (fast, plain))
    assert ((ours - theirs).norm() / theirs.norm()).item() < 1e-4
    assert ((theirs - start).norm() / start.norm()).item() > 1e-2  # the steps moved the weights


# Ops that read a device value on the host: each would stall the step until the GPU caught up,
# and none can be captured in a CUDA graph.
_HOST_READS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "equal", "item"}


class _NoHostReads(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        assert name not in _HOST_READS and not name.startswith("unique"), f"{func} reads the device"
        bool_index = func.__name__.startswith("index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        )
        assert not bool_index, f"{func} with a boolean mask has a data-dependent shape"
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("augment", ["crop", "resized_crop", "crop+overlay"])
def test_a_step_never_reads_a_device_value_on_the_host(monkeypatch, augment: str) -> None:
    """Every changing value (indices, draws, MixUp lambda, ramp-up weight, learning rate,
    overlay keys) comes from the step's packed buffer, so a step can be replayed as a CUDA
    graph."""
    import asd_ray.steps as steps

    checked = []
    for name in ("_mixmatch_step", "_cross_entropy_step"):
        real = getattr(steps, name)

        def guarded(*args, _real=real, _name=name, **kwargs):
            with _NoHostReads():
                out = _real(*args, **kwargs)
            checked.append(_name)
            return out

        monkeypatch.setattr(steps, name, guarded)
    overlay = "0.2" if augment.endswith("+overlay") else "0"
    config = _config(
        *FAST, f"data.augment={augment.removesuffix('+overlay')}", f"mixmatch.noise_overlay={overlay}"
    )
    model = _model(config)
    optimizer = compute.adam(model.parameters(), config.mixmatch.lr)
    compute.make_capturable(optimizer, torch.device("cpu"))  # the learning rate as a tensor, as graphed
    mixmatch_epoch(model, optimizer, _share(), np.arange(64) % 2 == 0, config, epoch=0)
    virtual_epoch(model, _share(), config, epoch=0)
    assert set(checked) == {"_mixmatch_step", "_cross_entropy_step"}


@pytest.mark.parametrize(
    ("precision", "overlay", "most"), [("fp32", 0, 440), ("bf16", 0, 440), ("bf16", 0.2, 460)]
)
def test_a_mixmatch_step_stays_within_its_kernel_budget(monkeypatch, precision: str, overlay, most) -> None:
    """ResNet-18 at 32 px (the cifar10 preset's step; the count does not depend on the batch,
    so 4 + 4 rows keep the test fast), on the CPU: the ops of the step's device side that
    launch kernels (views and empty allocations launch none; the host's planning on CPU
    tensors launches none on a GPU), the optimizer's step counted apart. Measured at
    64 + 64: 382 in fp32 and 433 in bf16 of 594 and 645 dispatched, and 4 for the fused
    Adam; the step before this design dispatched 707 and 780 (477 and 550 launching
    kernels, its planning included), plus 560 for Adam's multi-tensor step. That is the
    paper's step; the default noise overlay (``mixmatch.noise_overlay``: a hash of every
    pixel, then a blend) adds 22: 455 in bf16 at 4 + 4."""
    import asd_ray.steps as steps

    batch = ["mixmatch.batch_labeled=4", "mixmatch.batch_unlabeled=4", f"compute.precision={precision}"]
    batch.append(f"mixmatch.noise_overlay={overlay}")
    config = load_config("cifar10", overrides=["mixmatch.iterations=1", "cluster.workers=1", *batch])
    n = 256
    images = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8))
    data, clean = WorkerData(images, torch.arange(n) % 10, np.arange(n)), np.arange(n) % 2 == 0
    torch.manual_seed(0)
    model = compute.prepare_model(ModelSpec("resnet18", 10, 3, 32).build(), config.compute)
    optimizer = compute.adam(model.parameters(), config.mixmatch.lr)
    mixmatch_epoch(model, optimizer, data, clean, config, epoch=0)  # the optimizer's state is made once
    step, device_side, in_optimizer = optimizer.step, compute.DispatchCounter(), compute.DispatchCounter()
    real = steps._mixmatch_step

    def counted_optimizer(*args, **kwargs):
        with device_side.paused(), in_optimizer:
            return step(*args, **kwargs)

    def counted_step(*args, **kwargs):
        with device_side:
            return real(*args, **kwargs)

    optimizer.step = counted_optimizer
    monkeypatch.setattr(steps, "_mixmatch_step", counted_step)
    mixmatch_epoch(model, optimizer, data, clean, config, epoch=0)
    assert device_side.kernels <= most, (device_side.total, device_side.kernels)
    assert in_optimizer.total <= 8, in_optimizer.total


def test_samples_held_out_of_the_unlabeled_set_are_never_drawn() -> None:
    """split.holdout_ratio: MixMatch draws its unlabeled rows from the given set alone."""
    ids = np.arange(64)
    clean, unlabeled = ids % 4 == 0, (ids % 4 != 0) & (ids < 40)
    plans = mixmatch_plans(_share(), clean, _config(*PLAIN), epoch=0, iterations=8, unlabeled=unlabeled)
    drawn_unlabeled, drawn_labeled = set(), set()
    for _ in range(8):
        plan = next(plans)
        drawn_unlabeled.update(plan.unlabeled_ids.tolist())
        drawn_labeled.update(plan.labeled_ids.tolist())
    assert drawn_unlabeled == set(np.flatnonzero(unlabeled).tolist())  # all of them, and nothing else
    assert drawn_labeled <= set(np.flatnonzero(clean).tolist())


def test_the_noise_overlay_blends_every_view_of_a_mixmatch_step() -> None:
    """mixmatch.noise_overlay: each row gets its own key and a weight below the setting, and
    the labeled rows (drawn first, so their crops are the ones drawn without an overlay)
    are those crops with the noise blended in."""
    clean = np.arange(64) % 4 == 0
    plain_rows, _ = _first_step(_share(), clean, _config(*PLAIN, "mixmatch.noise_overlay=0"), epoch=1)
    config = _config(*PLAIN, "mixmatch.noise_overlay=0.2")
    plan = next(mixmatch_plans(_share(), clean, config, epoch=1, iterations=2))
    tensors = plan.tensors()
    keys, weights = tensors.overlay.key, tensors.overlay.weight
    assert len(keys) == len(weights) == 24 and len(set(keys.tolist())) == 24
    assert 0 <= weights.min() and weights.max() < 0.2 and weights.std() > 0.02
    rows = step_inputs(_share(), config, plan, tensors)
    expected = noise_overlay(plain_rows[:8], keys[:8], weights[:8], config.data)
    torch.testing.assert_close(rows[:8], expected)


def test_an_epoch_re_sent_after_a_restart_is_answered_with_the_checkpoints_losses() -> None:
    """A restarted worker group does not train an epoch its checkpoint already holds: it
    answers with the losses the checkpoint recorded, or unknown (NaN) ones for an epoch
    before it."""
    from asd_ray import messages, train

    base = torch.nn.Linear(2, 3)
    recorded = messages.EpochLosses(train_loss=0.5, loss_x=0.4, loss_u=0.1)
    assert recorded.to_row() == {"train_loss": 0.5, "loss_x": 0.4, "loss_u": 0.1}  # as checkpoints keep them
    worker = train._Worker(None, base, base, None, None, 0, Restored(2, recorded.to_row(), pretrained=True))
    assert worker.train(messages.Train(2, None, {})).losses == recorded  # no data: training would fail
    earlier = worker.train(messages.Train(1, None, {})).losses
    assert all(np.isnan(v) for v in earlier.to_row().values())


def test_a_worker_trains_on_the_pools_its_task_carries_and_reads_no_file(monkeypatch) -> None:
    """Workers may run on nodes that share no file system with the driver: a training task
    brings its pools (bit-packed) through Ray, and the worker opens nothing to use them.
    The checkpoint records the pools' digest."""
    import builtins
    import io
    import os

    import pyarrow.parquet as pq

    from asd_ray import messages, tables, train

    config = _config(*PLAIN)
    model = _model(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.mixmatch.lr)
    ids = np.arange(61)  # N not a multiple of 8
    data = WorkerData(_share(61).images, torch.from_numpy(ids % 4), ids)
    clean, unlabeled = ids % 3 == 0, (ids % 3 != 0) & (ids < 50)  # 50..60: held out
    trained_on, reported = [], []

    def spy(model, optimizer, data, clean, config, *, epoch, unlabeled):
        trained_on.append((clean, unlabeled))
        return mixmatch_epoch(model, optimizer, data, clean, config, epoch=epoch, unlabeled=unlabeled)

    def no_file(*args, **kwargs):
        raise AssertionError(f"a worker opened {args[:1]}")

    monkeypatch.setattr(train, "mixmatch_epoch", spy)
    monkeypatch.setattr(
        train._Worker, "_report", lambda self, epoch, split, *_: reported.append((epoch, split))
    )
    for module, name in (
        (builtins, "open"),
        (io, "open"),
        (os, "open"),
        (pq, "read_table"),
        (tables, "read_parquet"),
    ):
        monkeypatch.setattr(module, name, no_file)
    worker = train._Worker(config, model, model, optimizer, data, 0, Restored())
    task = messages.Train(0, messages.Pools.pack(clean, unlabeled), {})
    answer = worker.train(task)
    monkeypatch.undo()
    assert len(trained_on) == 1
    assert np.array_equal(trained_on[0][0], clean) and np.array_equal(trained_on[0][1], unlabeled)
    assert reported == [(0, task.pools.digest)] and np.isfinite(answer.losses.train_loss)


def test_a_worker_shares_the_trusted_seed_copies_it_receives_without_a_folder(tmp_path) -> None:
    """The seeds' trusted copies come decoded in the worker's set-up (through Ray), as ids N..,
    each to the rank of its id, after that rank's share of the training shards."""
    from conftest import make_shards, synthetic_arrays

    from asd_ray import train

    shards = make_shards(tmp_path / "train", n=21, size=16, channels=1)
    extra, extra_labels = synthetic_arrays(5, 16, 1, seed=9)
    training = TrainingSet(shards.folder, shards.versions, len(shards), (extra, extra_labels))
    setup = WorkerSetup(
        _config(), training, model=None, mailbox="", cache_dir=str(tmp_path), checkpoints=None
    )
    pixels, _, _ = load_share(shards)
    everything = np.concatenate([pixels, extra])
    for rank in (0, 1):
        data = train._load_share(setup, rank, 2, torch.device("cpu"))
        assert data.total == 26 and data.sample_ids.tolist() == list(range(rank, 26, 2))
        assert np.array_equal(data.images.numpy(), everything[rank::2])
        assert data.labels.tolist() == np.concatenate([shards.labels, extra_labels])[rank::2].tolist()


def test_the_newest_checkpoint_is_a_folder_never_ray_trains_index_or_its_set_aside_copy(tmp_path):
    from asd_ray import storage
    from asd_ray.resume import newest_checkpoint

    for name in ("checkpoint_2026-01-01_00-00-01", "checkpoint_2026-01-01_00-00-02"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint_manager_snapshot.json").write_text("{}")
    (tmp_path / "checkpoint_manager_snapshot.json.unreadable-1796627291").write_text("{")
    assert newest_checkpoint(storage.location(tmp_path)).name == "checkpoint_2026-01-01_00-00-02"
    assert newest_checkpoint(storage.location(tmp_path / "checkpoint_2026-01-01_00-00-01")) is None
