"""In-memory uint8 image data sets and their loaders.

A whole data set is one uint8 tensor, so a batch is one indexing op (`__getitems__`) and all
augmentation runs later on the batch (see `transforms.py`) instead of per sample in PIL.
"""

from __future__ import annotations

import gzip
import os
import pickle
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..errors import ConfigError, DataError
from .folder import load_image_folder

Split = tuple["ImageTensorDataset", "ImageTensorDataset"]

FASHION_MNIST_DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")


class ImageTensorDataset(torch.utils.data.Dataset):
    """Images as a uint8 (N, C, H, W) tensor and labels as an int64 (N,) tensor."""

    workers = 0   # DataLoader worker processes: none, batches are one indexing op in memory

    def __init__(self, images: Tensor, labels: Tensor, num_classes: int, name: str) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be a uint8 (N, C, H, W) tensor, got {images.dtype} "
                             f"{tuple(images.shape)}")
        if labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"labels must be a ({len(images)},) tensor, got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.num_classes = num_classes
        self.name = name

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        """A whole batch with one indexing op; the DataLoader calls this when it exists."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.images[index], self.labels[index]

    take = __getitems__   # images (unaugmented uint8) and labels at `indices`, as data sets do

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        return tuple(self.images.shape[1:])

    def __repr__(self) -> str:
        return (f"ImageTensorDataset({self.name!r}, {len(self)} images of "
                f"{tuple(self.images.shape[1:])}, {self.num_classes} classes)")


def collate_batch(batch: tuple[Tensor, Tensor] | Sequence[tuple[Tensor, int]]
                  ) -> tuple[Tensor, Tensor]:
    """DataLoader collate_fn: pass a `__getitems__` batch through, stack a list of samples."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], Tensor):
        return batch
    images, labels = zip(*batch)
    return torch.stack(images), torch.as_tensor(labels, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# CIFAR (python pickle layout, as torchvision downloads it)

_CIFAR = {
    10: ("CIFAR-10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
         "test_batch", b"labels", "data_batch_1..5 and test_batch"),
    100: ("CIFAR-100", "cifar-100-python", ["train"], "test", b"fine_labels", "train and test"),
}

# What a CIFAR pickle may reference: numpy arrays and (in Python-3 protocol-2 pickles) bytes.
# Anything else is refused, so a planted file in the data folder cannot run code.
_PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _ArrayUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in _PICKLE_GLOBALS:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def _unpickle(path: Path, title: str) -> dict:
    if not path.is_file():
        raise DataError(f"{title} incomplete: missing file {path}")
    try:
        with open(path, "rb") as f:
            data = _ArrayUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, ImportError, OSError) as exc:
        raise DataError(f"{title}: {path} is truncated or corrupt ({exc.__class__.__name__}: "
                        f"{exc})") from None
    if not isinstance(data, dict):
        raise DataError(f"{title}: {path} holds a {type(data).__name__}, not a dict")
    return data


def _cifar_part(paths: list[Path], title: str, label_key: bytes, num_classes: int,
                name: str) -> ImageTensorDataset:
    images, labels = [], []
    for path in paths:
        batch = _unpickle(path, title)
        if b"data" not in batch or label_key not in batch:
            raise DataError(f"{title}: {path} lacks the keys b'data' and {label_key!r}")
        data = np.asarray(batch[b"data"])
        label = np.asarray(batch[label_key])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 \
                or label.shape != (len(data),):
            raise DataError(f"{title}: {path} has data {data.dtype} {data.shape} and "
                            f"{label.shape} labels; expected uint8 (N, 3072) and (N,)")
        if len(label) and (label.min() < 0 or label.max() >= num_classes):
            raise DataError(f"{title}: {path} has labels outside 0..{num_classes - 1}")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(label.astype(np.int64))
    return ImageTensorDataset(torch.from_numpy(np.concatenate(images)),
                              torch.from_numpy(np.concatenate(labels)), num_classes, name)


def load_cifar(root: str | Path, num_classes: int) -> Split:
    """CIFAR-10/100 from `root` (the folder containing cifar-10-batches-py / cifar-100-python,
    or that folder itself), read without torchvision's md5 check."""
    if num_classes not in _CIFAR:
        raise ConfigError(f"CIFAR has 10 or 100 classes, not {num_classes}")
    title, folder_name, train_files, test_file, label_key, listing = _CIFAR[num_classes]
    root = Path(root).expanduser()
    folder = root if root.name == folder_name else root / folder_name
    if not folder.is_dir():
        raise DataError(f"{title} not found: expected folder {folder} with {listing}; download "
                        f"it yourself (no network here) and pass --data-root")
    name = f"cifar{num_classes}"
    train = _cifar_part([folder / f for f in train_files], title, label_key, num_classes, name)
    test = _cifar_part([folder / test_file], title, label_key, num_classes, name)
    return train, test


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (idx files)

