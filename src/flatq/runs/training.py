"""Training runs, start to finish: the walk data -> model -> quantize -> objective -> trainer.

`pretrain` trains a full-precision model, `qat` a quantized student of one; both write a run
folder (see `flatq.train.run_io` for its files and `load_model`, which reads them back).
"""

from __future__ import annotations

import dataclasses

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..analysis.tracking import tracking_callbacks
from ..config import RunConfig
from ..data import DataBundle, calibration_batches
from ..errors import ConfigError
from ..methods import Objective, build_objective
from ..models import build_model, check_model_name, load_weights
from ..models.external import check_weights_file
from ..quant import calibrate, quant_layers, quantize_model
from ..quant.convert import calibration_state
from ..train.checkpoint import state_fingerprint
from ..train.distributed import (check_global_batch, is_main_process, main_first, rank, setup,
                                 world_size, wrap)
from ..train.loop import Trainer, evaluate
from ..train.run_folder import check_run_folder, claimed_run_folder
from ..train.run_io import (data_for_model, load_teacher, resume_state, write_config,
                             write_result)


def check_model_fits(model: nn.Module, data: DataBundle, name: str, device: torch.device) -> None:
    """Run one test image through `model`, so that a model that cannot take the data's images
    (a ViT's patch grid on 28x28 inputs) is refused before anything is written."""
    image = data.eval_pipeline(data.test.take([0])[0].to(device), train=False)
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(image)
    except (RuntimeError, ValueError, AssertionError, IndexError) as exc:
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"model {name} cannot run on {data.train.name} images of shape "
                          f"{tuple(image.shape[1:])} ({reason}); choose another model or "
                          "--image-size") from None
    finally:
        model.train(was_training)


def to_device(model: nn.Module, device: torch.device, config: RunConfig) -> nn.Module:
    """`model` on `device`, in channels-last layout when train.channels_last asks (copies made
    from it later, the quantized student and a method's teacher, keep the layout)."""
    if config.train.channels_last:
        return model.to(device, memory_format=torch.channels_last)
    return model.to(device)


def check_sizes(config: RunConfig, data: DataBundle) -> None:
    """Sizes that would run without a word but not as asked."""
    train = config.train
    if train.batch_size > len(data.train):
        raise ConfigError(f"--batch-size {train.batch_size} exceeds the {len(data.train)} "
                          f"training images of {config.data.name}")
    if train.warmup_epochs >= train.epochs:
        raise ConfigError(f"--warmup-epochs {train.warmup_epochs} leaves no epoch of the "
                          f"{train.epochs} for the cosine schedule; use fewer warm-up epochs")


