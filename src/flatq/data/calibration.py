"""Calibration batches for post-training range estimation.

A seeded subset of the training set without augmentation, so that observers see the same
images in the same order on every run with the same seed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import ConfigError
from .datasets import ImageTensorDataset
from .folder import ImageFolderSet
from .transforms import BatchPipeline


def calibration_batches(dataset: ImageTensorDataset | ImageFolderSet, pipeline: BatchPipeline,
                        num_images: int = 100, seed: int = 0,
                        batch_size: int = 50) -> list[Tensor]:
    """`num_images` random training images (chosen by `seed`), transformed with train=False,
    as float batches of at most `batch_size` images."""
    if not 1 <= num_images <= len(dataset):
        raise ConfigError(f"calibration needs 1..{len(dataset)} images (the size of the "
                          f"{dataset.name} training set), got {num_images}")
    if batch_size < 1:
        raise ConfigError(f"calibration batch size must be >= 1, got {batch_size}")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    chosen = order[:num_images]
    return [pipeline(dataset.take(chosen[i:i + batch_size])[0], train=False)
            for i in range(0, num_images, batch_size)]
