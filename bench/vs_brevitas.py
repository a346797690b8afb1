"""The same W4A4 ResNet-18 QAT step in flatq and in Brevitas, each against the FP step (issue 10).

Target: flatq's QAT overhead (step-time ratio to FP minus 1) at most half of Brevitas'.
Brevitas is a bench-only tool, not a flatq dependency: `.venv/bin/pip install brevitas`.

What makes the two comparable (printed and recorded with the result):
- the same network: flatq's CIFAR-form resnet18 (10 classes, 32x32x3), same seed and weights;
- the same quantization points: every conv/linear quantizes its input (per tensor) and its
  weight (per output channel), at the bit widths flatq's `quantize_model` chose for that
  layer (4 bits inside, 8 bits for the first conv and the classifier), read layer by layer
  from the flatq model and handed to Brevitas' QuantConv2d / QuantLinear;
- the same kind of quantizer: signed integer grids with zero point 0 and learned float scales
  (flatq LSQ with symmetric weights and inputs; Brevitas Int8WeightPerChannelFloat and
  Int8ActPerTensorFloat with bit_width set and the weight scale made a learned parameter);
  Brevitas runs its stats-collection steps inside the untimed warm-up, so the timed steps use
  learned scales in both;
- the same step: cross-entropy, backward, SGD (flatq's build_optimizer), batch 64 on CPU,
  FP / flatq / Brevitas interleaved with a rotating order; medians reported.

    .venv/bin/python bench/vs_brevitas.py                 # batch 64, 10 timed steps
    .venv/bin/python bench/vs_brevitas.py --steps 5 --warmup 3
Writes results/bench_vs_brevitas.json (machine, load average, settings, times, ratios).
"""

from __future__ import annotations

import argparse
import copy
import os

import torch
from torch import nn

from flatq.config import QuantConfig, TrainConfig
from flatq.methods import TaskObjective
from flatq.models import build_model
from flatq.quant import calibrate, quant_layers, quantize_model
from flatq.train.batchnorm import reestimate_batchnorm
from flatq.train.optim import build_optimizer

from machine import machine_info, print_load, run_main, save_report
from step_time import NUM_CLASSES, batch, summarize, timed_step

SETTINGS = ("fp", "flatq", "brevitas")
TARGET = 0.5  # flatq overhead / Brevitas overhead
QUANT = QuantConfig(w_bits=4, a_bits=4, quantizer="lsq", symmetric_weights=True,
                    symmetric_inputs=True)
COLLECT_STATS_STEPS = 2  # Brevitas' activation-scale initialization, inside the warm-up


def import_brevitas():
    """The Brevitas pieces the bench uses, or a clear request to install it."""
    try:
        from brevitas.inject.enum import ScalingImplType
        from brevitas.nn import QuantConv2d, QuantLinear
        from brevitas.quant import Int8ActPerTensorFloat, Int8WeightPerChannelFloat
    except ImportError as error:
        raise SystemExit(f"this bench needs Brevitas ({error}); install it with "
                         "`.venv/bin/pip install brevitas` (a bench-only tool, not a flatq "
                         "dependency)") from None

    class WeightPerChannelLearned(Int8WeightPerChannelFloat):
        """Signed per-channel weights with a learned scale initialized from max|w| (as LSQ)."""
        scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS

    class ActPerTensorLearned(Int8ActPerTensorFloat):
        """Signed per-tensor inputs with a learned scale initialized from runtime statistics."""
        collect_stats_steps = COLLECT_STATS_STEPS

    return QuantConv2d, QuantLinear, WeightPerChannelLearned, ActPerTensorLearned


def brevitas_model(fp: nn.Module, flatq_model: nn.Module) -> nn.Module:
    """`fp` with each layer that flatq quantized swapped for a Brevitas layer of the same bits."""
    QuantConv2d, QuantLinear, weight_quant, act_quant = import_brevitas()
    model = copy.deepcopy(fp)
    modules = dict(model.named_modules())
    for name, flat_layer in quant_layers(flatq_model):
        w_bits, a_bits = flat_layer.bits
        layer = modules[name]
        quant = dict(weight_quant=weight_quant, input_quant=act_quant, weight_bit_width=w_bits,
                     input_bit_width=a_bits, return_quant_tensor=False)
        if isinstance(layer, nn.Conv2d):
            new = QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                              stride=layer.stride, padding=layer.padding, dilation=layer.dilation,
                              groups=layer.groups, bias=layer.bias is not None, **quant)
        else:
            new = QuantLinear(layer.in_features, layer.out_features,
                              bias=layer.bias is not None, **quant)
        # strict=False: Brevitas adds its quantizers' state; the float weights must all land.
        assert not new.load_state_dict(layer.state_dict(), strict=False).unexpected_keys
        parent_name, _, child = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, child, new)
    return model


