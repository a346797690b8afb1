"""LSQ+SAM: sharpness-aware minimization (Foret et al. 2021) around the student's weights.

Each step takes two forward/backward passes: the gradient at w gives the ascent direction
e = rho g / ||g||; the update uses the gradient taken at w + e. Only the layer weights and
biases (not step sizes or zero points) are perturbed: SAM seeks flatness in weight space.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import MethodConfig, option, register_method_config
from ..quant import Quantizer
from .base import Objective, total_loss


@register_method_config
@dataclass
class SAMConfig(MethodConfig):
    name = "sam"
    rho: float = option(0.05, "radius of the weight perturbation", low=0.0)


class SAM(Objective):
    """Cross-entropy minimized with SAM's two-pass update.

    Args:
        student: the model being trained (float or quantized; quantizer parameters are not
            perturbed).
        teacher: the frozen full-precision model (not used).
        config: the method's options (default: SAMConfig()).
        **context: what a run offers beyond the models (the trainer passes `data`, `seed`);
            ignored where unused.
    """

    def _perturbed_params(self) -> list[torch.nn.Parameter]:
        quantizer_params = {id(p) for m in self.student.modules() if isinstance(m, Quantizer)
                            for p in m.parameters()}
        return [p for p in self.student.parameters()
                if p.requires_grad and id(p) not in quantizer_params]

    def step(self, images: Tensor, labels: Tensor,
             optimizer: torch.optim.Optimizer) -> dict[str, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        losses = self.forward_losses(images, labels)
        total_loss(losses).backward()
        params = [p for p in self._perturbed_params() if p.grad is not None]
        with torch.no_grad():
            norm = torch.norm(torch.stack([p.grad.norm() for p in params]))
            shifts = [p.grad * (self.config.rho / (norm + 1e-12)) for p in params]
            for p, e in zip(params, shifts):
                p.add_(e)
        optimizer.zero_grad(set_to_none=True)
        total_loss(self.forward_losses(images, labels)).backward()
        with torch.no_grad():
            for p, e in zip(params, shifts):
                p.sub_(e)
        optimizer.step()
        self.stepped()
        return {k: v.detach() for k, v in losses.items()}
