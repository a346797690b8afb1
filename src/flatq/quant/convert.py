"""Turn a float model into a fake-quantized one by swapping layers, then calibrate it.

Module swap instead of graph tracing: it works on any nn.Module (Python control flow
included), keeps state_dict names, and keeps the float model untouched to serve as teacher.
"""

from __future__ import annotations

import copy
import dataclasses
import warnings
from collections.abc import Iterable
from contextlib import nullcontext

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import ConfigError
from .layers import OutputPoint, is_quant_layer, quant_layers
from .plan import plan_quantization, quant_class
from .quantizers import MinMaxQuantizer, Quantizer, quantizer_family
from .residual import add_residual_points
from .shared_grid import GRID_KEY, add_grid_links
from .target import OUTPUT_BITS, add_output_points, output_point_dataflow


def _make_quantizers(config: QuantConfig, channels: int, w_bits: int, a_bits: int,
                     is_edge: bool = False) -> tuple[Quantizer, Quantizer]:
    """(weight quantizer, input quantizer) of one layer.

    Each comes from its registered family (`config.weight_family`, `config.input_family`:
    `quantizer` unless `weight_quantizer` / `input_quantizer` say otherwise), which knows how
    it quantizes a weight and an input (see `Quantizer.for_weights` / `for_inputs`).
    config.range_method sets the inputs' calibration; weights use min-max, or MSE per channel
    when it is mse (percentiles would cut real weights, not noise). With edge_weights
    minmax the first and last layer's weights, and with eight_bit_weights minmax any other
    layer's 8-bit weights, take min-max ranges recomputed every step: a learned 8-bit
    per-channel step size is ~20x smaller than a 4-bit one for about the same LSQ gradient,
    and on short schedules it can grow past the weights and kill the channel.
    config.target onnxruntime makes weights symmetric on [-qmax, qmax] (flatq.quant.target).
    """
    w_range = "mse" if config.range_method == "mse" else "minmax"
    deploy = config.target == "onnxruntime"
    w_config = dataclasses.replace(config, symmetric_weights=True) if deploy else config
    weight = quantizer_family(config.weight_family).for_weights(w_bits, channels, w_config,
                                                                is_edge)
    inputs = quantizer_family(config.input_family).for_inputs(a_bits, config)
    policy = config.edge_weights if is_edge else (config.eight_bit_weights if w_bits == 8
                                                  else "learned")
    if policy == "minmax" and weight.learnable:
        weight = MinMaxQuantizer.for_weights(w_bits, channels, w_config, is_edge, dynamic=True)
    weight.narrow_range = deploy
    weight.set_range_method(w_range)
    inputs.set_range_method(config.range_method, config.percentile)
    return weight, inputs


def layer_plan(model: nn.Module,
               config: QuantConfig) -> list[tuple[str, nn.Module, tuple[int, int]]]:
    """(name, float layer, (w_bits, a_bits)) of every layer `quantize_model` would swap, in
    module order (see `flatq.quant.plan`). Methods that prepare a float model for a bit width
    (DNQ) read the same plan."""
    return [(r.name, model.get_submodule(r.name), (r.w_bits, r.a_bits))
            for r in plan_quantization(model, config).quantized]


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """A fake-quantized copy of `model`; `model` itself is left untouched. The copy must be
    calibrated (`calibrate`) before use.

    Which layers are swapped, at which bits, and why the other weight-bearing modules stay
    float is the copy's `quant_plan` (a QuantPlan; print it). A plan with no layer at the
    inner bit width is also reported as a warning.

    Args:
        model: any float nn.Module; its Conv1d/Conv2d/Linear/MultiheadAttention layers are
            swapped (see `flatq.quant.plan` for what stays float and why).
        config: bit widths, quantizer families, skip patterns and per-layer overrides
            (default: `QuantConfig()`, W4A4 LSQ with 8-bit first and last layers).

    Returns:
        The quantized copy, uncalibrated, with its `quant_plan`.

    Raises:
        ConfigError: `model` is already quantized or has no layer to quantize, a skip or
            override pattern matches no layer, or a parent reads a layer's weight directly
            (the layers are named, with the `skip` option that leaves them float).
    """
    config = config or QuantConfig()
    if any(is_quant_layer(m) for m in model.modules()):
        raise ConfigError("quantize_model: the model is already quantized")
    plan = plan_quantization(model, config)
    qmodel = copy.deepcopy(model)
    for row in plan.quantized:
        layer = qmodel.get_submodule(row.name)
        weight = layer.in_proj_weight if isinstance(layer, nn.MultiheadAttention) else layer.weight
        weight_q, input_q = _make_quantizers(config, weight.shape[0], row.w_bits, row.a_bits,
                                             row.edge)
        qmodel.set_submodule(row.name, quant_class(layer).from_float(layer, weight_q, input_q))
    if config.target == "onnxruntime":
        def output_quantizer() -> Quantizer:
            return _make_quantizers(config, 1, OUTPUT_BITS, OUTPUT_BITS)[1]

        add_output_points(qmodel, output_quantizer)
        add_residual_points(qmodel, plan.residual_points, output_quantizer)
        add_grid_links(qmodel)
    qmodel.quant_plan = plan
    for message in plan.warnings:
        warnings.warn(message, stacklevel=2)
    return qmodel


