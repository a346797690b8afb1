"""Fake-quantization math with straight-through gradients.

`fake_quantize` is the one kernel every learned quantizer uses. It is an autograd Function
rather than a chain of STE tricks so that backward saves only the input (memory) and computes
the LSQ gradients for input, scale and zero point in one pass, exactly as PyTorch's
`_fake_quantize_learnable_*_affine` ops define them (tests compare the two).
"""

from __future__ import annotations

import torch
from torch import Tensor


def round_ste(x: Tensor) -> Tensor:
    """Round in the forward pass, identity in the backward pass (straight-through estimator)."""
    return x + (torch.round(x) - x).detach()


def grad_scale(x: Tensor, factor: float) -> Tensor:
    """Keep the value of `x` but multiply its gradient by `factor` (LSQ's gradient scale)."""
    return (x - x * factor).detach() + x * factor


def _reduce_to(grad: Tensor, shape: torch.Size) -> Tensor:
    """Sum a broadcast gradient back to the shape of the parameter it belongs to."""
    if grad.shape == shape:
        return grad
    dims = tuple(i for i, (g, s) in enumerate(zip(grad.shape, shape)) if s == 1 and g != 1)
    return grad.sum(dim=dims, keepdim=True).reshape(shape)


class _FakeQuantize(torch.autograd.Function):
    """x_hat = (clip(round(x/s + z), qmin, qmax) - z) * s with LSQ/LSQ+ gradients."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                factor: float) -> Tensor:
        ctx.save_for_backward(x, scale, zero_point)
        ctx.qmin, ctx.qmax, ctx.factor = qmin, qmax, factor
        q = torch.clamp(torch.round(x / scale + zero_point), qmin, qmax)
        return (q - zero_point) * scale

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, scale, zero_point = ctx.saved_tensors
        u = x / scale + zero_point
        q = torch.round(u)
        below, above = q < ctx.qmin, q > ctx.qmax
        inside = ~(below | above)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_scale_ = grad_zero = None
        if ctx.needs_input_grad[1]:
            # d x_hat / d s: (round(u) - u) inside the range, (q_bound - z) outside.
            ds = torch.where(inside, q - u, torch.where(below, ctx.qmin - zero_point,
                                                          ctx.qmax - zero_point))
            grad_scale_ = _reduce_to(grad_out * ds * ctx.factor, scale.shape)
        if ctx.needs_input_grad[2]:
            dz = torch.where(inside, torch.zeros_like(x), -scale.expand_as(x))
            grad_zero = _reduce_to(grad_out * dz * ctx.factor, zero_point.shape)
        return grad_x, grad_scale_, grad_zero, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  grad_factor: float = 1.0) -> Tensor:
    """Uniform affine fake quantization with learnable scale and zero point.

    `scale` and `zero_point` must broadcast against `x` (shape (1,) per tensor, or (C,1,1,1)
    per output channel of a conv weight). `zero_point` holds integer values; it is learned only
    by LSQ+ and then rounded by the caller. `grad_factor` scales the gradients of scale and
    zero point (LSQ's g = 1/sqrt(N * Qp)).
    """
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_factor)


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid of a `bits`-bit quantizer: [-2^(b-1), 2^(b-1)-1] or [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1
