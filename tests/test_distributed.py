"""W workers compute the single-process step: the global draw, batch norm over the
global batch, global MixUp partners and the loss scaling, on CPU with gloo."""

import math
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from scipy import stats

from asd_ray import compute, distributed
from asd_ray.batches import (
    WorkerData,
    _positions_by_worker,
    batch_scale,
    lr_factor,
    mixmatch_plans,
    use_sync_batch_norm,
)
from asd_ray.config import load_config
from asd_ray.models import ModelSpec
from asd_ray.steps import mixmatch_epoch, step_inputs, virtual_schedule

N, SIZE, CLASSES = 96, 12, 4


def _dataset():
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (N, SIZE, SIZE, 1), dtype=np.uint8))
    return images, torch.arange(N) % CLASSES


def _share(rank: int, world: int) -> WorkerData:
    images, labels = _dataset()
    ids = np.arange(rank, N, world)
    return WorkerData(images[ids], labels[ids], ids, total=N, rank=rank, world=world)


def _config(*overrides: str):
    return load_config(
        "mnist-quick",
        overrides=[
            "mixmatch.batch_labeled=16",
            "mixmatch.batch_unlabeled=16",
            "data.crop_padding=2",
            "compute.precision=fp32",  # bf16 reductions would differ between the layouts
            *overrides,
        ],
    )


def _uneven_clean() -> np.ndarray:
    """A clean pool that falls very unevenly across 4 shares: mostly on share 0."""
    ids = np.arange(N)
    return (ids % 4 == 0) | (ids < 8)


def test_draw_frequencies_do_not_depend_on_the_worker_count() -> None:
    config, clean, steps = _config(), _uneven_clean(), 300
    single = np.zeros(N, int)
    for plan in _take(_plans(_share(0, 1), clean, config, 5), steps):
        np.add.at(single, plan.labeled_ids, 1)
    served = np.zeros(N, int)
    for rank in range(4):
        data = _share(rank, 4)
        for plan in _take(_plans(data, clean, config, 5), steps):
            rows, local = data.serve(plan.labeled_ids)
            assert plan.labeled == len(rows)
            assert np.array_equal(plan.tensors().index[: plan.labeled].numpy(), local)
            np.add.at(served, data.sample_ids[local], 1)
    assert np.array_equal(served, single)  # every row of every global batch served exactly once
    pool = np.flatnonzero(clean)
    assert served[~clean].sum() == 0 and served.sum() == steps * 16
    _, p = stats.chisquare(served[pool])  # uniform over the pool, although share 0 holds most of it
    assert p > 1e-3
    by_share = [served[pool[pool % 4 == r]].mean() for r in range(4)]
    assert max(by_share) / min(by_share) < 1.3


def test_a_row_is_augmented_alike_whichever_worker_serves_it() -> None:
    """Crop and noise overlay of every row of a MixMatch step: the same input, to the bit,
    on one worker and on the one of four that serves the row."""
    config = _config("mixmatch.batch_labeled=4", "mixmatch.batch_unlabeled=4", "mixmatch.noise_overlay=0.2")
    clean = _uneven_clean()
    whole = next(_plans(_share(0, 1), clean, config, 40))
    rows = step_inputs(_share(0, 1), config, whole, whole.tensors())
    served = 0
    for rank in range(4):
        data = _share(rank, 4)
        plan = next(_plans(data, clean, config, 40))
        mine = step_inputs(data, config, plan, plan.tensors())
        positions = _positions_by_worker(plan.labeled_ids, plan.unlabeled_ids, 4)[rank]
        assert torch.equal(mine, rows[positions])
        served += len(positions)
    assert served == len(rows) == 12


def _plans(data, clean, config, epoch: int):
    return mixmatch_plans(data, clean, config, epoch=epoch, iterations=config.mixmatch.iterations)


def _take(iterator, n):
    for _ in range(n):
        yield next(iterator)


def _step(rank: int, world: int, folder: str, overrides: tuple[str, ...] = ()) -> None:
    """MixMatch steps (SGD, lr 1: the update is the gradient) on ``world`` workers."""
    torch.set_num_threads(1)
    config = _config("mixmatch.iterations=1", "mixmatch.lr=1.0", *overrides)
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world
        )
    torch.manual_seed(0)
    model = compute.prepare_model(ModelSpec("small_cnn", CLASSES, 1, SIZE).build(), config.compute)
    if use_sync_batch_norm(config, world):
        model = distributed.sync_batch_norm(model)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    metrics = mixmatch_epoch(wrapped, optimizer, _share(rank, world), _uneven_clean(), config, epoch=40)
    if rank == 0:
        torch.save({"state": model.state_dict(), "metrics": metrics.to_row()}, f"{folder}/world{world}.pt")
    if world > 1:
        dist.destroy_process_group()


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


