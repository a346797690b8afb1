"""Dead weight channels: output channels whose every weight quantizes to zero.

Such a channel outputs a constant (its bias), for good: no weight of it gets a gradient through
the zero integer codes that changes them back while its step size stays above twice its
largest weight. After BatchNorm in eval mode a constant channel is divided by about
sqrt(eps), which blows up curvature measures (README, Results). QAT counts them after every
epoch and warns when the count rises.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import quant_layers


@torch.no_grad()
def dead_channels(model: nn.Module) -> dict[str, list[int]]:
    """Per quantized layer with at least one dead channel: the indices of its output channels
    whose fake-quantized weights are all exactly zero."""
    dead = {}
    for name, layer in quant_layers(model):
        quantizer, training = layer.weight_quantizer, layer.weight_quantizer.training
        quantizer.eval()   # a moving-average range must not move for this look
        weight = layer.quantized_weight()
        quantizer.train(training)
        if weight.dim() < 2:
            continue
        channels = (weight.flatten(1) == 0).all(dim=1).nonzero().flatten().tolist()
        if channels:
            dead[name] = channels
    return dead


def count_dead(dead: dict[str, list[int]]) -> int:
    """Total dead channels of a `dead_channels` result."""
    return sum(len(channels) for channels in dead.values())


def describe_dead(dead: dict[str, list[int]]) -> str:
    """One line naming each layer's dead channels, e.g. 'stem.0 [3, 7]; fc [1]'."""
    return "; ".join(f"{name} {channels}" for name, channels in dead.items())
