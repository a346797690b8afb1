"""A run folder's contents, read and written: the finished model (`model.pt`), its summary,
its config, and the checkpoint a resume continues from.

A run folder holds `config.yaml`, `metrics.jsonl`, `checkpoint.pt` (the full training state,
every epoch) and, once finished, `model.pt` (weights plus the metadata to rebuild the model)
and `summary.json`. `load_model` rebuilds any finished run, full-precision or quantized.
The runs that write these folders (pretrain, qat, ptq) live in `flatq.runs`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..atomic import write_text_atomic
from ..config import DataConfig, QuantConfig, RunConfig, save_yaml
from ..data import DataBundle, prepare_data
from ..errors import CheckpointError, ConfigError
from ..models import build_model, native_input_size
from ..models.external import IMAGENET_SIZE
from ..quant import quantize_model
from ..quant.residual import blocks_with_output_points
from ..quant.shared_grid import LOADED_AS_DEFAULT
from .checkpoint import CHECKPOINT_NAME, MODEL_NAME, load_checkpoint, save_atomic
from .run_folder import CONFIG_NAME, SUMMARY_NAME, check_run_folder

META_KEYS = ("model", "num_classes", "in_channels")


def build_from_meta(meta: dict[str, Any]) -> nn.Module:
    """The model a checkpoint's metadata describes (quantized when it records a QuantConfig)."""
    missing = [key for key in META_KEYS if key not in meta]
    if missing:
        raise CheckpointError(f"the checkpoint's metadata lacks {', '.join(missing)}; it was "
                              "not written by flatq or is damaged")
    model = build_model(meta["model"], num_classes=meta["num_classes"],
                        in_channels=meta["in_channels"])
    if meta.get("quant") is not None:
        model = quantize_model(model, QuantConfig.from_dict(meta["quant"]))
    return model


def load_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model of a run folder or checkpoint file.

    Args:
        path: a run folder (its `model.pt`) or a checkpoint file.

    Returns:
        (the model in eval mode, the checkpoint dict: `meta`, `config`, `model`, ...).

    Raises:
        CheckpointError: no checkpoint, a damaged one, or weights that do not fit the model
            its metadata names.
    """
    state = load_checkpoint(path)
    meta = state.get("meta")
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{path}: the checkpoint has no model metadata")
    try:
        model = build_from_meta(meta)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    blocks = set(blocks_with_output_points(model))
    missing = [key for key in model.state_dict() if key not in state["model"]
               and not key.endswith(LOADED_AS_DEFAULT)]
    if missing and all(key.split(".output_point.")[0] in blocks for key in missing):
        raise CheckpointError(f"{path}: this run was trained for the onnxruntime target before "
                              "flatq gave residual blocks an output point (this model has "
                              f"{len(blocks)}, the file none); train it again with this "
                              "version of flatq")
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, ValueError) as exc:
        detail = " ".join(str(exc).split())    # names the missing and unexpected keys
        raise CheckpointError(f"{path}: weights do not fit model {meta['model']}: "
                              f"{detail[:400]}") from None
    return model.eval(), state


def run_data(state: dict[str, Any], data_root: str | None = None
             ) -> tuple[DataConfig, DataBundle]:
    """The data set a run (its checkpoint `state`, from `load_model`) was trained on,
    optionally found under another `data_root`: (its DataConfig, the loaded data).

    Raises:
        ConfigError, DataError: as `flatq.data.prepare_data`.
    """
    data_cfg = DataConfig.from_dict(state["meta"]["data"])
    if data_root:
        data_cfg = DataConfig.from_dict({"root": data_root}, base=data_cfg)
    return data_cfg, data_for_model(data_cfg, state["meta"]["model"])


def data_for_model(config: DataConfig, model: str) -> DataBundle:
    """The data `config` names, for `model`: an image folder is decoded at
    `config.image_size`, else at the input size `model` is made for, else 224.

    Raises:
        ConfigError, DataError: as `flatq.data.prepare_data`.
    """
    size = config.image_size or native_input_size(model) or IMAGENET_SIZE
    return prepare_data(config, folder_size=size)


def load_teacher(source: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """The full-precision model a QAT or PTQ run starts from (`--from`).

    Raises:
        CheckpointError: as `load_model`.
        ConfigError: `source` holds a quantized run.
    """
    model, state = load_model(source)
    state["path"] = str(source)
    if state["meta"].get("quant") is not None:
        raise ConfigError(f"--from {source}: expected a full-precision run, got a quantized "
                          f"({QuantConfig.from_dict(state['meta']['quant']).bits}) one")
    return model, state


def resume_state(run_dir: str | Path) -> dict[str, Any]:
    """The checkpoint a `--resume` continues from (its config is the run's own, whatever
    became of config.yaml, the human-readable copy)."""
    check_run_folder(run_dir, resume=True, overwrite=False)
    state = load_checkpoint(run_dir, CHECKPOINT_NAME)
    if not isinstance(state.get("meta"), dict):
        raise CheckpointError(f"{Path(run_dir) / CHECKPOINT_NAME} holds no run metadata; it "
                              "was not written by flatq or is damaged")
    if not isinstance(state.get("config"), dict):
        state["config"] = {}
    return state


def write_config(config: RunConfig, run_dir: str | Path) -> None:
    """`config.yaml`: the human-readable copy of the run's configuration."""
    save_yaml(config, Path(run_dir) / CONFIG_NAME)


def write_result(run_dir: str | Path, meta: dict[str, Any], config: RunConfig,
                 model_state: dict[str, Any], summary: dict[str, Any]) -> None:
    """A finished run: `model.pt` (metadata, config, weights, summary) and `summary.json`."""
    run_dir = Path(run_dir)
    save_atomic({"meta": meta, "config": config.to_dict(), "model": model_state,
                 "summary": summary}, run_dir / MODEL_NAME)
    write_text_atomic(run_dir / SUMMARY_NAME, json.dumps(summary, indent=2) + "\n")