@pytest.mark.parametrize(
    ("precision", "steps", "tolerance", "overlay"),
    # bf16 rounds each rank's partial sums differently, and SGD at lr 1 amplifies that
    # from step to step: one bf16 step, three fp32 ones. The noise overlay's inputs make
    # the fp32 rounding differences larger (measured: 6e-5 after one step, against 4e-6
    # without), and three steps at lr 1 grow them to 5e-2, so the three fp32 steps take
    # the paper's inputs; test_a_row_is_augmented_alike_whichever_worker_serves_it checks
    # the overlay's rows exactly
    [("bf16", 1, 5e-2, "0.2"), ("fp32", 3, 2e-3, "0")],
)
def test_empty_ranks_take_the_single_process_step(tmp_path, precision, steps, tolerance, overlay) -> None:
    """W = 4 with 2 + 2 rows per global batch: in every step at least two ranks hold no
    labeled row and two no unlabeled row (the guess pass), and some hold no row at all,
    so they run batch norm on nothing. They must still send float32 statistics of the
    same size as the others, under bf16 autocast too, and the step must be the
    single-process one. (PyTorch's SyncBatchNorm sends an empty rank's statistics in
    the input's dtype: on gloo that aborts with a size mismatch, on NCCL it hangs.)"""
    overrides = ("mixmatch.batch_labeled=2", "mixmatch.batch_unlabeled=2", f"mixmatch.iterations={steps}")
    overrides += (f"compute.precision={precision}", f"mixmatch.noise_overlay={overlay}")
    config = _config("mixmatch.lr=1.0", *overrides)
    plans = list(_take(_plans(_share(0, 1), _uneven_clean(), config, 40), steps))
    holders = [set((np.concatenate([p.labeled_ids, p.unlabeled_ids]) % 4).tolist()) for p in plans]
    assert any(len(h) < 4 for h in holders), holders  # some rank holds none of a whole step's rows
    _step(0, 1, str(tmp_path), overrides)
    mp.spawn(_step, args=(4, str(tmp_path), overrides), nprocs=4, join=True)
    one = torch.load(tmp_path / "world1.pt", weights_only=True)
    four = torch.load(tmp_path / "world4.pt", weights_only=True)
    for key in ("train_loss", "loss_x", "loss_u"):
        assert four["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-3), key
    torch.manual_seed(0)
    start = ModelSpec("small_cnn", CLASSES, 1, SIZE).build().state_dict()
    moved = 0
    for key, value in one["state"].items():
        if not value.dtype.is_floating_point:
            continue
        assert torch.isfinite(four["state"][key]).all(), key
        assert _relative_error(four["state"][key], value) < tolerance, key
        moved += not torch.equal(value, start[key])
    assert moved > 10  # the steps moved the weights: the comparison means something


def test_every_batch_norm_becomes_the_global_one_on_any_device() -> None:
    """What a CUDA run uses is decided without CUDA: one batch norm for every backend."""
    model = distributed.sync_batch_norm(ModelSpec("resnet18", CLASSES, 3, 32).build())
    kinds = {type(m).__name__ for m in model.modules() if "Norm" in type(m).__name__}
    assert kinds == {"GlobalBatchNorm"}


def test_global_batch_norm_is_batch_norm_without_a_process_group() -> None:
    bn = torch.nn.BatchNorm2d(3)
    wrapped = distributed.GlobalBatchNorm(torch.nn.BatchNorm2d(3))
    x = torch.randn(5, 3, 4, 4)
    assert torch.allclose(wrapped(x), bn(x)) and torch.allclose(wrapped.running_var, bn.running_var)
    assert set(wrapped.state_dict()) == set(bn.state_dict())


def test_scaled_keeps_the_papers_virtual_model() -> None:
    """The meta-split measures how far the virtual model moves: ``scaled`` must not
    shorten it (at W = 8 it once took 49 steps of 1,024 instead of 391 of 128)."""
    plain = virtual_schedule(load_config("cifar10"), 50_000)
    assert plain == (391, 128, 0.015)
    assert virtual_schedule(load_config("cifar10", overrides=["mixmatch.batch_rule=scaled"]), 50_000) == plain


def test_batch_rules() -> None:
    plain = _config()
    assert batch_scale(plain, 4) == 1 and lr_factor(plain, 4, 0.0) == 1.0
    assert use_sync_batch_norm(plain, 4) and not use_sync_batch_norm(plain, 1)
    assert not use_sync_batch_norm(_config("cluster.sync_batch_norm=false"), 4)
    scaled = _config("mixmatch.batch_rule=scaled", "mixmatch.warmup_epochs=2")
    assert batch_scale(scaled, 4) == 4 and not use_sync_batch_norm(scaled, 4)
    assert lr_factor(scaled, 4) == 2.0  # sqrt(4)
    assert lr_factor(scaled, 4, 1.0) == pytest.approx(1.5) and lr_factor(scaled, 4, 9.0) == 2.0
    assert lr_factor(_config("mixmatch.batch_rule=scaled", "mixmatch.scaled_lr=linear"), 4) == 4.0
    assert math.isclose(lr_factor(scaled, 1, 0.0), 1.0)
    with pytest.raises(
        ValueError,
        match="mixmatch.batch_rule = 'per_worker' is out of range: it must be one of global, scaled",
    ):
        _config("mixmatch.batch_rule=per_worker")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="interfaces are looked up the Linux way")
def test_gloo_is_pinned_to_the_interface_of_the_nodes_address() -> None:
    """Ray workers pin Gloo to the interface carrying their node's address (a host whose
    name resolves to 127.0.0.1 would otherwise offer DDP peers on other nodes loopback)."""
    from asd_ray.worker_setup import interface_of

    assert interface_of("127.0.0.1") == "lo"
    assert interface_of("203.0.113.254") is None  # TEST-NET-3: no interface has it
