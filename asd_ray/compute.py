"""How the model arithmetic runs: precision, memory format, compilation, host->device copies.

Precision is named for what the hardware computes: ``fp32`` (full fp32, also on
GPUs), ``tf32`` (fp32 storage, TF32 matmuls and convolutions on GPUs), ``bf16``
(autocast). The fast path on a CPU is bf16 autocast plus channels_last. Measured
on a 2-core AVX-512-BF16 CPU (ResNet-18, 32 px, 192 images, forward + backward):
fp32 2.7 s, channels_last 2.0 s, bf16 1.1 s, both 0.94 s (``jobs/bench_pipeline.py``
has the MixMatch-step figures). ``compute.precision = auto`` takes what was
measured faster on the device (:func:`resolve_precision`).

Training (MixMatch passes, label guesses, the virtual model, the baseline) runs
under ``compute.precision``; scoring under ``scoring.precision`` (full fp32 by
default: the split ranks samples by small loss differences).
"""

from __future__ import annotations

import contextlib
import dataclasses
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


SMALL_IMAGE = 64  # on a GPU, auto takes tf32 up to this image side and bf16 above


def resolve_precision(config: ComputeConfig, device: torch.device, image_size: int = 0) -> str:
    """``fp32``, ``tf32`` or ``bf16``: what ``config.precision`` means on ``device`` for
    training on images of ``image_size`` px.

    ``auto`` on a GPU with native bf16 (compute capability 8+) is what was measured
    faster there (ResNet-18 on one H200): at 32 px a 64 + 64 step is bound by kernel
    launches and autocast's casts make bf16 slower than TF32 (11,485 against 14,744
    images/s), so ``tf32`` up to :data:`SMALL_IMAGE` px; at 224 px bf16 trains 2.0x
    faster. Older GPUs: ``fp32``. On a CPU: ``bf16`` where it is native, else ``fp32``;
    ``tf32`` means ``fp32`` there (CPUs have no TF32).
    """
    if config.precision == "tf32" and device.type != "cuda":
        return "fp32"
    if config.precision != "auto":
        return config.precision
    if device.type == "cuda":
        if torch.cuda.get_device_capability(device)[0] < 8:
            return "fp32"
        return "tf32" if image_size <= SMALL_IMAGE else "bf16"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def configure_training(config: ComputeConfig, device: torch.device, image_size: int) -> ComputeConfig:
    """Set this process up for training as ``config`` says and return it with the precision
    resolved: TF32 only where the precision is ``tf32`` (so ``fp32`` is full fp32 on a
    GPU too), and cuDNN's autotuner on (a run's shapes repeat every step)."""
    precision = resolve_precision(config, device, image_size)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = precision == "tf32"
        torch.backends.cudnn.benchmark = True
    return dataclasses.replace(config, precision=precision)


def autocast(config: ComputeConfig, device: torch.device):
    """The autocast context of training forward passes on ``device`` (bf16 only)."""
    if resolve_precision(config, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def scoring_precision(precision: str, device: torch.device):
    """Score in ``precision`` (``fp32``, ``tf32`` or ``bf16``) on ``device`` for the
    duration: TF32 on only under ``tf32``, bf16 autocast under ``bf16``."""
    if device.type == "cuda":
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        with (
            torch.autocast(device.type, dtype=torch.bfloat16)
            if precision == "bf16"
            else contextlib.nullcontext()
        ):
            yield
    finally:
        if device.type == "cuda":
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def adam(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam with its fused kernel on a GPU (one launch per step and no host reads of
    its step counts), the default elsewhere; the same update either way."""
    return torch.optim.Adam(params, lr=lr, fused=device.type == "cuda")


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


def maybe_compile(model: torch.nn.Module, config: ComputeConfig) -> torch.nn.Module:
    """``torch.compile(model)`` when ``compute.compile`` is on, else ``model`` unchanged."""
    return torch.compile(model) if config.compile else model
