"""Unlabeled in-distribution images for CR: where they come from and how a batch is drawn.

A spec names the source:
- `none`: no unlabeled images (the consistency term then sees the labeled batch only);
- `split:F`: hold out the fraction F of the training set and drop its labels;
- a folder holding another copy of the run's data set in its usual layout (e.g. the
  torchvision CIFAR folder); its training images are used, its labels ignored.
The held-out part is fixed by SPLIT_SEED, so a run and its resume see the same split, and
`labeled_fraction` keeps a prefix of the same permutation, so `split:0.5` and
`labeled_fraction: 0.5` (no unlabeled data) train on the same labeled images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError, DataError
from .datasets import ImageTensorDataset, load_dataset

SPLIT_SEED = 0


@dataclass(frozen=True)
class UnlabeledSpec:
    """Parsed form of the `unlabeled` option: kind is 'none', 'split' or 'path'."""
    kind: str
    fraction: float = 0.0
    path: str = ""


def parse_unlabeled(spec: str) -> UnlabeledSpec:
    """'none' | 'split:F' (0 < F < 1) | a folder path; malformed splits are ConfigErrors."""
    text = spec.strip()
    if text.lower() in ("", "none"):
        return UnlabeledSpec("none")
    if text.lower().startswith("split:"):
        match = re.fullmatch(r"split:\s*([0-9]*\.?[0-9]+(?:[eE][-+]?\d+)?)", text, re.IGNORECASE)
        fraction = float(match.group(1)) if match else -1.0
        if not 0.0 < fraction < 1.0:
            raise ConfigError(f"method.unlabeled: expected split:F with 0 < F < 1 (e.g. "
                              f"split:0.5), got {spec!r}")
        return UnlabeledSpec("split", fraction=fraction)
    return UnlabeledSpec("path", path=text)


def _subset(dataset: ImageTensorDataset, index: Tensor) -> ImageTensorDataset:
    return ImageTensorDataset(dataset.images[index], dataset.labels[index], dataset.num_classes,
                              dataset.name)


def split_training_set(dataset: ImageTensorDataset, unlabeled_fraction: float,
                       labeled_fraction: float) -> tuple[ImageTensorDataset, Tensor | None]:
    """(labeled subset, unlabeled uint8 images or None) of `dataset`.

    One fixed permutation: its last round(unlabeled_fraction N) images become unlabeled; of the
    rest, the first round(labeled_fraction n) keep their labels and the others are dropped.
    """
    n = len(dataset)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(SPLIT_SEED))
    held = round(unlabeled_fraction * n)
    pool = order[:n - held]
    keep = round(labeled_fraction * len(pool))
    if keep < 1 or (unlabeled_fraction > 0 and held < 1):
        raise DataError(f"the training set of {n} images is too small for unlabeled fraction "
                        f"{unlabeled_fraction} and labeled fraction {labeled_fraction}: "
                        f"{keep} labeled / {held} unlabeled images")
    if held == 0 and keep == n:
        return dataset, None
    labeled = _subset(dataset, pool[:keep].sort().values)
    return labeled, (dataset.images[order[n - held:].sort().values] if held else None)


def load_unlabeled_folder(dataset: ImageTensorDataset, path: str) -> Tensor:
    """The training images of another copy of `dataset`'s data set in folder `path`."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise DataError(f"method.unlabeled: {path!r} is neither 'none', 'split:F' nor an "
                        f"existing folder")
    images = load_dataset(dataset.name, folder)[0].images
    if images.shape[1:] != dataset.images.shape[1:]:
        raise DataError(f"unlabeled images in {folder} have shape {tuple(images.shape[1:])}, "
                        f"the labeled ones {tuple(dataset.images.shape[1:])}")
    if images.shape == dataset.images.shape and torch.equal(images, dataset.images):
        raise DataError(f"unlabeled images in {folder} are the labeled training set itself; "
                        f"use split:F to hold part of it out")
    return images


def draw_unlabeled(images: Tensor, n: int, generator: torch.Generator | None) -> Tensor:
    """n images drawn uniformly with replacement from `images` by `generator`; under DDP each
    rank takes its own slice of one shared draw, so ranks see different images."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = generator.device if generator is not None else torch.device("cpu")
    index = torch.randint(len(images), (n * world,), generator=generator, device=device)
    return images[index[rank * n:(rank + 1) * n].to(images.device)]
