"""Deployment targets: the quantization points a runtime's integer graph executes.

`paper` quantizes what the papers quantize (each layer's input and weight). `onnxruntime` also
models what onnxruntime's integer kernels compute, so that QAT trains with that arithmetic:

- weights symmetric per output channel on [-qmax, qmax] (QLinearConv takes one weight zero
  point per tensor, 0 here; the narrow range lets a negative BatchNorm scale flip the sign of
  a channel's integers when the export folds it);
- an 8-bit output point after every quantized convolution, after its BatchNorm when one follows
  it: QLinearConv requantizes its int32 sums, with the BatchNorm folded into the per-channel
  weight scales and the bias, to an 8-bit tensor there. Calibration switches a point off where
  one quantized layer alone reads the tensor (`output_point_dataflow`): that layer's input
  quantizer is then the requantization point;
- biases rounded to the int32 grid the runtime adds them on (step: input step x weight
  step); a conv's bias folded with its BatchNorm's in eval mode (in training the BatchNorm
  uses batch statistics, and the rounding, far below the output step, is left out).

The BatchNorm that belongs to a conv is its next sibling module (the conv-bn pairs of
torchvision's and flatq's models); it is swapped for `QuantBatchNorm2d`, the same BatchNorm
(same parameters, statistics and state_dict names) followed by the output quantizer. A conv
without one applies the output quantizer to its own output.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from .layers import OutputPoint, is_quant_layer, quant_layers, round_to_step
from .quantizers import Quantizer
from .shared_grid import ADDS, Read, output_points, shared_readers, tie

TARGETS = ("paper", "onnxruntime")
OUTPUT_BITS = 8  # QLinearConv's output type


@dataclass(frozen=True)
class FoldedConv:
    """A conv with its BatchNorm (eval mode) folded in, per output channel: the weight scale
    |k| s (s where k = 0), the sign of k (-1 flips a channel's integers, 0 zeroes them), the bias
    k b + beta - k mean and the step of its int32 form, input step x folded weight scale."""

    scale: Tensor
    sign: Tensor
    bias: Tensor
    bias_step: Tensor


def fold_batchnorm(conv: nn.Module, bn: nn.BatchNorm2d) -> FoldedConv:
    """Fold `bn` (running statistics) into the quantized conv `conv`: the export's arithmetic,
    also used by QuantBatchNorm2d to round the bias as the runtime does."""
    k = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias.detach() - bn.running_mean * k
    weight_scale = conv.weight_quantizer.scale_and_zero_point()[0].reshape(-1)
    scale = torch.where(k == 0, weight_scale, weight_scale * k.abs())
    bias = shift if conv.bias is None else conv.bias.detach() * k + shift
    input_step = conv.input_quantizer.scale_and_zero_point()[0].reshape(-1)[:1]
    return FoldedConv(scale, torch.sign(k), bias, input_step * scale)


class QuantBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d followed by an output quantizer (the requantization point of the folded
    conv before it). Trains like the BatchNorm it replaces; in eval mode its bias, folded with
    the conv's, is rounded to the int32 grid the runtime adds it on."""

    output_point: OutputPoint

    @classmethod
    def from_float(cls, bn: nn.BatchNorm2d, conv: nn.Module,
                   output_quantizer: Quantizer) -> "QuantBatchNorm2d":
        """The same BatchNorm (its parameters and buffers, not copies) with a quantized output;
        `conv` is the quantized conv it follows (referenced, not registered as a child)."""
        layer = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                    device=bn.weight.device if bn.affine else None)
        for name, value in list(bn.named_parameters(recurse=False)) + list(
                bn.named_buffers(recurse=False)):
            setattr(layer, name, value)
        layer.output_point = OutputPoint(output_quantizer)
        layer.__dict__["conv"] = conv
        return layer.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if not self.training:
            folded = fold_batchnorm(self.conv, self)
            rounding = round_to_step(folded.bias, folded.bias_step) - folded.bias
            y = y + rounding.view(1, -1, 1, 1)
        return self.output_point(y)


def batchnorm_after(model: nn.Module, name: str) -> str | None:
    """The BatchNorm2d that follows the conv `name` (its next sibling, with as many features
    as the conv has output channels), or None."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    children = list(parent.named_children())
    index = [n for n, _ in children].index(child)
    if index + 1 == len(children):
        return None
    sibling, module = children[index + 1]
    conv = children[index][1]
    if (isinstance(module, nn.BatchNorm2d) and conv.kind == "conv2d"
            and module.num_features == conv.out_channels):
        return f"{parent_name}.{sibling}" if parent_name else sibling
    return None


def add_output_points(model: nn.Module, make_quantizer: Callable[[], Quantizer]) -> None:
    """Give every quantized conv of `model` its output point (in place), `make_quantizer()`
    building each point's quantizer."""
    for name, layer in quant_layers(model):
        if not layer.kind.startswith("conv"):
            layer.quantize_bias = True  # QGemm / MatMulIntegerToFloat: int32 bias, float out
            continue
        bn_name = batchnorm_after(model, name)
        if bn_name is None:
            layer.output_point = OutputPoint(make_quantizer())
            layer.quantize_bias = True
        else:
            bn = model.get_submodule(bn_name)
            model.set_submodule(bn_name, QuantBatchNorm2d.from_float(bn, layer,
                                                                     make_quantizer()))


