"""Calibration batches for post-training range estimation.

A seeded subset of the training set without augmentation, so that observers see the same
images in the same order on every run with the same seed.
"""

from __future__ import annotations

from collections.abc import Iterator

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
    return [images for images, _ in subset_batches(dataset, pipeline, num_images, seed,
                                                   batch_size=batch_size)]


def subset_batches(dataset: ImageTensorDataset | ImageFolderSet, pipeline: BatchPipeline,
                   num_images: int, seed: int, skip: int = 0,
                   batch_size: int = 50) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) batches of the `num_images` training images that follow the first
    `skip` in a random order fixed by `seed` (with skip 0: the images of calibration_batches;
    with skip n: images disjoint from its first n), transformed with train=False. The sizes
    are checked now; the images are read lazily, so a large subset never sits in memory."""
    if not 1 <= num_images <= len(dataset) - skip:
        raise ConfigError(f"{num_images} training images requested after the first {skip}, "
                          f"but {dataset.name} has {len(dataset)}")
    if batch_size < 1:
        raise ConfigError(f"batch size must be >= 1, got {batch_size}")
    chosen = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))
    chosen = chosen[skip:skip + num_images]
    batches = (dataset.take(chosen[i:i + batch_size]) for i in range(0, num_images, batch_size))
    return ((pipeline(images, train=False), labels) for images, labels in batches)
