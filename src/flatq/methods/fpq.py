"""FPQ, Feature-Perturbed Quantization: L = CE + lambda_csd * L_CSD, with SFP noise in the
student's forward pass. Either part can be switched off for the paper's ablations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MethodConfig, option, register_method_config
from ..quant import QuantConv2d, quant_layers
from .base import Objective
from .csd import csd_loss
from .hooks import FeatureCapture, select_layers
from .sfp import SITES, StochasticFeaturePerturbation


@register_method_config
@dataclass
class FPQConfig(MethodConfig):
    """Options of FPQ; defaults follow the paper (p = 0.1, lambda_csd = 1)."""
    name = "fpq"
    sfp: bool = option(True, "stochastic feature perturbation on/off")
    # --sfp-p: torchrun's parser takes a bare --p for an abbreviation of its --print-completion
    p: float = option(0.1, "probability that a layer's input is perturbed in a forward pass",
                      low=0.0, high=1.0, aliases=("--sfp-p",))
    sfp_site: str = option("after", "where SFP noise goes: after the input quantizer (the "
                           "quantized input) or before it", choices=SITES)
    sfp_layers: list[str] = option([], "layer name patterns to perturb (default: every "
                                   "quantized layer but the first and last)")
    csd: bool = option(True, "channel-wise standardization distillation on/off")
    csd_weight: float = option(1.0, "weight lambda_csd of the CSD loss", low=0.0)
    csd_layers: list[str] = option([], "layer name patterns to distill (default: every "
                                   "quantized conv layer)")
    csd_eps: float = option(1e-5, "epsilon in the per-channel standardization", low=0.0)


class FPQ(Objective):
    """The FPQ objective for a quantized `student` and its frozen FP `teacher`.

    Use it in your own loop::

        objective = FPQ(student, teacher, FPQConfig(p=0.1))
        losses = objective.losses(images, labels)   # {'ce': ..., 'csd': ...}
        sum(losses.values()).backward()
    """

    needs_teacher = True

    def __init__(self, student: nn.Module, teacher: nn.Module,
                 config: FPQConfig | None = None, seed: int = 0, **context: Any) -> None:
        config = config or FPQConfig()
        super().__init__(student, teacher, config)
        self.sfp = (StochasticFeaturePerturbation(student, config.p, config.sfp_site,
                                                  config.sfp_layers, seed) if config.sfp else None)
        self.student_features = self.teacher_features = None
        if config.csd:
            convs = [n for n, m in quant_layers(student) if isinstance(m, QuantConv2d)]
            names = select_layers(student, config.csd_layers, convs)
            self.student_features = FeatureCapture(student, names)
            self.teacher_features = FeatureCapture(teacher, names)

    def losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        out = {"ce": self.task_loss(self.student(images), labels)}
        if self.student_features is not None:
            with torch.no_grad():
                self.teacher(images)
            out["csd"] = self.config.csd_weight * csd_loss(
                self.student_features.take(), self.teacher_features.take(), self.config.csd_eps)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"sfp_generator": self.sfp.generator.get_state()} if self.sfp else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.sfp and "sfp_generator" in state:
            self.sfp.generator.set_state(state["sfp_generator"])

    def generators(self) -> list[torch.Generator]:
        return [self.sfp.generator] if self.sfp else []

    def close(self) -> None:
        for part in (self.sfp, self.student_features, self.teacher_features):
            if part is not None:
                part.remove()
