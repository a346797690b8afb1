"""The one training loop every method runs through.

Epochs of SGD steps (the objective computes the losses and takes the step), a per-step cosine
schedule, evaluation after each epoch, a checkpoint after each epoch (and every N steps if
asked) written atomically, metrics as JSON lines, and `resume` that restores model, optimizer,
schedule, objective state, the epoch's running loss sums and every rank's RNG, so a resumed
run ends where an uninterrupted one would. Batch order is fixed by (seed, epoch) and the
augmentation generator is reseeded from (seed, step, rank) at every step, so a run resumed
mid-epoch skips the finished batches and draws exactly what it would have drawn.

Under DDP (see `distributed.py`) one permutation per epoch is split across the ranks, so a
global batch holds the same images whatever the number of ranks; rank 0 writes all files.
"""

from __future__ import annotations

import hashlib
import itertools
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..config import RunConfig, canonical_method
from ..data import (BatchPipeline, ImageFolderSet, ImageTensorDataset, ResumableSampler,
                    make_loader, subset_batches)
from ..errors import CheckpointError, NonFiniteLossError
from ..methods.base import Objective
from ..quant.dampening import check_dampening
from ..quant.freezing import WeightFreezing
from ..quant.health import count_dead, dead_channels, describe_dead
from .batchnorm import (CheckedEstimate, freeze_batchnorm, reestimate_batchnorm,
                        reestimate_batchnorm_checked)
from .checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from .distributed import (all_gather, all_reduce_sum, broadcast_buffers, check_global_batch,
                          is_main_process, rank, resolve_device, world_size)
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler

# A step callback sees the objective and the current batch and returns values to log.
StepCallback = Callable[[int, Objective, Tensor, Tensor], "dict[str, float] | None"]


__all__ = ["Trainer", "StepCallback", "evaluate", "meta_mismatch", "resolve_device",
           "is_main_process", "stream_seed"]


def show_progress(enabled: bool) -> bool:
    return enabled and is_main_process() and sys.stderr.isatty()


def stream_seed(seed: int, step: int, rank: int = 0, stream: str = "augment") -> int:
    """Seed of the random draws of one (global step, rank) in the named stream."""
    key = f"{stream}:{seed}:{step}:{rank}".encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def meta_mismatch(saved: Any, meta: dict[str, Any]) -> str | None:
    """How a checkpoint's metadata differs from this run's in model and quantization, or None."""
    saved = saved if isinstance(saved, dict) else {}
    if saved.get("model") != meta.get("model"):
        return f"model {saved.get('model')} (this run: {meta.get('model')})"
    if saved.get("teacher") and meta.get("teacher") and saved["teacher"] != meta["teacher"]:
        return (f"the teacher in {saved.get('source')} (this run: {meta.get('source')}, "
                "other weights)")
    old, new = saved.get("quant"), meta.get("quant")
    if (old is None) != (new is None):
        kind = {True: "a full-precision", False: "a quantized"}
        return f"{kind[old is None]} model (this run: {kind[new is None][2:]})"
    if old != new:
        keys = list(new) + [k for k in old if k not in new]
        return ", ".join(f"quant.{k} {old.get(k)!r} (this run: {new.get(k)!r})"
                         for k in keys if old.get(k) != new.get(k))
    return None


# Options a resumed run may change: how far it trains (epochs; the cosine schedule is recomputed
# for the new length), its peak learning rate (the schedule continues at the same position,
# scaled: the fix for a diverged run), where and how it reports, and where its data now lives.
# Anything else would silently not apply (the optimizer state comes from the checkpoint) or
# would train another run under this one's name.
RESUMABLE_OPTIONS = ("train.epochs", "train.lr", "train.device", "train.progress",
                     "train.test_batch_size", "train.eval_every", "train.checkpoint_every_steps",
                     "data.root", "data.workers")


def _flat(config: dict[str, Any]) -> dict[str, Any]:
    """{'train': {'lr': 0.1}, 'model': 'resnet8'} -> {'train.lr': 0.1, 'model': 'resnet8'}."""
    flat: dict[str, Any] = {}
    for section, values in config.items():
        if isinstance(values, dict):
            flat.update({f"{section}.{key}": value for key, value in values.items()})
        else:
            flat[section] = values
    return flat


