"""Run an exported ONNX model in onnxruntime and compare it with the PyTorch model."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ..data import BatchPipeline, ImageTensorDataset, collate_batch
from ..errors import CheckpointError, ConfigError


# metadata_props key of the fingerprint (flatq.train.checkpoint.state_fingerprint) of the
# weights an export was made from, so that a file is checked against the run it claims to be.
WEIGHTS_KEY = "flatq.weights"


class OnnxModel:
    """An onnxruntime CPU session over an exported model: float images in, logits out.
    `threads` limits onnxruntime's thread pools (default: its own choice)."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no such ONNX file")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = options.inter_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options,
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own unrelated types
            raise CheckpointError(f"{path}: onnxruntime cannot load it: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.path, self.input = path, self.session.get_inputs()[0]
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)

    def check_exported_from(self, fingerprint: str, run: str) -> None:
        """Refuse a file that is not an export of the weights with this fingerprint."""
        stored = self.metadata.get(WEIGHTS_KEY)
        if stored is None:
            raise CheckpointError(f"{self.path} carries no flatq run identity (not written by "
                                  f"flatq export); export {run} with flatq export to compare it")
        if stored != fingerprint:
            raise CheckpointError(f"{self.path} was exported from other weights than {run}'s; "
                                  "compare a run with its own export")

    def __call__(self, images: Tensor) -> np.ndarray:
        expected, got = self.input.shape[1:], list(images.shape[1:])
        if len(expected) != len(got) or any(isinstance(e, int) and e != g
                                            for e, g in zip(expected, got)):
            raise ConfigError(f"{self.path} takes images of shape {expected}, got {got}")
        return self.session.run(None, {self.input.name: images.float().cpu().numpy()})[0]

    def latency_ms(self, images: Tensor, seconds: float = 1.0) -> float:
        """Median milliseconds of one run on `images`, over runs filling about `seconds` (at
        least 3) after a warm-up run."""
        self(images)
        times: list[float] = []
        while len(times) < 3 or sum(times) < seconds:
            start = time.perf_counter()
            self(images)
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)


@dataclass(frozen=True)
class Agreement:
    """PyTorch vs onnxruntime on the same images."""

    count: int
    torch_correct: int
    onnx_correct: int
    differing: int  # images whose predicted class differs
    max_abs_diff: float  # largest |logit difference|
    max_abs_logit: float  # largest |logit| of the PyTorch model, for scale

    @property
    def torch_acc(self) -> float:
        return 100.0 * self.torch_correct / max(self.count, 1)

    @property
    def onnx_acc(self) -> float:
        return 100.0 * self.onnx_correct / max(self.count, 1)

    def describe(self) -> str:
        """One line: both accuracies, differing predictions and the largest logit difference."""
        return (f"onnxruntime {self.onnx_acc:.2f}% vs PyTorch fake-quant "
                f"{self.torch_acc:.2f}% on {self.count} test images, "
                f"{self.differing} predictions differ, max |logit diff| "
                f"{self.max_abs_diff:.3g} (logits up to {self.max_abs_logit:.3g})")


@torch.no_grad()
def compare(onnx_model: OnnxModel, model: nn.Module, dataset: ImageTensorDataset,
            pipeline: BatchPipeline, batch_size: int = 256,
            limit: int | None = None) -> Agreement:
    """Accuracy of both models on (the first `limit` images of) `dataset`, and how they differ.

    Args:
        onnx_model: the export, in onnxruntime.
        model: the PyTorch model it was exported from.
        dataset, pipeline: the images, normalized by `pipeline` without augmentation.
        batch_size, limit: images per batch; how many images at most (default: all).

    Returns:
        An Agreement: both accuracies, differing predictions, largest logit difference.

    `model` runs on the CPU in eval mode, as onnxruntime does.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = torch_correct = onnx_correct = differing = 0
    max_diff = max_logit = 0.0
    for images, labels in DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                     collate_fn=collate_batch):
        if limit is not None and count >= limit:
            break
        if limit is not None:
            images, labels = images[:limit - count], labels[:limit - count]
        inputs = pipeline(images, train=False)
        reference = model(inputs.to(device)).float().cpu().numpy()
        logits = onnx_model(inputs)
        labels = labels.numpy()
        count += len(labels)
        torch_correct += int((reference.argmax(1) == labels).sum())
        onnx_correct += int((logits.argmax(1) == labels).sum())
        differing += int((reference.argmax(1) != logits.argmax(1)).sum())
        max_diff = max(max_diff, float(np.abs(reference - logits).max()))
        max_logit = max(max_logit, float(np.abs(reference).max()))
    model.train(was_training)
    return Agreement(count, torch_correct, onnx_correct, differing, max_diff, max_logit)
