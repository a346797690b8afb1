"""Quantized drop-in layers: QuantConv1d, QuantConv2d and QuantLinear.

Each keeps its float weight (trained as usual), a weight quantizer and an input quantizer,
and an `input_perturbation` point (an nn.Identity) applied to the quantized input just before
the convolution. Methods attach forward hooks there (SFP noise, feature capture) instead of
subclassing the layer. The training forward always uses the quantized weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .quantizers import Quantizer


def round_to_step(x: Tensor, step: Tensor) -> Tensor:
    """x rounded to a multiple of step (the int32 bias grid)."""
    return torch.round(x / step) * step


class OutputPoint(nn.Module):
    """A deployment target's requantization point on a layer's output (flatq.quant.target).

    Switched off (`set_active(False)`, kept in the state_dict) where only quantized layers read
    the tensor: their input quantizers are then the runtime's requantization point. Where its
    readers share its grid (flatq.quant.shared_grid), `quantizer` is theirs and, when they all
    read the tensor through a ReLU, `relu_first` applies that ReLU before quantizing: the values
    they read are unchanged (a negative value quantizes to at most the zero point, 0 after the
    ReLU), but the grid is calibrated and trained on what they read. Under autograd the result is a copy: the fake quantizer keeps its output for the
    backward pass, and the activation after a conv (or its BatchNorm) is often an in-place ReLU.
    """

    def __init__(self, quantizer: Quantizer) -> None:
        super().__init__()
        self.quantizer = quantizer
        self.register_buffer("active", torch.tensor(True))
        self.register_buffer("relu_first", torch.tensor(False))
        self.on = True  # `active` as a Python bool: no device sync in forward
        self.relu = False  # `relu_first` as a Python bool

    def set_active(self, on: bool) -> None:
        self.active.fill_(on)
        self.on = on
        for parameter in self.quantizer.parameters():
            parameter.requires_grad_(on)  # an unused step size: no gradient, none for DDP

    def set_relu_first(self, on: bool) -> None:
        self.relu_first.fill_(on)
        self.relu = on

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # Runs trained before readers shared a point's grid have no `relu_first`: off.
        state_dict.setdefault(prefix + "relu_first", torch.tensor(False))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self.set_active(bool(self.active))
        self.relu = bool(self.relu_first)

    def forward(self, x: Tensor) -> Tensor:
        if not self.on:
            return x
        out = self.quantizer(torch.relu(x) if self.relu else x)
        return out.clone() if out.requires_grad else out


def bias_step(layer: nn.Module) -> Tensor:
    """Per output channel, the step of an int32 bias added to the integer sums of `layer`:
    input step x weight step (what QLinearConv / QGemm assume)."""
    input_step = layer.input_quantizer.scale_and_zero_point()[0].reshape(-1)[:1]
    return input_step * layer.weight_quantizer.scale_and_zero_point()[0].reshape(-1)


class _QuantLayer:
    """Shared wiring of the quantized layers; the op itself comes from the torch base class."""

    kind: str  # what the exporters call the op: conv1d, conv2d, linear, ...
    weight: nn.Parameter
    weight_quantizer: Quantizer
    input_quantizer: Quantizer
    input_perturbation: nn.Module
    output_point: "OutputPoint | None"

    # The input comes on the grid of `input_quantizer` already: the output point that produced
    # it quantizes with that very quantizer (flatq.quant.shared_grid), so it is not applied
    # again (a second rounding on the same grid would change nothing but cost a pass).
    input_shared = False

    def _attach(self, weight_quantizer: Quantizer, input_quantizer: Quantizer) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self.input_perturbation = nn.Identity()
        # The deployment target's requantization point on the output (flatq.quant.target).
        self.output_point = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if "input_grid_point" in self._buffers:  # runs from before shared grids: not shared
            state_dict.setdefault(prefix + "input_grid_point", torch.tensor(-1))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def quantized_input(self, x: Tensor) -> Tensor:
        return self.input_perturbation(x if self.input_shared else self.input_quantizer(x))

    def quantized_weight(self) -> Tensor:
        return self.weight_quantizer(self.weight)

    def weight_grid(self) -> tuple[Tensor, Tensor, int, int]:
        """The weight quantizer's integer grid (scale, zero point, lo, hi), scale and zero point
        detached and shaped to broadcast over the weight (per output channel or one value)."""
        scale, zero_point, lo, hi = self.weight_quantizer.integer_grid()
        shape = (-1,) + (1,) * (self.weight.dim() - 1) if self.weight_quantizer.per_channel else ()
        return scale.detach().reshape(shape), zero_point.detach().reshape(shape), lo, hi

    # The onnxruntime target (flatq.quant.target) sets this on layers whose own bias the
    # runtime adds as int32 in steps of input step x weight step.
    quantize_bias = False

    def layer_bias(self) -> Tensor | None:
        """The bias as the forward adds it: rounded to the int32 grid when `quantize_bias`
        (straight through), else as is."""
        if not self.quantize_bias or self.bias is None:
            return self.bias
        return self.bias + (round_to_step(self.bias, bias_step(self)) - self.bias).detach()

    @property
    def bits(self) -> tuple[int, int]:
        """(weight bits, input bits)."""
        return self.weight_quantizer.bits, self.input_quantizer.bits


class _QuantConv(_QuantLayer):
    """Shared conversion and forward of the quantized convolutions (any spatial rank)."""

    @classmethod
    def from_float(cls, conv: nn.Module, weight_quantizer: Quantizer,
                   input_quantizer: Quantizer) -> nn.Module:
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                    conv.padding, conv.dilation, conv.groups, conv.bias is not None,
                    conv.padding_mode, device=conv.weight.device, dtype=conv.weight.dtype)
        layer.weight, layer.bias = conv.weight, conv.bias
        layer._attach(weight_quantizer, input_quantizer)
        return layer.train(conv.training)

    def forward(self, x: Tensor) -> Tensor:
        out = self._conv_forward(self.quantized_input(x), self.quantized_weight(),
                                 self.layer_bias())
        return out if self.output_point is None else self.output_point(out)


class QuantConv1d(_QuantConv, nn.Conv1d):
    """nn.Conv1d whose forward sees the fake-quantized input and weight."""

    kind = "conv1d"


class QuantConv2d(_QuantConv, nn.Conv2d):
    """nn.Conv2d whose forward sees the fake-quantized input and weight."""

    kind = "conv2d"


class QuantLinear(_QuantLayer, nn.Linear):
    """nn.Linear whose forward sees the fake-quantized input and weight."""

    kind = "linear"

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: Quantizer,
                   input_quantizer: Quantizer) -> "QuantLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=linear.weight.device, dtype=linear.weight.dtype)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._attach(weight_quantizer, input_quantizer)
        return layer.train(linear.training)

    def forward(self, x: Tensor) -> Tensor:
        return nn.functional.linear(self.quantized_input(x), self.quantized_weight(),
                                    self.layer_bias())


# Float base class -> its quantized layer. Subclasses of a base are swapped too, unless they
# change what the layer computes (see flatq.quant.plan).
QUANT_LAYERS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Conv1d: QuantConv1d,
    nn.Conv2d: QuantConv2d,
    nn.Linear: QuantLinear,
}


def quant_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The (name, layer) pairs of every quantized layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, _QuantLayer)]


def is_quant_layer(module: nn.Module) -> bool:
    return isinstance(module, _QuantLayer)
