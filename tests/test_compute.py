"""The fast path: precision resolution, autocast, memory format."""

import numpy as np
import pytest
import torch

from asd_ray import compute
from asd_ray.config import ComputeConfig, load_config
from asd_ray.models import build_model

CPU = torch.device("cpu")


def test_explicit_precision_is_kept() -> None:
    assert compute.resolve_precision(ComputeConfig(precision="fp32"), CPU) == "fp32"
    assert compute.resolve_precision(ComputeConfig(precision="bf16"), CPU) == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_follows_native_cpu_bf16(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(compute, "cpu_has_native_bf16", lambda: native)
    assert compute.resolve_precision(ComputeConfig(), CPU) == ("bf16" if native else "fp32")


def test_tf32_is_fp32_on_a_cpu_and_configure_resolves_once() -> None:
    assert compute.resolve_precision(ComputeConfig(precision="tf32"), CPU) == "fp32"
    resolved = compute.configure_training(ComputeConfig(precision="tf32"), CPU, 32)
    assert resolved.precision == "fp32" and resolved.channels_last


def test_adam_is_fused_and_can_be_made_capturable_with_its_rate_on_the_device() -> None:
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = compute.adam([param], 0.1)
    assert optimizer.defaults["fused"] is True and optimizer.defaults["lr"] == 0.1
    compute.make_capturable(optimizer, CPU)
    group = optimizer.param_groups[0]
    assert group["capturable"] and isinstance(group["lr"], torch.Tensor)
    assert group["lr"].item() == pytest.approx(0.1)
    compute.set_lr(optimizer, 0.5, torch.tensor(0.25))  # inside a graph: from the device value
    assert group["lr"].item() == 0.25
    compute.set_lr(optimizer, 0.5)
    assert group["lr"].item() == 0.5
    param.grad = torch.ones(2)
    optimizer.step()  # a fused, capturable step with a tensor rate runs
    assert torch.allclose(param.detach(), torch.full((2,), -0.5))


def test_autocast_computes_in_the_resolved_precision() -> None:
    a = torch.randn(4, 8)
    with compute.autocast(ComputeConfig(precision="bf16"), CPU):
        assert (a @ a.T).dtype == torch.bfloat16
    for name in ("fp32", "tf32"):
        with compute.autocast(ComputeConfig(precision=name), CPU):
            assert (a @ a.T).dtype == torch.float32


def test_prepare_model_sets_the_memory_format() -> None:
    model = build_model("small_cnn", 10, in_channels=1, image_size=28)
    conv = model.backbone.block2[0].weight  # (32, 16, 3, 3): the two layouts differ
    compute.prepare_model(model, ComputeConfig(channels_last=True))
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    compute.prepare_model(model, ComputeConfig(channels_last=False))
    assert model.backbone.block2[0].weight.is_contiguous()


def test_to_device_leaves_cpu_tensors_alone() -> None:
    t = torch.arange(3)
    assert compute.to_device(t, CPU) is t


def test_bad_precision_names_the_key() -> None:
    with pytest.raises(
        ValueError,
        match="compute.precision = 'half' is out of range: it must be one of auto, fp32, tf32, bf16",
    ):
        load_config(None, None, ["compute.precision=half"])


def test_scoring_precision_is_checked_and_applied() -> None:
    from asd_ray.config import ScoringConfig

    a = torch.randn(4, 8)
    with compute.scoring_precision("bf16", CPU):
        assert (a @ a.T).dtype == torch.bfloat16
    for name in ("fp32", "tf32"):
        with compute.scoring_precision(name, CPU):
            assert (a @ a.T).dtype == torch.float32
    with pytest.raises(
        ValueError, match="scoring.precision = 'half' is out of range: it must be one of fp32, tf32, bf16"
    ):
        ScoringConfig(precision="half")


def test_cuda_graphs_need_one_worker_and_no_compilation() -> None:
    from asd_ray.config import load_config
    from asd_ray.errors import ConfigError

    assert load_config(
        "mnist-quick", overrides=["compute.cuda_graphs=true", "cluster.workers=1"]
    ).compute.cuda_graphs
    with pytest.raises(ConfigError, match="set cluster.workers=1"):
        load_config("mnist-quick", overrides=["compute.cuda_graphs=true", "cluster.workers=2"])
    with pytest.raises(ConfigError, match="exclude each other"):
        load_config(
            "mnist-quick", overrides=["compute.cuda_graphs=true", "compute.compile=true", "cluster.workers=1"]
        )


def test_a_pack_reaches_the_device_in_one_buffer_and_unpacks_by_name() -> None:
    pack = compute.Pack().add("index", np.array([3, 1, 2])).add("rows", np.arange(6).reshape(2, 3))
    buffer, layout = pack.add("lam", 0.75).add("theta", np.full((2, 2), 1e-3)).build()
    assert buffer.dtype == torch.int64 and buffer.shape == (3 + 6 + 1 + 4,)
    values = compute.unpack(buffer, layout)
    assert values["index"].tolist() == [3, 1, 2] and values["rows"].shape == (2, 3)
    assert values["lam"].dtype == torch.float32 and values["lam"].item() == 0.75 and values["lam"].dim() == 0
    assert torch.allclose(values["theta"], torch.full((2, 2), 1e-3))


def test_an_unfused_checkpoint_loads_into_a_fused_adam_that_stays_fused() -> None:
    param = torch.nn.Parameter(torch.ones(3))
    old = torch.optim.Adam([param], lr=0.1)  # as an older asd-ray saved its checkpoints
    param.grad = torch.ones(3)
    old.step()
    fresh = torch.nn.Parameter(param.detach().clone())
    optimizer = compute.adam([fresh], 0.1)
    compute.load_adam_state(optimizer, old.state_dict())
    assert optimizer.param_groups[0]["fused"] is True and optimizer.param_groups[0]["foreach"] is None
    assert optimizer.state[fresh]["step"].dtype == torch.float32
    fresh.grad = torch.ones(3)
    optimizer.step()  # the fused kernel runs on the loaded state
    assert optimizer.state[fresh]["step"].item() == 2.0
