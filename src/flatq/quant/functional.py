"""Fake-quantization math with straight-through gradients.

`fake_quantize` is the one kernel every learned quantizer uses. It is an autograd Function
rather than a chain of STE tricks so that forward and backward each take few passes over memory
and compute the LSQ gradients for input, scale and zero point as PyTorch's
`_fake_quantize_learnable_*_affine` ops define them (tests compare the two). One deliberate
difference: at exact ties with an odd zero point PyTorch's backward decides clipping by
round(x/s + z) while its forward rounds round(x/s) + z; here the gradient follows the forward.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the parameter it belongs to."""
    if grad.shape == shape:
        return grad
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    return grad.sum(dim=dims, keepdim=True).reshape(shape)


def _sum_of_products(a: Tensor, b: Tensor, shape: torch.Size) -> Tensor:
    """sum(a * b) per tensor or per channel (dim 0), as a dot product: no product tensor.

    A channels-last `a` (train.channels_last) is read in its memory order, dim 0 first, so
    flattening it is a view rather than a copy; `b` is read in the same order."""
    if a.dim() == 4 and not a.is_contiguous() and a.is_contiguous(
            memory_format=torch.channels_last):
        a, b = a.permute(0, 2, 3, 1), b.permute(0, 2, 3, 1)
    if shape.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    channels = a.shape[0]
    return torch.einsum("ck,ck->c", a.reshape(channels, -1), b.reshape(channels, -1)).reshape(shape)


def grid_integers(x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """round(x / s) + z, before clamping: a new float tensor of integer values.

    The order of ONNX QuantizeLinear and of PyTorch's quantize ops (round, then add the zero
    point); x is divided by s as ONNX does, where PyTorch's fake-quant kernels multiply by
    1/s and so round a few near-tie values the other way. `None` stands for z = 0."""
    integers = torch.div(x, scale).round_()
    return integers if zero_point is None else integers.add_(zero_point)


def _shift(zero_point: Tensor) -> Tensor | None:
    """The zero point, or None when it is 0 and reading it costs no device sync (CPU): most
    inputs after a ReLU have z = 0, and skipping + z and - z saves two of the six passes
    forward and one backward."""
    if zero_point.device.type == "cpu" and not zero_point.any():
        return None
    return zero_point


def _mask_outside(values: Tensor, integers: Tensor, qmin: int, qmax: int,
                  out: Tensor | None = None) -> Tensor:
    """`values` where qmin <= integers <= qmax, else 0, in one vectorized pass.

    hardtanh_backward keeps its first argument where lo < second < hi; the integers sit
    half a step inside those bounds. torch.where with a bool mask of mixed values runs
    several times slower on CPU (branch mispredictions), and writing the mask costs as
    much as recomputing the integers."""
    hardtanh_backward = torch.ops.aten.hardtanh_backward
    if out is None:
        return hardtanh_backward(values, integers, qmin - 0.5, qmax + 0.5)
    return hardtanh_backward.grad_input(values, integers, qmin - 0.5, qmax + 0.5, grad_input=out)


def _forward(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int,
             qmax: int) -> tuple[Tensor, bool]:
    """(x_hat, whether the zero point was applied), in place on one new tensor."""
    shift = _shift(zero_point)
    out = grid_integers(x, scale, shift).clamp_(qmin, qmax)
    if shift is not None:
        out.sub_(shift)
    return out.mul_(scale), shift is not None


def _backward(grad_out: Tensor, x: Tensor, out: Tensor, scale: Tensor, zero_point: Tensor,
              shifted: bool, qmin: int, qmax: int, factor: float,
              needs: tuple[bool, bool]) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Gradients of x, scale and zero point (`needs`: whether scale's and zero's are wanted)."""
    integers = grid_integers(x.detach(), scale.detach(), zero_point.detach() if shifted else None)
    grad_x = _mask_outside(grad_out, integers, qmin, qmax)
    grad_scale = grad_zero = None
    if needs[0]:
        x = x.to(out.dtype)
        if torch.is_grad_enabled():  # double backward (Hessian analysis): no out= ops
            ds_times_s = out - _mask_outside(x, integers, qmin, qmax)
        else:
            ds_times_s = torch.sub(out, _mask_outside(x, integers, qmin, qmax, out=integers),
                                   out=integers)
        grad_scale = _sum_of_products(ds_times_s, grad_out, scale.shape) / scale * factor
    if needs[1]:
        # d x_hat / d z: 0 inside the range, -s outside.
        grad_zero = (_reduce_to(grad_out - grad_x, zero_point.shape)
                     * scale.reshape(zero_point.shape) * -factor)
    return grad_x, grad_scale, grad_zero


class _FakeQuantize(torch.autograd.Function):
    """x_hat = (clamp(round(x/s) + z, qmin, qmax) - z) * s with LSQ/LSQ+ gradients.

    Written for few passes over memory (fake quantization costs as much as the convolutions
    on a CPU): forward works in place on its one new tensor and saves no mask; backward
    recomputes the grid integers, which is cheaper than writing and reading a bool mask, and
    uses d x_hat / d s = (x_hat - inside * x) / s, which is round(u) - u inside the range and
    q_bound - z outside it, reduced against the incoming gradient as a dot product.
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                factor: float) -> Tensor:
        out, shifted = _forward(x, scale, zero_point, qmin, qmax)
        ctx.save_for_backward(x, out, scale, zero_point)
        ctx.qmin, ctx.qmax, ctx.factor, ctx.shifted = qmin, qmax, factor, shifted
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, out, scale, zero_point = ctx.saved_tensors
        grad_x, grad_scale, grad_zero = _backward(
            grad_out, x, out, scale, zero_point, ctx.shifted, ctx.qmin, ctx.qmax, ctx.factor,
            (ctx.needs_input_grad[1], ctx.needs_input_grad[2]))
        return grad_x if ctx.needs_input_grad[0] else None, grad_scale, grad_zero, None, None, None


