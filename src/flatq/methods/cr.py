"""CR: in-distribution consistency regularization for QAT (Pang et al., arXiv 2402.13497).

The quantized student f_S is trained with

    L = CE(f_S(x2), y) + lambda(t) tau^2 KL( softmax(f_T(x1)/tau) || softmax(f_S(x2)/tau) )

where x1, x2 are two independently augmented views of the same images, f_T is an exponential
moving average of the student (`ema.EMATeacher`, updated after every optimizer step, no
gradient), the CE term covers the labeled images only and the consistency term covers the
labeled and the unlabeled images (`unlabeled.py`). lambda(t) ramps up over the first part of
training (`consistency_weight`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MethodConfig, option, register_method_config
from ..data import BatchPipeline, ImageFolderSet, ImageTensorDataset
from ..errors import CheckpointError, ConfigError
from .base import Objective
from .ema import TEACHER_BATCHNORM, EMATeacher
from .kd import kd_loss
from ..data.unlabeled import (draw_unlabeled, load_unlabeled_folder, parse_unlabeled,
                              split_training_set)

SCHEDULES = ("sigmoid", "linear", "cosine", "constant")


@register_method_config
@dataclass
class CRConfig(MethodConfig):
    """Options of CR. The paper's own values are not known to us: every default here is ours
    (see docs/cr.md)."""
    name = "cr"
    ema_decay: float = option(0.99, "EMA decay a of the teacher: theta_T <- a theta_T + "
                              "(1 - a) theta_S after every step (default ours, measured in "
                              "docs/cr.md)", low=0.0, high=1.0)
    teacher_batchnorm: str = option("batch", "what the EMA teacher's BatchNorm layers "
                                    "normalize with: copied (the student's running statistics), "
                                    "averaged (running statistics averaged like the weights) or "
                                    "batch (each batch's own statistics)",
                                    choices=TEACHER_BATCHNORM)
    temperature: float = option(1.0, "softmax temperature tau of the consistency KL (default "
                                "ours)", low=1e-3)
    lambda_max: float = option(1.0, "final weight of the consistency term (default ours)",
                               low=0.0)
    schedule: str = option("sigmoid", "ramp-up of the consistency weight: sigmoid "
                           "(exp(-5 (1 - t/T_ramp)^2)), linear, cosine or constant "
                           "(the paper studies several strengths; default ours)",
                           choices=SCHEDULES)
    ramp_fraction: float = option(0.3, "fraction of all training steps over which the "
                                  "consistency weight ramps up to lambda_max (default ours)",
                                  low=0.0, high=1.0)
    unlabeled: str = option("none", "unlabeled in-distribution images: none, split:F (hold out "
                            "the fraction F of the training set, labels dropped) or a folder "
                            "with another copy of the data set")
    unlabeled_ratio: float = option(1.0, "unlabeled images per labeled image in each batch "
                                    "(default ours)", low=0.0)
    labeled_fraction: float = option(1.0, "keep labels for only this fraction of the (not "
                                     "held-out) training set; the rest is not used", low=0.0,
                                     high=1.0)

    def validate(self) -> None:
        super().validate()
        parse_unlabeled(self.unlabeled)


def consistency_weight(schedule: str, progress: float | None, ramp_fraction: float,
                       lambda_max: float) -> float:
    """lambda(t) at `progress` = t / T (fraction of training done); the ramp ends at
    t / T = ramp_fraction, after which lambda = lambda_max; None means 'ramp finished'."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; one of {SCHEDULES}")
    if schedule == "constant" or progress is None or ramp_fraction == 0:
        return lambda_max
    r = min(max(progress / ramp_fraction, 0.0), 1.0)
    if schedule == "linear":
        return lambda_max * r
    if schedule == "cosine":
        return lambda_max * 0.5 * (1.0 - math.cos(math.pi * r))
    return lambda_max * math.exp(-5.0 * (1.0 - r) ** 2)