def named_quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """(name, quantizer) of every quantizer in `model`, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor],
              device: torch.device | str | None = None) -> nn.Module:
    """Initialize every quantizer's range from data (the paper: 100 training images).

    The model runs in eval mode (BatchNorm statistics are not touched) with quantization
    bypassed, each quantizer recording the min/max of the tensor it sees; then step sizes
    and zero points are set from those statistics.

    Args:
        model: a model from `quantize_model`.
        batches: float input batches (e.g. `flatq.data.calibration_batches`).
        device: where to run them (default: the model's device).

    Returns:
        `model` itself, calibrated, in the train/eval mode it had.

    Raises:
        ConfigError: the model has no quantizer, no batch was given, or a quantized layer
            never ran (it is named, with the `skip` option that leaves it float).
    """
    named = named_quantizers(model)
    if not named:
        raise ConfigError("calibrate(): the model has no quantizer; call quantize_model first")
    if device is None:
        device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    for _, q in named:
        q.start_observing()
    try:
        seen = 0
        for batch in batches:
            # The first pass also settles which output points the runtime needs.
            with output_point_dataflow(model) if seen == 0 else nullcontext():
                model(batch.to(device))
            seen += 1
        if seen == 0:
            raise ConfigError("calibrate(): no calibration batches were given")
        missed = list(dict.fromkeys(n.rpartition(".")[0] for n, q in named
                                    if q.observer is None or not q.observer.seen))
        if missed:
            raise ConfigError(
                f"calibrate(): layers never ran during calibration: {missed[:5]} (their parent "
                "may use their weight itself, or they sit on an unused branch); leave them float "
                "with --skip / quant.skip")
        for _, q in named:
            q.finish_observing()
    finally:
        for _, q in named:
            q.observer = None
        model.train(was_training)
    return model


def calibration_state(model: nn.Module) -> dict[str, object]:
    """The state_dict entries that `calibrate` sets: every quantizer's (under each name a shared
    one has), every output point's and every layer's `input_grid_point`. Loaded into a model
    just built by `quantize_model` (`load_state_dict(..., strict=False)`), they calibrate it
    the same way, ties between grids included (flatq.quant.shared_grid)."""
    prefixes = tuple(f"{name}." for name, module in model.named_modules(remove_duplicate=False)
                     if isinstance(module, (Quantizer, OutputPoint)))
    return {k: v for k, v in model.state_dict().items()
            if k.startswith(prefixes) or k.endswith(f".{GRID_KEY}")}


def describe(model: nn.Module) -> list[dict]:
    """One row per quantized layer: name, type and bit widths (for logs and tests)."""
    return [{"name": n, "type": type(m).__name__, "w_bits": m.bits[0], "a_bits": m.bits[1]}
            for n, m in quant_layers(model)]