def weight_levels(model: nn.Module) -> int:
    """Most distinct values in one output channel of any 4-bit Brevitas weight (<= 16)."""
    most = 0
    for module in model.modules():
        if hasattr(module, "quant_weight") and module.weight_quant.bit_width() == 4:
            w = module.quant_weight().value.detach()
            most = max(most, max(len(torch.unique(c)) for c in w))
    return most


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3,
                        help=f"untimed steps per setting first (>= {COLLECT_STATS_STEPS + 1})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="results/bench_vs_brevitas.json")
    args = parser.parse_args(argv)
    if args.warmup <= COLLECT_STATS_STEPS:
        parser.error(f"--warmup must exceed Brevitas' {COLLECT_STATS_STEPS} stats-collection steps")
    if args.threads:
        torch.set_num_threads(args.threads)
    import_brevitas()  # fail before any work when it is missing
    import brevitas

    device = torch.device("cpu")
    load_before = os.getloadavg()
    images, labels = batch(args.batch, device)
    torch.manual_seed(0)
    fp = build_model("resnet18", num_classes=NUM_CLASSES, in_channels=3)
    reestimate_batchnorm(fp, [images])   # the BatchNorm statistics a trained model has
    flat = quantize_model(fp, QUANT)
    calibrate(flat, [images], device)
    brev = brevitas_model(fp, flat)
    runs = {}
    for setting, model in zip(SETTINGS, (fp, flat, brev)):
        objective = TaskObjective(model).train()
        runs[setting] = (objective, build_optimizer(model, TrainConfig()))

    times: dict[str, list[tuple[float, float]]] = {s: [] for s in SETTINGS}
    for i in range(args.warmup + args.steps):
        for setting in SETTINGS[i % 3:] + SETTINGS[:i % 3]:
            elapsed = timed_step(*runs[setting], images, labels, device)
            if i >= args.warmup:
                times[setting].append(elapsed)
    summary = {s: summarize(t) for s, t in times.items()}
    medians = {s: summary[s]["median_ms"] for s in SETTINGS}
    ratios = {s: medians[s] / medians["fp"] for s in ("flatq", "brevitas")}
    overheads = {s: r - 1 for s, r in ratios.items()}
    relative = overheads["flatq"] / overheads["brevitas"]
    cpu = {s: summary[s]["cpu_median_ms"] / summary["fp"]["cpu_median_ms"] - 1
           for s in ("flatq", "brevitas")}
    comparable = [
        "same network: flatq resnet18 (CIFAR form, 10 classes, 32x32x3), same initial weights",
        "same quantization points: each conv/linear quantizes its input per tensor and its "
        "weight per output channel; bits per layer taken from flatq (4, first conv and "
        "classifier 8)",
        "same quantizer kind: signed grids, zero point 0, learned float scales (flatq LSQ with "
        "symmetric weights and inputs; Brevitas Int8WeightPerChannelFloat with "
        "scaling_impl_type=PARAMETER_FROM_STATS and Int8ActPerTensorFloat, bit_width set); "
        "Brevitas weights use its default narrow range [-7, 7] at 4 bits",
        f"Brevitas' {COLLECT_STATS_STEPS} activation stats-collection steps fall in the "
        "untimed warm-up: timed steps use learned scales in both",
        f"same step: cross-entropy, backward, SGD (flatq build_optimizer), batch {args.batch}, "
        f"CPU, {torch.get_num_threads()} threads, settings interleaved, medians of "
        f"{args.steps} steps",
    ]
    report = {
        "machine": {**machine_info(), "device": "cpu"},
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "brevitas": brevitas.__version__,
        "settings": {"model": "resnet18", "batch": args.batch, "steps": args.steps,
                     "warmup": args.warmup, "image": [3, 32, 32], "bits": "w4a4",
                     "edge_bits": QUANT.edge_bits},
        "comparable_because": comparable,
        "brevitas_weight_levels_per_channel": weight_levels(brev),
        "times_ms": summary, "ratio_to_fp": ratios, "overhead": overheads,
        "flatq_overhead_over_brevitas": relative, "target": TARGET,
        "cpu_time_overhead": cpu,
        "cpu_time_flatq_overhead_over_brevitas": cpu["flatq"] / cpu["brevitas"],
        "meets_target": relative <= TARGET,
    }
    print(f"ResNet-18 W4A4 QAT step, batch {args.batch}, CPU ({torch.get_num_threads()} threads), "
          f"medians of {args.steps} interleaved steps:")
    for s in SETTINGS:
        print(f"  {s:9s} {medians[s]:8.1f} ms" + (f"  {ratios[s]:.2f}x FP, overhead "
                                                  f"{overheads[s]:+.2f}" if s in ratios else ""))
    verdict = "ok" if relative <= TARGET else "MISSED"
    print(f"  flatq overhead / Brevitas overhead = {relative:.2f} (target <= {TARGET}) {verdict}")
    print(f"  by CPU time: overhead flatq {cpu['flatq']:+.2f}, Brevitas {cpu['brevitas']:+.2f}, "
          f"flatq / Brevitas = {cpu['flatq'] / cpu['brevitas']:.2f}")
    print("comparable because:\n" + "\n".join(f"  - {c}" for c in comparable))
    print_load(report)
    save_report(report, args.out)
    return report


if __name__ == "__main__":
    run_main(main)
