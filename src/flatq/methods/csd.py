"""Channel-wise Standardization Distillation (FPQ paper, Sec. 3.3).

Each captured layer output is standardized per channel over (batch, H, W); the student's
and the teacher's standardized maps are compared by squared error, averaged over elements
within a layer (the paper writes a plain sum, which at batch 256 is thousands of times larger
than the cross-entropy) and summed over layers.

The student's side is computed in closed form (`_StandardizedSquaredError`): the loss needs only
per-channel sums of the student's output, so the standardized student map, the difference and
their backward passes (batch-norm backward plus MSE backward, about ten full-size passes per
layer) are never materialized; the backward pass is one elementwise expression (two ops). At the
paper's batch of 256 these passes stream from memory and were most of CSD's cost.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def _compute_dtype(z: Tensor) -> Tensor:
    """Half and bfloat16 features (autocast) in float32; float32 and float64 as they are."""
    return z if z.dtype in (torch.float32, torch.float64) else z.float()


def _rows(z: Tensor) -> Tensor:
    """z as (N, C, rest): per-channel reductions then run along contiguous memory (several
    times faster on CPU than reducing NCHW over dims (0, 2, 3))."""
    return z.reshape(z.shape[0], z.shape[1], -1)


def _channel_sum(z: Tensor) -> Tensor:
    """Per-channel sum over every other dim, shaped to broadcast against z."""
    return _broadcast(_rows(z).sum(-1).sum(0), z)


def _channel_square_sum(z: Tensor) -> Tensor:
    """Per-channel sum of squares, without writing z * z."""
    return _broadcast(torch.linalg.vector_norm(_rows(z), 2, dim=-1).square_().sum(0), z)


def _channel_dot(a: Tensor, b: Tensor) -> Tensor:
    """Per-channel sum of a * b as a batch of row dot products (bmm): no product tensor, whose
    fresh allocation costs more than the arithmetic at these sizes."""
    rows, length = a.shape[0] * a.shape[1], a[0, 0].numel()
    dots = torch.bmm(a.reshape(rows, 1, length), b.reshape(rows, length, 1))
    return _broadcast(dots.view(a.shape[0], a.shape[1]).sum(0), a)


def _broadcast(per_channel: Tensor, z: Tensor) -> Tensor:
    return per_channel.view((1, -1) + (1,) * (z.dim() - 2))


def _channel_moments(z: Tensor) -> tuple[int, Tensor, Tensor]:
    """Per-channel count, mean and (biased) variance from one pass each of sum and sum of
    squares. The variance E[z^2] - mu^2 errs by about 1e-6 mu^2 / var relative in float32;
    in CSD that only rescales a channel, negligible for conv outputs (mu^2 / var stays below
    100 in flatq's trained models)."""
    count = z.numel() // z.shape[1]
    mean = _channel_sum(z) / count
    var = (_channel_square_sum(z) / count - mean.square()).clamp_(min=0)
    return count, mean, var


def channel_standardize(z: Tensor, eps: float = 1e-5, in_place: bool = False) -> Tensor:
    """(z - mean) / sqrt(var + eps), statistics per channel (dim 1) over all other dims:
    the teacher's target of CSD, in one elementwise pass after the two reductions.
    `in_place` overwrites z (when it is float32/64) instead of allocating the result."""
    z = _compute_dtype(z)
    _, mean, var = _channel_moments(z)
    rstd = (var + eps).rsqrt_()
    if in_place:
        return z.mul_(rstd).sub_(mean * rstd)
    return torch.addcmul(-mean * rstd, z, rstd)


class _StandardizedSquaredError(torch.autograd.Function):
    """mean((standardize(z) - target)^2) for a target with zero mean per channel.

    With per-channel count D, mean mu, variance v and r = (v + eps)^-1/2 of z, and
    dot = sum(z * target), the loss is sum_c (D v r^2 + sum(target^2) - 2 r dot) / numel,
    and its gradient 2/numel * ((eps r^4 + dot r^3 / D) (z - mu) - r target).
    """

    @staticmethod
    def forward(ctx, z: Tensor, target: Tensor, eps: float) -> Tensor:
        count, mean, var = _channel_moments(z)
        rstd = (var + eps).rsqrt()
        dot = _channel_dot(z, target)
        per_channel = count * var * rstd.square() + _channel_square_sum(target) - 2 * rstd * dot
        loss = per_channel.clamp_(min=0).sum() / z.numel()
        ctx.save_for_backward(z, target, mean, rstd, dot)
        ctx.eps, ctx.count = eps, count
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        z, target, mean, rstd, dot = ctx.saved_tensors
        scale = 2 * grad_loss / z.numel()
        slope = scale * (ctx.eps * rstd.pow(4) + dot * rstd.pow(3) / ctx.count)
        grad = torch.addcmul(-slope * mean, z, slope)
        return grad.addcmul_(target, -scale * rstd), None, None


def csd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], eps: float = 1e-5,
             overwrite_teacher: bool = False) -> Tensor:
    """Sum over layers of the mean squared difference of channel-standardized outputs.

    `overwrite_teacher` standardizes the teacher's tensors in place: FPQ passes the outputs it
    captured from the frozen teacher, which nothing reads after its forward pass, and saves a
    full-size allocation per layer."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"CSD needs matching non-empty layer lists, got {len(student)} and "
                         f"{len(teacher)}")
    total = 0.0
    for zs, zt in zip(student, teacher):
        if zs.shape != zt.shape:
            raise ValueError(f"CSD layer shapes differ: student {tuple(zs.shape)}, teacher "
                             f"{tuple(zt.shape)}")
        with torch.no_grad():
            target = channel_standardize(zt.detach(), eps, in_place=overwrite_teacher)
        zs = _compute_dtype(zs)
        total = total + _StandardizedSquaredError.apply(zs, target.to(zs.dtype), eps)
    return total
