"""Image folders (torchvision's ImageFolder layout, which ImageNet uses), streamed from disk.

    DIR/train/CLASS/*.jpg|png|...      DIR/val/CLASS/...

Nothing is held in memory but the file list (one bytes array, so that DataLoader workers do
not copy it page by page as they would a list of str). Each image is decoded and transformed
where the DataLoader asks for it, in its worker processes, with the standard ImageNet
transforms (train: RandomResizedCrop + horizontal flip; eval: resize to size * 256/224 and
center crop) into a uint8 (3, size, size) tensor; normalization happens on the whole batch
(`BatchPipeline`), on the training device.

A training image's random crop and flip are drawn from a generator seeded by (seed, epoch,
index), set by `set_epoch` before each epoch's iterator starts its workers: the crops do not
depend on the worker that decodes the image, the number of workers or ranks, or where a
resumed run starts. `with_views(2)` decodes each image once and crops it twice, independently
(the first crop is the one-view crop), for methods that compare two augmented views (CR).
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
LAYOUT = "DIR/train/CLASS/*.jpg|png and DIR/val/CLASS/..."


def default_workers() -> int:
    """DataLoader workers per process: min(8, this process's share of the CPUs)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (cpus or 1) // ranks_here))


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    key = f"folder:{seed}:{epoch}:{index}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def image_transform(size: int, train: bool) -> Callable[..., Tensor]:
    """torchvision's ImageNet transforms to a uint8 (3, size, size) tensor (no normalization)."""
    from torchvision import transforms as T

    if train:
        steps = [T.RandomResizedCrop(size), T.RandomHorizontalFlip()]
    else:
        steps = [T.Resize(round(size * 256 / 224)), T.CenterCrop(size)]
    return T.Compose([*steps, T.PILToTensor()])


class ImageFolderSet(torch.utils.data.Dataset):
    """One split of an image folder: files and labels; images decoded on demand."""

    def __init__(self, root: Path, files: np.ndarray, labels: Tensor, classes: list[str],
                 size: int, train: bool, workers: int, name: str = "imagefolder") -> None:
        self.root, self.files, self.labels, self.classes = root, files, labels, classes
        self.size, self.train, self.workers, self.name = size, train, workers, name
        self.num_classes = len(classes)
        self.transform = image_transform(size, train)
        self.seed, self.epoch = 0, 0
        self.views = 1

    def __len__(self) -> int:
        return len(self.files)

    def __repr__(self) -> str:
        return (f"ImageFolderSet({str(self.root)!r}, {len(self)} images, {self.num_classes} "
                f"classes, {self.size}x{self.size}, {'train' if self.train else 'eval'})")

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return 3, self.size, self.size

    def with_views(self, views: int) -> "ImageFolderSet":
        """The same split, each item `views` transforms of one decoded image, stacked as a
        uint8 (views, 3, size, size) tensor."""
        if views < 1:
            raise ValueError(f"views must be at least 1, got {views}")
        other = copy.copy(self)
        other.views = views
        return other

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Seed the augmentation of the coming epoch (before its iterator is created)."""
        self.seed, self.epoch = seed, epoch

    def _decode(self, index: int, transform: Callable[..., Tensor], views: int = 1) -> Tensor:
        """Image `index` through `transform`; with `views` > 1, that many transforms of it
        stacked (decoded once)."""
        from PIL import Image, UnidentifiedImageError

        path = self.root / os.fsdecode(self.files[index])
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, ValueError, UnidentifiedImageError) as exc:
            raise DataError(f"{path}: cannot decode the image ({exc})") from None
        if views == 1:
            return transform(rgb)
        return torch.stack([transform(rgb) for _ in range(views)])

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        index = int(index)
        if not self.train:
            return self._decode(index, self.transform, self.views), int(self.labels[index])
        with torch.random.fork_rng(devices=[]):   # the caller's stream stays untouched
            # the CPU generator alone: torch.manual_seed would also queue a CUDA seeding
            # with a formatted stack trace, costing more than the crop
            torch.default_generator.manual_seed(_sample_seed(self.seed, self.epoch, index))
            image = self._decode(index, self.transform, self.views)
        return image, int(self.labels[index])

    def take(self, indices: Sequence[int] | Tensor) -> tuple[Tensor, Tensor]:
        """Images `indices` without augmentation (in this process) and their labels."""
        transform = self.transform if not self.train else image_transform(self.size, False)
        index = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        images = [self._decode(int(i), transform) for i in index]
        return torch.stack(images), self.labels[index]


def _scan(split: Path) -> dict[str, list[bytes]]:
    """{class name: sorted image file names (bytes, relative to `split`)} of one split."""
    classes: dict[str, list[bytes]] = {}
    for entry in sorted(os.scandir(split), key=lambda e: e.name):
        if not entry.is_dir() or entry.name.startswith("."):
            continue
        files = []
        for dirpath, dirnames, filenames in os.walk(entry.path, followlinks=True):
            dirnames.sort()
            for filename in sorted(filenames):
                if filename.lower().endswith(IMAGE_SUFFIXES) and not filename.startswith("."):
                    files.append(os.fsencode(os.path.relpath(os.path.join(dirpath, filename),
                                                             split)))
        if not files:
            raise DataError(f"image folder: class folder {entry.path} has no images "
                            f"({', '.join(IMAGE_SUFFIXES)})")
        classes[entry.name] = files
    if not classes:
        raise DataError(f"image folder: {split} has no class folders with images; expected "
                        f"{LAYOUT}")
    return classes


def _split_folder(root: Path, split: str) -> Path:
    folder = root / split
    if not folder.is_dir():
        raise DataError(f"image folder {root} has no {split}/ folder; expected {LAYOUT}")
    return folder


def load_image_folder(root: str | Path | None, size: int = 224, augment: bool = True,
                      workers: int | None = None) -> tuple[ImageFolderSet, ImageFolderSet]:
    """(train, val) of the image folder `root`, decoded at `size` by `workers` DataLoader
    worker processes (None: `default_workers()`); the class list (sorted folder names) must
    be the same in both splits."""
    if not root:
        raise DataError(f"--data imagefolder needs --data-root DIR with {LAYOUT}")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"image folder {root} not found; expected {LAYOUT}")
    train_dir, val_dir = _split_folder(root, "train"), _split_folder(root, "val")
    train, val = _scan(train_dir), _scan(val_dir)
    if list(train) != list(val):
        only_train = sorted(set(train) - set(val))
        only_val = sorted(set(val) - set(train))
        raise DataError(f"image folder {root}: train/ and val/ have different classes "
                        f"(only in train: {', '.join(only_train[:5]) or '-'}; only in val: "
                        f"{', '.join(only_val[:5]) or '-'})")
    classes = list(train)
    workers = default_workers() if workers is None else workers

    def split(folder: Path, found: dict[str, list[bytes]], train_split: bool) -> ImageFolderSet:
        files = np.array([f for names in found.values() for f in names], dtype=np.bytes_)
        labels = torch.cat([torch.full((len(names),), label, dtype=torch.long)
                            for label, names in enumerate(found.values())])
        return ImageFolderSet(folder, files, labels, classes, size, train_split and augment,
                              workers)

    return split(train_dir, train, True), split(val_dir, val, False)
