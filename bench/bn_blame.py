"""Which BatchNorm layer's statistics make a trained 2-bit network lose points?
(issue: sound QAT, "what makes a run collapse").

bench/eval_noise.py found draws of running statistics (60 augmented training batches, as
between two evaluations in training) that take a trained W2A2 run from 89 to 76 points with
every weight fixed. This bench takes one such draw and moves it into the model as trained one
BatchNorm layer at a time: the layer whose statistics alone reproduce the drop is where the
network is sensitive. For that layer it lists the channels whose normalization changed most
(the ratio of the new to the old 1/sqrt(var + eps)) with their running variance.

Then the mechanism: Fashion-MNIST images are half background (pixels exactly 0), and a
constant region gives every conv the same output at every position inside it, so each
channel's activations carry a point mass. For a blank image, every quantized layer's input at
the centre is listed per channel in units of its step size, with its distance to the nearest
rounding threshold (k + 1/2): a point mass within a few hundredths of a step of a threshold
flips, all of it at once, under a shift of the statistics that small.

    python bench/bn_blame.py runs/converged/session/w2a2/lsq/seed1 --draw 2
Writes results/converged/bn_blame/<run>-draw<k>.json.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

import torch
from torch import nn

from flatq.quant import quant_layers
from bn_sensitivity import accuracy, load_run
from eval_noise import refreshed_statistics
from machine import machine_info, run_main, run_name, save_report

SHOWN_CHANNELS = 5
NEAR = 0.05   # steps from a rounding threshold that count as "at" it


def batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    return {name: m for name, m in model.named_modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)}


def scale_changes(old: nn.Module, new: nn.Module) -> list[dict]:
    """The channels of one BatchNorm layer whose normalization changed most between two
    estimates, largest ratio first."""
    old_scale = (old.running_var + old.eps).rsqrt()
    new_scale = (new.running_var + new.eps).rsqrt()
    ratio = new_scale / old_scale
    order = torch.argsort((ratio.log()).abs(), descending=True)[:SHOWN_CHANNELS]
    return [{"channel": int(c), "scale ratio": float(ratio[c]),
             "old var": float(old.running_var[c]), "new var": float(new.running_var[c]),
             "old mean": float(old.running_mean[c]), "new mean": float(new.running_mean[c]),
             "weight": float(old.weight[c].detach()) if old.weight is not None else None}
            for c in order]


def blame(model: nn.Module, data, draw: int) -> dict:
    refreshed = refreshed_statistics(model, data, draw)
    result = {"as trained": accuracy(model, data), "refreshed": accuracy(refreshed, data),
              "layers": {}}
    new_layers = batchnorms(refreshed)
    for name, layer in batchnorms(model).items():
        patched = copy.deepcopy(model)
        target = batchnorms(patched)[name]
        target.running_mean.copy_(new_layers[name].running_mean)
        target.running_var.copy_(new_layers[name].running_var)
        result["layers"][name] = {"accuracy": accuracy(patched, data),
                                  "channels": scale_changes(layer, new_layers[name])}
        print(f"{name:<40} {result['layers'][name]['accuracy']:.2f}", flush=True)
    return result


def blank_positions(model: nn.Module, data) -> dict[str, dict]:
    """Per quantized layer with an input quantizer: a blank (all-zero) image's input at the
    centre pixel, per channel in steps, and the channels within NEAR of a rounding threshold
    among those inside the grid (above 0 and below the top level). Positions are x / s, so
    they are grid positions for quantizers with zero point 0 (LSQ's, the grids' quantizer)."""
    captured: dict[str, torch.Tensor] = {}
    handles = [layer.input_quantizer.register_forward_pre_hook(
        lambda module, inputs, name=name: captured.__setitem__(name, inputs[0].detach()))
        for name, layer in quant_layers(model) if layer.input_quantizer is not None]
    images, _ = data.test.take(torch.arange(1))
    with torch.no_grad():
        model.eval()(data.eval_pipeline(torch.zeros_like(images), train=False))
    for handle in handles:
        handle.remove()
    result = {}
    for name, layer in quant_layers(model):
        if name not in captured or captured[name].dim() != 4:
            continue
        x = captured[name][0]
        steps = (x[:, x.shape[1] // 2, x.shape[2] // 2]
                 / layer.input_quantizer.step_size().detach().flatten()).tolist()
        top = layer.input_quantizer.qmax
        near = [c for c, u in enumerate(steps)
                if 0 < u < top and abs(u - round(u - 0.5) - 0.5) < NEAR]
        result[name] = {"centre in steps": [round(u, 3) for u in steps],
                        "channels near a threshold": near}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--draw", type=int, required=True,
                        help="the seed of bench/eval_noise.py's draw to take apart")
    parser.add_argument("--out", type=Path, default=Path("results/converged/bn_blame"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, data = load_run(args.run)
    result = blame(model, data, args.draw)
    print(f"as trained {result['as trained']:.2f}, all statistics refreshed "
          f"{result['refreshed']:.2f}")
    result["blank image"] = blank_positions(model, data)
    for name, row in result["blank image"].items():
        print(f"blank image, input of {name:<30} channels within {NEAR} step of a threshold: "
              f"{row['channels near a threshold'] or '-'}")
    name = run_name(args.run).replace("/", "-")
    save_report({"machine": machine_info(), "run": run_name(args.run), "draw": args.draw,
                 **result}, args.out / f"{name}-draw{args.draw}.json")


if __name__ == "__main__":
    run_main(main)
