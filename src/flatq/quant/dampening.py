"""Oscillation dampening (Nagel, Fournarakis, Bondarenko, Blankevoort, "Overcoming Oscillations
in Quantization-Aware Training", ICML 2022).

With the straight-through estimator a latent weight near a rounding threshold keeps crossing
it, so its quantized value flips between two grid points from step to step; at 2 bits this
moves the test accuracy by a point between evaluations and makes the network sensitive to its
BatchNorm statistics (docs/soundness.md). The dampening term pulls every latent weight toward
the centre of its bin, the quantized value itself:

    L_dampen = sum over quantized layers of kernel_mean((q(w) - clip(w, s (lo - z), s (hi - z)))^2)

q(w) the fake-quantized weight, held constant (the target); clip(w, ...) the latent weight
clipped to the grid's range with the range held constant, so the term moves weights, never
step sizes or zero points; kernel_mean sums over output channels and averages over the rest
(the paper's code's default). Its weight follows the paper's schedule: 0 for the first quarter
of training, then a cosine from 0 to the final weight at the end.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .annealing import cosine_anneal
from .layers import quant_layers
from .quantizers import DoReFaWeightQuantizer


def check_dampening(model: nn.Module) -> None:
    """Refuse models whose weight grids have no bin centre in weight units (DoReFa)."""
    layers = quant_layers(model)
    if not layers:
        raise ConfigError("oscillation dampening (--dampen) applies to quantized models "
                          "(flatq qat); this model has no quantized layer")
    for name, layer in layers:
        if isinstance(layer.weight_quantizer, DoReFaWeightQuantizer):
            raise ConfigError(f"oscillation dampening (--dampen) does not apply to DoReFa "
                              f"weights (layer {name}: its grid lives in tanh space); use "
                              f"--pact-weights minmax or another quantizer")


def dampening_weight(final: float, progress: float | None) -> float:
    """The term's weight at `progress` (step / total steps; None outside a trainer: final)."""
    return final if progress is None else cosine_anneal(0.0, final, progress)


def dampening_loss(model: nn.Module) -> Tensor:
    """L_dampen of the module docstring over every quantized layer of `model`."""
    total = None
    for _, layer in quant_layers(model):
        weight, quantizer = layer.weight, layer.weight_quantizer
        target = quantizer(weight).detach()
        scale, zero_point, lo, hi = layer.weight_grid()
        clipped = torch.clamp(weight, (lo - zero_point) * scale, (hi - zero_point) * scale)
        term = (target - clipped).square().sum(0).mean()
        total = term if total is None else total + term
    if total is None:
        raise ConfigError("oscillation dampening needs a quantized model")
    return total
