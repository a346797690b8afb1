"""Data package: loaders on tiny files in the real on-disk layouts, batched fetching,
vectorized augmentation and calibration subsets."""

import gzip
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

from data_files import idx_bytes, write_fashion_mnist, write_idx
from flatq.data import (BatchPipeline, ImageTensorDataset, available_datasets, calibration_batches,
                        collate_batch, load_cifar, load_dataset, load_digits, load_fashion_mnist,
                        make_synthetic, pipeline_for)
from flatq.data.datasets import read_idx
from flatq.errors import ConfigError, DataError

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# CIFAR

def _cifar_rows(n: int, offset: int) -> np.ndarray:
    """n rows of 3072 bytes with pixel values that encode (row, plane, y, x)."""
    y, x = np.divmod(np.arange(1024), 32)
    rows = np.zeros((n, 3072), np.uint8)
    for i in range(n):
        for plane in range(3):
            value = (offset + i * 7 + plane * 50 + y * 3 + x) % 256
            rows[i, plane * 1024:(plane + 1) * 1024] = value
    return rows


def _expected_image(row: np.ndarray) -> np.ndarray:
    """The (3, 32, 32) image of a 3072 row, built pixel by pixel: R plane, G plane, B plane."""
    image = np.zeros((3, 32, 32), np.uint8)
    for c in range(3):
        for y in range(32):
            for x in range(32):
                image[c, y, x] = row[c * 1024 + y * 32 + x]
    return image


def _dump(path: Path, obj: dict, legacy_numpy_path: bool = False) -> None:
    data = pickle.dumps(obj, protocol=2)
    if legacy_numpy_path:  # what the original Python-2 CIFAR pickles reference
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(data)


