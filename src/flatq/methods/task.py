"""Plain training with cross-entropy: FP pre-training ('ce') and QAT with the task loss alone
('task', formerly 'lsq': the quantizer choice, not the method, decides whether that is LSQ,
LSQ+ or PACT)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import MethodConfig, register_method_config
from .base import Objective


@register_method_config
@dataclass
class CEConfig(MethodConfig):
    """Full-precision training with cross-entropy only."""
    name = "ce"


@register_method_config
@dataclass
class TaskConfig(MethodConfig):
    """QAT with cross-entropy only: LSQ, LSQ+ or PACT depending on --quantizer. Configs and
    checkpoints that say `lsq` (its former name) load as this."""
    name = "task"
    aliases = ("lsq",)


LSQConfig = TaskConfig      # the former name, for code that imports it


class TaskObjective(Objective):
    """Cross-entropy on the student's logits; nothing else.

    Args:
        student: the model being trained: float (pretraining) or quantized (QAT, any
            quantizer).
        teacher: the frozen full-precision model (not used).
        config: the method's options (default: no options()).
        **context: what a run offers beyond the models (the trainer passes `data`, `seed`);
            ignored where unused.
    """
