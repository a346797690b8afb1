"""Deployment targets: the quantization points a runtime's integer graph executes.

`paper` quantizes what the papers quantize (each layer's input and weight). `onnxruntime` also
models what onnxruntime's integer kernels compute, so that QAT trains with that arithmetic:

- weights symmetric per output channel on [-qmax, qmax] (QLinearConv takes one weight zero
  point per tensor, 0 here; the narrow range lets a negative BatchNorm scale flip the sign of
  a channel's integers when the export folds it);
- an 8-bit output point after every quantized convolution, after its BatchNorm when one follows
  it: QLinearConv requantizes its int32 sums, with the BatchNorm folded into the per-channel
  weight scales and the bias, to an 8-bit tensor there;
- biases rounded to the int32 grid the runtime adds them on (step: input step x weight
  step); a conv's bias folded with its BatchNorm's in eval mode (in training the BatchNorm
  uses batch statistics, and the rounding, far below the output step, is left out).

The BatchNorm that belongs to a conv is its next sibling module (the conv-bn pairs of
torchvision's and flatq's models); it is swapped for `QuantBatchNorm2d`, the same BatchNorm
(same parameters, statistics and state_dict names) followed by the output quantizer. A conv
without one applies the output quantizer to its own output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .layers import quant_layers, quantize_output, round_to_step
from .quantizers import Quantizer

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

    output_quantizer: Quantizer

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
        layer.output_quantizer = output_quantizer
        layer.__dict__["conv"] = conv
        return layer.train(bn.training)

    def forward(self, x: Tensor) -> Tensor:
        y = super().forward(x)
        if not self.training:
            folded = fold_batchnorm(self.conv, self)
            rounding = round_to_step(folded.bias, folded.bias_step) - folded.bias
            y = y + rounding.view(1, -1, 1, 1)
        return quantize_output(self.output_quantizer, y)


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
            layer.output_quantizer = make_quantizer()
            layer.quantize_bias = True
        else:
            bn = model.get_submodule(bn_name)
            model.set_submodule(bn_name, QuantBatchNorm2d.from_float(bn, layer,
                                                                     make_quantizer()))


def output_point(model: nn.Module, name: str) -> tuple[str | None, Quantizer | None]:
    """(name of the folded BatchNorm or None, the output quantizer or None) of layer `name`."""
    layer = model.get_submodule(name)
    if getattr(layer, "output_quantizer", None) is not None:
        return None, layer.output_quantizer
    bn_name = batchnorm_after(model, name) if layer.kind == "conv2d" else None
    if bn_name is not None and isinstance(model.get_submodule(bn_name), QuantBatchNorm2d):
        return bn_name, model.get_submodule(bn_name).output_quantizer
    return None, None


def has_output_points(model: nn.Module) -> bool:
    """Whether `model` was quantized for the onnxruntime target."""
    return any(isinstance(m, QuantBatchNorm2d) or getattr(m, "output_quantizer", None)
               is not None for m in model.modules())
