"""BatchNorm policies of QAT: statistics frozen at the end of training, re-estimated after it.

The running statistics average over training steps whose weights and quantization ranges kept
changing (and, under FPQ, over perturbed forward passes), so the eval-mode network normalizes
with the statistics of networks it no longer is. On the README's Fashion-MNIST pilot the
effect per run ranged from -2.3 to +1.5 points, so it is an option, off by default.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches: Iterable[Tensor]) -> int:
    """Replace every BatchNorm's running mean and variance by their plain average over
    `batches`, and return how many BatchNorm layers there were.

    Only the BatchNorm layers run in training mode: every other module stays in eval mode, so
    quantizers keep their ranges and training-time hooks (SFP's noise) stay off. No parameter
    changes; the model's modes and the layers' momenta are restored afterwards.
    """
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not norms:
        return 0
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None          # cumulative average: every batch weighs the same
        norm.train()
    for images in batches:
        model(images)
    for norm, momentum in zip(norms, momenta):
        norm.momentum = momentum
    for module, training in modes.items():
        module.training = training
    return len(norms)


def freeze_batchnorm(model: nn.Module) -> None:
    """Put every BatchNorm of `model` in eval mode: it normalizes with its running statistics
    and stops updating them; its affine parameters still train. The rest of the model keeps
    its mode (quantizers and SFP noise are untouched)."""
    for module in model.modules():
        if isinstance(module, _BatchNorm):
            module.eval()