def resume_changes(saved: dict[str, Any], config: RunConfig) -> list[str]:
    """The options that differ from the checkpoint's config and may not change on resume
    (options the checkpoint predates are not compared)."""
    old, new = _flat(saved), _flat(config.to_dict())
    return [f"{key} {old[key]!r} -> {new.get(key)!r}" for key in sorted(old)
            if key not in RESUMABLE_OPTIONS and old[key] != new.get(key)]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: ImageTensorDataset | ImageFolderSet,
             pipeline: BatchPipeline, device: torch.device, batch_size: int = 512,
             progress: bool = False, distributed: bool = False) -> dict[str, float]:
    """Top-1 accuracy (%) and mean cross-entropy of `model` on `dataset`, in eval mode.

    `distributed`: every rank evaluates its share of the images (every `world`-th) and the
    counts are summed over ranks, so all ranks return the full-set result (all must call it).
    """
    was_training = model.training
    model.eval()
    shard = range(rank(), len(dataset), world_size()) if distributed else range(len(dataset))
    loader = make_loader(dataset, batch_size, shard, device=device)
    correct, loss, count = 0, 0.0, 0
    for images, labels in tqdm(loader, desc="eval", leave=False, disable=not show_progress(progress)):
        images, labels = pipeline(images.to(device), train=False), labels.to(device)
        logits = model(images).float()
        loss += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(1) == labels).sum().item()
        count += labels.numel()
    model.train(was_training)
    totals = torch.tensor([correct, loss, count], dtype=torch.float64, device=device)
    if distributed:
        all_reduce_sum(totals)
    correct, loss, count = totals.tolist()
    return {"acc": 100.0 * correct / max(count, 1), "loss": loss / max(count, 1)}


