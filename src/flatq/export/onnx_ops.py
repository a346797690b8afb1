"""Autograd Functions that trace to ONNX QuantizeLinear/DequantizeLinear nodes.

Their forwards mirror ONNX's order of operations (round(x / s) + z); they serve tracing only.
"""

from __future__ import annotations

import torch
from torch import Tensor


class QuantDequant(torch.autograd.Function):
    """x -> QuantizeLinear [-> Clip(lo, hi)] -> DequantizeLinear, per tensor."""

    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, zero_point: Tensor, lo: int, hi: int,
                clip: bool) -> Tensor:
        z = zero_point.float()
        return (torch.clamp(torch.round(x / scale) + z, lo, hi) - z) * scale

    @staticmethod
    def symbolic(g, x, scale, zero_point, lo: int, hi: int, clip: bool):
        q = g.op("QuantizeLinear", x, scale, zero_point)
        if clip:
            dtype = torch.int8 if lo < 0 else torch.uint8  # signed grids always reach below 0
            q = g.op("Clip", q, g.op("Constant", value_t=torch.tensor(lo, dtype=dtype)),
                     g.op("Constant", value_t=torch.tensor(hi, dtype=dtype)))
        return g.op("DequantizeLinear", q, scale, zero_point)


class DequantizeAxis0(torch.autograd.Function):
    """Integer tensor -> DequantizeLinear with per-axis-0 scale and zero point (weights,
    biases)."""

    @staticmethod
    def forward(ctx, q: Tensor, scale: Tensor, zero_point: Tensor) -> Tensor:
        shape = (-1,) + (1,) * (q.dim() - 1)
        return (q.float() - zero_point.float().view(shape)) * scale.view(shape)

    @staticmethod
    def symbolic(g, q, scale, zero_point):
        return g.op("DequantizeLinear", q, scale, zero_point, axis_i=0)
