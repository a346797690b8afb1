"""The one training loop every method runs through.

Epochs of SGD steps (the objective computes the losses and takes the step), a per-step cosine
schedule, evaluation after each epoch, a checkpoint after each epoch written atomically,
metrics as JSON lines, and `resume` that restores model, optimizer, schedule, objective state
and RNG so a resumed run ends where an uninterrupted one would.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler
from tqdm import tqdm

from ..config import RunConfig
from ..data import BatchPipeline, ImageTensorDataset, collate_batch
from ..errors import CheckpointError, NonFiniteLossError
from ..methods.base import Objective
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler

# A step callback sees the objective and the current batch and returns values to log.
StepCallback = Callable[[int, Objective, Tensor, Tensor], "dict[str, float] | None"]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def show_progress(enabled: bool) -> bool:
    return enabled and is_main_process() and sys.stderr.isatty()


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageTensorDataset, pipeline: BatchPipeline,
             device: torch.device, batch_size: int = 512, progress: bool = False) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on `dataset`, in eval mode."""
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    correct, loss, count = 0, 0.0, 0
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not show_progress(progress)):
        images, labels = pipeline(images.to(device), train=False), labels.to(device)
        logits = model(images).float()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += labels.numel()
    model.train(was_training)
    return {"acc": 100.0 * correct / max(count, 1), "loss": loss / max(count, 1)}


