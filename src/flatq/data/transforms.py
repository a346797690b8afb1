"""Augmentation and normalization of whole uint8 batches with tensor ops.

One call per batch, on the batch's device (CPU or GPU), with no python loop over samples;
this replaces per-sample PIL transforms, which dominate the step time of small models.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .datasets import canonical_name
from .folder import IMAGENET_MEAN, IMAGENET_STD


class BatchPipeline:
    """uint8 (N, C, H, W) -> normalized float32 (N, C', S, S).

    Steps: repeat a gray channel to `channels`; zero-pad centrally to `size`; when training,
    random crop after zero padding of `crop_padding` pixels and random horizontal flip; then
    (x / 255 - mean) / std per channel (a 1-element mean/std applies to all channels).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], size: int | None = None,
                 channels: int | None = None, crop_padding: int = 0, flip: bool = False) -> None:
        if len(mean) != len(std) or not mean:
            raise ConfigError(f"mean {tuple(mean)} and std {tuple(std)} must have the same "
                              f"non-zero length")
        if any(s <= 0 for s in std):
            raise ConfigError(f"std must be positive, got {tuple(std)}")
        if channels is not None and len(mean) not in (1, channels):
            raise ConfigError(f"mean/std have {len(mean)} values for {channels} channels")
        if crop_padding < 0:
            raise ConfigError(f"crop padding must be >= 0, got {crop_padding}")
        if size is not None and size < 1:
            raise ConfigError(f"image size must be positive, got {size}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.size = size
        self.channels = channels
        self.crop_padding = crop_padding
        self.flip = flip

    def __repr__(self) -> str:
        return (f"BatchPipeline(mean={self.mean}, std={self.std}, size={self.size}, "
                f"channels={self.channels}, crop_padding={self.crop_padding}, flip={self.flip})")

    def output_shape(self, in_shape: Sequence[int]) -> tuple[int, int, int]:
        """(C, H, W) of the output for inputs of (C, H, W) `in_shape`; refuses what __call__
        would refuse."""
        c, h, w = in_shape
        out_c = self.channels or c
        if c != out_c and c != 1:
            raise ConfigError(f"cannot turn {c}-channel images into {out_c} channels "
                              f"(only 1 -> {out_c} by repeating the gray channel)")
        if len(self.mean) not in (1, out_c):
            raise ConfigError(f"mean/std have {len(self.mean)} values for {out_c} channels")
        if self.size is None:
            return out_c, h, w
        if h > self.size or w > self.size:
            raise ConfigError(f"images of {h}x{w} are larger than the target size {self.size}; "
                              f"only padding to a larger size is supported")
        return out_c, self.size, self.size

    def __call__(self, images: Tensor, train: bool,
                 generator: torch.Generator | None = None) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected a uint8 (N, C, H, W) batch, got {images.dtype} "
                             f"{tuple(images.shape)}")
        c, h, w = self.output_shape(images.shape[1:])
        x = images.expand(-1, c, -1, -1)
        if (h, w) != tuple(images.shape[2:]):
            top, left = (h - images.shape[2]) // 2, (w - images.shape[3]) // 2
            x = F.pad(x, (left, w - images.shape[3] - left, top, h - images.shape[2] - top))
        if train and self.crop_padding:
            x = random_crop(x, self.crop_padding, generator)
        if train and self.flip:
            x = random_flip(x, generator)
        mean = torch.tensor(self.mean, device=x.device).view(-1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(-1, 1, 1)
        return x.float().div_(255).sub_(mean).div_(std)   # in place: (x / 255 - mean) / std


def _uniform_ints(high: int, n: int, generator: torch.Generator | None,
                  device: torch.device) -> Tensor:
    """n random ints in [0, high) drawn from `generator` (on its own device), moved to device."""
    gen_device = generator.device if generator is not None else device
    return torch.randint(high, (n,), generator=generator, device=gen_device).to(device)


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Per sample, the same-size window at a random offset of the zero-padded batch: one pad
    and one gather for the whole batch."""
    n, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))
    dy = _uniform_ints(2 * padding + 1, n, generator, x.device)
    dx = _uniform_ints(2 * padding + 1, n, generator, x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


def random_flip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Each sample mirrored left-right with probability 1/2."""
    flipped = _uniform_ints(2, len(x), generator, x.device).bool()
    return torch.where(flipped[:, None, None, None], x.flip(3), x)


# mean, std, native image size, crop padding at native size, flip
_DEFAULTS: dict[str, tuple[tuple[float, ...], tuple[float, ...], int, int, bool]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616), 32, 4, True),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762), 32, 4, True),
    "fashion_mnist": ((0.2860,), (0.3530,), 28, 2, True),
    "digits": ((0.3053,), (0.3760,), 8, 1, False),
    "synthetic": ((0.5,), (0.22,), 32, 0, False),
    # cropped and flipped per image as it is decoded (folder.py); the batch is only normalized
    "imagefolder": (IMAGENET_MEAN, IMAGENET_STD, 224, 0, False),
}


def pipeline_for(dataset_name: str, size: int | None = None, channels: int | None = None,
                 augment: bool = True) -> BatchPipeline:
    """The usual pipeline of a data set. When images are padded beyond their native size, the
    crop padding grows by the added border, so the crop still cuts off as much content as at
    native size (Fashion-MNIST: 2 at 28, 4 at 32)."""
    mean, std, native, padding, flip = _DEFAULTS[canonical_name(dataset_name)]
    if size is not None and size > native and padding:
        padding += (size - native) // 2
    return BatchPipeline(mean, std, size=size, channels=channels,
                         crop_padding=padding if augment else 0, flip=flip and augment)
