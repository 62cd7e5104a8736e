"""The GPU path: scoring, MixMatch and the virtual model on CUDA against the CPU.

Skipped without CUDA (CI has no GPU); run on a GPU machine with
``python -m pytest tests/test_cuda.py``. These tests need neither Ray nor
webdataset, so a bare PyTorch image runs them.
"""

import socket

import numpy as np
import pytest
import torch

from asd_ray import compute, distributed
from asd_ray.batches import WorkerData
from asd_ray.config import load_config
from asd_ray.models import ModelSpec
from asd_ray.scores import score_images
from asd_ray.steps import mixmatch_epoch, virtual_epoch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

CUDA = torch.device("cuda", 0)
FAST = ("compute.precision=bf16", "compute.channels_last=true")
PLAIN = ("compute.precision=fp32", "compute.channels_last=false")


def _config(*overrides: str):
    return load_config(
        "mnist-quick",
        overrides=[
            "mixmatch.iterations=3",
            "mixmatch.batch_labeled=16",
            "mixmatch.batch_unlabeled=16",
            "virtual.batch_size=16",
            "virtual.min_steps=2",
            "scoring.batch_size=32",
            "data.crop_padding=2",
            *overrides,
        ],
    )


def _share(device: torch.device, n: int = 128) -> WorkerData:
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 256, (n, 16, 16, 1), dtype=np.uint8))
    return WorkerData(images.to(device), (torch.arange(n) % 4).to(device), np.arange(n))


def _model(config, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return compute.prepare_model(ModelSpec("small_cnn", 4, 1, 16).build(), config.compute).to(device)


@pytest.fixture(autouse=True)
def _full_fp32():
    # fp32 comparisons with the CPU need full fp32 kernels
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.deterministic = False


def test_auto_precision_is_tf32_for_small_images_and_bf16_for_large_from_ampere_on() -> None:
    config = _config("compute.precision=auto")
    ampere = torch.cuda.get_device_capability()[0] >= 8
    assert compute.resolve_precision(config.compute, CUDA, 32) == ("tf32" if ampere else "fp32")
    assert compute.resolve_precision(config.compute, CUDA, 224) == ("bf16" if ampere else "fp32")


def test_scores_on_the_gpu_match_the_cpu() -> None:
    config = _config(*PLAIN)
    cpu, gpu = _share(torch.device("cpu")), _share(CUDA)
    results = {}
    for name, data in (("cpu", cpu), ("gpu", gpu)):
        model = _model(config, data.device).train(False)
        pinned = data.images.cpu().pin_memory()  # as the scoring actors hold their share
        results[name] = score_images(
            model, pinned, data.labels.cpu(), config.data, config.scoring, config.compute
        )
    torch.testing.assert_close(results["gpu"][0], results["cpu"][0], rtol=1e-4, atol=1e-5)
    assert torch.equal(results["gpu"][1], results["cpu"][1])


@pytest.mark.parametrize("mode", ["plain", "fast"])
def test_mixmatch_epoch_on_the_gpu_matches_the_cpu(mode: str) -> None:
    """The same batches and augmentation draws on either device (they come from CPU
    generators), so fp32 losses agree closely and bf16 within its precision."""
    config = _config(*(PLAIN if mode == "plain" else FAST))
    clean = np.arange(128) % 2 == 0
    losses = {}
    for name, device in (("cpu", torch.device("cpu")), ("gpu", CUDA)):
        model = _model(_config(*PLAIN), device)
        model = compute.prepare_model(model, config.compute)
        optimizer = torch.optim.Adam(model.parameters(), lr=config.mixmatch.lr)
        losses[name] = mixmatch_epoch(model, optimizer, _share(device), clean, config, epoch=3)
    rel = 1e-3 if mode == "plain" else 0.05
    gpu, cpu = losses["gpu"].to_row(), losses["cpu"].to_row()
    for key in ("train_loss", "loss_x", "loss_u"):
        assert np.isfinite(gpu[key])
        assert gpu[key] == pytest.approx(cpu[key], rel=rel, abs=1e-4)


@pytest.mark.parametrize("mode", ["plain", "fast"])
def test_graphed_steps_match_the_eager_ones(mode: str) -> None:
    """compute.cuda_graphs: warm-up steps, one capture, replays; every step runs once, with
    the values of its own plan (batches, draws, lambda, ramp-up weight, learning rate)."""
    clean = np.arange(128) % 2 == 0
    results = {}
    for graphs in (False, True):
        precision = PLAIN if mode == "plain" else FAST
        config = _config(
            *precision, "mixmatch.iterations=8", "cluster.workers=1", f"compute.cuda_graphs={graphs}"
        )
        model = _model(config, CUDA)
        optimizer = compute.adam(model.parameters(), config.mixmatch.lr)
        losses = [mixmatch_epoch(model, optimizer, _share(CUDA), clean, config, epoch=e) for e in (3, 4)]
        virtual = virtual_epoch(model, _share(CUDA), config, epoch=4)
        results[graphs] = losses, model.state_dict(), virtual.state_dict()
    rel = 1e-3 if mode == "plain" else 0.05
    for eager, graphed in zip(results[False][0], results[True][0]):
        eager, graphed = eager.to_row(), graphed.to_row()
        for key in ("train_loss", "loss_x", "loss_u"):
            assert graphed[key] == pytest.approx(eager[key], rel=rel, abs=1e-4), key
    for part in (1, 2):
        for key, value in results[False][part].items():
            if value.dtype.is_floating_point:
                torch.testing.assert_close(results[True][part][key], value, rtol=rel, atol=1e-3)


def test_virtual_epoch_on_the_gpu_updates_only_meta_parameters() -> None:
    config = _config(*FAST)
    model = _model(config, CUDA)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    virtual = virtual_epoch(model, _share(CUDA), config, epoch=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    changed = {k for k, v in virtual.named_parameters() if not torch.equal(before[k], v)}
    assert changed and all(k.startswith(("backbone.block4", "head")) for k in changed)


def test_global_batch_norm_model_trains_under_nccl_ddp() -> None:
    """One rank on NCCL: the conversion, DDP wrap and step loop run on the GPU backend
    (more ranks need more GPUs than this test assumes)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, device_id=CUDA
    )
    try:
        config = _config(*FAST)
        model = distributed.sync_batch_norm(_model(config, CUDA))
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[0])
        optimizer = torch.optim.Adam(model.parameters(), lr=config.mixmatch.lr)
        clean = np.arange(128) % 2 == 0
        metrics = mixmatch_epoch(ddp, optimizer, _share(CUDA), clean, config, epoch=1)
        assert all(np.isfinite(v) for v in metrics.to_row().values())
    finally:
        torch.distributed.destroy_process_group()
