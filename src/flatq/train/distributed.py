"""Devices and ranks: one process per GPU under torchrun, or a single plain process.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; `setup` then joins the process group (NCCL on
CUDA, gloo on CPU) and pins the process to GPU LOCAL_RANK. Without those variables nothing
here communicates and every helper degrades to the single-process case, so the same run code
serves both. Rank 0 is the one that writes files; `main_first` runs a step on rank 0 alone
and hands its result (or its FlatqError) to the others.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..config import check_device
from ..errors import ConfigError, FlatqError

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda when available, else cpu; a CUDA device that is not there is refused."""
    name = check_device(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available on this machine; use "
                              "--device cpu or auto")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: this machine has {torch.cuda.device_count()} "
                              "GPU(s)")
    return device


def launched_by_torchrun() -> bool:
    return all(v in os.environ for v in TORCHRUN_VARIABLES)


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main_process() -> bool:
    return rank() == 0


def check_global_batch(batch_size: int) -> None:
    """The global batch must split evenly over the ranks (each takes batch_size / world)."""
    if batch_size % world_size():
        raise ConfigError(f"train.batch_size: {batch_size} is not divisible by the "
                          f"{world_size()} DDP ranks")


def setup(device_name: str) -> torch.device:
    """This process's device; under torchrun also joins the process group (once per process).

    Each rank uses GPU LOCAL_RANK when the device resolves to CUDA (an index given with
    --device is then ignored: torchrun decides which GPU a rank owns).
    """
    device = resolve_device(device_name)
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        atexit.register(teardown)
    return device


def teardown() -> None:
    """Leave the process group together: a rank that destroys its gloo group while another
    still talks to it can abort the other at exit ("terminate called without an active
    exception"). The (gloo) barrier waits at most 60 s, so a rank whose peers died still
    exits."""
    if not dist.is_initialized():
        return
    if dist.get_backend() == "gloo":
        try:
            dist.monitored_barrier(timeout=timedelta(seconds=60))
        except RuntimeError:
            pass                  # a peer is gone: nothing left to wait for
    dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device, sync_bn: bool = False) -> nn.Module:
    """`model` in DistributedDataParallel when there are several ranks, else as it is.

    DDP broadcasts rank 0's parameters and buffers at construction and rank 0's buffers
    (BatchNorm running statistics) before every forward; gradients are averaged. BatchNorm
    normalizes with each rank's own batch statistics (plain BN, as in the papers' per-GPU
    setups). Hooks registered on the inner model's submodules keep firing inside DDP.
    """
    if world_size() == 1:
        return model
    if sync_bn:
        if device.type != "cuda":
            raise ConfigError("--sync-bn needs CUDA: PyTorch's SyncBatchNorm does not run on "
                              f"{device.type}")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                   else None)


def main_first(fn: Callable[[], T]) -> T:
    """`fn()` run on rank 0 only; every rank returns its (picklable) result.

    A FlatqError raised on rank 0 is raised on every rank, so all ranks stop with the same
    message instead of the others waiting for rank 0 forever.
    """
    if world_size() == 1:
        return fn()
    box: list[Any] = [None]
    if rank() == 0:
        try:
            box[0] = (fn(), None)
        except FlatqError as exc:
            box[0] = (None, exc)
        except Exception as exc:
            dist.broadcast_object_list([(None, RuntimeError(f"rank 0 failed: {exc!r}"))], src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    result, error = box[0]
    if error is not None:
        raise error
    return result


def all_gather(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (one element when not distributed)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum of `values` over ranks (in place; a no-op when not distributed)."""
    if world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values
