"""The integer view of a quantized model: what both exporters write.

A QuantConv2d / QuantLinear computes with `(q - z) * s`, where the weight integers
q = clamp(round(w / s) + z, qmin, qmax) are per output channel and the input integers per
tensor. This module reads those integers, scales and zero points off the layer's quantizers,
computed with the same float32 ops as the fake quantizer so that dequantizing them gives the
fake-quantized weight bit for bit, and the grids of the active output points (deployment
target onnxruntime). `GridQuantizer` goes the other way: a quantizer on a stored grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..quant import Quantizer, fake_quantize, grid_integers, quant_layers
from ..quant.layers import OutputPoint
from ..quant.observers import MinMaxObserver
from ..quant.residual import blocks_with_output_points
from ..quant.target import QuantBatchNorm2d


@dataclass(frozen=True)
class IntegerWeight:
    """A weight as integers `q` (float32 tensor of whole numbers, the weight's shape) with
    per-output-channel `scale` and integer `zero_point` (both shape (C,)), inside the integer
    range [lo, hi] its quantizer clamps to (the whole `bits`-bit grid for every weight
    quantizer flatq has; kept so that a narrow-range one would export without guessing)."""

    q: Tensor
    scale: Tensor
    zero_point: Tensor
    bits: int
    signed: bool
    lo: int
    hi: int

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
                           quantizer.signed, int(lo), int(hi))
    if not torch.equal(weight.dequantize(), expected):
        raise ConfigError(f"the {type(quantizer).__name__} weight quantizer does not compute "
                          "(clamp(round(w/s) + z) - z) * s, so its integers cannot be exported")
    return weight


def input_grid(layer: nn.Module) -> InputGrid:
    """The per-tensor scale, zero point and integer range of a quantized layer's input."""
    return quantizer_grid(layer.input_quantizer)


def quantizer_grid(quantizer: Quantizer) -> InputGrid:
    """The grid of a per-tensor quantizer (a layer's input or an output point)."""
    if quantizer.per_channel:
        raise ConfigError("only per-tensor input quantizers can be exported")
    scale, zero_point, lo, hi = quantizer.integer_grid()
    return InputGrid(float(scale.reshape(-1)[0]), int(zero_point.reshape(-1)[0]),
                     quantizer.bits, quantizer.signed, lo, hi)


POINT_SITES = ("conv", "batchnorm", "residual")


@dataclass(frozen=True)
class OutputPointGrid:
    """An active output point (flatq.quant.target, flatq.quant.residual) and where it sits.

    `site` "conv": on the output of the quantized conv `after` (no BatchNorm follows it);
    "batchnorm": on the output of the BatchNorm `after` that follows the quantized conv
    `layer` (the runtime folds the two); "residual": on what the block `after` returns (its
    residual add, after the block's final ReLU). `relu_first`: a ReLU before quantizing.
    `shared_by`: the quantized layers whose input quantizer is this very grid; they read the
    point's integers as they are, without quantizing their input again.
    """

    name: str
    site: str
    after: str
    layer: str | None
    grid: InputGrid
    relu_first: bool
    shared_by: tuple[str, ...]


def output_point_grids(model: nn.Module) -> list[OutputPointGrid]:
    """The active output points of `model` with their grids, in module order (none for the
    paper target)."""
    layers = quant_layers(model)
    layer_names = {id(layer): name for name, layer in layers}
    blocks = set(blocks_with_output_points(model))
    grids = []
    for name, point in model.named_modules():
        if not isinstance(point, OutputPoint) or not point.on:
            continue
        after = name.rpartition(".")[0]
        owner = model.get_submodule(after)
        if id(owner) in layer_names:
            site, layer = "conv", after
        elif isinstance(owner, QuantBatchNorm2d):
            site, layer = "batchnorm", layer_names[id(owner.conv)]
        elif after in blocks:
            site, layer = "residual", None
        else:
            raise ConfigError(f"output point {name} sits on a {type(owner).__name__}, where "
                              f"no exporter expects one ({', '.join(POINT_SITES)})")
        shared_by = tuple(n for n, reader in layers
                          if reader.input_shared and reader.input_quantizer is point.quantizer)
        grids.append(OutputPointGrid(name, site, after, layer, quantizer_grid(point.quantizer),
                                     point.relu, shared_by))
    return grids


class GridQuantizer(Quantizer):
    """A fixed grid read back from an export: (clamp(round(x / s) + z, lo, hi) - z) * s, the
    integer view every exportable quantizer computes, so that a model rebuilt from the file
    computes what the trained one did. Nothing to calibrate or learn."""

    learnable = False

    def __init__(self, scale: Tensor, zero_point: Tensor, bits: int, signed: bool, lo: int,
                 hi: int, per_channel: bool = False) -> None:
        super().__init__(bits, signed, per_channel, scale.numel())
        self.register_buffer("scale", scale.detach().float().reshape(-1).clone())
        self.register_buffer("zero_point", zero_point.detach().float().reshape(-1).clone())
        self.lo, self.hi = lo, hi
        self.initialized.fill_(True)
        self.calibrated = True

    @classmethod
    def for_input(cls, grid: InputGrid) -> "GridQuantizer":
        """A per-tensor quantizer on `grid` (a layer's input or an output point)."""
        return cls(torch.tensor([grid.scale]), torch.tensor([float(grid.zero_point)]),
                   grid.bits, grid.signed, grid.lo, grid.hi)

    @classmethod
    def for_weight(cls, weight: IntegerWeight) -> "GridQuantizer":
        """A per-channel quantizer on the grid of `weight`, clamping to its integer range (the
        stored integers lie inside it, so it maps (q - z) * s to itself)."""
        return cls(weight.scale, weight.zero_point, weight.bits, weight.signed, weight.lo,
                   weight.hi, per_channel=True)

    @property
    def qmin(self) -> int:
        return self.lo

    @property
    def qmax(self) -> int:
        return self.hi

    def init_from_observer(self, observer: MinMaxObserver) -> None:
        """Nothing to set: the grid is the stored one."""

    def quantize(self, x: Tensor) -> Tensor:
        shape = self._shape(x)
        return fake_quantize(x, self.scale.view(shape), self.zero_point.view(shape), self.lo,
                             self.hi)

    def scale_and_zero_point(self) -> tuple[Tensor, Tensor]:
        return self.scale, self.zero_point