@pytest.fixture
def cifar10_root(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rows, labels = [], []
    for b in range(1, 6):
        r = _cifar_rows(b, offset=b * 11)  # batch b holds b rows
        lab = [(b + i) % 10 for i in range(b)]
        _dump(folder / f"data_batch_{b}", {b"batch_label": b"training batch", b"data": r,
                                           b"labels": lab, b"filenames": [b"x.png"] * b},
              legacy_numpy_path=b == 1)
        rows.append(r)
        labels += lab
    test_rows = _cifar_rows(3, offset=200)
    _dump(folder / "test_batch", {b"data": test_rows, b"labels": [9, 0, 4]})
    return tmp_path, np.concatenate(rows), labels, test_rows, [9, 0, 4]


def test_cifar10_loads_exact_pixels_and_labels(cifar10_root):
    root, rows, labels, test_rows, test_labels = cifar10_root
    train, test = load_cifar(root, 10)
    assert len(train) == 15 and len(test) == 3
    assert train.images.dtype == torch.uint8 and train.images.shape == (15, 3, 32, 32)
    assert train.num_classes == 10 and train.name == "cifar10"
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(train.images[i].numpy(), _expected_image(row))
    for i, row in enumerate(test_rows):
        np.testing.assert_array_equal(test.images[i].numpy(), _expected_image(row))
    assert train.labels.tolist() == labels and test.labels.tolist() == test_labels
    assert train.labels.dtype == torch.int64


def test_cifar10_accepts_the_batches_folder_itself(cifar10_root):
    root = cifar10_root[0]
    train, _ = load_cifar(root / "cifar-10-batches-py", 10)
    direct, _ = load_dataset("cifar10", root=str(root))
    assert torch.equal(train.images, direct.images)


def test_cifar100(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    train_rows, test_rows = _cifar_rows(4, 1), _cifar_rows(2, 99)
    _dump(folder / "train", {b"data": train_rows, b"fine_labels": [0, 99, 42, 7],
                             b"coarse_labels": [0, 19, 1, 2]})
    _dump(folder / "test", {b"data": test_rows, b"fine_labels": [5, 98],
                            b"coarse_labels": [3, 4]})
    train, test = load_cifar(tmp_path, 100)
    assert train.labels.tolist() == [0, 99, 42, 7] and test.labels.tolist() == [5, 98]
    assert train.num_classes == 100
    np.testing.assert_array_equal(test.images[1].numpy(), _expected_image(test_rows[1]))


def test_cifar_missing_folder_names_expected_folder(tmp_path):
    with pytest.raises(DataError) as err:
        load_cifar(tmp_path, 10)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    assert "--data-root" in str(err.value)
    with pytest.raises(DataError, match="cifar-100-python"):
        load_dataset("cifar100", root=tmp_path)


def test_cifar_missing_file(cifar10_root):
    root = cifar10_root[0]
    (root / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar(root, 10)


def test_cifar_truncated_pickle_names_file(cifar10_root):
    path = cifar10_root[0] / "cifar-10-batches-py" / "data_batch_4"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(DataError, match="data_batch_4"):
        load_cifar(cifar10_root[0], 10)


def test_cifar_garbage_and_foreign_objects_refused(cifar10_root):
    folder = cifar10_root[0] / "cifar-10-batches-py"
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="test_batch"):
        load_cifar(cifar10_root[0], 10)
    # A pickle that would call os.system must not run: it is refused as corrupt.
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": os.system}, protocol=2))
    with pytest.raises(DataError, match="test_batch"):
        load_cifar(cifar10_root[0], 10)


def test_cifar_wrong_shape(cifar10_root):
    folder = cifar10_root[0] / "cifar-10-batches-py"
    _dump(folder / "test_batch", {b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]})
    with pytest.raises(DataError, match="test_batch.*3072"):
        load_cifar(cifar10_root[0], 10)


def test_cifar_without_root_asks_for_one(monkeypatch):
    monkeypatch.delenv("FLATQ_DATA", raising=False)
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("cifar10")


# --------------------------------------------------------------------------------------------
# idx files / Fashion-MNIST

@pytest.mark.parametrize("gz", [False, True])
def test_fashion_mnist_from_small_idx_files(tmp_path, gz):
    train_x, train_y, test_x, test_y = write_fashion_mnist(tmp_path, 5, 3, gz)
    train, test = load_fashion_mnist(tmp_path)
    assert train.images.shape == (5, 1, 28, 28) and test.images.shape == (3, 1, 28, 28)
    np.testing.assert_array_equal(train.images[:, 0].numpy(), train_x)
    np.testing.assert_array_equal(test.labels.numpy(), test_y)
    assert train.num_classes == 10


def test_fashion_mnist_root_from_env(tmp_path, monkeypatch):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 4, 4)), False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(2), False)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((1, 4, 4)), True)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(1), True)
    monkeypatch.setenv("FLATQ_DATA", str(tmp_path))
    train, test = load_dataset("Fashion-MNIST")
    assert len(train) == 2 and len(test) == 1