@dataclass
class Trainer:
    """Runs `objective` for `config.train.epochs` epochs and keeps the run folder up to date.

    `meta` (model name, classes, channels, quantization) goes into every checkpoint so that
    a run folder alone is enough to rebuild the model.
    """

    objective: Objective
    train_set: ImageTensorDataset
    test_set: ImageTensorDataset
    train_pipeline: BatchPipeline
    eval_pipeline: BatchPipeline
    config: RunConfig
    run_dir: Path
    meta: dict[str, Any]
    step_callbacks: list[StepCallback] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    def __post_init__(self) -> None:
        train = self.config.train
        self.run_dir = Path(self.run_dir)
        self.model = self.objective.student
        self.train_set = self.objective.training_set(self.train_set)
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        if train.batch_size % self.world:
            raise ValueError(f"batch size {train.batch_size} is not divisible by {self.world} ranks")
        self.sampler = (DistributedSampler(self.train_set, seed=train.seed, drop_last=True)
                        if self.world > 1 else None)
        self.loader = DataLoader(self.train_set, batch_size=train.batch_size // self.world,
                                 sampler=self.sampler or RandomSampler(self.train_set, generator=torch.Generator()),
                                 drop_last=len(self.train_set) >= train.batch_size,
                                 collate_fn=collate_batch)
        self.steps_per_epoch = len(self.loader)
        if train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, train.max_steps_per_epoch)
        self.optimizer = build_optimizer(self.model, train)
        self.total_steps = train.epochs * self.steps_per_epoch
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         train.warmup_epochs * self.steps_per_epoch)
        if train.amp and self.device.type == "cuda":
            self.objective.autocast_dtype = torch.bfloat16
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.epoch = 0
        self.step = 0

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch, "step": self.step, "meta": self.meta,
            "config": self.config.to_dict(),
            "model": self._bare_model().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }

    def _bare_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def save_checkpoint(self) -> None:
        if is_main_process():
            save_atomic(self.state_dict(), self.run_dir / CHECKPOINT_NAME)

    def resume(self) -> None:
        """Continue from the run folder's last complete checkpoint."""
        state = load_checkpoint(self.run_dir, CHECKPOINT_NAME)
        if state.get("meta", {}).get("model") != self.meta.get("model") or \
                state.get("meta", {}).get("quant") != self.meta.get("quant"):
            raise CheckpointError(
                f"{self.run_dir / CHECKPOINT_NAME} was written for model "
                f"{state.get('meta', {}).get('model')} / quant {state.get('meta', {}).get('quant')}, "
                f"not {self.meta.get('model')} / {self.meta.get('quant')}")
        try:
            self._bare_model().load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint in {self.run_dir} does not fit this model: "
                                  f"{str(exc).splitlines()[0]}") from None
        self.scheduler.load_state_dict(state["scheduler"])
        self.objective.load_state_dict(state.get("objective", {}))
        torch.set_rng_state(state["rng"]["torch"])
        if state["rng"]["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.metrics.truncate_after(self.step)

    # -- loop -----------------------------------------------------------------------------
    def _epoch_batches(self):
        """This epoch's batches, in an order fixed by (seed, epoch) so resume replays it."""
        seed = self.config.train.seed * 100003 + self.epoch
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        else:
            self.loader.sampler.generator.manual_seed(seed)
        return self.loader

    def train_epoch(self) -> dict[str, float]:
        train = self.config.train
        self.objective.train()
        aug = torch.Generator(device=self.device).manual_seed(train.seed * 7919 + self.epoch)
        sums: dict[str, float] = {}
        count = 0
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {self.epoch + 1}/{train.epochs}",
                   leave=False, disable=not show_progress(train.progress))
        for i, (images, labels) in enumerate(self._epoch_batches()):
            if i >= self.steps_per_epoch:
                break
            images, labels, extra = self.objective.prepare(
                images.to(self.device), labels.to(self.device), self.train_pipeline, aug)
            self.objective.progress = self.step / self.total_steps
            try:
                losses = self.objective.step(images, labels, self.optimizer, **extra)
            except NonFiniteLossError as exc:
                last = self.run_dir / CHECKPOINT_NAME
                where = f"last good checkpoint: {last}" if last.is_file() else "no checkpoint yet"
                raise NonFiniteLossError(f"{exc} at step {self.step + 1} (epoch {self.epoch + 1}); "
                                         f"training stopped, weights not updated; {where}") from None
            self.scheduler.step()
            self.step += 1
            for name, value in losses.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            count += 1
            self._run_callbacks(images, labels)
            if train.checkpoint_every_steps and self.step % train.checkpoint_every_steps == 0:
                self.save_checkpoint()
            bar.set_postfix(loss=f"{sum(float(v) for v in losses.values()):.3f}")
            bar.update()
        bar.close()
        return {f"train_{k}": v / max(count, 1) for k, v in sums.items()}

    def _run_callbacks(self, images: Tensor, labels: Tensor) -> None:
        if not self.step_callbacks or self.step % self.config.train.track_every:
            return
        record: dict[str, float] = {}
        for callback in self.step_callbacks:
            record.update(callback(self.step, self.objective, images, labels) or {})
        if record and is_main_process():
            self.metrics.write({"step": self.step, "epoch": self.epoch + 1, **record})

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the last epoch; returns the final evaluation."""
        if resume:
            self.resume()
        train = self.config.train
        result: dict[str, Any] = {}
        while self.epoch < train.epochs:
            start = time.perf_counter()
            record = self.train_epoch()
            self.epoch += 1
            test = evaluate(self.model, self.test_set, self.eval_pipeline, self.device,
                            train.test_batch_size)
            result = {"epoch": self.epoch, "step": self.step, **record, "test_acc": test["acc"],
                      "test_loss": test["loss"], "lr": self.optimizer.param_groups[0]["lr"],
                      "seconds": time.perf_counter() - start}
            if is_main_process():
                self.metrics.write(result)
                terms = "  ".join(f"{k[6:]} {v:.4f}" for k, v in record.items())
                print(f"epoch {self.epoch}/{train.epochs}  {terms}  test acc {test['acc']:.2f}%  "
                      f"({result['seconds']:.1f}s)", flush=True)
            self.save_checkpoint()
        if not result:
            test = evaluate(self.model, self.test_set, self.eval_pipeline, self.device,
                            train.test_batch_size)
            result = {"epoch": self.epoch, "step": self.step, "test_acc": test["acc"],
                      "test_loss": test["loss"]}
        return result
