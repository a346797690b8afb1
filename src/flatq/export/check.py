"""The export's own check: onnxruntime, at its default optimization level, against PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FlatqError

# onnxruntime sums in another float order than PyTorch, so an activation within float
# rounding of a half step can land on the neighbouring integer, and in a deep low-bit network
# that one-step change can move the rest of the image's forward pass. So the check allows a few
# such images: it fails when more than FLIPPED_SHARE of the images change prediction beyond a
# near-tie (PyTorch's margin between the two classes over TIE_MARGIN of the logit scale), or
# when the typical (median) image is off by more than MEDIAN_RELATIVE of the logit scale: the
# marks of a graph that computes something else.
TIE_MARGIN = 0.01
FLIPPED_SHARE = 0.05
MEDIAN_RELATIVE = 5e-3


class ExportError(FlatqError):
    """The written graph does not compute what the PyTorch model computes."""


@dataclass(frozen=True)
class ExportCheck:
    """onnxruntime vs PyTorch on the check images."""

    images: int
    differing: int  # predictions that differ
    max_relative: float  # largest |logit difference| / largest |logit|
    median_relative: float  # the median image's

    def summary(self) -> str:
        return (f"checked in onnxruntime on {self.images} images: {self.differing} predictions "
                f"differ, |logit diff| up to {self.max_relative:.2g} of the logit scale "
                f"(median image {self.median_relative:.2g})")


def run_onnx(data: bytes, images: Tensor) -> np.ndarray:
    """Logits of the serialized model `data` in onnxruntime (CPU, default optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failure is reported once, as ExportError
    try:
        session = ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images.float().cpu().numpy()})[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated types
        raise ExportError(f"onnxruntime cannot run the exported graph: "
                          f"{str(exc).splitlines()[0]}; nothing was written") from None


@torch.no_grad()
def check_agreement(data: bytes, model: nn.Module, images: Tensor) -> ExportCheck:
    """Run `data` in onnxruntime and `model` (eval mode) on `images`; raise an ExportError
    when they disagree beyond the rounding-order flips described above."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        reference = model(images.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    logits = run_onnx(data, images)
    scale = max(float(np.abs(reference).max()), 1e-12)
    per_image = np.abs(logits - reference).max(axis=1) / scale
    rows = np.arange(len(reference))
    picked, ort_picked = reference.argmax(1), logits.argmax(1)
    margin = (reference[rows, picked] - reference[rows, ort_picked]) / scale
    result = ExportCheck(len(reference), int((picked != ort_picked).sum()),
                         float(per_image.max()), float(np.median(per_image)))
    flipped = int((margin > TIE_MARGIN).sum())
    if flipped > FLIPPED_SHARE * len(reference) or result.median_relative > MEDIAN_RELATIVE:
        raise ExportError(f"the exported graph disagrees with the PyTorch model "
                          f"({result.summary()}; allowed: predictions changed beyond a near-tie "
                          f"on at most {FLIPPED_SHARE:.0%} of the images, a median logit "
                          f"difference up to {MEDIAN_RELATIVE:g} of the logit scale); nothing "
                          "was written")
    return result
