"""Post-training quantization: quantize a trained float model by calibration alone.

No training and no gradient: the layers are swapped for fixed min-max quantizers (the
`minmax` family, per-channel weights, per-tensor inputs, first/last layer at `edge_bits`),
and a few calibration images (the paper: 100) set every range. How a range is read from the
calibration data is `range_method`: min-max, percentile clipping, or the MSE-optimal clip
(see `flatq.quant.observers`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from .convert import calibrate, quantize_model


def ptq_config(config: QuantConfig, range_method: str | None = None,
               percentile: float | None = None) -> QuantConfig:
    """`config` with the fixed min-max quantizer family and, when given, the range method.

    This is the config a PTQ model is rebuilt from (`flatq.train.run_io.load_model`).
    """
    changes: dict = {"quantizer": "minmax", "weight_quantizer": None, "input_quantizer": None}
    if range_method is not None:
        changes["range_method"] = range_method
    if percentile is not None:
        changes["percentile"] = percentile
    return dataclasses.replace(config, **changes)


def post_training_quantize(model: nn.Module, config: QuantConfig, batches: Iterable[Tensor],
                           range_method: str | None = None, percentile: float | None = None,
                           device: torch.device | str | None = None) -> nn.Module:
    """A calibrated quantized copy of `model` in eval mode; `model` is left untouched.

    `config.quantizer` (weights' and inputs' alike) is replaced by 'minmax' (PTQ has nothing
    to learn a step size with).

    Args:
        model: the trained float model.
        config: bit widths, skip patterns, overrides and calibration settings.
        batches: float input batches (e.g. `flatq.data.calibration_batches`).
        range_method, percentile: override the config's when given.
        device: where to calibrate (default: the model's device).

    Returns:
        The calibrated quantized copy, in eval mode.

    Raises:
        ConfigError: as `quantize_model` and `calibrate`.
    """
    config = ptq_config(config, range_method, percentile)
    qmodel = quantize_model(model, config)
    return calibrate(qmodel, batches, device).eval()
