"""Robustness to input noise (FPQ paper, Fig. 1): how much a model's outputs move when
Gaussian noise of standard deviation sigma is added to its (normalized) input.

For each image, the input is perturbed `repeats` times independently; the variance of each
output across the repeats (unbiased, over the repeats), averaged over the outputs and then
over the images, is the number reported for that sigma. Flatter models move less.
"""

from __future__ import annotations

import math

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from .measuring import measuring

OUTPUTS = ("logits", "probs")


@torch.no_grad()
def output_variance(model: nn.Module, images: Tensor, labels: Tensor, sigmas: Sequence[float],
                    repeats: int = 10, output: str = "logits", seed: int = 0,
                    batch_size: int = 256) -> list[dict[str, float]]:
    """One record per sigma: mean output variance with its standard error over images, and
    the accuracy (%) over all noisy copies.

    `images` are normalized model inputs. `output` is `logits` (the paper's "outputs") or
    `probs` (softmax). The noise generator restarts from `seed` for every model, so models
    compared on the same images see the same noise.

    Args:
        model: float or quantized (run in eval mode; its state is restored).
        images, labels: normalized test images and their labels.
        sigmas: noise standard deviations (>= 0).
        repeats: noisy copies per image (>= 2).
        output, seed, batch_size: see above; images per forward pass.

    Returns:
        One dict per sigma: sigma, variance, stderr, acc.

    Raises:
        ConfigError: an unknown `output`, fewer than 2 repeats, or a negative or non-finite
            sigma.
    """
    if output not in OUTPUTS:
        raise ConfigError(f"output: {output!r} is not one of {', '.join(OUTPUTS)}")
    if repeats < 2:
        raise ConfigError(f"noise analysis: need at least 2 repeats for a variance, got {repeats}")
    if not sigmas or not all(math.isfinite(s) and s >= 0 for s in sigmas):
        raise ConfigError(f"noise analysis: sigmas must be a non-empty list of finite numbers >= 0, "
                          f"got {list(sigmas)}")
    if batch_size < 1:
        raise ConfigError(f"noise analysis: batch size must be >= 1, got {batch_size}")
    generator = torch.Generator(device=images.device)
    records = []
    with measuring(model):
        for sigma in sigmas:
            generator.manual_seed(seed)
            per_image, correct = [], 0
            for start in range(0, len(images), batch_size):
                x, y = images[start:start + batch_size], labels[start:start + batch_size]
                outs = []
                for _ in range(repeats):
                    noisy = x + sigma * torch.randn(x.shape, generator=generator,
                                                    device=x.device, dtype=x.dtype)
                    logits = model(noisy).double()
                    correct += int((logits.argmax(1) == y).sum())
                    outs.append(logits.softmax(1) if output == "probs" else logits)
                per_image.append(torch.stack(outs).var(dim=0).mean(dim=1))
            variance = torch.cat(per_image)
            stderr = variance.std() / len(variance) ** 0.5 if len(variance) > 1 else torch.nan
            records.append({"sigma": float(sigma), "variance": float(variance.mean()),
                            "stderr": float(stderr),
                            "acc": 100.0 * correct / (repeats * len(images))})
    return records