def _finish(trainer: Trainer, result: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    summary = {**result, **extra}
    if is_main_process():
        write_result(trainer.run_dir, trainer.meta, trainer.config,
                     trainer._bare_model().state_dict(), summary)
    return summary


def _seed(config: RunConfig) -> None:
    torch.manual_seed(config.train.seed)


def _objective(config: RunConfig, student: nn.Module, teacher: nn.Module | None,
               data: DataBundle, device: torch.device):
    """The run's objective, its student wrapped in DDP when there are several ranks.

    Hooks (SFP, feature capture) go on the bare student before the wrap, so they fire inside
    DDP's forward; the objective then calls the wrapped student. Random streams differ per
    rank from here on: the global generator is seeded seed + rank, and so are the
    objective's own generators (SFP's coin flips).
    """
    seed = config.train.seed + rank()
    objective = build_objective(config.method, student, teacher, data=data, seed=seed)
    torch.manual_seed(seed)
    for _, layer in quant_layers(student):     # each rank quantizes 1/world of the batch
        layer.input_quantizer.replicas = world_size()
    objective.student = wrap(objective.student, device, config.train.sync_bn)
    return objective


@contextmanager
def _claimed_trainer(objective: Objective, data: DataBundle, config: RunConfig,
                     run_dir: str | Path, meta: dict[str, Any], callbacks: list | None,
                     device: torch.device, resume: bool, overwrite: bool) -> Iterator[Trainer]:
    """The run's trainer, resumed if asked, inside its claimed run folder. The resume loads
    (and refuses a mismatched checkpoint) before the folder is claimed, so a refused resume
    leaves the folder as it was."""
    trainer = Trainer(objective, data.train, data.test, data.train_pipeline, data.eval_pipeline,
                      config, Path(run_dir), meta,
                      tracking_callbacks(config.train) + list(callbacks or []), device)
    if resume:
        trainer.resume()
    with claimed_run_folder(run_dir, resume, overwrite):
        yield trainer


def _train(trainer: Trainer) -> dict[str, Any]:
    """Record the config and train."""
    if is_main_process():
        write_config(trainer.config, trainer.run_dir)
    return trainer.fit()


def pretrain(config: RunConfig, run_dir: str | Path, resume: bool = False,
             overwrite: bool = False, callbacks: list | None = None) -> dict[str, Any]:
    """Train a full-precision model from scratch with the configured method (CE or DNQ).

    Under torchrun every rank calls this; rank 0 writes the run folder. `callbacks` run
    every step besides the trackers `config.train.track` asks for.

    Args:
        config: model, data, training settings and method (ce or dnq).
        run_dir: the run folder to write.
        resume, overwrite: continue the run in `run_dir`; replace the run there.
        callbacks: called every step with the trainer's step record.

    Returns:
        The summary (also in summary.json): test accuracy and loss, kind "pretrain".

    Raises:
        ConfigError: invalid settings (all checked before the run folder is touched).
        FlatqError: an unusable run folder (in use, not a flatq run, nothing to resume).
        CheckpointError: a checkpoint to resume that does not fit this run.
        NonFiniteLossError: the loss or the weights became NaN or infinite.
    """
    device = setup(config.train.device)
    # Everything is validated (the cheap checks first) before the run folder is touched.
    check_global_batch(config.train.batch_size)
    check_run_folder(run_dir, resume, overwrite)
    check_model_name(config.model)
    if config.pretrained and not resume:
        check_weights_file(config.pretrained)
    _seed(config)
    data = data_for_model(config.data, config.model)
    check_sizes(config, data)
    model = build_model(config.model, num_classes=data.num_classes, in_channels=data.channels)
    if config.pretrained and not resume:   # a resumed run's weights come from its checkpoint
        load_weights(model, config.pretrained, config.model)
    model = to_device(model, device, config)
    check_model_fits(model, data, config.model, device)
    meta = {"model": config.model, "num_classes": data.num_classes,
            "in_channels": data.channels, "data": config.data.to_dict(), "quant": None}
    with _objective(config, model, None, data, device) as objective, _claimed_trainer(
            objective, data, config, run_dir, meta, callbacks, device, resume,
            overwrite) as trainer:
        return _finish(trainer, _train(trainer), {"kind": "pretrain"})


def _calibrate_on_main(student: nn.Module, batches: list, device: torch.device) -> None:
    """Calibrate on rank 0 and broadcast what calibration set (every quantizer's parameters,
    buffers and the signedness PACT chooses from the data; which output points are on and
    which grids are shared) to the other ranks."""

    def run() -> dict[str, Any]:
        calibrate(student, batches, device)
        return {k: v.cpu() if isinstance(v, torch.Tensor) else v
                for k, v in calibration_state(student).items()}

    state = main_first(run)
    if not is_main_process():
        student.load_state_dict(state, strict=False)


def _restore_calibration(student: nn.Module, run_dir: str | Path) -> None:
    """A resumed run's student set up as its checkpoint's (output points on or off, grids
    shared) before the optimizer lists the parameters that train: a switched-off point's and
    a shared grid's are not among them. A checkpoint that does not fit is left to
    Trainer.resume, which says why."""
    saved = resume_state(run_dir)["model"]
    keys = calibration_state(student).keys()
    try:
        student.load_state_dict({k: v for k, v in saved.items() if k in keys}, strict=False)
    except (RuntimeError, ValueError):
        pass


def _reestimate_batchnorm(trainer: Trainer, data: DataBundle, config: RunConfig,
                          result: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Re-estimate the trained student's BatchNorm statistics (every rank on the same images,
    so they agree), with --bn-check kept only if held-out training images say so, and evaluate
    again; the summary keeps the accuracy before."""
    checked = trainer.reestimate_batchnorm(data.train, check=config.quant.bn_check)
    if checked is not None and not checked.kept:   # statistics restored: the model evaluated
        after = {"acc": result["test_acc"], "loss": result["test_loss"]}
    else:
        after = evaluate(trainer._bare_model(), data.test, data.eval_pipeline, device,
                         config.train.test_batch_size, distributed=True)
    record = {"test_acc_before_bn": result["test_acc"],
              "test_loss_before_bn": result["test_loss"], "test_acc": after["acc"],
              "test_loss": after["loss"], "bn_images": config.quant.bn_images}
    message = f"BatchNorm statistics re-estimated from {config.quant.bn_images} training images"
    if checked is not None:
        record.update(bn_check=config.quant.bn_check, bn_check_acc_before=checked.before,
                      bn_check_acc_after=checked.after, bn_kept=checked.kept)
        message += (f"; on {config.quant.bn_check} further training images {checked.before:.2f}%"
                    f" -> {checked.after:.2f}%: "
                    + ("kept" if checked.kept else "discarded, the statistics as trained stay"))
    if is_main_process():
        print(f"{message}: test acc {result['test_acc']:.2f}% -> {after['acc']:.2f}%",
              flush=True)
    return {**result, **record}


def _fit_batchnorm_subsets(config: RunConfig, train_size: int) -> RunConfig:
    """The config with quant.bn_images cut to half the training set and quant.bn_check to
    the rest, saying so where it cuts (small data sets run with the defaults too)."""
    quant = config.quant
    images = min(quant.bn_images, train_size // 2)
    check = min(quant.bn_check, train_size - images) if images else quant.bn_check
    if (images, check) == (quant.bn_images, quant.bn_check):
        return config
    if is_main_process():
        print(f"BatchNorm re-estimation after QAT: {config.data.name} has {train_size} training "
              f"images, so --bn-images {quant.bn_images} -> {images}"
              + (f", --bn-check {quant.bn_check} -> {check}" if check != quant.bn_check else ""),
              flush=True)
    return dataclasses.replace(config, quant=dataclasses.replace(quant, bn_images=images,
                                                                 bn_check=check))


def pretrained_teacher(config: RunConfig, data: DataBundle) -> tuple[nn.Module, dict[str, Any]]:
    """Model `config.model` with the weights of the file `config.pretrained`, and the state
    `load_teacher` would return for it."""
    model = build_model(config.model, num_classes=data.num_classes, in_channels=data.channels)
    load_weights(model, config.pretrained, config.model)
    meta = {"model": config.model, "num_classes": data.num_classes, "in_channels": data.channels,
            "data": config.data.to_dict(), "quant": None}
    return model, {"meta": meta, "model": model.state_dict(), "path": config.pretrained}


def qat(config: RunConfig, teacher: nn.Module | None, teacher_state: dict[str, Any] | None,
        run_dir: str | Path, resume: bool = False, overwrite: bool = False,
        callbacks: list | None = None) -> dict[str, Any]:
    """Quantize `teacher` (from `load_teacher`), calibrate it, train it with the configured method.

    Without a teacher, the teacher is `config.model` with the weights of the file
    `config.pretrained` (e.g. torchvision's ImageNet weights). The FP model is left as it was:
    the student starts as its quantized copy, and a method that distills from it freezes a
    copy of its own.

    Args:
        config: data, training, quantization (required) and method settings.
        teacher, teacher_state: the full-precision model and its checkpoint (`load_teacher`),
            or None and None with `config.pretrained` set.
        run_dir, resume, overwrite, callbacks: as `pretrain`.

    Returns:
        The summary: test accuracy and loss, the teacher's, bits and method, kind "qat".

    Raises:
        ConfigError: no quantization config or teacher, data unlike the teacher's, invalid
            settings.
        FlatqError, CheckpointError, NonFiniteLossError: as `pretrain`.
    """
    if config.quant is None:
        raise ConfigError("qat needs a quantization config (e.g. --bits w4a4)")
    if teacher is None and not config.pretrained:
        raise ConfigError("qat needs a teacher: --from RUN, or --model and --pretrained FILE")
    device = setup(config.train.device)
    check_global_batch(config.train.batch_size)
    check_run_folder(run_dir, resume, overwrite)
    if teacher is None:
        check_model_name(config.model)
        check_weights_file(config.pretrained)
    _seed(config)
    data = data_for_model(config.data, config.model if teacher is None
                          else teacher_state["meta"]["model"])
    if teacher is None:
        teacher, teacher_state = pretrained_teacher(config, data)
    state, source = teacher_state, teacher_state.get("path", "the teacher")
    check_sizes(config, data)
    if (data.channels != state["meta"]["in_channels"]
            or data.num_classes != state["meta"]["num_classes"]):
        raise ConfigError(
            f"data {config.data.name} gives {data.channels} channels / {data.num_classes} classes, "
            f"but {source} was trained with {state['meta']['in_channels']} / "
            f"{state['meta']['num_classes']}")
    config = _fit_batchnorm_subsets(config, len(data.train))
    teacher = to_device(teacher, device, config)
    check_model_fits(teacher, data, state["meta"]["model"], device)
    student = quantize_model(teacher, config.quant)
    if is_main_process():
        print(student.quant_plan.summary(), flush=True)
    batches = None if resume else calibration_batches(
        data.train, data.eval_pipeline, config.quant.calib_images, config.quant.calib_seed)
    meta = {"model": state["meta"]["model"], "num_classes": data.num_classes,
            "in_channels": data.channels, "data": config.data.to_dict(),
            "quant": config.quant.to_dict(), "source": str(source),
            "teacher": state_fingerprint(state["model"])}
    fp = evaluate(teacher, data.test, data.eval_pipeline, device, config.train.test_batch_size,
                  distributed=True)
    if batches is not None:
        _calibrate_on_main(student, batches, device)
    else:
        _restore_calibration(student, run_dir)
    with _objective(config, student, teacher, data, device) as objective, _claimed_trainer(
            objective, data, config, run_dir, meta, callbacks, device, resume,
            overwrite) as trainer:
        if is_main_process():
            print(f"full-precision teacher: test acc {fp['acc']:.2f}%", flush=True)
        result = _train(trainer)
        objective.close()   # before BatchNorm re-estimation: no SFP noise there
        if config.quant.bn_images:
            result = _reestimate_batchnorm(trainer, data, config, result, device)
        return _finish(trainer, result, {"kind": "qat", "fp_test_acc": fp["acc"],
                                         "bits": config.quant.bits,
                                         "method": config.method.name if config.method
                                         else "task"})


def pretrain_base(run_dir: str | Path, resume: bool = False) -> dict[str, Any]:
    """The config (as a mapping) a pretrain's options apply to: with `resume`, the run's
    own config from its checkpoint; otherwise nothing (the defaults).

    Raises:
        CheckpointError: `resume` and no usable checkpoint in `run_dir`.
    """
    return resume_state(run_dir)["config"] if resume else {}


def qat_start(run_dir: str | Path, source: str | Path | None = None, resume: bool = False,
              pretrained: str | None = None, model: str | None = None
              ) -> tuple[nn.Module | None, dict[str, Any] | None, dict[str, Any]]:
    """What a qat run starts from: (teacher, teacher checkpoint, base config mapping).

    With `resume` the run's own config is the base its options apply to, and its own
    teacher is used unless `source` names one; a fresh run starts from the teacher's data
    config. A teacher made of `model` and the weights file `pretrained` (given now or by the
    resumed run) is built by `qat` itself: (None, None, base).

    Raises:
        ConfigError: both `source` and `pretrained`/`model`; no teacher and nothing to resume.
        CheckpointError: no usable checkpoint to resume or teacher to load.
    """
    if source and (pretrained or model):
        raise ConfigError("--from RUN brings its own model and weights; give either --from or "
                          "--model with --pretrained FILE")
    saved = resume_state(run_dir) if resume else None
    if pretrained or (saved and saved["config"].get("pretrained") and not source):
        return None, None, saved["config"] if saved else {}
    source = source or (saved["meta"].get("source") if saved else None)
    if source is None:
        raise ConfigError("--from is required: the full-precision run to quantize (or --model "
                          "and --pretrained FILE)")
    teacher, state = load_teacher(source)
    base = {"data": state["meta"]["data"], **(saved["config"] if saved else {})}
    return teacher, state, base
