"""Readers that share their output point's grid (onnxruntime target): no float requantization.

An output point stays on where two readers need it (flatq.quant.target): a residual block's
output is read by the next add and the next block's convs, the stem's by a conv and an add.
Each conv then requantized the 8-bit tensor to its own input grid, which onnxruntime runs in
float (DequantizeLinear -> QuantizeLinear) between its integer kernels. Where the readers are
quantized layers with one kind of input quantizer (type, bits, signedness) plus residual adds,
they share one grid with the point instead: the point quantizes with the first reader's input
quantizer (the same module: one step size), and the layers skip it, their input being on it
already. The runtime's QLinearConv / QLinearAdd then requantize straight to that grid and the
next kernels read those integers as they are. Reads through a ReLU (the stem) are allowed when
all reads are (the point then applies the ReLU first, `OutputPoint.relu_first`), and through a
MaxPool (monotone: the max of grid values is a grid value, torchvision's stem).

What changes in training: the point takes the readers' bit width (4 instead of 8 at W4A4), so
the add reads its shortcut at that width too, and a conv reads one rounding of the value
instead of two (8-bit, then its own grid); the shared step size is trained where the point
quantizes. The paper target has no output points and is untouched.

The ties are decided on calibration's first batch and kept in the state_dict: each layer's
`input_grid_point` (the index of the point among the model's output points, -1: its own grid)
and the point's `relu_first`. `restore_shared_grids`, a load_state_dict pre-hook of the
quantized model, ties a freshly built model the same way before the values load.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layers import OutputPoint, quant_layers

GRID_KEY = "input_grid_point"
# State entries that runs trained before shared grids lack; they load as "not shared".
LOADED_AS_DEFAULT = (f".{GRID_KEY}", ".relu_first")
# torch functions of a residual add (`a + b`, `out += identity`, torch.add).
ADDS = frozenset({"add", "__add__", "__radd__", "__iadd__", "add_"})


@dataclass(frozen=True)
class Read:
    """One read of an output point's tensor: by a quantized `layer`, an add, a MaxPool module
    (whose output its own readers read) or any other op; `via` is what it went through:
    "" (nothing), "relu" or "relu6"."""

    kind: str  # "layer", "add", "pool" or "other"
    via: str
    layer: nn.Module | None = None


def add_grid_links(model: nn.Module) -> None:
    """Give every quantized layer of `model` its `input_grid_point` (-1: own grid) and the
    model the pre-hook that restores ties from a state_dict (in place)."""
    for _, layer in quant_layers(model):
        layer.register_buffer(GRID_KEY, torch.tensor(-1, device=layer.weight.device))
    model.register_load_state_dict_pre_hook(restore_shared_grids)


def output_points(model: nn.Module) -> list[OutputPoint]:
    """The output points of `model`, in module order (their index is what layers store)."""
    return [m for m in model.modules() if isinstance(m, OutputPoint)]


def shared_readers(reads: list[Read], only_reader: set[int]) -> tuple[list[nn.Module], bool] | None:
    """(the layers that share the point's grid, whether the point applies a ReLU first), or
    None where they cannot: a read by anything but quantized layers, adds and MaxPools, through
    a ReLU6 (its bound 6 need not be on the grid), some reads through a ReLU and others not,
    layers with different input grids, or a layer that also reads other tensors (ids not in
    `only_reader`)."""
    layers = list({id(r.layer): r.layer for r in reads if r.kind == "layer"}.values())
    vias = {r.via for r in reads}
    if (not layers or any(r.kind not in ("layer", "add", "pool") for r in reads)
            or len(vias) != 1 or vias - {"", "relu"}
            or any(id(layer) not in only_reader or layer.input_shared for layer in layers)):
        return None
    kinds = {(type(q), q.bits, q.signed, q.per_channel)
             for q in (layer.input_quantizer for layer in layers)}
    return (layers, vias == {"relu"}) if len(kinds) == 1 else None


def tie(point: OutputPoint, index: int, layers: list[nn.Module], relu_first: bool) -> None:
    """Make `point` (the model's `index`-th) quantize with the first layer's input quantizer
    and every layer read its output as is (in place)."""
    shared = layers[0].input_quantizer
    point.quantizer = shared
    point.set_relu_first(relu_first)
    for layer in layers:
        layer.input_quantizer = shared
        getattr(layer, GRID_KEY).fill_(index)
        layer.input_shared = True


def restore_shared_grids(model: nn.Module, state_dict: dict, prefix: str, *args) -> None:
    """load_state_dict pre-hook: tie `model`'s points and layers as the state_dict records,
    before the values load (a tied point's quantizer has the readers' bit width)."""
    points = dict((n, m) for n, m in model.named_modules() if isinstance(m, OutputPoint))
    names = list(points)
    groups: dict[int, list[nn.Module]] = {}
    for name, layer in quant_layers(model):
        value = state_dict.get(f"{prefix}{name}.{GRID_KEY}")
        index = -1 if value is None else int(value)
        if index < 0 and layer.input_shared:
            raise ValueError(f"{prefix}{name} shares its input grid with an output point and "
                             "the state_dict's does not: load it into a model just built by "
                             "quantize_model")
        if index >= len(names):
            raise ValueError(f"{prefix}{name}.{GRID_KEY} = {index}: the model has only "
                             f"{len(names)} output points")
        if index >= 0:
            groups.setdefault(index, []).append(layer)
    for index, layers in groups.items():
        relu = state_dict.get(f"{prefix}{names[index]}.relu_first")
        tie(points[names[index]], index, layers, bool(relu is not None and relu))