@dataclass
class Trainer:
    """Runs `objective` for `config.train.epochs` epochs and keeps the run folder up to date.

    `meta` (model name, classes, channels, quantization) goes into every checkpoint so that
    a run folder alone is enough to rebuild the model.
    """

    objective: Objective
    train_set: ImageTensorDataset | ImageFolderSet
    test_set: ImageTensorDataset | ImageFolderSet
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
        if train.dampen:
            check_dampening(self.model)
            self.objective.dampening = train.dampen
        if train.freeze_oscillations:
            self.objective.freezing = WeightFreezing(self._bare_model(), train.freeze_oscillations,
                                                     train.freeze_momentum)
        self.train_set = self.objective.training_set(self.train_set)
        self.world, self.rank = world_size(), rank()
        check_global_batch(train.batch_size)
        # One permutation of the training set per (seed, epoch), rank r taking every
        # world-th index: the union of the ranks' batches is the single-process batch.
        self.sampler = ResumableSampler(self.train_set, num_replicas=self.world,
                                        rank=self.rank, seed=train.seed, drop_last=True)
        self.loader = make_loader(self.train_set, train.batch_size // self.world, self.sampler,
                                  drop_last=len(self.train_set) >= train.batch_size,
                                  # each epoch's iterator draws a seed from this, not from the
                                  # global RNG (SFP noise), which a mid-epoch resume restores
                                  generator=torch.Generator(), device=self.device)
        self.steps_per_epoch = len(self.loader)
        if train.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, train.max_steps_per_epoch)
        self.optimizer = build_optimizer(self.model, train)
        self.total_steps = train.epochs * self.steps_per_epoch
        self.bn_freeze_step = round((1.0 - train.bn_freeze) * self.total_steps)
        self.dead = 0                            # dead weight channels at the last epoch's end
        self.scheduler = build_scheduler(self.optimizer, self.total_steps,
                                         train.warmup_epochs * self.steps_per_epoch)
        if train.amp and self.device.type == "cuda":
            self.objective.autocast_dtype = torch.bfloat16
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl")
        self.epoch = 0
        self.step = 0
        self.epoch_step = 0                      # steps done in the current epoch
        self.epoch_sums: dict[str, float] = {}   # their loss terms, summed
        self.result: dict[str, Any] = {}         # the last epoch's record (the run's result)

    # -- state ----------------------------------------------------------------------------
    def _rng_state(self) -> dict[str, Any]:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                "objective": [g.get_state() for g in self.objective.generators()]}

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        if state["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        for generator, saved in zip(self.objective.generators(), state.get("objective", [])):
            generator.set_state(saved)

    def _reseed(self) -> None:
        """Fresh per-rank random streams, for a run resumed with another number of ranks."""
        seed = self.config.train.seed
        torch.manual_seed(stream_seed(seed, self.step, self.rank, "torch"))
        for i, generator in enumerate(self.objective.generators()):
            generator.manual_seed(stream_seed(seed, self.step, self.rank, f"objective{i}"))

    def state_dict(self) -> dict[str, Any]:
        """The full training state; every rank must call it (their RNG states are gathered)."""
        return {
            "epoch": self.epoch, "step": self.step, "epoch_step": self.epoch_step,
            "epoch_sums": dict(self.epoch_sums), "steps_per_epoch": self.steps_per_epoch,
            "result": dict(self.result),
            "world_size": self.world, "meta": self.meta,
            "config": self.config.to_dict(),
            "model": self._bare_model().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "objective": self.objective.state_dict(),
            "freezing": self.objective.freezing.state_dict() if self.objective.freezing else {},
            "rng": all_gather(self._rng_state()),
        }

    def _bare_model(self) -> nn.Module:
        return getattr(self.model, "module", self.model)

    def _last_good(self) -> str:
        last = self.run_dir / CHECKPOINT_NAME
        return f"last good checkpoint: {last}" if last.is_file() else "no checkpoint yet"

    def save_checkpoint(self) -> None:
        """Rank 0 writes the state atomically; non-finite weights are never written."""
        bad = [name for name, value in self._bare_model().state_dict().items()
               if isinstance(value, Tensor) and value.is_floating_point()
               and not torch.isfinite(value).all()]
        if bad:
            raise NonFiniteLossError(f"weights became non-finite ({bad[0]}) by step {self.step} "
                                     f"(epoch {self.epoch + 1}); training stopped, nothing "
                                     f"saved; {self._last_good()}")
        state = self.state_dict()
        if is_main_process():
            save_atomic(state, self.run_dir / CHECKPOINT_NAME)

    def resume(self) -> None:
        """Load the run folder's last complete checkpoint (every rank reads it), refusing one
        written for another model, method, teacher or settings. Writes nothing: `fit` then
        drops the metrics records it will redo."""
        state = load_checkpoint(self.run_dir, CHECKPOINT_NAME)
        mismatch = meta_mismatch(state.get("meta"), self.meta)
        saved = state.get("config", {})
        method = saved.get("method", {}).get("name")
        if method is not None:      # a checkpoint may say a method's former name (lsq)
            method = canonical_method(method)
            saved = {**saved, "method": {**saved["method"], "name": method}}
        if not mismatch and self.config.method and method and method != self.config.method.name:
            mismatch = f"method {method} (this run: {self.config.method.name})"
        if mismatch:
            raise CheckpointError(f"{self.run_dir / CHECKPOINT_NAME} was written for {mismatch}; "
                                  "resume with the run's own settings or use another --out")
        changed = resume_changes(saved, self.config)
        if changed:
            raise CheckpointError(f"--resume cannot change {'; '.join(changed)}; only "
                                  f"{', '.join(RESUMABLE_OPTIONS)} may change (start a new run "
                                  "with --out for other settings)")
        try:
            self._bare_model().load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(f"checkpoint in {self.run_dir} does not fit this model: "
                                  f"{str(exc).splitlines()[0]}") from None
        if state.get("epoch_step") and state["steps_per_epoch"] != self.steps_per_epoch:
            raise CheckpointError(
                f"{self.run_dir / CHECKPOINT_NAME} was saved mid-epoch with "
                f"{state['steps_per_epoch']} steps per epoch, this configuration has "
                f"{self.steps_per_epoch}; resume with the run's batch size and "
                "max_steps_per_epoch")
        self.scheduler.load_state_dict(state["scheduler"])
        self._apply_schedule(state.get("config", {}).get("train", {}).get("lr"))
        self.objective.load_state_dict(state.get("objective", {}))
        if self.objective.freezing is not None:
            self.objective.freezing.load_state_dict(state["freezing"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.epoch_step = state.get("epoch_step", 0)
        self.epoch_sums = dict(state.get("epoch_sums", {}))
        self.result = dict(state.get("result", {}))
        self.dead = self.result.get("dead_channels", 0)
        rngs = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
        if len(rngs) == self.world:
            self._set_rng_state(rngs[self.rank])
        else:
            self._reseed()

    def _apply_schedule(self, saved_lr: float | None) -> None:
        """This config's learning rate and length on the restored schedule position."""
        lr = self.config.train.lr
        if saved_lr is not None and saved_lr != lr and is_main_process():
            print(f"--resume: peak learning rate {saved_lr:g} -> {lr:g}; the schedule continues "
                  f"at step {self.step}", flush=True)
        groups = self.optimizer.param_groups
        self.scheduler.base_lrs = [lr * group.get("lr_scale", 1.0) for group in groups]
        for group, base, factor in zip(groups, self.scheduler.base_lrs,
                                       self.scheduler.lr_lambdas):
            group["initial_lr"] = base
            group["lr"] = base * factor(self.scheduler.last_epoch)

    # -- loop -----------------------------------------------------------------------------
    def _epoch_batches(self):
        """This epoch's batches not yet done, in an order fixed by (seed, epoch): the sampler
        starts after the images of the done steps, so none of them is read again."""
        self.sampler.set_epoch(self.epoch, start=self.epoch_step * self.loader.batch_size)
        if isinstance(self.train_set, ImageFolderSet):   # crops drawn per (seed, epoch, image)
            self.train_set.set_epoch(self.epoch, self.config.train.seed)
        return itertools.islice(self.loader, self.steps_per_epoch - self.epoch_step)

    def reestimate_batchnorm(self, dataset: ImageTensorDataset | ImageFolderSet,
                             check: int = 0) -> CheckedEstimate | None:
        """Replace the student's BatchNorm statistics by their average over `quant.bn_images`
        clean images of `dataset` (the same images on every rank, so the ranks agree). With
        `check` > 0, keep them only if the accuracy on the `check` images that follow those in
        the same seeded order does not fall (batchnorm.reestimate_batchnorm_checked)."""
        quant = self.config.quant
        batches = subset_batches(dataset, self.eval_pipeline, quant.bn_images, quant.calib_seed,
                                 batch_size=self.config.train.batch_size)
        on_device = (images.to(self.device) for images, _ in batches)
        if not check:
            reestimate_batchnorm(self._bare_model(), on_device)
            return None
        return reestimate_batchnorm_checked(
            self._bare_model(), on_device, lambda: subset_batches(
                dataset, self.eval_pipeline, check, quant.calib_seed, skip=quant.bn_images,
                batch_size=self.config.train.test_batch_size), self.device)

    def _freeze_batchnorm(self) -> None:
        """BatchNorm in eval mode from `bn_freeze_step` on. With `quant.bn_images` set, the
        statistics it keeps are first re-estimated on the weights of that step (once, at the
        step itself; a resumed run finds them in its checkpoint), rather than the running
        averages over the steps before, which may be stale."""
        if self.step == self.bn_freeze_step and self.config.quant.bn_images:
            self.reestimate_batchnorm(self.train_set)
        freeze_batchnorm(self.model)

    def train_epoch(self) -> dict[str, float]:
        train = self.config.train
        self.objective.train()
        aug = torch.Generator(device=self.device)
        bar = tqdm(total=self.steps_per_epoch, initial=self.epoch_step, leave=False,
                   desc=f"epoch {self.epoch + 1}/{train.epochs}",
                   disable=not show_progress(train.progress))
        for images, labels in self._epoch_batches():
            aug.manual_seed(stream_seed(train.seed, self.step, self.rank))
            images, labels, extra = self.objective.prepare(
                images.to(self.device), labels.to(self.device), self.train_pipeline, aug)
            self.objective.progress = self.step / self.total_steps
            if train.bn_freeze and self.step >= self.bn_freeze_step:
                self._freeze_batchnorm()
            try:
                losses = self.objective.step(images, labels, self.optimizer, **extra)
            except NonFiniteLossError as exc:
                raise NonFiniteLossError(f"{exc} at step {self.step + 1} (epoch {self.epoch + 1}); "
                                         f"training stopped, weights not updated; "
                                         f"{self._last_good()}") from None
            self.scheduler.step()
            self.step += 1
            self.epoch_step += 1
            # Mean over ranks, so the logged losses are those of the global batch.
            means = all_reduce_sum(torch.stack([v.float() for v in losses.values()])) / self.world
            for name, value in zip(losses, means.tolist()):
                self.epoch_sums[name] = self.epoch_sums.get(name, 0.0) + value
            self._run_callbacks(images, labels)
            if train.checkpoint_every_steps and self.step % train.checkpoint_every_steps == 0:
                self.save_checkpoint()
            bar.set_postfix(loss=f"{sum(means.tolist()):.3f}")
            bar.update()
        bar.close()
        return {f"train_{k}": v / max(self.epoch_step, 1) for k, v in self.epoch_sums.items()}

    def _run_callbacks(self, images: Tensor, labels: Tensor) -> None:
        if not self.step_callbacks or self.step % self.config.train.track_every:
            return
        record: dict[str, float] = {}
        for callback in self.step_callbacks:
            record.update(callback(self.step, self.objective, images, labels) or {})
        if record and is_main_process():
            self.metrics.write({"step": self.step, "epoch": self.epoch + 1, **record})

    def _dead_channels(self) -> dict[str, Any]:
        """The epoch record's dead weight channels (quantized models only), with a warning when
        more channels are dead than at the last epoch's end."""
        if not self.meta.get("quant"):
            return {}
        dead = dead_channels(self._bare_model())
        count = count_dead(dead)
        if count > self.dead and is_main_process():
            print(f"warning: {count} weight channel(s) dead (every weight quantizes to 0, the "
                  f"channel outputs a constant): {describe_dead(dead)}; see docs/soundness.md",
                  file=sys.stderr, flush=True)
        self.dead = count
        return {"dead_channels": count, "dead_channel_layers": dead}

    def _frozen_weights(self) -> dict[str, Any]:
        """The epoch record's count of weights frozen by --freeze-oscillations (when on)."""
        if self.objective.freezing is None:
            return {}
        frozen, tracked = self.objective.freezing.frozen_count()
        return {"frozen_weights": frozen, "frozen_share": frozen / tracked}

    def _test_record(self) -> dict[str, float]:
        """The epoch's test accuracy and loss, on the epochs train.eval_every asks for and
        after the last; empty on the others."""
        train = self.config.train
        if self.epoch % train.eval_every and self.epoch < train.epochs:
            return {}
        test = evaluate(self._bare_model(), self.test_set, self.eval_pipeline, self.device,
                        train.test_batch_size, distributed=True)
        return {"test_acc": test["acc"], "test_loss": test["loss"]}

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Train to the last epoch; returns the final evaluation."""
        if resume:
            self.resume()
        if self.step and is_main_process():
            self.metrics.truncate_after(self.step, self.epoch)
        train = self.config.train
        result = self.result
        while self.epoch < train.epochs:
            start = time.perf_counter()
            record = self.train_epoch()
            self.epoch += 1
            self.epoch_step, self.epoch_sums = 0, {}
            # The ranks' BatchNorm statistics drifted apart in the last steps; all evaluate and
            # save rank 0's, so the reported accuracy is the saved model's.
            broadcast_buffers(self._bare_model())
            result = {"epoch": self.epoch, "step": self.step, **record, **self._test_record(),
                      "lr": self.optimizer.param_groups[0]["lr"],
                      **self._dead_channels(), **self._frozen_weights(),
                      "seconds": time.perf_counter() - start}
            self.result = result
            if is_main_process():
                self.metrics.write(result)
                terms = "  ".join(f"{k[6:]} {v:.4f}" for k, v in record.items())
                test = f"  test acc {result['test_acc']:.2f}%" if "test_acc" in result else ""
                frozen = (f"  frozen {100 * result['frozen_share']:.1f}%"
                          if "frozen_share" in result else "")
                print(f"epoch {self.epoch}/{train.epochs}  {terms}{test}{frozen}  "
                      f"({result['seconds']:.1f}s)", flush=True)
            self.save_checkpoint()
        if "test_acc" not in result:   # a checkpoint from before results were saved in it,
            # or one saved at an epoch train.eval_every skipped (resumed with --epochs there)
            result = {"epoch": self.epoch, "step": self.step, **self._test_record()}
        return result