# The same kernel as opaque custom ops for torch.compile and torch.export: traced as one node
# each, they keep the LSQ backward (export would otherwise trace the forward's round and clamp
# and differentiate those), and the zero-point test inside runs on real data, not in a guard.
@torch.library.custom_op("flatq::fake_quantize", mutates_args=())
def _fake_quantize_op(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                      factor: float) -> Tensor:
    return _forward(x, scale, zero_point, qmin, qmax)[0]


@_fake_quantize_op.register_fake
def _(x, scale, zero_point, qmin, qmax, factor):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, scale.dtype))


@torch.library.custom_op("flatq::fake_quantize_backward", mutates_args=())
def _fake_quantize_backward_op(grad_out: Tensor, x: Tensor, out: Tensor, scale: Tensor,
                               zero_point: Tensor, qmin: int, qmax: int,
                               factor: float) -> tuple[Tensor, Tensor, Tensor]:
    shifted = _shift(zero_point) is not None
    return _backward(grad_out, x, out, scale, zero_point, shifted, qmin, qmax, factor,
                     (True, True))


@_fake_quantize_backward_op.register_fake
def _(grad_out, x, out, scale, zero_point, qmin, qmax, factor):
    return torch.empty_like(grad_out), torch.empty_like(scale), torch.empty_like(zero_point)


def _setup_context(ctx, inputs, output) -> None:
    x, scale, zero_point, ctx.qmin, ctx.qmax, ctx.factor = inputs
    ctx.save_for_backward(x, output, scale, zero_point)


def _op_backward(ctx, grad_out: Tensor):
    x, out, scale, zero_point = ctx.saved_tensors
    grads = _fake_quantize_backward_op(grad_out, x, out, scale, zero_point, ctx.qmin, ctx.qmax,
                                       ctx.factor)
    return *grads, None, None, None


_fake_quantize_op.register_autograd(_op_backward, setup_context=_setup_context)


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  grad_factor: float = 1.0) -> Tensor:
    """Uniform affine fake quantization with learnable scale and zero point.

    `scale` and `zero_point` must broadcast against `x`: one value per tensor (shape (1,) or
    (1,1,1,1)), or one per channel on dim 0 ((C,1,1,1) for a conv weight). `zero_point` holds
    integer values within [qmin, qmax]; it is learned only by LSQ+ and then rounded by the
    caller. `grad_factor` scales the gradients of scale and zero point (LSQ's
    g = 1/sqrt(N * Qp)).
    """
    if torch.compiler.is_compiling():
        return _fake_quantize_op(x, scale, zero_point, qmin, qmax, grad_factor)
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_factor)


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid of a `bits`-bit quantizer: [-2^(b-1), 2^(b-1)-1] or [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1
