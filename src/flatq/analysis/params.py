"""Which parameters an analysis differentiates with respect to.

The papers' flatness quantities (Tr(H), ||grad_w L||) are taken with respect to the layer
weights w: the weight of every convolution and linear layer (quantized or not). `all` adds
every other trainable tensor (BatchNorm affine parameters, biases, learned step sizes).
"""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError

PARAM_SETS = ("weights", "all")


def layer_weights(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(layer name, weight) of every trainable conv and linear layer, in module order."""
    return [(name, module.weight) for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear)) and module.weight.requires_grad]


def select_params(model: nn.Module, which: str = "weights") -> list[tuple[str, nn.Parameter]]:
    """Named tensors to analyze: `weights` (named by their layer) or `all` trainable ones."""
    if which not in PARAM_SETS:
        raise ConfigError(f"params: {which!r} is not one of {', '.join(PARAM_SETS)}")
    chosen = (layer_weights(model) if which == "weights" else
              [(n, p) for n, p in model.named_parameters() if p.requires_grad])
    if not chosen:
        what = "layer weights" if which == "weights" else "parameters"
        raise ConfigError(f"the model has no trainable {what}")
    return chosen
