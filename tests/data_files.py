"""Small data files in the exact formats flatq reads, written by the tests themselves (so the
suite needs no installed data set)."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray, gz: bool) -> None:
    data = idx_bytes(array)
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def write_fashion_mnist(folder: Path, train: int, test: int, gz: bool = True,
                        seed: int = 0) -> tuple[np.ndarray, ...]:
    """Fashion-MNIST's four idx files with random 28x28 images: (train_x, train_y, test_x,
    test_y)."""
    rng = np.random.default_rng(seed)
    arrays = (rng.integers(0, 256, (train, 28, 28)), rng.integers(0, 10, train),
              rng.integers(0, 256, (test, 28, 28)), rng.integers(0, 10, test))
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    for name, array in zip(names, arrays):
        write_idx(folder / name, array, gz)
    return arrays


def write_image_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog", "fox"),
                       train: int = 8, val: int = 3, size: int = 16, seed: int = 0) -> Path:
    """An ImageFolder layout of PNGs, root/{train,val}/CLASS/N.png: per class a colour plus
    noise, so a small model can tell the classes apart."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train), ("val", val)):
        for label, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.random((size, size, 3)) * 60 + label * 80
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root
