"""Whole runs, start to finish: the walk data -> model -> quantize -> objective -> trainer.

A run folder holds `config.yaml`, `metrics.jsonl`, `checkpoint.pt` (the full training state,
every epoch) and, once finished, `model.pt` (weights plus the metadata to rebuild the model)
and `summary.json`. `load_model` rebuilds any finished run, full-precision or quantized.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import DataConfig, QuantConfig, RunConfig, save_yaml
from ..data import BatchPipeline, ImageTensorDataset, calibration_batches, load_dataset, pipeline_for
from ..errors import CheckpointError, ConfigError, FlatqError
from ..methods import build_objective
from ..models import build_model
from ..quant import calibrate, quantize_model
from .checkpoint import CHECKPOINT_NAME, MODEL_NAME, load_checkpoint, save_atomic
from .loop import Trainer, evaluate, is_main_process, resolve_device


@dataclass
class DataBundle:
    """The data sets of a run and the batch pipelines that feed them to the model."""
    train: ImageTensorDataset
    test: ImageTensorDataset
    train_pipeline: BatchPipeline
    eval_pipeline: BatchPipeline

    @property
    def channels(self) -> int:
        return self.eval_pipeline.output_shape(self.train.images.shape[1:])[0]

    @property
    def num_classes(self) -> int:
        return self.train.num_classes


def prepare_data(config: DataConfig) -> DataBundle:
    train, test = load_dataset(config.name, config.root)
    return DataBundle(
        train, test,
        pipeline_for(config.name, size=config.image_size, channels=config.channels,
                     augment=config.augment),
        pipeline_for(config.name, size=config.image_size, channels=config.channels,
                     augment=False))


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """The model a checkpoint's metadata describes (quantized when it records a QuantConfig)."""
    model = build_model(meta["model"], num_classes=meta["num_classes"],
                        in_channels=meta["in_channels"])
    if meta.get("quant") is not None:
        model = quantize_model(model, QuantConfig.from_dict(meta["quant"]))
    return model


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a run folder or checkpoint file: (model in eval mode, checkpoint)."""
    state = load_checkpoint(path)
    meta = state.get("meta")
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{path}: the checkpoint has no model metadata")
    model = build_from_meta(meta)
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']}: "
                              f"{str(exc).splitlines()[0]}") from None
    return model.eval(), state


def prepare_run_dir(run_dir: str | Path, resume: bool, overwrite: bool) -> Path:
    """Create the run folder; refuse to clobber an earlier run unless told to."""
    run_dir = Path(run_dir)
    if resume:
        if not (run_dir / CHECKPOINT_NAME).is_file():
            raise CheckpointError(f"--resume: no {CHECKPOINT_NAME} in {run_dir}")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        if not overwrite:
            raise FlatqError(f"run folder {run_dir} already holds a run; use --resume to continue "
                             "it, --overwrite to replace it, or another --out")
        if is_main_process():
            shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise FlatqError(f"cannot write to run folder {run_dir}: {exc.strerror}") from None
    return run_dir


def _finish(trainer: Trainer, result: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    summary = {**result, **extra}
    if is_main_process():
        model = trainer._bare_model()
        save_atomic({"meta": trainer.meta, "config": trainer.config.to_dict(),
                     "model": model.state_dict(), "summary": summary},
                    trainer.run_dir / MODEL_NAME)
        (trainer.run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def _seed(config: RunConfig) -> None:
    torch.manual_seed(config.train.seed)


def pretrain(config: RunConfig, run_dir: str | Path, resume: bool = False,
             overwrite: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Train a full-precision model from scratch with the configured method (CE or DNQ)."""
    run_dir = prepare_run_dir(run_dir, resume, overwrite)
    _seed(config)
    data = prepare_data(config.data)
    device = resolve_device(config.train.device)
    model = build_model(config.model, num_classes=data.num_classes,
                        in_channels=data.channels).to(device)
    objective = build_objective(config.method, model, None, data=data)
    meta = {"model": config.model, "num_classes": data.num_classes,
            "in_channels": data.channels, "data": config.data.to_dict(), "quant": None}
    if is_main_process():
        save_yaml(config, run_dir / "config.yaml")
    trainer = Trainer(objective, data.train, data.test, data.train_pipeline, data.eval_pipeline,
                      config, run_dir, meta, list(callbacks or []), device)
    return _finish(trainer, trainer.fit(resume), {"kind": "pretrain"})


def load_teacher(source: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The full-precision model a QAT run starts from (`--from`)."""
    model, state = load_model(source)
    state["path"] = str(source)
    if state["meta"].get("quant") is not None:
        raise ConfigError(f"--from {source}: expected a full-precision run, got a quantized "
                          f"({QuantConfig.from_dict(state['meta']['quant']).bits}) one")
    return model, state


def qat(config: RunConfig, teacher: nn.Module, teacher_state: dict[str, Any],
        run_dir: str | Path, resume: bool = False, overwrite: bool = False,
        callbacks: list | None = None) -> dict[str, Any]:
    """Quantize `teacher` (from `load_teacher`), calibrate it, train it with the configured method.

    The FP model stays as the frozen teacher; the student starts as its quantized copy.
    """
    if config.quant is None:
        raise ConfigError("qat needs a quantization config (e.g. --bits w4a4)")
    run_dir = prepare_run_dir(run_dir, resume, overwrite)
    _seed(config)
    state, source = teacher_state, teacher_state.get("path", "the teacher")
    data = prepare_data(config.data)
    if data.channels != state["meta"]["in_channels"] or data.num_classes != state["meta"]["num_classes"]:
        raise ConfigError(
            f"data {config.data.name} gives {data.channels} channels / {data.num_classes} classes, "
            f"but {source} was trained with {state['meta']['in_channels']} / "
            f"{state['meta']['num_classes']}")
    device = resolve_device(config.train.device)
    teacher = teacher.to(device)
    student = quantize_model(teacher, config.quant)
    meta = {"model": state["meta"]["model"], "num_classes": data.num_classes,
            "in_channels": data.channels, "data": config.data.to_dict(),
            "quant": config.quant.to_dict(), "source": str(source)}
    fp = evaluate(teacher, data.test, data.eval_pipeline, device, config.train.test_batch_size)
    if not resume:
        calibrate(student, calibration_batches(data.train, data.eval_pipeline,
                                               config.quant.calib_images, config.quant.calib_seed),
                  device)
    objective = build_objective(config.method, student, teacher, data=data)
    if is_main_process():
        save_yaml(config, run_dir / "config.yaml")
        print(f"full-precision teacher: test acc {fp['acc']:.2f}%", flush=True)
    trainer = Trainer(objective, data.train, data.test, data.train_pipeline, data.eval_pipeline,
                      config, run_dir, meta, list(callbacks or []), device)
    result = trainer.fit(resume)
    objective.close()
    return _finish(trainer, result, {"kind": "qat", "fp_test_acc": fp["acc"],
                                     "bits": config.quant.bits,
                                     "method": config.method.name if config.method else "lsq"})
