"""The integer view of a quantized layer: what both exporters write.

A QuantConv2d / QuantLinear computes with `(q - z) * s`, where the weight integers
q = clamp(round(w / s) + z, qmin, qmax) are per output channel and the input integers per
tensor. This module reads those integers, scales and zero points off the layer's quantizers,
computed with the same float32 ops as the fake quantizer so that dequantizing them gives the
fake-quantized weight bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..quant import Quantizer, grid_integers


@dataclass(frozen=True)
class IntegerWeight:
    """A weight as integers `q` (float32 tensor of whole numbers, the weight's shape) with
    per-output-channel `scale` and integer `zero_point` (both shape (C,))."""

    q: Tensor
    scale: Tensor
    zero_point: Tensor
    bits: int
    signed: bool

    def dequantize(self) -> Tensor:
        """(q - z) * s, the same float32 expression as the fake quantizer's output."""
        shape = (-1,) + (1,) * (self.q.dim() - 1)
        return (self.q - self.zero_point.view(shape)) * self.scale.view(shape)


@dataclass(frozen=True)
class InputGrid:
    """A layer's per-tensor input quantizer: x_hat = (clamp(round(x/s) + z, lo, hi) - z) * s.

    `lo`/`hi` is the integer range the quantizer really uses; it is the full `bits`-bit grid
    except for signed PACT, which clips symmetrically to [-alpha, alpha] = [-qmax, qmax] steps.
    """

    scale: float
    zero_point: int
    bits: int
    signed: bool
    lo: int
    hi: int


EXPORTABLE_KINDS = ("conv1d", "conv2d", "linear")


def check_exportable(layers: list[tuple[str, nn.Module]]) -> None:
    """Refuse quantized layers no exporter writes (attention's fused in-projection)."""
    others = [name for name, layer in layers if layer.kind not in EXPORTABLE_KINDS]
    if others:
        raise ConfigError(f"no integer export for the quantized layers {others[:3]} (only "
                          f"{', '.join(EXPORTABLE_KINDS)}); quantize with --skip "
                          f"'{','.join(others[:3])}' to export the rest")


def integer_weight(layer: nn.Module) -> IntegerWeight:
    """The integers, scales and zero points of a quantized layer's weight.

    Runs the weight quantizer once (a dynamic min-max quantizer records the weight's range,
    as in any forward) and checks that the integers reproduce its output exactly.
    """
    quantizer: Quantizer = layer.weight_quantizer
    with torch.no_grad():
        expected = quantizer(layer.weight)
        scale, zero_point, lo, hi = quantizer.integer_grid()
        scale, zero_point = scale.float(), zero_point.float()
        shape = (-1,) + (1,) * (layer.weight.dim() - 1)
        # The fake quantizer's own rounding, so that the integers match it bit for bit.
        q = grid_integers(layer.weight, scale.view(shape), zero_point.view(shape)).clamp_(lo, hi)
    weight = IntegerWeight(q, scale.expand(q.shape[0]).clone(),
                           zero_point.expand(q.shape[0]).clone(), quantizer.bits,
                           quantizer.signed)
    if not torch.equal(weight.dequantize(), expected):
        raise ConfigError(f"the {type(quantizer).__name__} weight quantizer does not compute "
                          "(clamp(round(w/s) + z) - z) * s, so its integers cannot be exported")
    return weight


def input_grid(layer: nn.Module) -> InputGrid:
    """The per-tensor scale, zero point and integer range of a quantized layer's input."""
    quantizer: Quantizer = layer.input_quantizer
    if quantizer.per_channel:
        raise ConfigError("only per-tensor input quantizers can be exported")
    scale, zero_point, lo, hi = quantizer.integer_grid()
    return InputGrid(float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]),
                     quantizer.bits, quantizer.signed, lo, hi)
