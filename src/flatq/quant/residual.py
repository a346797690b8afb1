"""Output points on residual blocks: the onnxruntime target quantizes what a block's add returns.

onnxruntime runs a residual add on integers (QLinearAdd) only when the add's result is
quantized as well as its inputs, as its own `quantize_static` does. The add is a `+` inside a
block's `forward` (flatq's blocks, torchvision's `out += identity`), not a module, so there is
nothing to swap for it. Instead the blocks known to end in the add (and, in ResNets, the ReLU
after it) get an 8-bit `OutputPoint` on their output: the block's class is swapped for a
subclass that applies `self.output_point` to what the original `forward` returns. The point
sits after the block's final ReLU, where the runtime quantizes (a zero point of 0 lets it drop
the ReLU into the requantization); its inputs are quantized already by the output points of
the convs (or their BatchNorms) that feed the add.

Blocks are recognised by their class's qualified name, so torchvision is not imported here, and
by a predicate on the instance (a MobileNetV2 block adds only when `use_res_connect`). Other
block types join with `register_residual_block`; a block not registered keeps its add in float
(correct, just slower).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from torch import Tensor, nn

from .layers import OutputPoint
from .quantizers import Quantizer

# Qualified class name -> whether an instance ends in a residual add.
RESIDUAL_BLOCKS: dict[str, Callable[[nn.Module], bool]] = {}


def register_residual_block(qualified_name: str,
                            adds: Callable[[nn.Module], bool] = lambda block: True) -> None:
    """Let the onnxruntime target quantize the output of blocks of class `qualified_name`
    (`module.QualName`), whose forward returns a residual add (optionally through a ReLU), for
    instances where `adds(block)` is true."""
    RESIDUAL_BLOCKS[qualified_name] = adds


register_residual_block("flatq.models.resnet.BasicBlock")
register_residual_block("flatq.models.resnet.Bottleneck")
register_residual_block("flatq.models.mobilenet.InvertedResidual",
                        lambda block: block.shortcut is not None)
register_residual_block("torchvision.models.resnet.BasicBlock")
register_residual_block("torchvision.models.resnet.Bottleneck")
register_residual_block("torchvision.models.mobilenetv2.InvertedResidual",
                        lambda block: block.use_res_connect)
register_residual_block("torchvision.models.mobilenetv3.InvertedResidual",
                        lambda block: block.use_res_connect)


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def residual_blocks(model: nn.Module) -> list[str]:
    """Names of the modules of `model` that end in a residual add (see RESIDUAL_BLOCKS)."""
    names = []
    for name, module in model.named_modules():
        adds = RESIDUAL_BLOCKS.get(_qualified_name(type(module)))
        if adds is not None and adds(module):
            names.append(name)
    return names


def blocks_with_output_points(model: nn.Module) -> list[str]:
    """Names of the blocks of `model` that `add_residual_points` gave an output point."""
    return [name for name, module in model.named_modules()
            if isinstance(module, _QuantizedOutput)]


class _QuantizedOutput:
    """Mixin: the block's own forward, then its output point."""

    output_point: OutputPoint

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        return self.output_point(super().forward(*args, **kwargs))


@cache
def _with_output_point(cls: type[nn.Module]) -> type[nn.Module]:
    """`cls` with its output quantized (one subclass per block class)."""
    return type(f"Quant{cls.__name__}", (_QuantizedOutput, cls),
                {"__doc__": f"{cls.__name__} with an output point (flatq.quant.residual)."})


def add_residual_points(model: nn.Module, blocks: list[str],
                        make_quantizer: Callable[[], Quantizer]) -> None:
    """Give each named block of `model` an output point (in place): the block keeps its
    parameters, buffers and state_dict names, plus `NAME.output_point.*`."""
    for name in blocks:
        block = model.get_submodule(name)
        block.output_point = OutputPoint(make_quantizer())
        block.__class__ = _with_output_point(type(block))
