"""How the model arithmetic runs: precision, memory format, compilation, host->device copies, CUDA graphs.

Precision is named for what the hardware computes: ``fp32`` (full fp32, also on
GPUs), ``tf32`` (fp32 storage, TF32 matmuls and convolutions on GPUs), ``bf16``
(autocast). The fast path on a CPU is bf16 autocast plus channels_last, each faster
than fp32 and the two together fastest (jobs/BENCHMARKS.md, "Pipeline"; the
MixMatch-step figures are ``jobs/bench_pipeline.py``'s). ``compute.precision = auto``
takes what was measured faster on the device (:func:`resolve_precision`).

Training (MixMatch passes, label guesses, the virtual model, the baseline) runs
under ``compute.precision``; scoring under ``scoring.precision`` (full fp32 by
default: the split ranks samples by small loss differences).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    faster there (ResNet-18; jobs/BENCHMARKS.md, "One H200"): at 32 px a 64 + 64 step is
    bound by kernel launches and autocast's casts make bf16 slower than TF32, so ``tf32``
    up to :data:`SMALL_IMAGE` px; at 224 px bf16 is faster. Older GPUs: ``fp32``. On a CPU: ``bf16`` where it is native, else ``fp32``;
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
    """The autocast context of training forward passes on ``device`` (bf16 only). Its
    cache of cast weights is off under ``compute.cuda_graphs``, as PyTorch's CUDA-graph
    documentation asks of autocast in a captured region (the weights are then cast for
    each pass, not once per step)."""
    if resolve_precision(config, device) != "bf16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not config.cuda_graphs)


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


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel (CPUs and GPUs): one launch per step instead of hundreds,
    and no host reads of its step counts (faster, jobs/BENCHMARKS.md, "Ops per step"); the
    same update."""
    return torch.optim.Adam(params, lr=lr, fused=True)


def load_adam_state(optimizer: torch.optim.Adam, state: dict) -> None:
    """Load a checkpoint's optimizer state and keep the optimizer fused.

    PyTorch restores a group's flags from the checkpoint, so one written by an unfused
    Adam (an older asd-ray) would silently unfuse this one; the step counts then also
    move to the parameters' device, where the fused kernel reads them.
    """
    optimizer.load_state_dict(state)
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, None
    _steps_beside_parameters(optimizer)


def make_capturable(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Let a fused Adam's step be captured in a CUDA graph: its learning rate becomes a
    device tensor (set by :func:`set_lr` inside the graph), its groups capturable and its
    step counts device tensors."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        group["capturable"] = True
    _steps_beside_parameters(optimizer)


def _steps_beside_parameters(optimizer: torch.optim.Optimizer) -> None:
    for param, state in optimizer.state.items():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].to(device=param.device, dtype=torch.float32)


def set_lr(optimizer: torch.optim.Optimizer, lr: float, on_device: torch.Tensor | None = None) -> None:
    """Set every group's learning rate: copied from ``on_device`` (a device value, no host
    sync) where the rate is a tensor, else the host float ``lr``."""
    for group in optimizer.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].copy_(on_device) if on_device is not None else group["lr"].fill_(lr)
        else:
            group["lr"] = lr


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


@dataclasses.dataclass(frozen=True)
class PackLayout:
    """Where each named value sits in a :class:`Pack`'s buffer: ``(name, offset, shape)``
    for the integer part, then the float part (stored as float64 bits)."""

    ints: tuple[tuple[str, int, tuple[int, ...]], ...]
    floats: tuple[tuple[str, int, tuple[int, ...]], ...]
    int_size: int
    size: int