def read_idx(path: Path) -> np.ndarray:
    """A uint8 idx file (gzipped when its name ends in .gz) as an array of its stored shape."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] == 0:
        raise DataError(f"{path}: not a uint8 idx file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", ndim, offset=4))
    if len(raw) != header + int(np.prod(shape)):
        raise DataError(f"{path}: truncated or oversized: header says {shape} "
                        f"({int(np.prod(shape))} bytes), file has {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def _find_idx(root: Path, stem: str) -> Path:
    for path in (root / stem, root / f"{stem}.gz"):
        if path.is_file():
            return path
    raise DataError(f"Fashion-MNIST not found: no {stem}(.gz) in {root}; install it with "
                    f"`apt-get install dataset-fashion-mnist`, or put the four idx files in a "
                    f"folder and set FLATQ_DATA or pass --data-root")


def _fashion_part(root: Path, prefix: str) -> ImageTensorDataset:
    image_path = _find_idx(root, f"{prefix}-images-idx3-ubyte")
    label_path = _find_idx(root, f"{prefix}-labels-idx1-ubyte")
    images, labels = read_idx(image_path), read_idx(label_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST: {image_path} {images.shape} and {label_path} "
                        f"{labels.shape} do not match as (N, H, W) images and (N,) labels")
    if len(labels) and labels.max() >= 10:
        raise DataError(f"Fashion-MNIST: {label_path} has labels outside 0..9")
    return ImageTensorDataset(torch.from_numpy(images.copy()).unsqueeze(1),
                              torch.from_numpy(labels.astype(np.int64)), 10, "fashion_mnist")


def load_fashion_mnist(root: str | Path | None = None) -> Split:
    """Fashion-MNIST from its four idx files (plain or .gz) in `root`; default: FLATQ_DATA,
    else the folder of the Debian package dataset-fashion-mnist."""
    if root is None:
        root = os.environ.get("FLATQ_DATA") or FASHION_MNIST_DEFAULT_ROOT
    root = Path(root).expanduser()
    return _fashion_part(root, "train"), _fashion_part(root, "t10k")


# --------------------------------------------------------------------------------------------
# Small built-in data sets

def _split(images: Tensor, labels: Tensor, num_train: int, num_classes: int,
           name: str) -> Split:
    return (ImageTensorDataset(images[:num_train], labels[:num_train], num_classes, name),
            ImageTensorDataset(images[num_train:], labels[num_train:], num_classes, name))


def load_digits() -> Split:
    """scikit-learn's bundled 8x8 digits (1797 images), split 80/20 by a fixed permutation."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    return _split(images[order], labels[order], int(0.8 * len(images)), 10, "digits")


def make_synthetic(num_classes: int = 10, train_size: int = 512, test_size: int = 256,
                   channels: int = 3, size: int = 32, seed: int = 0) -> Split:
    """A learnable random data set for tests: per class a smooth random template, samples are
    the template plus pixel noise (a small CNN separates the classes in a few epochs)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(num_classes, channels, 2, 2, generator=g)
    templates = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear",
                                                align_corners=False) * 200 + 28
    labels = torch.cat([(torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
                        for n in (train_size, test_size)])  # balanced in each split
    total = train_size + test_size
    noise = torch.randn(total, channels, size, size, generator=g) * 30
    images = (templates[labels] + noise).round().clamp(0, 255).to(torch.uint8)
    return _split(images, labels, train_size, num_classes, "synthetic")


# --------------------------------------------------------------------------------------------
# Registry

def _data_root(root: str | Path | None, title: str, folder: str) -> str | Path:
    root = root or os.environ.get("FLATQ_DATA")
    if not root:
        raise DataError(f"{title}: no data folder given; pass --data-root (the folder "
                        f"containing {folder}) or set FLATQ_DATA")
    return root


_LOADERS: dict[str, Callable[..., Split]] = {
    "cifar10": lambda root: load_cifar(_data_root(root, "CIFAR-10", "cifar-10-batches-py"), 10),
    "cifar100": lambda root: load_cifar(_data_root(root, "CIFAR-100", "cifar-100-python"), 100),
    "fashion_mnist": lambda root: load_fashion_mnist(root),
    "digits": lambda root: load_digits(),
    "synthetic": lambda root, **kw: make_synthetic(**kw),
    "imagefolder": lambda root, **kw: load_image_folder(root, **kw),
}


def available_datasets() -> list[str]:
    """Names `load_dataset` accepts (a '-' may stand for '_', case does not matter)."""
    return list(_LOADERS)


def canonical_name(name: str) -> str:
    """The registry name of a data set ('Fashion-MNIST' -> 'fashion_mnist'); unknown ->
    ConfigError listing the available names."""
    key = name.strip().lower().replace("-", "_")
    if key not in _LOADERS:
        raise ConfigError(f"unknown data set {name!r}; available: "
                          f"{', '.join(available_datasets())}")
    return key


def load_dataset(name: str, root: str | Path | None = None, **kw) -> Split:
    """(train, test) of the named data set; `kw` go to the loader (synthetic: sizes and seed;
    imagefolder: size, augment, workers)."""
    return _LOADERS[canonical_name(name)](root, **kw)