def output_point(model: nn.Module, name: str) -> tuple[str | None, Quantizer | None]:
    """(name of the folded BatchNorm or None, the active output quantizer or None) of the
    quantized layer `name`."""
    layer = model.get_submodule(name)
    bn_name = batchnorm_after(model, name) if layer.kind == "conv2d" else None
    if bn_name is not None and not isinstance(model.get_submodule(bn_name), QuantBatchNorm2d):
        bn_name = None
    point = model.get_submodule(bn_name).output_point if bn_name else layer.output_point
    return bn_name, point.quantizer if point is not None and point.on else None


def has_output_points(model: nn.Module) -> bool:
    """Whether `model` was quantized for the onnxruntime target."""
    return any(isinstance(m, OutputPoint) for m in model.modules())


# Activations a tensor passes through on its way to the next quantized layer: the runtime
# applies them on the integers after the requantization (Relu, Clip), so they keep the tensor a
# quantized layer's input.
PASS_THROUGH = (nn.ReLU, nn.ReLU6)
# Tensor queries that do not read the values.
_QUERIES = {"size", "dim", "shape", "__get__", "numel", "stride", "is_contiguous", "device",
            "dtype", "requires_grad", "__len__"}


_IN_PLACE_DUNDER = re.compile(r"__i(add|sub|mul|truediv|floordiv|mod|pow|matmul|and|or|xor|"
                              r"lshift|rshift)__")


def _in_place(name: str) -> bool:
    """Whether the torch function `name` writes its first argument (add_, __iadd__)."""
    return bool(_IN_PLACE_DUNDER.fullmatch(name)) or (name.endswith("_")
                                                      and not name.startswith("__"))


class _Readers(TorchFunctionMode):
    """Who reads the tensors that output points produce, during one forward pass: quantized
    layers (their input quantizers requantize it), adds, MaxPool modules (followed to their
    own readers) or anything else (float ops), each read with what it went through (a ReLU
    or ReLU6 module)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        # id(tensor) -> (the point that produced it, what it went through since)
        self.roots: dict[int, tuple[OutputPoint, str]] = {}
        self.kept: list[Tensor] = []  # keeps those ids alive during the pass
        self.reads: dict[int, list[Read]] = {}  # id(point) -> its reads
        self.sources: dict[int, set[int | None]] = {}  # id(layer) -> id(point) it read, or None
        self.inside = 0  # depth inside quantized layers, pass-through activations and pools
        self.handles = []
        for module in model.modules():
            if isinstance(module, OutputPoint):
                self.handles.append(module.register_forward_hook(self._produced))
            elif is_quant_layer(module) or isinstance(module, PASS_THROUGH + (nn.MaxPool2d,)):
                self.handles.append(module.register_forward_pre_hook(self._enter))
                self.handles.append(module.register_forward_hook(self._leave))

    def _track(self, tensor: Tensor, point: OutputPoint, via: str) -> None:
        self.roots[id(tensor)] = (point, via)
        self.kept.append(tensor)

    def _read(self, point: OutputPoint, read: Read) -> None:
        self.reads.setdefault(id(point), []).append(read)

    def _produced(self, point: OutputPoint, inputs, output: Tensor) -> None:
        self._track(output, point, "")

    def _enter(self, module: nn.Module, inputs) -> None:
        root = self.roots.get(id(inputs[0])) if inputs and not self.inside else None
        if is_quant_layer(module) and not self.inside:
            self.sources.setdefault(id(module), set()).add(id(root[0]) if root else None)
            if root is not None:
                self._read(root[0], Read("layer", root[1], module))
        elif isinstance(module, nn.MaxPool2d) and root is not None:
            self._read(root[0], Read("pool", root[1]))
        self.inside += 1

    def _leave(self, module: nn.Module, inputs, output) -> None:
        self.inside -= 1
        root = self.roots.get(id(inputs[0])) if inputs and not self.inside else None
        if root is None or is_quant_layer(module):
            return
        point, via = root
        if isinstance(module, nn.ReLU6) or via == "relu6":
            via = "relu6"
        elif isinstance(module, nn.ReLU):
            via = "relu"
        self._track(output, point, via)  # in place: the same id, now read after the ReLU

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if not self.inside and name not in _QUERIES:
            for value in list(args) + list(kwargs.values()):
                for tensor in value if isinstance(value, (list, tuple)) else (value,):
                    root = self.roots.get(id(tensor)) if isinstance(tensor, Tensor) else None
                    if root is not None:
                        self._read(root[0], Read("add" if name in ADDS else "other", root[1]))
        if not self.inside and args and isinstance(args[0], Tensor) and _in_place(name):
            # `out += identity`: the tensor no longer holds the point's values; who reads it
            # now reads the op's result, not the point's
            self.roots.pop(id(args[0]), None)
        return func(*args, **kwargs)

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@contextmanager
def output_point_dataflow(model: nn.Module) -> Iterator[None]:
    """Around one forward pass (calibration's first batch): switch off the output points whose
    tensor one quantized layer reads and nothing else, directly or through a ReLU/ReLU6 module.
    The runtime then requantizes the conv's sum straight to that layer's input grid (its input
    quantizer), as QLinearConv does, with no second rounding in between. (Two readers need
    two grids, hence a point of their own to requantize from.) Where a point stays on, its
    readers share its grid when they can (flatq.quant.shared_grid)."""
    points = output_points(model)
    if not points:
        yield
        return
    readers = _Readers(model)
    try:
        with readers:
            yield
    finally:
        readers.close()
    only_reader = {layer for layer, sources in readers.sources.items()
                   if len(sources) == 1 and None not in sources}
    for index, point in enumerate(points):
        reads = readers.reads.get(id(point), [])
        if len(reads) == 1 and reads[0].kind == "layer":
            point.set_active(False)
            continue
        shared = shared_readers(reads, only_reader) if point.on else None
        if shared is not None:
            tie(point, index, *shared)
