"""An exponential-moving-average copy of a model: the mean teacher of CR.

The teacher starts as a deep copy of the student (weights, step sizes, zero points, BN
statistics) and after every optimizer step moves its floating-point parameters towards the
student's, theta_T <- a theta_T + (1 - a) theta_S. Buffers (BatchNorm running statistics,
integer zero points, quantizer flags) are not averaged but copied from the student, since
they already are running statistics of the student or fixed by calibration.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CheckpointError


class EMATeacher:
    """A frozen (no gradient, eval mode) moving average of `student`."""

    def __init__(self, student: nn.Module, decay: float) -> None:
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(student).eval().requires_grad_(False)

    def __call__(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(x)

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """theta_T <- decay * theta_T + (1 - decay) * theta_S for float parameters; buffers
        (and any non-float parameter) copied from the student."""
        averaged, copied = [], []
        for t, s in zip(self.model.parameters(), student.parameters(), strict=True):
            (averaged if t.is_floating_point() else copied).append((t, s.detach()))
        if averaged:
            teacher_params = [t for t, _ in averaged]
            torch._foreach_mul_(teacher_params, self.decay)
            torch._foreach_add_(teacher_params,
                                torch._foreach_mul([s for _, s in averaged], 1.0 - self.decay))
        for t, s in copied:
            t.copy_(s)
        for t, s in zip(self.model.buffers(), student.buffers(), strict=True):
            t.copy_(s)

    def state_dict(self) -> dict[str, Any]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.model.load_state_dict(state)
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"the saved EMA teacher does not fit this model: "
                                  f"{str(exc).splitlines()[0]}") from None
