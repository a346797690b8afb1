"""Channel-wise Standardization Distillation (FPQ paper, Sec. 3.3).

Each captured layer output is standardized per channel over every other axis ((batch, H, W)
for a conv map, every leading axis, tokens included, for a Linear output of shape (..., C));
the student's and the teacher's standardized maps are compared by squared error, averaged
over elements within a layer (the paper writes a plain sum, which at batch 256 is thousands
of times larger than the cross-entropy) and summed over layers.

Neither standardized map is ever materialized (`_StandardizedSquaredError`): the loss needs
only per-channel sums of the two outputs, of their squares and of their product, and its
gradient is one elementwise expression of the two. The direct form (batch norm of both maps,
MSE, and their backward passes) makes about a dozen full-size passes per layer; at the
paper's batch of 256 these stream from memory and were most of CSD's cost.

The sums are taken of shifted outputs, z - K with K per channel near the channel's mean (the
mean of the first slice along the leading axis): the closed form E[z^2] - E[z]^2 of the
unshifted output loses about log10(mu^2 / var) of float32's seven digits, and gives a
constant channel a spurious variance; of the shifted output it is exact to rounding. FPQ
shifts each output in its capture hook (`channel_rows`), where the shifted copy also keeps
the output as the layer produced it and its sums are taken while it is fresh in cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor


class ChannelRows(NamedTuple):
    """A layer output made ready for CSD (`channel_rows`): the shifted (A, C, B) rows and
    their per-channel sum and sum of squares, each shaped (1, C, 1)."""
    rows: Tensor
    total: Tensor
    squares: Tensor


def _compute_dtype(z: Tensor) -> torch.dtype:
    """Half and bfloat16 features (autocast) in float32; float32 and float64 as they are."""
    return z.dtype if z.dtype in (torch.float32, torch.float64) else torch.float32


def channel_rows(z: Tensor, channel_dim: int = 1) -> ChannelRows:
    """z made ready for CSD: a new (A, C, B) tensor, the axes before `channel_dim` folded into A
    and those after into B, each channel shifted by K (see the module docstring) and in float32
    or float64; with its per-channel sums.

    Being a new tensor, it keeps the layer output as the layer produced it even where an
    in-place op (a ReLU) follows. Per-channel reductions of it run along contiguous rows,
    several times faster on CPU than reducing NCHW over dims (0, 2, 3), and about three times
    faster right after the shift than once other layers have run. A channels-last map
    (train.channels_last) is first copied into that row order: its rows would otherwise
    stride over the channels, and reductions along them run about ten times slower."""
    dim = channel_dim % z.dim()
    rows = z.reshape(math.prod(z.shape[:dim]), z.shape[dim],
                     math.prod(z.shape[dim + 1:])).contiguous()
    shift = rows[0].detach().mean(-1, dtype=_compute_dtype(z))
    rows = torch.sub(rows, shift.view(1, -1, 1))
    with torch.no_grad():
        return ChannelRows(rows, _channel_sum(rows), _channel_square_sum(rows))


def _channel_sum(x: Tensor) -> Tensor:
    """Per-channel sum of an (A, C, B) tensor, shaped (1, C, 1); with B = 1 (a Linear output)
    straight down the columns, without a row pass that would copy x."""
    rows = x[:, :, 0] if x.shape[2] == 1 else x.sum(-1)
    return rows.sum(0).view(1, -1, 1)


def _channel_square_sum(x: Tensor) -> Tensor:
    """Per-channel sum of squares of an (A, C, B) tensor, without writing x * x."""
    if x.shape[2] == 1:
        return torch.linalg.vector_norm(x[:, :, 0], 2, dim=0).square_().view(1, -1, 1)
    return torch.linalg.vector_norm(x, 2, dim=-1).square_().sum(0).view(1, -1, 1)


def _variance(x: ChannelRows) -> Tensor:
    """Per-channel variance (biased), E[x^2] - E[x]^2: exact to rounding, as the shift leaves
    E[x] within a few deviations of zero."""
    count = x.rows.shape[0] * x.rows.shape[2]
    return (x.squares / count - (x.total / count).square()).clamp_(min=0)


def _channel_terms(x: ChannelRows, y: ChannelRows, eps: float) -> tuple[Tensor, Tensor, Tensor,
                                                                        Tensor]:
    """Per-channel squared error (before the clamp) of student rows x and teacher rows y, and
    the r_z, r_t and dot its gradient needs."""
    count = x.rows.shape[0] * x.rows.shape[2]
    var_z, var_t = _variance(x), _variance(y)
    r_z, r_t = (var_z + eps).rsqrt(), (var_t + eps).rsqrt()
    dot = r_t * (_channel_sum(x.rows * y.rows) - x.total * y.total / count)
    per_channel = count * (var_z * r_z.square() + var_t * r_t.square()) - 2 * r_z * dot
    return per_channel, r_z, r_t, dot


def csd_channel_errors(x: ChannelRows, y: ChannelRows, eps: float = 1e-5) -> Tensor:
    """Each channel's sum of squared standardized differences, shaped (1, C, 1), as computed
    before the clamp at 0 (rounding can leave an identical pair's slightly negative)."""
    return _channel_terms(x, y, eps)[0]


class _StandardizedSquaredError(torch.autograd.Function):
    """mean((standardize(z) - standardize(t))^2) of (A, C, B) rows, per channel over A and B,
    gradient to the student's rows only.

    Takes x = z - K_z and y = t - K_t with their sums (`ChannelRows`). Per channel: count D,
    sums S_x, S_y, variances v_z, v_t, r_z = (v_z + eps)^-1/2, r_t likewise, and
    dot = sum(z * standardize(t)) = r_t (sum(x y) - S_x S_y / D); the squared error is
    D v_z r_z^2 + D v_t r_t^2 - 2 r_z dot, clamped at 0 (rounding can take an identical pair's
    below); its gradient with respect to z is
    (eps r_z^4 + dot r_z^3 / D)(x - S_x / D) - r_z r_t (y - S_y / D), times 2 / numel, and
    zero for a clamped channel (as for torch.clamp).
    """

    @staticmethod
    def forward(ctx, x: Tensor, x_total: Tensor, x_squares: Tensor, y: Tensor,
                y_total: Tensor, y_squares: Tensor, eps: float) -> Tensor:
        student, teacher = ChannelRows(x, x_total, x_squares), ChannelRows(y, y_total, y_squares)
        per_channel, r_z, r_t, dot = _channel_terms(student, teacher, eps)
        kept = per_channel >= 0
        loss = per_channel.clamp_(min=0).sum() / x.numel()
        ctx.save_for_backward(x, y, x_total, y_total, r_z, r_t, dot, kept)
        ctx.eps, ctx.count = eps, x.shape[0] * x.shape[2]
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        x, y, sum_x, sum_y, r_z, r_t, dot, kept = ctx.saved_tensors
        scale = kept * (2 * grad_loss / x.numel())
        slope = scale * (ctx.eps * r_z.pow(4) + dot * r_z.pow(3) / ctx.count)
        teacher_slope = scale * r_z * r_t
        constant = (teacher_slope * sum_y - slope * sum_x) / ctx.count
        # x * slope first: a broadcast product runs vectorized, addcmul with a broadcast
        # first operand does not (about 1.5x slower on CPU).
        grad = torch.mul(x, slope).add_(constant)
        return grad.addcmul_(y, -teacher_slope), None, None, None, None, None, None


def _check_layer_counts(*counts: int) -> None:
    if not counts[0] or len(set(counts)) > 1:
        raise ValueError(f"CSD needs matching non-empty layer lists, got {counts} (student, "
                         "teacher[, channel axes])")


def csd_loss_from_rows(student: Sequence[ChannelRows], teacher: Sequence[ChannelRows],
                       eps: float = 1e-5) -> Tensor:
    """`csd_loss` of outputs already passed through `channel_rows` (as FPQ's capture hooks do)."""
    _check_layer_counts(len(student), len(teacher))
    total = 0.0
    for xs, xt in zip(student, teacher):
        if xs.rows.shape != xt.rows.shape:
            raise ValueError(f"CSD layer shapes differ: student {tuple(xs.rows.shape)}, "
                             f"teacher {tuple(xt.rows.shape)} (as channel rows)")
        xt = ChannelRows(*(part.detach().to(xs.rows.dtype) for part in xt))
        total = total + _StandardizedSquaredError.apply(*xs, *xt, eps)
    return total


def csd_loss(student: Sequence[Tensor], teacher: Sequence[Tensor], eps: float = 1e-5,
             channel_dims: Sequence[int] | None = None) -> Tensor:
    """Sum over layers of the mean squared difference of channel-standardized outputs.

    `channel_dims` gives each layer's channel axis: 1 (the default) for conv maps (N, C, ...),
    -1 for Linear outputs (..., C). The gradient reaches the student's tensors only; the
    teacher's are read, never written."""
    dims = [1] * len(student) if channel_dims is None else list(channel_dims)
    _check_layer_counts(len(student), len(teacher), len(dims))
    return csd_loss_from_rows([channel_rows(z, d) for z, d in zip(student, dims)],
                              [channel_rows(t.detach(), d) for t, d in zip(teacher, dims)], eps)
