"""Training objectives, one module per method, and the registry that builds them by name.

A method is a loss (plus hooks), not a trainer: see `base.Objective`. Each module registers
its config dataclass (`flatq.config.register_method_config`) and its objective class here.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..config import METHOD_ALIASES, METHOD_CONFIGS, MethodConfig, method_config
from ..errors import ConfigError
from .base import Objective, total_loss
from .cr import CR, CRConfig
from .dnq import DNQ, DNQConfig
from .fpq import FPQ, FPQConfig
from .kd import KD, KDConfig
from .mec import MEC, MECConfig
from .sam import SAM, SAMConfig
from .task import TaskObjective

OBJECTIVES: dict[str, type[Objective]] = {"ce": TaskObjective, "task": TaskObjective,
                                          "kd": KD, "fpq": FPQ, "sam": SAM, "mec": MEC, "cr": CR,
                                          "dnq": DNQ}

# Methods that train a full-precision model (pretrain) vs a quantized student (qat). Older
# names stay accepted through METHOD_ALIASES (lsq -> task).
PRETRAIN_METHODS = ["ce", "dnq"]
QAT_METHODS = ["task", "kd", "fpq", "sam", "mec", "cr"]


def register_objective(name: str, cls: type[Objective], stage: str = "qat") -> None:
    """Make `cls` buildable by `name`; `stage` is 'pretrain' or 'qat'."""
    OBJECTIVES[name] = cls
    (PRETRAIN_METHODS if stage == "pretrain" else QAT_METHODS).append(name)


def build_objective(config: MethodConfig | None, student: nn.Module,
                    teacher: nn.Module | None = None, **context: Any) -> Objective:
    """The objective `config` names, built on `student` (and `teacher`).

    Args:
        config: a method config (`flatq.config.method_config(name, options)`); None is plain
            cross-entropy.
        student: the model being trained.
        teacher: the full-precision model, for methods that distill (a copy is kept).
        **context: passed on to the objective (the trainer passes `data` and `seed`).

    Returns:
        The objective; use it as a context manager, so its hooks leave the student at the end.

    Raises:
        ConfigError: an unknown method, or what the objective itself refuses.
    """
    if config is None:
        return TaskObjective(student, teacher, **context)
    if config.name not in OBJECTIVES:
        raise ConfigError(f"unknown method {config.name!r}; available: "
                          f"{', '.join(sorted(OBJECTIVES))}")
    return OBJECTIVES[config.name](student, teacher, config, **context)


__all__ = ["Objective", "CR", "CRConfig", "DNQ", "DNQConfig", "MEC", "MECConfig", "TaskObjective",
           "FPQ", "FPQConfig", "KD", "KDConfig", "SAM", "SAMConfig", "OBJECTIVES",
           "PRETRAIN_METHODS", "QAT_METHODS", "METHOD_ALIASES", "METHOD_CONFIGS",
           "build_objective", "method_config", "register_objective", "total_loss"]
