"""Weight step sizes per quantized layer, and the channels they have killed.

A weight channel whose step size exceeds twice its largest |weight| rounds every weight to the
zero point: the channel is dead (its output is a constant; `flatq.quant.health`). Learned 8-bit
step sizes on the first and last layer can get there (docs/soundness.md).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..quant import quant_layers
from ..quant.health import dead_channels


def weight_step_sizes(model: nn.Module) -> list[dict[str, Any]]:
    """One row per quantized layer: its name, largest weight step size, largest |weight| and
    number of dead channels (every fake-quantized weight zero). Layers whose weight quantizer
    has no step size are left out."""
    dead = dead_channels(model)
    rows = []
    for name, layer in quant_layers(model):
        quantizer = layer.weight_quantizer
        if not hasattr(quantizer, "scale_and_zero_point"):
            continue
        scale, _ = quantizer.scale_and_zero_point()
        weight = layer.weight.detach().flatten(1).abs().amax(dim=1)
        scale = scale.detach().flatten().expand_as(weight)
        rows.append({"layer": name, "max_step": scale.max().item(),
                     "max_abs_weight": weight.max().item(),
                     "dead_channels": len(dead.get(name, []))})
    return rows
