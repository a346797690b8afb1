"""BatchNorm policies of QAT: statistics frozen at the end of training, re-estimated after it,
and re-estimated with a check.

The running statistics average over training steps whose weights and quantization ranges kept
changing (and, under FPQ, over perturbed forward passes), so the eval-mode network normalizes
with the statistics of networks it no longer is. Re-estimating them helps some 2-bit runs and
costs others points, because such a network's accuracy can jump between levels under small
changes of its normalization (docs/soundness.md); the checked re-estimation keeps new
statistics only where held-out training images say they do not hurt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class CheckedEstimate:
    """Accuracy (%) on held-out check images with the statistics as trained and re-estimated,
    and whether the re-estimated ones were kept (they were unless the accuracy fell)."""

    before: float
    after: float

    @property
    def kept(self) -> bool:
        return self.after >= self.before


def reestimate_batchnorm_checked(
        model: nn.Module, batches: Iterable[Tensor],
        check: Callable[[], Iterable[tuple[Tensor, Tensor]]],
        device: torch.device | None = None) -> CheckedEstimate:
    """`reestimate_batchnorm`, keeping the new statistics only if the accuracy on the batches
    `check()` yields (images, labels; not the images estimated from; read twice, before and
    after) does not fall; otherwise every BatchNorm's statistics are restored exactly.

    Why: a 2-bit network's accuracy can jump between levels under small changes of its
    normalization, so re-estimation helps some runs and costs others points
    (docs/soundness.md); held-out training images tell which, without the test set.
    """
    saved = {name: buffer.clone() for name, buffer in _statistics(model).items()}
    before = accuracy_on(model, check(), device)
    reestimate_batchnorm(model, batches)
    result = CheckedEstimate(before, accuracy_on(model, check(), device))
    if not result.kept:
        with torch.no_grad():
            for name, buffer in _statistics(model).items():
                buffer.copy_(saved[name])
    return result


def _statistics(model: nn.Module) -> dict[str, Tensor]:
    """Every BatchNorm's running statistics (mean, variance, batch count), by name."""
    return {f"{name}.{buffer}": getattr(module, buffer)
            for name, module in model.named_modules() if isinstance(module, _BatchNorm)
            and module.track_running_stats
            for buffer in ("running_mean", "running_var", "num_batches_tracked")}


@torch.no_grad()
def accuracy_on(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]],
                device: torch.device | None = None) -> float:
    """Top-1 accuracy (%) of `model` in eval mode on (images, labels) batches; the model's
    modes are restored afterwards."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    correct = count = 0
    for images, labels in batches:
        logits = model(images.to(device) if device is not None else images)
        correct += int((logits.argmax(1).cpu() == labels.cpu()).sum())
        count += labels.numel()
    for module, training in modes.items():
        module.training = training
    return 100.0 * correct / max(count, 1)
