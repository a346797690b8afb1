"""The objective interface: a method turns (student, teacher, batch) into named losses.

One trainer runs every method. A method adds loss terms and may attach hooks (SFP noise,
feature capture); it does not own the loop. A user with their own loop can call
`objective.losses(images, labels)` and back-propagate the sum, or call `objective.step`;
`with build_objective(...) as objective:` removes the hooks from the student at the end.
The caller's float model is never changed: a method that needs a teacher works on a frozen
copy of it.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..config import MethodConfig
from ..errors import ConfigError, NonFiniteLossError
from ..quant.dampening import dampening_loss, dampening_weight
from ..quant.freezing import WeightFreezing

if TYPE_CHECKING:
    from ..data import BatchPipeline, ImageTensorDataset


def total_loss(losses: dict[str, Tensor]) -> Tensor:
    """The sum of the named terms, refused when it is NaN or infinite."""
    total = sum(losses.values())
    if not torch.isfinite(total):
        parts = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
        raise NonFiniteLossError(f"non-finite loss ({parts})")
    return total


def frozen_copy(model: nn.Module) -> nn.Module:
    """`model` copied in eval mode without gradients: the teacher an objective freezes and
    hooks, so that the caller's model keeps its mode, its requires_grad flags and its hooks."""
    return copy.deepcopy(model).eval().requires_grad_(False)


class Objective:
    """Plain task loss (cross-entropy); the base every method extends.

    `needs_teacher` says whether the method wants the frozen full-precision model; it then
    keeps a frozen copy as `teacher` (the model passed in is left as it was, at the cost of
    one copy of its weights), and methods that do not need one ignore it. Subclasses override
    `losses` (adding terms) and, when they keep state across steps (an EMA teacher, a noise
    generator), `state_dict` / `load_state_dict` so checkpoints carry it. An objective is a
    context manager: leaving the `with` block calls `close()`.
    """

    needs_teacher = False
    # Fraction of training done (step / total steps), set by the trainer before each step for
    # methods with schedules; None outside a trainer (schedules then use their final value).
    progress: float | None = None
    # Final weight of oscillation dampening (flatq.quant.dampening), set by the trainer from
    # train.dampen; 0 leaves the losses as the method defines them.
    dampening: float = 0.0
    # Iterative freezing of oscillating weights (flatq.quant.freezing), set by the trainer from
    # train.freeze_oscillations; updated after every optimizer step.
    freezing: WeightFreezing | None = None

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 config: MethodConfig | None = None, **context: Any) -> None:
        """`context` is what the run offers beyond the models (e.g. `data`, its DataBundle);
        methods that need it read it, the others ignore it."""
        if self.needs_teacher and teacher is None:
            raise ConfigError(f"{type(self).__name__} needs a teacher model")
        self.student, self.config = student, config
        self.teacher = frozen_copy(teacher) if self.needs_teacher else None
        self.autocast_dtype: torch.dtype | None = None

    def train(self, mode: bool = True) -> "Objective":
        """Student to train/eval mode; the teacher always stays in eval mode."""
        self.student.train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def task_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return nn.functional.cross_entropy(logits.float(), labels)

    def training_set(self, dataset: "ImageTensorDataset") -> "ImageTensorDataset":
        """The labeled examples the trainer iterates; methods that hold part of the training
        set back (CR keeps some as unlabeled data) override this."""
        return dataset

    def prepare(self, raw_images: Tensor, labels: Tensor, pipeline: "BatchPipeline",
                generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """A raw uint8 training batch -> (images, labels, extra) for `step`; `extra` reaches
        `losses` as keyword arguments. One augmented view by default; methods that need more
        views or extra data (CR) override this."""
        return pipeline(raw_images, train=True, generator=generator), labels, {}

    def losses(self, images: Tensor, labels: Tensor) -> dict[str, Tensor]:
        return {"ce": self.task_loss(self.student(images), labels)}

    def forward_losses(self, images: Tensor, labels: Tensor, **extra: Tensor) -> dict[str, Tensor]:
        """`losses` (under autocast when mixed precision is on), plus the oscillation
        dampening term `dampen` (in float32) when `dampening` is set."""
        if self.autocast_dtype is None:
            losses = self.losses(images, labels, **extra)
        else:
            with torch.autocast(images.device.type, dtype=self.autocast_dtype):
                losses = self.losses(images, labels, **extra)
        if self.dampening:
            weight = dampening_weight(self.dampening, self.progress)
            losses["dampen"] = weight * dampening_loss(self.student)
        return losses

    def step(self, images: Tensor, labels: Tensor, optimizer: torch.optim.Optimizer,
             **extra: Tensor) -> dict[str, Tensor]:
        """One optimizer step; returns the detached loss terms."""
        losses = self.forward_losses(images, labels, **extra)
        total = total_loss(losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        self.stepped()
        return {k: v.detach() for k, v in losses.items()}

    def stepped(self) -> None:
        """What every `step` does after its optimizer step: weight freezing (when on) first,
        so the method's own `after_step` (an EMA teacher) sees the frozen weights."""
        if self.freezing is not None:
            self.freezing.update(1.0 if self.progress is None else self.progress)
        self.after_step()

    def after_step(self) -> None:
        """Called after every optimizer step (EMA teachers update here)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""

    def generators(self) -> list[torch.Generator]:
        """The objective's own random generators (e.g. SFP's coin flips). Their states differ
        per DDP rank, so the trainer checkpoints them per rank, beside the global RNG."""
        return []

    def close(self) -> None:
        """Remove the hooks this objective attached to the student."""

    def __enter__(self) -> "Objective":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
