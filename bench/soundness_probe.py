"""Probes behind docs/soundness.md: what kills first-layer channels, and which option stops it.

Each probe is a short QAT run that records the first layer's largest weight and step size
after every step (the variants differ only in the quantization or training option named).

    python bench/soundness_probe.py synthetic   # 3 seeds x LSQ/KD/FPQ x variants, tiny data
    python bench/soundness_probe.py trace       # step by step: the update that kills a channel
    python bench/soundness_probe.py real --fp runs/pilot_fp   # FPQ W2A4 on Fashion-MNIST
    python bench/soundness_probe.py real --fp runs/pilot_fp --method cr --bits w2a2 \
        --method-options '{"ema_decay": 0.9}' --bn-images 0 --name cr_ema0.9 \
        --variants "min-max init everywhere (FPQ's Eq. 5)"

`real` needs a full-precision run (e.g. `flatq pretrain --model resnet8 --image-size 32
--channels 3 --epochs 5 --max-steps-per-epoch 100 --batch-size 256 --lr 0.1 --out DIR`).
Results go to results/soundness/.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import torch

from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config
from flatq.quant import quant_layers
from flatq.runs import load_teacher, pretrain, qat
from machine import machine_info, run_main, save_report

# variant -> (quantization options, training options)
VARIANTS = {
    "min-max init everywhere (FPQ's Eq. 5)": ({"edge_init": "minmax"}, {}),
    "quantizer-lr 0.1": ({"edge_init": "minmax"}, {"quantizer_lr": 0.1}),
    "init lsq (all layers)": ({"init": "lsq"}, {}),
    "edge-init lsq": ({"edge_init": "lsq"}, {}),
    "edge-weights minmax": ({"edge_weights": "minmax"}, {}),
}
METHODS = ("lsq", "kd", "fpq")
SYNTHETIC = DataConfig(name="synthetic")
FASHION = DataConfig(name="fashion_mnist", image_size=32, channels=3)


def stem_tracker(trace: list[dict]):
    """Step callback: the first quantized layer's largest |w|, largest step and their ratio."""

    def record(step, objective, images, labels):
        layer = quant_layers(objective.student)[0][1]
        with torch.no_grad():
            scale, _ = layer.weight_quantizer.scale_and_zero_point()
            weight_max = layer.weight.flatten(1).abs().amax(1)
            ratio = scale.flatten().expand_as(weight_max) / weight_max
        trace.append({"step": step, "max_weight": weight_max.max().item(),
                      "max_step": scale.max().item(), "max_step_over_weight": ratio.max().item()})

    return record


def probe(teacher_dir: Path, out: Path, data: DataConfig, method: str, bits: str, seed: int,
          quant: dict, train: dict, method_options: dict | None = None) -> dict:
    """One QAT run; its accuracy, dead channels and the first layer's trajectory."""
    trace: list[dict] = []
    config = RunConfig(model="resnet8", data=data, method=method_config(method, method_options),
                       quant=QuantConfig(w_bits=int(bits[1]), a_bits=int(bits[3]), **quant),
                       train=TrainConfig(**{"device": "cpu", "progress": False, "track_every": 1,
                                            "seed": seed, **train}))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        result = qat(config, *load_teacher(teacher_dir), out, overwrite=True,
                     callbacks=[stem_tracker(trace)])
    return {"test_acc": result["test_acc"], "dead_channels": result["dead_channels"],
            "grew": max(t["max_step_over_weight"] for t in trace) > 2.0,
            "peak_max_weight": max(t["max_weight"] for t in trace),
            "peak_max_step": max(t["max_step"] for t in trace), "trace": trace}


def synthetic_teacher(root: Path) -> Path:
    fp = root / "fp"
    if not (fp / "model.pt").is_file():
        pretrain(RunConfig(model="resnet8", data=SYNTHETIC, method=method_config("ce"),
                           train=TrainConfig(epochs=3, batch_size=64, lr=0.1, device="cpu",
                                             progress=False)), fp, overwrite=True)
    return fp


def run_synthetic(root: Path) -> dict:
    teacher = synthetic_teacher(root)
    train = {"epochs": 2, "batch_size": 64, "lr": 0.05}
    rows = {}
    for variant, (quant, train_options) in VARIANTS.items():
        runs = {f"{method} seed {seed}": probe(teacher, root / "qat", SYNTHETIC, method, "w2a4",
                                               seed, quant, {**train, **train_options})
                for seed in (0, 1, 2) for method in METHODS}
        rows[variant] = runs
        dead = sum(r["dead_channels"] > 0 for r in runs.values())
        grew = sum(r["grew"] for r in runs.values())
        print(f"{variant:40s} runs with a dead channel {dead}/9, grew {grew}/9, largest weight "
              f"{max(r['peak_max_weight'] for r in runs.values()):.3g}", flush=True)
    return rows


