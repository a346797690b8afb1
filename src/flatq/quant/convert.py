"""Turn a float model into a fake-quantized one by swapping layers, then calibrate it.

Module swap instead of graph tracing: it works on any nn.Module (Python control flow
included), keeps state_dict names, and keeps the float model untouched to serve as teacher.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ..config import QuantConfig
from ..errors import ConfigError
from .layers import QUANT_LAYERS, quant_layers
from .quantizers import (DoReFaWeightQuantizer, LSQPlusQuantizer, LSQQuantizer,
                         MinMaxQuantizer, PACTQuantizer, Quantizer)


def _make_quantizers(config: QuantConfig, layer: nn.Module, w_bits: int, a_bits: int,
                     is_edge: bool = False) -> tuple[Quantizer, Quantizer]:
    """(weight quantizer, input quantizer) of one layer for the configured quantizer family.

    lsq: LSQ for both. lsq+: LSQ weights, LSQ+ inputs (learned offset, as in the LSQ+ paper;
    snapped to an integer zero point unless lsqplus_offset is continuous).
    pact: PACT inputs; weights min-max recomputed every step, or with pact_weights dorefa
    DoReFa's tanh quantizer (the PACT paper's) on all but the first and last layer (the
    classifier has no BatchNorm to absorb DoReFa's [-1, 1] weight scale, so those keep
    min-max). minmax: fixed min-max for both (weights recomputed every step too, unless
    range_method is mse: then calibrated once).
    config.range_method sets the inputs' calibration; weights use min-max, or MSE per channel
    when it is mse (percentiles would cut real weights, not noise). With edge_weights
    minmax the first and last layer's weights take min-max ranges recomputed every step: a
    learned 8-bit per-channel step size is ~20x smaller than a 4-bit one for about the same
    LSQ gradient, and on short schedules it can grow past the weights and kill the channel.
    """
    channels = layer.weight.shape[0]
    w_kw = dict(signed=config.symmetric_weights, per_channel=True, num_channels=channels,
                init=config.init)
    a_kw = dict(signed=config.symmetric_inputs, init=config.init)
    w_range = "mse" if config.range_method == "mse" else "minmax"
    kind = config.quantizer
    if kind == "lsq":
        pair = LSQQuantizer(w_bits, **w_kw), LSQQuantizer(a_bits, **a_kw)
    elif kind == "lsq+":
        continuous = config.lsqplus_offset == "continuous"
        pair = LSQQuantizer(w_bits, **w_kw), LSQPlusQuantizer(a_bits, continuous=continuous,
                                                              **a_kw)
    elif kind == "pact":
        weight: Quantizer = (DoReFaWeightQuantizer(w_bits)
                             if config.pact_weights == "dorefa" and not is_edge
                             else MinMaxQuantizer(w_bits, dynamic=True, **w_kw))
        pair = weight, PACTQuantizer(a_bits, **a_kw)
    else:
        pair = (MinMaxQuantizer(w_bits, dynamic=w_range == "minmax", **w_kw),
                MinMaxQuantizer(a_bits, **a_kw))
    if is_edge and config.edge_weights == "minmax" and not isinstance(pair[0], MinMaxQuantizer):
        pair = MinMaxQuantizer(w_bits, dynamic=True, **w_kw), pair[1]
    pair[0].set_range_method(w_range)
    pair[1].set_range_method(config.range_method, config.percentile)
    return pair


def _layer_bits(config: QuantConfig, name: str, is_edge: bool) -> tuple[int, int] | None:
    """Bits of one layer after the first/last policy and the overrides; None skips it."""
    bits = (config.w_bits, config.a_bits)
    if is_edge and config.edge_bits is not None:
        bits = (config.edge_bits, config.edge_bits)
    for rule in config.overrides:
        if fnmatch.fnmatchcase(name, rule["pattern"]):
            if rule.get("skip"):
                return None
            bits = (rule.get("w_bits", bits[0]), rule.get("a_bits", bits[1]))
    return bits


def layer_plan(model: nn.Module,
               config: QuantConfig) -> list[tuple[str, nn.Module, tuple[int, int]]]:
    """(name, float layer, (w_bits, a_bits)) of every layer `quantize_model` would swap.

    Every nn.Conv2d and nn.Linear, in module order. The first and last of them (the stem and
    the classifier of the bundled models) get `config.edge_bits`; `config.overrides` then
    apply by fnmatch pattern on module names (skipped layers are left out). Methods that
    prepare a float model for a bit width (DNQ) read the same plan.
    """
    layers = [(n, m) for n, m in model.named_modules() if type(m) in QUANT_LAYERS]
    if not layers:
        raise ConfigError("the model has no nn.Conv2d or nn.Linear layer to quantize")
    unused = [r["pattern"] for r in config.overrides
              if not any(fnmatch.fnmatchcase(n, r["pattern"]) for n, _ in layers)]
    if unused:
        raise ConfigError(f"quant.overrides: pattern(s) {unused} match no layer; layers are "
                          f"named like {layers[0][0]!r}, {layers[-1][0]!r}")
    edges = edge_layers(model)
    plan = [(name, layer, _layer_bits(config, name, name in edges)) for name, layer in layers]
    return [(name, layer, bits) for name, layer, bits in plan if bits is not None]


def edge_layers(model: nn.Module) -> set[str]:
    """Names of the first and last conv/linear layer (the stem and the classifier)."""
    layers = [n for n, m in model.named_modules() if type(m) in QUANT_LAYERS]
    return {layers[0], layers[-1]} if layers else set()


def quantize_model(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """A fake-quantized copy of `model` (layers and bits by `layer_plan`); `model` itself is
    left untouched. The copy must be calibrated (`calibrate`) before use."""
    config = config or QuantConfig()
    qmodel = copy.deepcopy(model)
    edges = edge_layers(qmodel)
    for name, layer, bits in layer_plan(qmodel, config):
        weight_q, input_q = _make_quantizers(config, layer, *bits, name in edges)
        qlayer = QUANT_LAYERS[type(layer)].from_float(layer, weight_q, input_q)
        qmodel.set_submodule(name, qlayer)
    return qmodel


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable[Tensor],
              device: torch.device | str | None = None) -> nn.Module:
    """Initialize every quantizer's range from data (the paper: 100 training images).

    The model runs in eval mode (BatchNorm statistics are not touched) with quantization
    bypassed, each quantizer recording the min/max of the tensor it sees; then step sizes
    and zero points are set from those statistics.
    """
    named = quantizers(model)
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
            model(batch.to(device))
            seen += 1
        if seen == 0:
            raise ConfigError("calibrate(): no calibration batches were given")
        missed = [n for n, q in named if q.observer is None or not q.observer.seen]
        if missed:
            raise ConfigError(f"calibrate(): quantizers never ran during calibration: {missed[:5]}")
        for _, q in named:
            q.finish_observing()
    finally:
        for _, q in named:
            q.observer = None
        model.train(was_training)
    return model


def describe(model: nn.Module) -> list[dict]:
    """One row per quantized layer: name, type and bit widths (for logs and tests)."""
    return [{"name": n, "type": type(m).__name__, "w_bits": m.bits[0], "a_bits": m.bits[1]}
            for n, m in quant_layers(model)]