def test_idx_bad_magic_and_truncation(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x00\x00\x0d\x01" + (3).to_bytes(4, "big") + b"abc")  # float idx
    with pytest.raises(DataError, match="bad"):
        read_idx(bad)
    short = tmp_path / "short"
    short.write_bytes(idx_bytes(np.zeros((4, 3, 3)))[:-5])
    with pytest.raises(DataError, match="short"):
        read_idx(short)
    broken_gz = tmp_path / "broken.gz"
    broken_gz.write_bytes(gzip.compress(idx_bytes(np.zeros((4, 3, 3))))[:-12])
    with pytest.raises(DataError, match="broken.gz"):
        read_idx(broken_gz)


def test_fashion_mnist_missing_says_how_to_get_it(tmp_path):
    with pytest.raises(DataError) as err:
        load_fashion_mnist(tmp_path)
    assert str(tmp_path) in str(err.value)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "FLATQ_DATA" in str(err.value)


@pytest.mark.skipif(not FASHION_ROOT.is_dir(), reason="Debian dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
    train, test = load_fashion_mnist(FASHION_ROOT)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.labels.bincount().tolist() == [6000] * 10
    assert test.labels.min() == 0 and test.labels.max() == 9


# --------------------------------------------------------------------------------------------
# Built-in sets and the registry

def test_digits():
    train, test = load_digits()
    assert train.images.shape == (1437, 1, 8, 8) and test.images.shape == (360, 1, 8, 8)
    assert train.images.max() == 255 and train.images.dtype == torch.uint8
    assert set(test.labels.tolist()) == set(range(10))
    again, _ = load_digits()
    assert torch.equal(again.images, train.images)


def test_synthetic_determinism():
    a_train, a_test = make_synthetic(num_classes=4, train_size=40, test_size=20, channels=1,
                                     size=16, seed=3)
    b_train, b_test = load_dataset("synthetic", num_classes=4, train_size=40, test_size=20,
                                   channels=1, size=16, seed=3)
    assert a_train.images.shape == (40, 1, 16, 16) and len(a_test) == 20
    assert torch.equal(a_train.images, b_train.images)
    assert torch.equal(a_test.labels, b_test.labels)
    c_train, _ = make_synthetic(num_classes=4, train_size=40, test_size=20, channels=1, size=16,
                                seed=4)
    assert not torch.equal(a_train.images, c_train.images)
    assert a_train.labels.bincount().tolist() == [10] * 4


def test_registry():
    assert available_datasets() == ["cifar10", "cifar100", "fashion_mnist", "digits", "synthetic",
                                    "imagefolder"]
    with pytest.raises(ConfigError, match="cifar10.*synthetic"):
        load_dataset("imagenet")
    with pytest.raises(ConfigError, match="available"):
        pipeline_for("imagenet")


# --------------------------------------------------------------------------------------------
# Batched fetching

def test_dataloader_batches_every_index_once():
    n = 37
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 2, 3, 3).clone()
    ds = ImageTensorDataset(images, torch.arange(n), num_classes=n, name="ids")
    assert ds[5][0].shape == (2, 3, 3) and ds[5][1] == 5
    loader = DataLoader(ds, batch_size=8, collate_fn=collate_batch,
                        sampler=RandomSampler(ds, generator=torch.Generator().manual_seed(0)))
    for _ in range(2):
        seen = []
        for x, y in loader:
            assert x.dtype == torch.uint8 and x.shape[1:] == (2, 3, 3) and x.shape[0] <= 8
            assert torch.equal(x[:, 0, 0, 0].long(), y)
            seen += y.tolist()
        assert sorted(seen) == list(range(n))
        assert seen != list(range(n))


def test_dataloader_with_distributed_sampler():
    ds, _ = make_synthetic(train_size=30, test_size=1, size=8)
    seen = []
    for rank in range(2):
        sampler = DistributedSampler(ds, num_replicas=2, rank=rank, seed=1)
        for x, y in DataLoader(ds, batch_size=4, sampler=sampler, collate_fn=collate_batch):
            assert x.shape[1:] == (3, 8, 8)
            seen += y.tolist()
    assert len(seen) == 30
    assert torch.equal(torch.tensor(seen).bincount(), ds.labels.bincount())


def test_collate_batch_stacks_samples():
    ds, _ = make_synthetic(train_size=6, test_size=1, size=8)
    x, y = collate_batch([ds[i] for i in range(3)])
    assert torch.equal(x, ds.images[:3]) and torch.equal(y, ds.labels[:3])


# --------------------------------------------------------------------------------------------
# BatchPipeline

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def _random_images(n=16, c=3, h=8, w=8, seed=0):
    return torch.randint(0, 256, (n, c, h, w), generator=torch.Generator().manual_seed(seed),
                         dtype=torch.uint8)


def _reference(x: torch.Tensor, mean, std) -> torch.Tensor:
    m, s = torch.tensor(mean).view(-1, 1, 1), torch.tensor(std).view(-1, 1, 1)
    return (x.float() / 255 - m) / s


def test_eval_mode_is_padding_then_normalization():
    x = _random_images(h=6, w=6)
    pipe = BatchPipeline(MEAN, STD, size=8, crop_padding=2, flip=True)
    out = pipe(x, train=False)
    padded = torch.zeros(16, 3, 8, 8, dtype=torch.uint8)
    padded[:, :, 1:7, 1:7] = x
    assert out.dtype == torch.float32 and out.shape == (16, 3, 8, 8)
    torch.testing.assert_close(out, _reference(padded, MEAN, STD))
    assert torch.equal(out, pipe(x, train=False))


def test_train_without_augmentation_equals_eval():
    x = _random_images()
    pipe = BatchPipeline(MEAN, STD, crop_padding=0, flip=False)
    assert torch.equal(pipe(x, train=True), pipe(x, train=False))


def test_flip_mirrors_exactly_the_flipped_samples():
    x = _random_images(n=64)
    pipe = BatchPipeline(MEAN, STD, flip=True)
    out = pipe(x, train=True, generator=torch.Generator().manual_seed(0))
    plain, mirrored = _reference(x, MEAN, STD), _reference(x.flip(3), MEAN, STD)
    flipped = [bool(torch.equal(o, m)) for o, m in zip(out, mirrored)]
    for o, p, f in zip(out, plain, flipped):
        assert f or torch.equal(o, p)
    assert 10 < sum(flipped) < 54
    again = pipe(x, train=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_crop_is_a_window_of_the_padded_image():
    pad, n = 3, 64
    x = _random_images(n=n, h=10, w=12)
    pipe = BatchPipeline(MEAN, STD, crop_padding=pad)
    out = pipe(x, train=True, generator=torch.Generator().manual_seed(1))
    padded = _reference(torch.nn.functional.pad(x, (pad,) * 4), MEAN, STD)
    offsets = []
    for i in range(n):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(out[i], padded[i, :, dy:dy + 10, dx:dx + 12])]
        assert len(matches) == 1, f"sample {i} is no window of its padded image"
        offsets.append(matches[0])
    assert len(set(offsets)) > 20  # per-sample offsets, not one for the batch
    assert {dy for dy, _ in offsets} == set(range(2 * pad + 1))


def test_channels_and_size():
    x = _random_images(n=4, c=1, h=28, w=28)
    pipe = pipeline_for("fashion_mnist", size=32, channels=3)
    assert pipe.crop_padding == 4 and pipe.output_shape((1, 28, 28)) == (3, 32, 32)
    out = pipe(x, train=True, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 32, 32)
    ev = pipe(x, train=False)
    assert torch.equal(ev[:, 0], ev[:, 2])
    torch.testing.assert_close(ev[:, 1, 2:30, 2:30], _reference(x[:, 0], (0.2860,), (0.3530,)))
    assert pipeline_for("fashion-mnist").crop_padding == 2
    with pytest.raises(ConfigError, match="larger"):
        BatchPipeline((0.5,), (0.5,), size=16)(x, train=False)
    with pytest.raises(ConfigError, match="channels"):
        BatchPipeline((0.5,), (0.5,), channels=3)(_random_images(c=2), train=False)
    with pytest.raises(ConfigError, match="channels"):
        BatchPipeline(MEAN, STD)(x, train=False)


def test_pipeline_defaults():
    cifar = pipeline_for("cifar10")
    assert (cifar.crop_padding, cifar.flip, len(cifar.mean)) == (4, True, 3)
    assert pipeline_for("cifar10", augment=False).crop_padding == 0
    assert not pipeline_for("cifar100", augment=False).flip
    assert (pipeline_for("digits").crop_padding, pipeline_for("digits").flip) == (1, False)
    synthetic = pipeline_for("synthetic")
    assert (synthetic.crop_padding, synthetic.flip) == (0, False)


# --------------------------------------------------------------------------------------------
# Calibration

def test_calibration_batches():
    train, _ = make_synthetic(train_size=64, test_size=1, size=8)
    pipe = BatchPipeline(MEAN, STD, crop_padding=2, flip=True)
    a = calibration_batches(train, pipe, num_images=30, seed=5, batch_size=8)
    b = calibration_batches(train, pipe, num_images=30, seed=5, batch_size=8)
    c = calibration_batches(train, pipe, num_images=30, seed=6, batch_size=8)
    assert [t.shape[0] for t in a] == [8, 8, 8, 6]
    assert all(torch.equal(s, t) for s, t in zip(a, b))
    assert not torch.equal(a[0], c[0])
    # eval transform of distinct training images
    rows = torch.cat(a)
    expected = _reference(train.images, MEAN, STD)
    picked = [next(j for j in range(64) if torch.equal(r, expected[j])) for r in rows]
    assert len(set(picked)) == 30
    with pytest.raises(ConfigError, match="64"):
        calibration_batches(train, pipe, num_images=65)
