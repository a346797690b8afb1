"""DataLoaders for both kinds of data set, and the sampler that lets an epoch start midway.

In-memory sets are batched in this process by one indexing op; image folders are decoded by
their `workers` processes (never persistent: every epoch's workers start from the data set as
`set_epoch` left it).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..errors import FlatqError
from .datasets import collate_batch


class ResumableSampler(DistributedSampler):
    """DistributedSampler whose epoch can start at position `start` of this rank's share.

    `set_epoch(epoch, start)` fixes the order by (seed, epoch) as DistributedSampler does and
    skips its first `start` indices, so a run resumed mid-epoch reads no image it has already
    trained on (an image folder would otherwise decode every skipped batch).
    """

    start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(super().__iter__(), self.start, None)

    def __len__(self) -> int:
        return super().__len__() - self.start


class _Loader(DataLoader):
    """A DataLoader that reports a worker's FlatqError (an image that cannot be decoded) as
    the one-line error it was, not wrapped in the worker's traceback text."""

    def __iter__(self) -> Iterator:
        iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except FlatqError as exc:
                last = str(exc).strip().splitlines()[-1]        # "module.Class: message"
                prefix = f"{type(exc).__module__}.{type(exc).__name__}: "
                raise type(exc)(last.removeprefix(prefix)) from None
            yield batch


def make_loader(dataset: Dataset, batch_size: int, sampler: Iterable[int],
                drop_last: bool = False, generator: torch.Generator | None = None,
                device: torch.device | None = None) -> DataLoader:
    """A DataLoader over `dataset` in `sampler`'s order with the dataset's own number of
    worker processes (`dataset.workers`); batches are (uint8 images, int64 labels)."""
    workers = getattr(dataset, "workers", 0)
    return _Loader(dataset, batch_size=batch_size, sampler=sampler, drop_last=drop_last,
                      collate_fn=collate_batch, generator=generator, num_workers=workers,
                      pin_memory=workers > 0 and device is not None and device.type == "cuda",
                      prefetch_factor=4 if workers else None)
