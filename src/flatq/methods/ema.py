"""An exponential-moving-average copy of a model: the mean teacher of CR.

The teacher starts as a deep copy of the student (weights, step sizes, zero points, BN
statistics) and after every optimizer step moves its floating-point parameters towards the
student's, theta_T <- a theta_T + (1 - a) theta_S. What its BatchNorm layers normalize with is
a choice (`TEACHER_BATCHNORM`): the student's running statistics are statistics of the student's
weights, not of the averaged ones, so copying them gives the teacher mismatched statistics
whenever the two sets of weights differ (docs/cr.md measures the three).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..errors import CheckpointError

# copied:   running statistics copied from the student after every step (eval-mode BN)
# averaged: running statistics averaged like the weights (as timm's ModelEmaV2 does)
# batch:    the teacher normalizes each batch with its own batch statistics (Tarvainen and
#           Valpola's mean-teacher code runs the teacher in train mode)
TEACHER_BATCHNORM = ("copied", "averaged", "batch")


class EMATeacher:
    """A frozen (no gradient) moving average of `student`; `batchnorm` is one of
    TEACHER_BATCHNORM."""

    def __init__(self, student: nn.Module, decay: float, batchnorm: str = "copied") -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if batchnorm not in TEACHER_BATCHNORM:
            raise ValueError(f"unknown teacher BatchNorm mode {batchnorm!r}; one of "
                             f"{TEACHER_BATCHNORM}")
        self.decay = decay
        self.batchnorm = batchnorm
        self.model = copy.deepcopy(student).eval().requires_grad_(False)
        self.norms = [m for m in self.model.modules() if isinstance(m, _BatchNorm)]
        if batchnorm == "batch":
            for norm in self.norms:
                norm.momentum = 0.0       # batch statistics leave the running ones as they are

    def __call__(self, x: Tensor) -> Tensor:
        for norm in self.norms:
            norm.train(self.batchnorm == "batch")
        with torch.no_grad():
            return self.model(x)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """theta_T <- decay * theta_T + (1 - decay) * theta_S for float parameters (and, with
        batchnorm="averaged", for float buffers); everything else copied from the student."""
        averaged, copied = [], []
        for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
            (averaged if t.is_floating_point() else copied).append((t, s.detach()))
        for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
            average = self.batchnorm == "averaged" and t.is_floating_point()
            (averaged if average else copied).append((t, s))
        if averaged:
            teacher = [t for t, _ in averaged]
            torch._foreach_mul_(teacher, self.decay)
            torch._foreach_add_(teacher, torch._foreach_mul([s for _, s in averaged],
                                                            1.0 - self.decay))
        for t, s in copied:
            t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"the saved EMA teacher does not fit this model: "
                                  f"{str(exc).splitlines()[0]}") from None
