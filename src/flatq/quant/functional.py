"""Fake-quantization math with straight-through gradients.

`fake_quantize` is the one kernel every learned quantizer uses. It is an autograd Function
rather than a chain of STE tricks so that forward and backward each take few passes over memory
and compute the LSQ gradients for input, scale and zero point exactly as PyTorch's
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


def _sum_of_products(a: Tensor, b: Tensor, shape: torch.Size) -> Tensor:
    """sum(a * b) per tensor or per channel (dim 0), as a dot product: no product tensor."""
    if shape.numel() == 1:
        return torch.dot(a.reshape(-1), b.reshape(-1)).reshape(shape)
    channels = a.shape[0]
    return torch.einsum("ck,ck->c", a.reshape(channels, -1), b.reshape(channels, -1)).reshape(shape)


class _FakeQuantize(torch.autograd.Function):
    """x_hat = (clip(round(x/s + z), qmin, qmax) - z) * s with LSQ/LSQ+ gradients.

    Written for few passes over memory (fake quantization costs as much as the convolutions
    on a CPU): forward works in place on its one temporary and saves the in-range mask;
    backward uses d x_hat / d s = (x_hat - inside * x) / s, which is round(u) - u inside the
    range and q_bound - z outside it, reduced against the incoming gradient as a dot product.
    x is divided by s as ONNX QuantizeLinear and the integer export do (PyTorch's fused
    fake-quant kernels multiply by 1/s, which rounds a few near-tie values the other way).
    """

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                factor: float) -> Tensor:
        rounded = torch.addcdiv(zero_point, x, scale).round_()
        out = rounded.clamp(qmin, qmax)
        inside = out == rounded
        del rounded
        out.sub_(zero_point).mul_(scale)
        ctx.save_for_backward(x, out, inside, scale)
        ctx.factor, ctx.zero_shape = factor, zero_point.shape
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, out, inside, scale = ctx.saved_tensors
        grad_scale_ = grad_zero = None
        if ctx.needs_input_grad[1]:
            # where() rather than arithmetic with the bool mask, which would copy it to float.
            ds_times_s = torch.where(inside, x.to(out.dtype), 0.0)
            if torch.is_grad_enabled():  # double backward (Hessian analysis): no out= ops
                ds_times_s = out - ds_times_s
            else:
                torch.sub(out, ds_times_s, out=ds_times_s)
            grad_scale_ = _sum_of_products(ds_times_s, grad_out, scale.shape) / scale * ctx.factor
        if ctx.needs_input_grad[2]:
            # d x_hat / d z: 0 inside the range, -s outside.
            outside = _reduce_to(torch.where(inside, 0.0, grad_out), ctx.zero_shape)
            grad_zero = outside * scale.reshape(ctx.zero_shape) * -ctx.factor
        grad_x = torch.where(inside, grad_out, 0.0) if ctx.needs_input_grad[0] else None
        return grad_x, grad_scale_, grad_zero, None, None, None


def fake_quantize(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int,
                  grad_factor: float = 1.0) -> Tensor:
    """Uniform affine fake quantization with learnable scale and zero point.

    `scale` and `zero_point` must broadcast against `x`: one value per tensor (shape (1,) or
    (1,1,1,1)), or one per channel on dim 0 ((C,1,1,1) for a conv weight). `zero_point` holds
    integer values within [qmin, qmax]; it is learned only by LSQ+ and then rounded by the
    caller. `grad_factor` scales the gradients of scale and zero point (LSQ's
    g = 1/sqrt(N * Qp)).
    """
    return _FakeQuantize.apply(x, scale, zero_point, qmin, qmax, grad_factor)


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """The integer grid of a `bits`-bit quantizer: [-2^(b-1), 2^(b-1)-1] or [0, 2^b-1]."""
    if signed:
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1
