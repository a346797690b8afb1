"""FPQ, Feature-Perturbed Quantization: L = CE + lambda_csd * L_CSD, with SFP noise in the
student's forward pass. Either part can be switched off for the paper's ablations."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MethodConfig, option, register_method_config
from ..errors import ConfigError
from ..quant import QuantConv2d, QuantLinear, QuantMultiheadAttention, quant_layers
from .base import Objective
from .csd import ChannelRows, channel_rows, csd_loss_from_rows
from .hooks import FeatureCapture, select_layers
from .sfp import SITES, StochasticFeaturePerturbation

CSD_LINEAR = ("auto", "none", "inner", "all")


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
    csd_layers: list[str] = option([], "layer name patterns to distill, among the candidates "
                                   "(every quantized conv and the Linear layers csd_linear "
                                   "admits; default: all of them)")
    csd_linear: str = option("auto", "quantized Linear layers CSD may distill (each output "
                             "channel standardized over every leading axis, tokens included): "
                             "none (the paper: convs only), inner (all but the last quantized "
                             "layer, the classifier), all, or auto: inner when the model has "
                             "more quantized Linear layers than convs (a transformer), else none",
                             choices=CSD_LINEAR)
    csd_eps: float = option(1e-5, "epsilon in the per-channel standardization", low=0.0)


def csd_candidates(student: nn.Module, linear: str = "auto") -> dict[str, int]:
    """The layers CSD may distill, in module order, each with its output's channel axis: every
    quantized conv (axis 1) and the quantized Linear layers `linear` (a CSD_LINEAR choice)
    admits (axis -1)."""
    if linear not in CSD_LINEAR:
        raise ValueError(f"csd_linear must be one of {CSD_LINEAR}, got {linear!r}")
    layers = quant_layers(student)
    convs = {n for n, m in layers if isinstance(m, QuantConv2d)}
    # An attention block's out_proj runs as a module in the student only: the float teacher's
    # nn.MultiheadAttention reads its weight directly, so there is no teacher output to match.
    attention = [n + "." for n, m in layers if isinstance(m, QuantMultiheadAttention)]
    linears = {n for n, m in layers if isinstance(m, QuantLinear)
               and not any(n.startswith(prefix) for prefix in attention)}
    if linear == "auto":
        linear = "inner" if len(linears) > len(convs) else "none"
    admitted = {"none": set(), "all": linears,
                "inner": linears - {layers[-1][0]} if layers else set()}[linear]
    chosen = convs | admitted
    return {n: 1 if n in convs else -1 for n, _ in layers if n in chosen}


class FPQ(Objective):
    """The FPQ objective for a quantized `student` and its frozen FP `teacher`.

    Use it in your own loop (the block's end removes its hooks from the student)::

        with FPQ(student, teacher, FPQConfig(p=0.1)) as objective:
            losses = objective.losses(images, labels)   # {'ce': ..., 'csd': ...}
            sum(losses.values()).backward()

    Args:
        student: the model being trained (the quantized student).
        teacher: the frozen full-precision model (required: CSD's target; a copy is kept).
        config: the method's options (default: FPQConfig()).
        seed: the seed of SFP's coin flips.
        **context: what a run offers beyond the models (the trainer passes `data`, `seed`);
            ignored where unused.

    Raises:
        ConfigError: no teacher, no layer for CSD, or an SFP/CSD layer pattern that matches
            nothing.
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
            candidates = csd_candidates(student, config.csd_linear)
            if not candidates:
                raise ConfigError(f"CSD has no layer to distill: the model has no quantized conv "
                                  f"and csd_linear={config.csd_linear!r} admits no Linear layer "
                                  "(try --csd-linear inner, or --no-csd)")
            names = select_layers(config.csd_layers, list(candidates), "CSD layer")
            self.channel_dims = {name: candidates[name] for name in names}
            self.student_features = FeatureCapture(student, names, transform=self._rows, on=False)
            self.teacher_features = FeatureCapture(self.teacher, names, transform=self._rows,
                                                   on=False)

    def _rows(self, name: str, output: Tensor) -> ChannelRows:
        """What the capture hooks keep of a layer's output: CSD's shifted channel rows (a new
        tensor, so an in-place op after the layer, a ReLU, cannot change it) and their sums."""
        return channel_rows(output, self.channel_dims[name])

    def losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        if self.student_features is None:
            return {"ce": self.task_loss(self.student(images), labels)}
        with self.student_features.recording(), self.teacher_features.recording():
            logits = self.student(images)
            with torch.no_grad():
                self.teacher(images)
        csd = csd_loss_from_rows(self.student_features.take(), self.teacher_features.take(),
                                 self.config.csd_eps)
        return {"ce": self.task_loss(logits, labels), "csd": self.config.csd_weight * csd}

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
