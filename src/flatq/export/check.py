"""The export's own check: onnxruntime, at its default optimization level, against PyTorch."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import FlatqError

# A prediction may differ only on a near-tie: the PyTorch model's margin between its class
# and onnxruntime's under this share of the logit scale. Logits may differ by this much more.
TIE_MARGIN = 0.01
MAX_RELATIVE = 0.05


class ExportError(FlatqError):
    """The written graph does not compute what the PyTorch model computes."""


@dataclass(frozen=True)
class ExportCheck:
    """onnxruntime vs PyTorch on the check images."""

    images: int
    differing: int  # predictions that differ
    max_relative: float  # largest |logit difference| / largest |logit|

    def summary(self) -> str:
        return (f"checked in onnxruntime on {self.images} images: {self.differing} predictions "
                f"differ, max |logit diff| {self.max_relative:.2g} of the logit scale")


def run_onnx(data: bytes, images: Tensor) -> np.ndarray:
    """Logits of the serialized model `data` in onnxruntime (CPU, default optimizations)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
        return session.run(None, {session.get_inputs()[0].name: images.float().cpu().numpy()})[0]
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated types
        raise ExportError(f"onnxruntime cannot run the exported graph: "
                          f"{str(exc).splitlines()[0]}; nothing was written") from None


@torch.no_grad()
def check_agreement(data: bytes, model: nn.Module, images: Tensor) -> ExportCheck:
    """Run `data` in onnxruntime and `model` (eval mode) on `images`; raise an ExportError if a
    prediction differs beyond a near-tie or a logit by more than MAX_RELATIVE of the scale."""
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        reference = model(images.to(device)).float().cpu().numpy()
    finally:
        model.train(was_training)
    logits = run_onnx(data, images)
    scale = max(float(np.abs(reference).max()), 1e-12)
    relative = float(np.abs(logits - reference).max()) / scale
    rows = np.arange(len(reference))
    picked, ort_picked = reference.argmax(1), logits.argmax(1)
    margin = (reference[rows, picked] - reference[rows, ort_picked]) / scale
    result = ExportCheck(len(reference), int((picked != ort_picked).sum()), relative)
    if relative > MAX_RELATIVE or (margin > TIE_MARGIN).any():
        raise ExportError(f"the exported graph disagrees with the PyTorch model ({result.summary()}"
                          f"; allowed: {MAX_RELATIVE:.0%} and no prediction off by more than a "
                          f"near-tie); nothing was written")
    return result
