"""How the model arithmetic runs: precision, memory format, compilation, host->device copies.

The fast path is bf16 autocast plus channels_last. Measured on a 2-core
AVX-512-BF16 CPU (ResNet-18, 32 px, 192 images, forward + backward): fp32 2.7 s,
channels_last 2.0 s, bf16 1.1 s, both 0.94 s (``jobs/bench_pipeline.py`` has the
MixMatch-step figures). Where the hardware has native bf16 (CUDA compute
capability 8+, or a CPU with AVX512-BF16 or AMX) ``compute.precision = auto``
takes it; elsewhere emulated bf16 is slower than fp32, so auto stays fp32.

Training (MixMatch passes, label guesses, the virtual model, the baseline) runs
under the chosen precision; the scoring pass always computes in fp32, because
the split ranks samples by small loss differences.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from asd_ray.config import ComputeConfig

_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True if this CPU computes bf16 in hardware (AVX512-BF16 or AMX; Linux flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return any(flag in flags.split() for flag in _CPU_BF16_FLAGS)


def resolve_precision(config: ComputeConfig, device: torch.device) -> str:
    """``bf16`` or ``fp32``: what ``config.precision`` means on ``device``."""
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda":  # compute capability 8+ (Ampere on); older GPUs only emulate bf16
        return "bf16" if torch.cuda.get_device_capability(device)[0] >= 8 else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def autocast(config: ComputeConfig, device: torch.device):
    """The autocast context of training forward passes on ``device``."""
    if resolve_precision(config, device) == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def memory_format(config: ComputeConfig) -> torch.memory_format:
    """channels_last (NHWC kernels, faster convolutions on CPU and tensor cores) or the default."""
    return torch.channels_last if config.channels_last else torch.contiguous_format


def prepare_model(model: torch.nn.Module, config: ComputeConfig) -> torch.nn.Module:
    """Put ``model``'s weights in the configured memory format (in place; returns it)."""
    return model.to(memory_format=memory_format(config))


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy a small host tensor (indices, random draws) to ``device`` without a host sync.

    A copy from pageable memory waits for the GPU's queue; from pinned memory with
    ``non_blocking`` it is queued like a kernel, so the step loop never stalls on it.
    """
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def disable_tf32() -> None:
    """Keep fp32 convolutions and matmuls in full fp32 on GPUs (no TF32), for this process.

    A function here rather than inline in a Ray actor: Ray pickles actor classes,
    and an inline reference to ``torch.backends.cudnn`` cannot be pickled.
    """
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def maybe_compile(model: torch.nn.Module, config: ComputeConfig) -> torch.nn.Module:
    """``torch.compile(model)`` when ``compute.compile`` is on, else ``model`` unchanged."""
    return torch.compile(model) if config.compile else model
