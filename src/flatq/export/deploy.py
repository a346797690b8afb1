"""The integer graph of a model quantized for the onnxruntime target (flatq.quant.target).

Each quantized conv `L` with BatchNorm `B` after it, and its output point, is written as

    x -> QuantizeLinear(s_x, z_x) [-> Clip] -> DequantizeLinear --------------------------+
    q' (int8, or INT4 + Cast) -> DequantizeLinear(s' = s |k|, 0, axis=0) ---------------> Conv
    round(b' / (s_x s')) (int32) -> DequantizeLinear(s_x s', 0, axis=0) ---------------> (bias)
    Conv -> QuantizeLinear(s_o, z_o) -> DequantizeLinear(s_o, z_o)       (B's output point)

which onnxruntime's QDQ fusion turns into one QLinearConv. BatchNorm in eval mode is
y = k (conv + b) + (beta - k mean) with k = gamma / sqrt(var + eps) per channel; folded, the
weight is (k s)(q) per channel: the integers q stay the trained ones and only the scale
changes. A negative k flips the channel's integers, q' = -q (on the symmetric grid
[-qmax, qmax] the target trains with, -q is on the grid too), with scale |k| s. A zero k
(gamma = 0) keeps q' = 0, and so does a channel whose folded bias would not fit int32 at step
s_x |k| s. Linear layers become Gemm/MatMul with DQ inputs and a float output
(QGemm / MatMulIntegerToFloat).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..quant import integer_range
from ..quant.layers import OutputPoint
from ..quant.target import fold_batchnorm, output_point
from .integer_view import InputGrid, input_grid, integer_weight, quantizer_grid
from .onnx_ops import DequantizeAxis0, QuantDequant

INT32_MAX = 2**31 - 1


def clip_needed(lo: int, hi: int, signed: bool) -> bool:
    """Whether an 8-bit QuantizeLinear needs a Clip to keep its integers in [lo, hi]."""
    return (lo, hi) != integer_range(8, signed)


class QuantPoint(nn.Module):
    """QuantizeLinear [-> Clip] -> DequantizeLinear with a per-tensor grid, stored in 8 bits."""

    def __init__(self, grid: InputGrid) -> None:
        super().__init__()
        dtype = torch.int8 if grid.signed else torch.uint8
        self.register_buffer("scale", torch.tensor(grid.scale, dtype=torch.float32))
        self.register_buffer("zero_point", torch.tensor(grid.zero_point, dtype=dtype))
        self.bits, self.lo, self.hi = grid.bits, grid.lo, grid.hi
        self.clip = clip_needed(grid.lo, grid.hi, grid.signed)

    def forward(self, x: Tensor) -> Tensor:
        return QuantDequant.apply(x, self.scale, self.zero_point, self.lo, self.hi, self.clip)


class DeployLayer(nn.Module):
    """Stand-in for a quantized conv/linear in the integer graph: BatchNorm folded into the
    per-channel weight scales and an int32 bias, input and output quantization points."""

    def __init__(self, name: str, layer: nn.Module, bn: nn.BatchNorm2d | None,
                 output_grid: InputGrid | None) -> None:
        super().__init__()
        weight, grid = integer_weight(layer), input_grid(layer)
        if not weight.signed or bool(weight.zero_point.any()):
            raise ConfigError(f"{name}: the onnxruntime export needs symmetric weights (zero "
                              "point 0); quantize with quant.target onnxruntime")
        shape = (-1,) + (1,) * (weight.q.dim() - 1)
        input_step = torch.tensor([grid.scale], dtype=torch.float32)
        q, scale = weight.q, weight.scale
        bias = layer.bias.detach() if layer.bias is not None else torch.zeros_like(scale)
        bias_scale = input_step * scale
        if bn is not None:
            folded = fold_batchnorm(layer, bn)
            q, scale = q * folded.sign.view(shape), folded.scale
            bias, bias_scale = folded.bias, folded.bias_step
        # A channel whose folded scale is so small that its bias leaves int32 (gamma near 0)
        # contributes under 2^-10 of its bias through the weights: it keeps the bias alone.
        tiny = (bias / bias_scale).abs() > INT32_MAX
        if bool(tiny.any()):
            q = torch.where(tiny.view(shape), torch.zeros_like(q), q)
            scale = torch.where(tiny, weight.scale, scale)
            bias_scale = input_step * scale
        self.bits = weight.bits
        self.register_buffer("weight_q", q.to(torch.int8))
        self.register_buffer("weight_scale", scale.float())
        self.register_buffer("weight_zero_point", torch.zeros_like(scale, dtype=torch.int8))
        bias_q = torch.round(bias / bias_scale)
        # An input step calibrated on an all-zero input (a dead layer) leaves no int32 step for
        # the bias: it is then added in float after the integer kernel.
        self.float_bias = bias if bool((bias_q.abs() > INT32_MAX).any()) else None
        if self.float_bias is not None:
            bias_q = torch.zeros_like(bias_q)
        self.register_buffer("bias_q", bias_q.to(torch.int32))
        self.register_buffer("bias_scale", bias_scale)
        self.register_buffer("bias_zero_point", torch.zeros_like(bias_q, dtype=torch.int32))
        self.input_grid = grid
        # A layer sharing its output point's grid (flatq.quant.shared_grid) reads the point's
        # DequantizeLinear as is: quantizing again on the same grid would change nothing.
        self.input_point = nn.Identity() if layer.input_shared else QuantPoint(grid)
        self.output_point = QuantPoint(output_grid) if output_grid is not None else nn.Identity()
        self.op = nn.functional.linear if layer.kind == "linear" else layer._conv_forward

    def forward(self, x: Tensor) -> Tensor:
        weight = DequantizeAxis0.apply(self.weight_q, self.weight_scale, self.weight_zero_point)
        if self.float_bias is None:
            bias = DequantizeAxis0.apply(self.bias_q, self.bias_scale, self.bias_zero_point)
            return self.output_point(self.op(self.input_point(x), weight, bias))
        y = self.op(self.input_point(x), weight, None)
        linear = self.op is nn.functional.linear
        return self.output_point(y + self.float_bias.view((-1,) if linear
                                                          else (-1,) + (1,) * (y.dim() - 2)))


def deploy_stand_ins(model: nn.Module, layers: list[tuple[str, nn.Module]]
                     ) -> dict[str, nn.Module]:
    """name -> stand-in for every module the integer graph replaces in `model`: each quantized
    layer becomes a DeployLayer, each folded BatchNorm an Identity and each output point of
    a residual block (flatq.quant.residual) a QuantPoint (an Identity when switched off)."""
    replaced: dict[str, nn.Module] = {}
    for name, layer in layers:
        bn_name, quantizer = output_point(model, name)
        bn = model.get_submodule(bn_name) if bn_name else None
        grid = quantizer_grid(quantizer) if quantizer is not None else None
        replaced[name] = DeployLayer(name, layer, bn, grid)
        if bn_name:
            replaced[bn_name] = nn.Identity()
    for name, module in model.named_modules():
        owner = name.rpartition(".")[0]
        if isinstance(module, OutputPoint) and owner not in replaced:
            replaced[name] = (QuantPoint(quantizer_grid(module.quantizer)) if module.on
                              else nn.Identity())
    return replaced
