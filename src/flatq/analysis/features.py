"""Per-channel distribution of one layer's output (FPQ paper, Figs. 3-4).

The layer is a convolution or linear layer; its output z = w x is taken before BatchNorm
(in the bundled models BatchNorm is a separate module), through a forward hook, on test
images in eval mode. For a quantized layer this is z = w_hat x_hat.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import ConfigError, DataError
from .measuring import measuring

PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


def feature_layers(model: nn.Module) -> list[str]:
    """Names of the layers whose output can be analyzed: every conv and linear layer."""
    return [name for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _layer(model: nn.Module, name: str) -> nn.Module:
    names = feature_layers(model)
    if name not in names:
        shown = ", ".join(names[:4] + (["...", names[-1]] if len(names) > 5 else names[4:]))
        raise ConfigError(f"layer {name!r} is not a conv or linear layer of this model; "
                          f"valid names: {shown}")
    return model.get_submodule(name)


@torch.no_grad()
def layer_outputs(model: nn.Module, name: str, images: Tensor, batch_size: int = 256) -> Tensor:
    """The layer's outputs over `images` as (channels, values) on the CPU in float32."""
    if batch_size < 1:
        raise ConfigError(f"feature analysis: batch size must be >= 1, got {batch_size}")
    chunks: list[Tensor] = []

    def keep(module: nn.Module, inputs: tuple, output: Tensor) -> None:
        out = output.detach().float()
        chunks.append(out.transpose(0, 1).reshape(out.shape[1], -1).cpu())

    handle = _layer(model, name).register_forward_hook(keep)
    try:
        with measuring(model):
            for start in range(0, len(images), batch_size):
                model(images[start:start + batch_size])
    finally:
        handle.remove()
    return torch.cat(chunks, dim=1)


def feature_statistics(model: nn.Module, name: str, images: Tensor, bins: int = 100,
                       percentiles: Sequence[float] = PERCENTILES,
                       batch_size: int = 256) -> dict:
    """Per-channel mean, std, min, max and percentiles of layer `name`'s output over
    `images` (channel c pools batch and spatial positions), plus one histogram of all values.

    Args:
        model: float or quantized (run in eval mode; its state is restored).
        name: a conv or linear layer's module name (`feature_layers` lists them).
        images: normalized images.
        bins, percentiles, batch_size: histogram bins; percentiles per channel; images per
            forward pass.

    Returns:
        A dict of per-channel lists (mean, std, min, max, percentiles) and the histogram.

    Raises:
        ConfigError: `name` is not a conv or linear layer (the valid names are listed), or
            `bins` / `batch_size` < 1.
        DataError: the layer gives non-finite outputs.
    """
    if bins < 1:
        raise ConfigError(f"feature analysis: bins must be >= 1, got {bins}")
    values = layer_outputs(model, name, images, batch_size).numpy()
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values).all(axis=1)).sum())
        raise DataError(f"feature analysis: layer {name!r} gives non-finite outputs in {bad} of "
                        f"{values.shape[0]} channels (NaN or infinite weights or inputs)")
    counts, edges = np.histogram(values, bins=bins)
    pct = np.percentile(values, list(percentiles), axis=1)
    return {
        "layer": name, "channels": int(values.shape[0]), "values_per_channel": int(values.shape[1]),
        "mean": values.mean(axis=1).tolist(), "std": values.std(axis=1).tolist(),
        "min": values.min(axis=1).tolist(), "max": values.max(axis=1).tolist(),
        "percentiles": {str(p): row.tolist() for p, row in zip(percentiles, pct)},
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
    }
