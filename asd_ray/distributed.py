"""What makes W workers compute the single-process step: batch norm over the global batch,
and gathering a step's rows from every rank.

Models and losses know nothing of this; :mod:`asd_ray.steps` applies it when a
run has more than one worker. One batch norm serves every backend (gloo on CPU,
NCCL on GPUs): :class:`GlobalBatchNorm` all-reduces per-channel sums in float32 in
the forward pass, and the sums of the upstream gradient in the backward pass,
which is exactly the gradient of the single-process loss when each rank's loss is
scaled as :func:`asd_ray.steps.mixmatch_epoch` does. A rank may hold none of a
step's rows (64 rows over 16 GPUs, say): it still sends float32 zeros of the same
size, so every rank takes part in the same collectives. PyTorch's
``SyncBatchNorm`` does not: an empty rank sends its statistics in the input's
dtype (bf16 under autocast) while the others send float32, and the ranks then
gather tensors of different types, which NCCL does not check.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from asd_ray.errors import ConfigError


def world() -> tuple[int, int]:
    """(rank, world size) of the default process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GlobalBatchNormFn(torch.autograd.Function):
    """Train-mode batch norm whose statistics cover every rank's rows (any may hold none)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps: float, momentum: float):
        dtype = x.dtype
        x = x.float()
        channels = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        count = torch.tensor([x.numel() // channels], dtype=torch.float32, device=x.device)
        # Sums around the running mean (the same on every rank, and close to the batch mean):
        # E[x^2] - E[x]^2 in float32 would lose precision when |mean| >> std.
        shape = [1, channels] + [1] * (x.dim() - 2)
        shift = running_mean.detach().float().view(shape)
        centred = x - shift
        stats = torch.cat([centred.sum(dims), (centred * centred).sum(dims), count])  # (2C + 1,) fp32
        dist.all_reduce(stats)  # the same size and dtype on every rank, rows or none
        n = stats[-1]  # the global batch (>= 2: the config's batch ranges); never read on the host
        offset, sq_mean = stats[:channels] / n, stats[channels : 2 * channels] / n
        var = (sq_mean - offset * offset).clamp_(min=0.0)  # biased, as batch norm normalises
        mean = offset + shift.flatten()
        invstd = torch.rsqrt(var + eps)
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(momentum * mean)
            running_var.mul_(1 - momentum).add_(momentum * var * n / (n - 1))  # unbiased
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight, n)
        return (xhat * weight.view(shape) + bias.view(shape)).to(dtype)

    @staticmethod
    def backward(ctx, grad):
        xhat, invstd, weight, n = ctx.saved_tensors
        dtype = grad.dtype
        grad = grad.float()
        channels = xhat.shape[1]
        dims = [d for d in range(xhat.dim()) if d != 1]
        local = torch.cat([grad.sum(dims), (grad * xhat).sum(dims)])  # (2C,)
        grad_bias, grad_weight = local[:channels].clone(), local[channels:].clone()
        dist.all_reduce(local)  # every rank's loss reaches every row through the statistics
        sum_grad, sum_grad_xhat = local[:channels] / n, local[channels:] / n
        shape = [1, channels] + [1] * (xhat.dim() - 2)
        grad_x = (weight * invstd).view(shape) * (
            grad - sum_grad.view(shape) - xhat * sum_grad_xhat.view(shape)
        )
        # Weight and bias get this rank's share: DDP averages them like every other parameter.
        return grad_x.to(dtype), grad_weight, grad_bias, None, None, None, None


class GlobalBatchNorm(nn.Module):
    """A ``BatchNorm{1,2,3}d`` that normalises over the global batch in train mode.

    It keeps the wrapped layer's parameters and buffers (same state-dict keys),
    and is the plain layer in eval mode or without a process group.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm):
        super().__init__()
        if bn.momentum is None or not bn.affine or not bn.track_running_stats:
            raise ConfigError(
                f"model: {bn} has no momentum, affine parameters or running statistics, which batch "
                "norm over the global batch needs; build the model's batch norms with the defaults"
            )
        self.eps, self.momentum = bn.eps, bn.momentum
        self.weight, self.bias = bn.weight, bn.bias
        self.register_buffer("running_mean", bn.running_mean)
        self.register_buffer("running_var", bn.running_var)
        self.register_buffer("num_batches_tracked", bn.num_batches_tracked)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world()[1] == 1:
            if self.training:
                self.num_batches_tracked.add_(1)
            return F.batch_norm(
                x,
                self.running_mean,
                self.running_var,
                self.weight,
                self.bias,
                self.training,
                self.momentum,
                self.eps,
            )
        self.num_batches_tracked.add_(1)
        return _GlobalBatchNormFn.apply(
            x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum
        )


def sync_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every batch-norm layer of ``model`` by :class:`GlobalBatchNorm` (in place), on
    every device and backend. State-dict keys do not change."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, GlobalBatchNorm(child))
        else:
            sync_batch_norm(child)
    return model


def gather_rows(local: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Every rank's ``local`` rows (rank r holds ``counts[r]``), in rank order; no gradient.

    Counts are known to every rank beforehand (they follow from the shared draw),
    so one padded ``all_gather`` suffices.
    """
    rank, size = world()
    if size == 1:
        return [local]
    padded = local.new_zeros((max(counts), *local.shape[1:]))
    padded[: counts[rank]] = local
    gathered = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(gathered, padded.contiguous())
    return [g[:c] for g, c in zip(gathered, counts)]


def total(count: int, device: torch.device) -> int:
    """The sum of ``count`` over every rank (each rank must call it)."""
    _, size = world()
    if size == 1:
        return count
    summed = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(summed)
    return int(summed.item())
