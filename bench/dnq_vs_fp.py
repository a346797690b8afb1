"""DNQ vs plain training, both followed by the same post-training quantization (issue 7).

Plain FP training (cross-entropy) once, then PTQ at every bit width; DNQ training once per
target bit width (its noise is that bit width's), then PTQ at that bit width. Same model,
data, epochs, steps and seed for all runs (our settings, not the paper's); PTQ is our reading
of the paper's "simple quantization" (fixed min-max ranges, per-channel weights, 100
calibration images, first/last layer 8 bits).

    .venv/bin/python bench/dnq_vs_fp.py --epochs 1 --max-steps-per-epoch 100     # minutes
    .venv/bin/python bench/dnq_vs_fp.py --data cifar100 --model resnet18 --epochs 30 --device cuda
Writes results/dnq_vs_fp.json (machine, seed, settings, one row per bit width) and prints a
markdown table. Runs go to --work (default: a temporary folder, removed afterwards).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from flatq.config import (DataConfig, QuantConfig, RunConfig, TrainConfig, method_config,
                          parse_bits)
from flatq.runs import ptq
from flatq.runs import load_teacher, pretrain

from machine import machine_info, run_main, save_report


def train(args: argparse.Namespace, method: str, options: dict, run_dir: Path) -> dict:
    """Pre-train one full-precision model; returns its summary (test_acc, ...)."""
    config = RunConfig(
        model=args.model,
        data=DataConfig(name=args.data, root=args.data_root, image_size=32, channels=3),
        train=TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                          seed=args.seed, device=args.device, progress=False,
                          max_steps_per_epoch=args.max_steps_per_epoch),
        method=method_config(method, options))
    return pretrain(config, run_dir, overwrite=True)


def quantize(args: argparse.Namespace, run_dir: Path, bits: str, out: Path) -> dict:
    """PTQ of a finished run at `bits`; returns the PTQ summary (test_acc, fp_test_acc)."""
    teacher, state = load_teacher(run_dir)
    w_bits, a_bits = parse_bits(bits)
    config = RunConfig(model=state["meta"]["model"],
                       data=DataConfig.from_dict(state["meta"]["data"]),
                       train=TrainConfig(device=args.device),
                       quant=QuantConfig(w_bits=w_bits, a_bits=a_bits, quantizer="minmax",
                                         range_method=args.range_method,
                                         calib_seed=args.seed))
    return ptq(config, teacher, state, out, overwrite=True)


def table(rows: list[dict]) -> str:
    lines = ["| bits | FP model | FP -> PTQ | DNQ model (FP) | DNQ -> PTQ | DNQ - FP after PTQ |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['bits']} | {r['fp_acc']:.2f} | {r['fp_ptq_acc']:.2f} | "
                     f"{r['dnq_fp_acc']:.2f} | {r['dnq_ptq_acc']:.2f} | "
                     f"{r['dnq_ptq_acc'] - r['fp_ptq_acc']:+.2f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace, work: Path) -> dict:
    start = time.perf_counter()
    fp = train(args, "ce", {}, work / "fp")
    rows = []
    for bits in args.bits:
        fp_ptq = quantize(args, work / "fp", bits, work / f"fp_ptq_{bits}")
        dnq = train(args, "dnq", {"target_bits": bits}, work / f"dnq_{bits}")
        dnq_ptq = quantize(args, work / f"dnq_{bits}", bits, work / f"dnq_ptq_{bits}")
        rows.append({"bits": bits, "fp_acc": fp["test_acc"], "fp_ptq_acc": fp_ptq["test_acc"],
                     "dnq_fp_acc": dnq["test_acc"], "dnq_ptq_acc": dnq_ptq["test_acc"]})
        print(table(rows[-1:]).splitlines()[-1], flush=True)
    return {"bench": "dnq_vs_fp", "machine": machine_info(), "seed": args.seed,
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
            "rows": rows, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--model", default="resnet8")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--max-steps-per-epoch", type=int, default=100,
                        help="cut each epoch after this many steps (0: whole epochs)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bits", default="w8a8,w4a4,w2a4",
                        type=lambda s: [b.strip().lower() for b in s.split(",") if b.strip()])
    parser.add_argument("--range-method", default="minmax", choices=("minmax", "percentile", "mse"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--work", default=None, help="keep the run folders here")
    parser.add_argument("--out", default="results/dnq_vs_fp.json")
    args = parser.parse_args()
    for bits in args.bits:
        parse_bits(bits)
    if args.work:
        result = run(args, Path(args.work))
    else:
        with tempfile.TemporaryDirectory(prefix="dnq_vs_fp_") as work:
            result = run(args, Path(work))
    print(f"\n{args.model} on {args.data}, {args.epochs} epoch(s) x "
          f"{args.max_steps_per_epoch or 'all'} steps, seed {args.seed}, PTQ "
          f"{args.range_method} ranges; test accuracy (%):\n")
    print(table(result["rows"]))
    save_report(result, args.out)
    print(f"took {result['seconds']:.0f} s")


if __name__ == "__main__":
    run_main(main)
