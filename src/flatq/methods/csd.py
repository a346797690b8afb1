"""Channel-wise Standardization Distillation (FPQ paper, Sec. 3.3).

Each captured layer output is standardized per channel over (batch, H, W); the student's
and the teacher's standardized maps are compared by squared error, averaged over elements
within a layer (the paper writes a plain sum, which at batch 256 is thousands of times larger
than the cross-entropy) and summed over layers.

Neither standardized map is ever materialized (`_StandardizedSquaredError`): the loss needs
only per-channel sums of the two outputs, of their squares and of their product, and its
gradient is one elementwise expression of the two (two ops). The direct form (batch norm of
both maps, MSE, and their backward passes) makes about a dozen full-size passes per layer; at
the paper's batch of 256 these stream from memory and were most of CSD's cost.
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
    """Per-channel sum of a * b, as row sums of the product: with freed memory retained
    (flatq.train.host_memory) the product tensor costs little, and this runs about twice as
    fast as a batched row dot product (`bmm` with 1 x L by L x 1 blocks) on CPU."""
    return _broadcast(_rows(a * b).sum(-1).sum(0), a)


def _broadcast(per_channel: Tensor, z: Tensor) -> Tensor:
    return per_channel.view((1, -1) + (1,) * (z.dim() - 2))


def _channel_moments(z: Tensor, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per-channel sum, variance (biased) and r = (var + eps)^-1/2, from one pass each of sum
    and sum of squares. The variance E[z^2] - mu^2 errs by about 1e-7 mu^2 / var relative in
    float32; in CSD that only rescales a channel, negligible for conv outputs (mu^2 / var
    stays below 100 in flatq's trained models)."""
    count = z.numel() // z.shape[1]
    total = _channel_sum(z)
    var = (_channel_square_sum(z) / count - (total / count).square()).clamp_(min=0)
    return total, var, (var + eps).rsqrt()


class _StandardizedSquaredError(torch.autograd.Function):
    """mean((standardize(z) - standardize(t))^2), gradient to the student's z only.

    Per channel, with count D, sums S_z, S_t, variances v_z, v_t, r_z = (v_z + eps)^-1/2,
    r_t likewise, and dot = sum(z * standardize(t)) = r_t (sum(z * t) - S_z S_t / D), the
    squared error is D v_z r_z^2 + D v_t r_t^2 - 2 r_z dot; its gradient with respect to z is
    (eps r_z^4 + dot r_z^3 / D)(z - S_z / D) - r_z r_t (t - S_t / D), times 2 / numel.
    """

    @staticmethod
    def forward(ctx, z: Tensor, t: Tensor, eps: float) -> Tensor:
        count = z.numel() // z.shape[1]
        sum_z, var_z, r_z = _channel_moments(z, eps)
        sum_t, var_t, r_t = _channel_moments(t, eps)
        dot = r_t * (_channel_dot(z, t) - sum_z * sum_t / count)
        per_channel = count * (var_z * r_z.square() + var_t * r_t.square()) - 2 * r_z * dot
        loss = per_channel.clamp_(min=0).sum() / z.numel()
        ctx.save_for_backward(z, t, sum_z, sum_t, r_z, r_t, dot)
        ctx.eps, ctx.count = eps, count
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        z, t, sum_z, sum_t, r_z, r_t, dot = ctx.saved_tensors
        scale = 2 * grad_loss / z.numel()
        slope = scale * (ctx.eps * r_z.pow(4) + dot * r_z.pow(3) / ctx.count)
        teacher_slope = scale * r_z * r_t
        constant = (teacher_slope * sum_t - slope * sum_z) / ctx.count
        # z * slope first: a broadcast product runs vectorized, addcmul with a broadcast
        # first operand does not (about 1.5x slower on CPU).
        grad = torch.mul(z, slope).add_(constant)
        return grad.addcmul_(t, -teacher_slope), None, None


def csd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor],
             eps: float = 1e-5) -> Tensor:
    """Sum over layers of the mean squared difference of channel-standardized outputs.

    The gradient reaches the student's tensors only; the teacher's are read, never written."""
    if len(student) != len(teacher) or not student:
        raise ValueError(f"CSD needs matching non-empty layer lists, got {len(student)} and "
                         f"{len(teacher)}")
    total = 0.0
    for zs, zt in zip(student, teacher):
        if zs.shape != zt.shape:
            raise ValueError(f"CSD layer shapes differ: student {tuple(zs.shape)}, teacher "
                             f"{tuple(zt.shape)}")
        zs = _compute_dtype(zs)
        total = total + _StandardizedSquaredError.apply(zs, zt.detach().to(zs.dtype), eps)
    return total