def run_trace(root: Path) -> list[dict]:
    """LSQ W2A4 on the synthetic set: per step, the channel with the largest |dL/ds|, its step
    size after the update and how many of its weights lay outside the grid before it."""
    rows: list[dict] = []
    outside_before: list[torch.Tensor] = []

    def record(step, objective, images, labels):
        layer = quant_layers(objective.student)[0][1]
        quantizer = layer.weight_quantizer
        with torch.no_grad():
            scale, zero = (t.flatten() for t in quantizer.scale_and_zero_point())
            codes = layer.weight.flatten(1) / scale[:, None] + zero[:, None]
            outside = ((codes < quantizer.qmin - 0.5) | (codes > quantizer.qmax + 0.5)).sum(1)
            grad = quantizer.scale.grad.flatten()
            channel = int(grad.abs().argmax())
        before = outside_before[-1] if outside_before else torch.zeros_like(outside)
        rows.append({"step": step, "channel": channel, "step_size": scale[channel].item(),
                     "outside_before": int(before[channel]), "dL_ds": grad[channel].item(),
                     "max_weight": layer.weight[channel].abs().max().item()})
        outside_before.append(outside)

    config = RunConfig(model="resnet8", data=SYNTHETIC, method=method_config("lsq"),
                       quant=QuantConfig(w_bits=2, a_bits=4),
                       train=TrainConfig(epochs=1, batch_size=64, lr=0.05, device="cpu",
                                         progress=False, track_every=1, max_steps_per_epoch=6))
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        qat(config, *load_teacher(synthetic_teacher(root)), root / "trace", overwrite=True,
            callbacks=[record])
    for row in rows:
        print(row, flush=True)
    return rows


def run_real(root: Path, fp: Path, variants: list[str], method: str, bits: str,
             method_options: dict, bn_images: int) -> dict:
    train = {"epochs": 2, "batch_size": 256, "lr": 0.01, "max_steps_per_epoch": 100}
    rows = {}
    for variant in variants:
        quant, train_options = VARIANTS[variant]
        row = probe(fp, root / "real", FASHION, method, bits, 0,
                    {**quant, "bn_images": bn_images, "bn_check": 0},
                    {**train, **train_options},
                    method_options)
        rows[variant] = row
        print(f"{variant:40s} acc {row['test_acc']:.2f} dead {row['dead_channels']} largest "
              f"weight {row['peak_max_weight']:.3g} step {row['peak_max_step']:.3g}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("synthetic", "trace", "real"))
    parser.add_argument("--fp", type=Path, help="full-precision run for `real`")
    parser.add_argument("--variants", default="min-max init everywhere (FPQ's Eq. 5),"
                        "edge-init lsq,edge-weights minmax",
                        help="comma-separated variants for `real`")
    parser.add_argument("--method", default="fpq", help="method of `real` [default: fpq]")
    parser.add_argument("--bits", default="w2a4", help="bit widths of `real` [default: w2a4]")
    parser.add_argument("--method-options", type=json.loads, default={},
                        help='method options of `real` as JSON, e.g. \'{"ema_decay": 0.9}\'')
    parser.add_argument("--bn-images", type=int, default=12800,
                        help="`real`: re-estimate BatchNorm from this many images after "
                        "training (0: no) [default: 12800]")
    parser.add_argument("--name", default=None, help="result file name [default: the mode]")
    parser.add_argument("--work", type=Path, default=Path("runs/soundness"))
    parser.add_argument("--results", type=Path, default=Path("results/soundness"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.what == "synthetic":
        report = run_synthetic(args.work)
    elif args.what == "trace":
        report = run_trace(args.work)
    else:
        if args.fp is None:
            parser.error("real needs --fp RUN (a full-precision ResNet-8 run)")
        report = run_real(args.work, args.fp, args.variants.split(","), args.method, args.bits,
                          args.method_options, args.bn_images)
    save_report({"probes": report, "settings": {k: str(v) for k, v in vars(args).items()},
                 "machine": machine_info()}, args.results / f"{args.name or args.what}.json")


if __name__ == "__main__":
    run_main(main)
