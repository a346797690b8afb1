"""What the analyses run on: a finished run's model and data, and fixed sets of images."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import BatchPipeline, DataBundle, ImageFolderSet, ImageTensorDataset
from ..errors import ConfigError
from ..train.run_io import load_model, run_data


@dataclass
class Run:
    """A finished run opened for analysis: its label, model (on `device`), metadata, data,
    and the path it was opened from."""
    label: str
    model: nn.Module
    meta: dict[str, Any]
    data: DataBundle
    path: str = ""

    @property
    def bits(self) -> str:
        quant = self.meta.get("quant")
        return "fp32" if quant is None else f"w{quant['w_bits']}a{quant['a_bits']}"


def run_label(path: str | Path) -> str:
    """A run's name for legends: its folder name (the parent folder for a model.pt file)."""
    path = Path(path)
    return path.parent.name if path.is_file() else path.name


def open_run(path: str | Path, device: torch.device, data_root: str | None = None,
             label: str | None = None) -> Run:
    """Load a run folder or model.pt with the data set it was trained on (or under
    `data_root`); the model comes back on `device`, in eval mode."""
    model, state = load_model(path)
    _, data = run_data(state, data_root)
    return Run(label or run_label(path), model.to(device), state["meta"], data, str(path))


def fixed_batches(dataset: ImageTensorDataset | ImageFolderSet, pipeline: BatchPipeline,
                  count: int, batch_size: int, seed: int, device: torch.device
                  ) -> list[tuple[Tensor, Tensor]]:
    """`count` batches of `batch_size` images drawn without replacement by `seed`, passed
    through `pipeline` without augmentation (train=False)."""
    if count < 1 or batch_size < 1:
        raise ConfigError(f"need at least 1 batch of at least 1 image, got {count} x {batch_size}")
    if count * batch_size > len(dataset):
        raise ConfigError(f"{count} batches of {batch_size} images need {count * batch_size} "
                          f"images; the {dataset.name} training set has {len(dataset)}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    batches = []
    for i in range(count):
        images, labels = dataset.take(order[i * batch_size:(i + 1) * batch_size])
        batches.append((pipeline(images.to(device), train=False), labels.to(device)))
    return batches


def first_images(dataset: ImageTensorDataset | ImageFolderSet, pipeline: BatchPipeline,
                 count: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The first `count` images of `dataset` (all of them if fewer), normalized."""
    if count < 1:
        raise ConfigError(f"need at least 1 image, got {count}")
    images, labels = dataset.take(range(min(count, len(dataset))))
    return pipeline(images.to(device), train=False), labels.to(device)
