"""Step callbacks that log flatness trajectories into metrics.jsonl while training.

`flatq pretrain|qat --track hessian,gradnorm --track-every N` hands these to the trainer,
which calls each every N steps as callback(step, objective, images, labels) and logs the
returned dict; the trainer does not know what they measure.
"""

from __future__ import annotations

from torch import Tensor, nn

from ..config import TrainConfig
from ..methods.base import Objective
from .gradnorm import grad_norm, task_grad_norm
from .hessian import model_hessian
from .params import layer_weights
from .measuring import measuring

# Hutchinson vectors per tracked step: a rough but cheap estimate (the standard error is
# logged beside it).
TRACK_SAMPLES = 4


def _student(objective: Objective) -> nn.Module:
    return getattr(objective.student, "module", objective.student)  # unwrap DDP


class GradNormTracker:
    """Logs `grad_norm`, ||grad_w L|| of the step's whole objective (the gradient the
    optimizer applied), and `task_grad_norm`, that of the task cross-entropy on the same batch
    in eval mode (comparable across methods; see `analysis.gradnorm`)."""

    def __call__(self, step: int, objective: Objective, images: Tensor,
                 labels: Tensor) -> dict[str, float]:
        student = _student(objective)
        record = {"task_grad_norm": task_grad_norm(student, images, labels)}
        norm = grad_norm(student)
        return record if norm is None else {"grad_norm": norm, **record}


class HessianTracker:
    """Logs `hessian_trace` (and its standard error): a Hutchinson estimate of Tr(H) of the
    task loss on the current batch w.r.t. the layer weights, with the student in eval mode
    for the measurement (BatchNorm running statistics used, buffers restored exactly, mode
    restored). The Rademacher vectors come from a generator seeded by (seed, step), so
    tracking does not disturb the training run's own random stream."""

    def __init__(self, seed: int = 0, samples: int = TRACK_SAMPLES) -> None:
        self.seed, self.samples = seed, samples

    def __call__(self, step: int, objective: Objective, images: Tensor,
                 labels: Tensor) -> dict[str, float]:
        student = _student(objective)
        with measuring(student):
            hessian = model_hessian(student, layer_weights(student), [(images, labels)])
            total, _ = hessian.trace(self.samples, seed=self.seed * 1_000_003 + step)
        return {"hessian_trace": total.value, "hessian_trace_stderr": total.stderr}


def tracking_callbacks(train: TrainConfig) -> list:
    """The step callbacks `train.track` asks for (empty list when it asks for none)."""
    makers = {"gradnorm": GradNormTracker, "hessian": lambda: HessianTracker(train.seed)}
    return [makers[name]() for name in dict.fromkeys(train.track)]
