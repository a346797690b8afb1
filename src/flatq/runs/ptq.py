"""A post-training quantization run: full-precision run in, calibrated quantized run out.

The output folder holds `config.yaml`, `model.pt` (the same format as a QAT run, so
`load_model` and `flatq eval` read it) and `summary.json` with the accuracy before and after.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from ..config import RunConfig
from ..data import calibration_batches, prepare_data
from ..errors import ConfigError
from ..quant.ptq import post_training_quantize, ptq_config
from ..train.loop import evaluate, resolve_device
from ..train.run_folder import check_run_folder, claimed_run_folder
from ..train.run_io import write_config, write_result
from ..models import check_model_name
from ..models.external import check_weights_file
from .training import check_model_fits, pretrained_teacher


def ptq(config: RunConfig, teacher: nn.Module | None, teacher_state: dict[str, Any] | None,
        run_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Calibrate a quantized copy of `teacher` (from `load_teacher`) on `config.data`'s
    training images (`config.quant.calib_images`, seed `calib_seed`) and evaluate both.
    Without a teacher it is `config.model` with the weights of the file `config.pretrained`
    (e.g. torchvision's ImageNet weights), as for `qat`.

    Returns:
        The summary (also in summary.json): test accuracy and loss of the quantized and the
        float model, bits and range method, kind "ptq".

    Raises:
        ConfigError: no quantization config, data unlike the teacher's, invalid settings.
        FlatqError: an unusable run folder.
    """
    if config.quant is None:
        raise ConfigError("ptq needs a quantization config (e.g. --bits w4a4)")
    if teacher is None and not config.pretrained:
        raise ConfigError("ptq needs a model: RUN, or --model and --pretrained FILE")
    check_run_folder(run_dir, resume=False, overwrite=overwrite)
    config = dataclasses.replace(config, quant=ptq_config(config.quant))
    if teacher is None:
        check_model_name(config.model)
        check_weights_file(config.pretrained)
    data = prepare_data(config.data, config.model if teacher is None
                        else teacher_state["meta"]["model"])
    if teacher is None:
        teacher, teacher_state = pretrained_teacher(config, data)
    meta_in = teacher_state["meta"]
    if data.channels != meta_in["in_channels"] or data.num_classes != meta_in["num_classes"]:
        raise ConfigError(
            f"data {config.data.name} gives {data.channels} channels / {data.num_classes} classes, "
            f"but {teacher_state.get('path', 'the model')} was trained with "
            f"{meta_in['in_channels']} / {meta_in['num_classes']}")
    device = resolve_device(config.train.device)
    teacher = teacher.to(device).eval()
    check_model_fits(teacher, data, meta_in["model"], device)
    batches = calibration_batches(data.train, data.eval_pipeline, config.quant.calib_images,
                                  config.quant.calib_seed)
    qmodel = post_training_quantize(teacher, config.quant, batches, device=device)
    print(qmodel.quant_plan.summary(), flush=True)
    batch_size = config.train.test_batch_size
    fp = evaluate(teacher, data.test, data.eval_pipeline, device, batch_size)
    quantized = evaluate(qmodel, data.test, data.eval_pipeline, device, batch_size)
    summary = {"kind": "ptq", "bits": config.quant.bits, "range_method": config.quant.range_method,
               "test_acc": quantized["acc"], "test_loss": quantized["loss"],
               "fp_test_acc": fp["acc"], "fp_test_loss": fp["loss"],
               "calib_images": config.quant.calib_images,
               "source": str(teacher_state.get("path", ""))}
    meta = {"model": meta_in["model"], "num_classes": data.num_classes,
            "in_channels": data.channels, "data": config.data.to_dict(),
            "quant": config.quant.to_dict(), "source": summary["source"]}
    with claimed_run_folder(run_dir, resume=False, overwrite=overwrite) as run_dir:
        write_config(config, run_dir)
        write_result(run_dir, meta, config, qmodel.state_dict(), summary)
    return summary