class CR(Objective):
    """Consistency regularization between the student and its EMA teacher.

    In your own loop::

        objective = CR(student, config=CRConfig(unlabeled="split:0.5"))
        train = objective.training_set(train)          # labeled part; keeps the rest
        images, labels, extra = objective.prepare(raw_uint8, labels, pipeline, generator)
        objective.step(images, labels, optimizer, **extra)   # updates the EMA teacher

    The frozen FP model that `qat` offers as `teacher` is not used.

    Args:
        student: the model being trained (the quantized student; its EMA copy is the teacher).
        teacher: the frozen full-precision model (not used).
        config: the method's options (default: CRConfig()).
        **context: what a run offers beyond the models (the trainer passes `data`, `seed`);
            ignored where unused.

    Raises:
        ConfigError: a malformed `config.unlabeled`.
        DataError (from `training_set`): unlabeled images that are missing, of another shape,
            or the labeled set itself.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 config: CRConfig | None = None, **context: Any) -> None:
        config = config or CRConfig()
        super().__init__(student, teacher, config)
        self.ema = EMATeacher(student, config.ema_decay, config.teacher_batchnorm)
        self.source = parse_unlabeled(config.unlabeled)
        self.unlabeled_images: Tensor | None = None

    def weight(self) -> float:
        cfg = self.config
        return consistency_weight(cfg.schedule, self.progress, cfg.ramp_fraction, cfg.lambda_max)

    def training_set(self, dataset: ImageTensorDataset | ImageFolderSet
                     ) -> ImageTensorDataset | ImageFolderSet:
        """The labeled part of `dataset`; the unlabeled images are kept for `prepare`. An image
        folder is augmented as it is decoded, so it is asked for two crops of every image."""
        cfg = self.config
        if isinstance(dataset, ImageFolderSet):
            if self.source.kind != "none" or cfg.labeled_fraction < 1:
                raise ConfigError("CR on an image folder uses all of its labeled training "
                                  "images: method.unlabeled and method.labeled_fraction need "
                                  "an in-memory data set (cifar10, cifar100, fashion_mnist, "
                                  "digits)")
            return dataset.with_views(2)
        fraction = self.source.fraction if self.source.kind == "split" else 0.0
        labeled, self.unlabeled_images = split_training_set(dataset, fraction,
                                                            cfg.labeled_fraction)
        if self.source.kind == "path":
            self.unlabeled_images = load_unlabeled_folder(dataset, self.source.path)
        return labeled

    def prepare(self, raw_images: Tensor, labels: Tensor, pipeline: BatchPipeline,
                generator: torch.Generator | None = None
                ) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Two independent views of the labeled batch (student: x2, teacher: x1) and, at
        `unlabeled_ratio`, two views of a batch of unlabeled images. A batch of an image
        folder's two crops per image, (N, 2, C, H, W), supplies the views itself."""
        if raw_images.dim() == 5:
            student_raw, teacher_raw = raw_images[:, 0], raw_images[:, 1]
        else:
            student_raw = teacher_raw = raw_images
        student_view = pipeline(student_raw, train=True, generator=generator)
        teacher_view = pipeline(teacher_raw, train=True, generator=generator)
        count = round(self.config.unlabeled_ratio * len(raw_images))
        if self.source.kind == "none" or count == 0:
            return student_view, labels, {"teacher_images": teacher_view}
        if self.unlabeled_images is None:
            raise RuntimeError("CR: call training_set(train) before prepare() so the "
                               f"unlabeled images ({self.config.unlabeled}) are known")
        raw = draw_unlabeled(self.unlabeled_images, count, generator).to(raw_images.device)
        unlabeled_student = pipeline(raw, train=True, generator=generator)
        unlabeled_teacher = pipeline(raw, train=True, generator=generator)
        return student_view, labels, {
            "teacher_images": torch.cat([teacher_view, unlabeled_teacher]),
            "unlabeled_images": unlabeled_student}

    def losses(self, images: Tensor, labels: Tensor, teacher_images: Tensor | None = None,
               unlabeled_images: Tensor | None = None) -> dict[str, Tensor]:
        """CE on the labeled `images`; consistency on labeled + unlabeled, the teacher seeing
        `teacher_images` (default: the student's own views). The unlabeled images go through
        the student in a separate forward pass, so in train mode their BatchNorm statistics
        do not touch the CE term: they enter the loss only through the consistency term."""
        logits = self.student(images)
        out = {"ce": self.task_loss(logits, labels)}
        student_logits = logits
        if unlabeled_images is not None:
            student_logits = torch.cat([logits, self.student(unlabeled_images)])
            if teacher_images is None:
                teacher_images = torch.cat([images, unlabeled_images])
        teacher_logits = self.ema(images if teacher_images is None else teacher_images)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"CR: the teacher sees {len(teacher_logits)} images, the student "
                             f"{len(student_logits)}; teacher_images must hold one view of each")
        out["cr"] = self.weight() * kd_loss(student_logits, teacher_logits,
                                            self.config.temperature)
        return out

    def after_step(self) -> None:
        self.ema.update(self.student)

    def state_dict(self) -> dict[str, Any]:
        return {"ema_teacher": self.ema.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "ema_teacher" not in state:
            raise CheckpointError("the checkpoint holds no CR teacher (was it written by "
                                  "another method?); start a new run instead of --resume")
        self.ema.load_state_dict(state["ema_teacher"])