class Pack:
    """A step's host values (indices, random draws, scalars) packed for one host->device copy.

    Integer arrays are stored as int64 and float ones as the bits of float64 values in
    the same int64 buffer, so everything a step reads reaches the device in one copy
    and is unpacked there by views and one cast (:func:`unpack`). A captured CUDA graph
    reads the same buffer each replay: the step's changing values are data, not code.
    """

    def __init__(self) -> None:
        self._ints: dict[str, np.ndarray] = {}
        self._floats: dict[str, np.ndarray] = {}

    def add(self, name: str, values) -> Pack:
        """Add ``values`` (an array or a scalar) under ``name``: integers exactly, floats as float64."""
        array = np.asarray(values)
        if array.dtype.kind in "biu":
            self._ints[name] = array.astype(np.int64)
        else:
            self._floats[name] = array.astype(np.float64)
        return self

    def build(self) -> tuple[torch.Tensor, PackLayout]:
        """(buffer, layout): the (L,) int64 host buffer and where each value is."""
        parts, ints, floats, offset = [], [], [], 0
        for name, array in self._ints.items():
            ints.append((name, offset, array.shape))
            parts.append(array.reshape(-1))
            offset += array.size
        int_size = offset
        for name, array in self._floats.items():
            floats.append((name, offset - int_size, array.shape))
            parts.append(array.reshape(-1).view(np.int64))
            offset += array.size
        buffer = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        return torch.from_numpy(buffer), PackLayout(tuple(ints), tuple(floats), int_size, offset)


def unpack(buffer: torch.Tensor, layout: PackLayout) -> dict[str, torch.Tensor]:
    """The named values of a :class:`Pack` buffer on its device: int64 views, and float32
    views of the float part (one cast)."""
    values = {name: buffer[o : o + math.prod(shape)].view(shape) for name, o, shape in layout.ints}
    if layout.floats:
        floats = buffer[layout.int_size : layout.size].view(torch.float64).to(torch.float32)
        values.update(
            {name: floats[o : o + math.prod(shape)].view(shape) for name, o, shape in layout.floats}
        )
    return values


class GraphedStep:
    """Run ``step(buffer)`` as a CUDA graph: a few eager warm-up steps on a side stream
    (cuDNN's autotuner and the optimizer's state settle), then one capture, then replays.

    Every step executes exactly once: warm-up steps are real steps, and the captured
    step is replayed for the values it was captured with. ``step`` must read every
    changing value from ``buffer`` (see :class:`Pack`), keep its outputs in tensors it
    owns, never read a device value on the host, and leave gradients as the graph
    found them (``before`` sets them to None ahead of each eager step and the capture).
    """

    def __init__(
        self, step: Callable[[torch.Tensor], None], before: Callable[[], None], *, warmup: int = 3
    ) -> None:
        if warmup < 1:  # first calls make cached device constants: never inside a capture
            raise ValueError("a graphed step needs at least one eager warm-up step")
        self.step, self.before, self.warmup = step, before, warmup
        self.buffer: torch.Tensor | None = None
        self.graph: torch.cuda.CUDAGraph | None = None

    def __call__(self, host: torch.Tensor, device: torch.device) -> None:
        main = torch.cuda.current_stream(device)
        if self.buffer is None:
            self.buffer = torch.empty(host.shape, dtype=host.dtype, device=device)
            self.side = torch.cuda.Stream(device)
        if host.shape != self.buffer.shape:
            raise ValueError(
                f"a graphed step's buffer changed size: {tuple(host.shape)} != {tuple(self.buffer.shape)}"
            )
        self.buffer.copy_(host.pin_memory(), non_blocking=True)
        if self.warmup > 0:
            self.warmup -= 1
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                self.before()
                self.step(self.buffer)
            main.wait_stream(self.side)
            return
        if self.graph is None:
            self.before()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):  # Ray's threads run on
                self.step(self.buffer)
        self.graph.replay()


class DispatchCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active (forward, backward, copies, optimizer).

    A small step on a GPU waits on the host that dispatches its ops one by one, so their
    number is its cost there. ``kernels`` leaves out the ops that launch no kernel on any
    device: views (``detach`` included) and allocations of uninitialised memory.
    ``paused()`` stops counting for a while (to count the optimizer's step apart).
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = self.kernels = 0
        self._paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            self.total += 1
            self.kernels += not (func.is_view or func.__name__.startswith(("empty", "lift_fresh")))
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def paused(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
