"""Images per second of flatq's image-folder pipeline against the same pipeline written plainly.

Both decode the same generated JPEGs (ImageNet-like sizes, in a temporary ImageFolder tree)
with the same torchvision training transforms, RandomResizedCrop(224) and a horizontal flip,
batched by a DataLoader with 1, 2 and all CPUs' worker processes:

- plain: torchvision's ImageFolder + ToTensor + Normalize in the workers, default collate;
- flatq: `load_image_folder` + `make_loader` (uint8 tensors from the workers, each image's
  crop seeded by (seed, epoch, index)) and the batch normalized in the main process by the
  run's BatchPipeline, as the trainer does.

Each (pipeline, workers) pair runs `--repeats` epochs, interleaved; the rate of one epoch
counts from its first batch (worker start-up excluded) and the best epoch is reported, with
the ratio flatq / plain (above 1: flatq is faster).

    .venv/bin/python bench/data_throughput.py --images 512
writes results/bench_data_throughput.json (the committed one: --images 384 --repeats 4).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets, transforms as T

from flatq.data import load_image_folder, make_loader, pipeline_for
from flatq.data.folder import IMAGENET_MEAN, IMAGENET_STD
from machine import machine_info, run_main, save_report

SIZE = 224


def write_jpegs(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """`images` JPEGs of 400-500 x 330-375 pixels (smooth noise, quality 90) in train/ and a
    one-image val/ per class (the loader needs both splits)."""
    rng = np.random.default_rng(seed)
    for i in range(images + classes):
        split, label = ("train", i % classes) if i < images else ("val", i - images)
        folder = root / split / f"class{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = int(rng.integers(330, 376)), int(rng.integers(400, 501))
        coarse = rng.integers(0, 256, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
        pixels = np.kron(coarse, np.ones((8, 8, 1), np.uint8))[:h, :w]
        Image.fromarray(pixels).save(folder / f"{i:05d}.jpg", quality=90)


def plain_loader(root: Path, batch: int, workers: int) -> DataLoader:
    transform = T.Compose([T.RandomResizedCrop(SIZE), T.RandomHorizontalFlip(), T.ToTensor(),
                           T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return DataLoader(datasets.ImageFolder(root / "train", transform), batch_size=batch,
                      shuffle=True, num_workers=workers, drop_last=True)


def flatq_batches(root: Path, batch: int, workers: int):
    train = load_image_folder(root, size=SIZE, workers=workers)[0]
    train.set_epoch(0, seed=0)
    pipeline = pipeline_for("imagefolder", size=SIZE)
    order = torch.randperm(len(train)).tolist()
    for images, labels in make_loader(train, batch, order, drop_last=True):
        yield pipeline(images, train=True), labels


def rate(batches) -> float:
    """Images per second after the first batch (worker start-up and warm-up left out)."""
    iterator = iter(batches)
    next(iterator)
    count, start = 0, time.perf_counter()
    for images, _ in iterator:
        count += len(images)
    return count / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="training JPEGs to generate")
    parser.add_argument("--classes", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="epochs per configuration")
    parser.add_argument("--out", default="results/bench_data_throughput.json")
    args = parser.parse_args()
    torch.set_num_threads(1)      # the main process normalizes; workers do the decoding
    cpus = len(os.sched_getaffinity(0))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_jpegs(root, args.images, args.classes)
        for workers in sorted({1, 2, cpus}):
            best = {"plain": 0.0, "flatq": 0.0}
            for _ in range(args.repeats):
                best["plain"] = max(best["plain"], rate(plain_loader(root, args.batch_size,
                                                                     workers)))
                best["flatq"] = max(best["flatq"], rate(flatq_batches(root, args.batch_size,
                                                                      workers)))
            ratio = best["flatq"] / best["plain"]
            rows.append({"workers": workers, "plain_images_per_s": round(best["plain"], 1),
                         "flatq_images_per_s": round(best["flatq"], 1),
                         "ratio_flatq_over_plain": round(ratio, 3)})
            print(f"{workers} worker(s): plain {best['plain']:7.1f} img/s  flatq "
                  f"{best['flatq']:7.1f} img/s  flatq/plain {ratio:.2f}x", flush=True)
    # the load other processes put on the CPUs while this ran (the rates share them)
    machine = {**machine_info(), "cpus_available": cpus, "load_average_1min": os.getloadavg()[0]}
    print(f"machine: {machine['cpu']}, {cpus} CPUs available, load average "
          f"{machine['load_average_1min']:.1f}")
    save_report({"benchmark": "image-folder pipeline throughput (JPEG decode + "
                              "RandomResizedCrop(224) + flip + normalize)",
                 "images": args.images, "batch_size": args.batch_size,
                 "repeats": args.repeats, "machine": machine, "results": rows}, args.out)


if __name__ == "__main__":
    run_main(main)
