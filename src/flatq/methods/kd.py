"""Hinton knowledge distillation from the FP teacher: the KD baseline of the FPQ tables."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MethodConfig, option, register_method_config
from .base import Objective


@register_method_config
@dataclass
class KDConfig(MethodConfig):
    name = "kd"
    temperature: float = option(4.0, "softmax temperature of the distillation term", low=1e-3)
    alpha: float = option(0.9, "weight of the distillation term; CE gets 1 - alpha",
                          low=0.0, high=1.0)


def kd_loss(student_logits: Tensor, teacher_logits: Tensor, temperature: float) -> Tensor:
    """T^2 KL(softmax(t/T) || softmax(s/T)), batch mean (Hinton et al. 2015)."""
    log_p_s = nn.functional.log_softmax(student_logits.float() / temperature, dim=1)
    log_p_t = nn.functional.log_softmax(teacher_logits.float() / temperature, dim=1)
    return nn.functional.kl_div(log_p_s, log_p_t, reduction="batchmean",
                                log_target=True) * temperature ** 2


class KD(Objective):
    """(1 - alpha) CE + alpha T^2 KL(teacher || student).

    Args:
        student: the model being trained (the quantized student).
        teacher: the frozen full-precision model (required: the logits it distills; a copy
            is kept).
        config: the method's options (default: KDConfig()).
        **context: what a run offers beyond the models (the trainer passes `data`, `seed`);
            ignored where unused.

    Raises:
        ConfigError: no teacher.
    """

    needs_teacher = True

    def losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        logits = self.student(images)
        with torch.no_grad():
            teacher_logits = self.teacher(images)
        cfg = self.config
        return {"ce": (1 - cfg.alpha) * self.task_loss(logits, labels),
                "kd": cfg.alpha * kd_loss(logits, teacher_logits, cfg.temperature)}
