"""Accuracy grid on the Fashion-MNIST stand-in of the FPQ paper's tables (issue: evidence).

Runs FP pre-training once per seed, then every (bits, method) cell from it, and writes one
JSON per run plus a summary (mean and standard deviation over seeds) and a markdown table.
Finished runs are skipped, so an interrupted grid continues where it stopped.

    python bench/accuracy.py --grid table4 --seeds 0,1,2 --fp-epochs 15 --qat-epochs 10
    python bench/accuracy.py --grid ablation,psweep --bits w2a4

A run's folder is named by what it trains (method, quantizer, options), not by the grid, so a
cell that two grids share (LSQ, and FPQ at p = 0.1) trains once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config, parse_bits
from flatq.runs import load_teacher, pretrain, qat

from machine import machine_info, run_main

# cell name -> (method, quantizer, method options[, other quantization options])
TABLE4 = {
    "LSQ": ("lsq", "lsq", {}),
    "LSQ+ (integer zero point, min-max init)": ("lsq", "lsq+", {}),
    "PACT (min-max weights)": ("lsq", "pact", {}),
    "KD": ("kd", "lsq", {}),
    "FPQ": ("fpq", "lsq", {}),
}
ABLATION = {
    "LSQ": ("lsq", "lsq", {}),
    "+SFP": ("fpq", "lsq", {"csd": False}),
    "+CSD": ("fpq", "lsq", {"sfp": False}),
    "+SFP+CSD (FPQ)": ("fpq", "lsq", {}),
}
# p = 0 perturbs no layer: the same objective as +CSD, so it shares that run; p = 0.1 is FPQ's default
PSWEEP = {f"p={p}": ("fpq", "lsq", {"sfp": False} if p == 0 else {} if p == 0.1 else {"p": p})
          for p in (0.0, 0.1, 0.3, 0.5, 1.0)}
# first and last layer's weights by min-max instead of learned step sizes (quant.edge_weights)
EDGE = {"LSQ edge-minmax": ("lsq", "lsq", {}, {"edge_weights": "minmax"}),
        "FPQ edge-minmax": ("fpq", "lsq", {}, {"edge_weights": "minmax"})}
# BatchNorm statistics re-estimated from 12,800 clean training images after QAT (quant.bn_images)
BN = {"LSQ bn-reestimated": ("lsq", "lsq", {}, {"bn_images": 12800, "bn_check": 0}),
      "FPQ bn-reestimated": ("fpq", "lsq", {}, {"bn_images": 12800, "bn_check": 0})}
GRIDS = {"table4": TABLE4, "ablation": ABLATION, "psweep": PSWEEP, "edge": EDGE, "bn": BN,
         "sam": {"LSQ+SAM": ("sam", "lsq", {}), "FPQ": ("fpq", "lsq", {})}}


def train_config(args: argparse.Namespace, epochs: int, lr: float, seed: int,
                 track: bool = False) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=args.batch_size, lr=lr, seed=seed,
                       device=args.device, max_steps_per_epoch=args.max_steps, progress=False,
                       track=["hessian", "gradnorm"] if track else [],
                       track_every=args.track_every)


def cell_folder(method: str, quantizer: str, options: dict, quant: dict) -> str:
    """Folder name of one trained setting, e.g. fpq-lsq-sfp=False or lsq-lsq-q.edge_weights=minmax."""
    return "-".join([method, quantizer] + [f"{k}={v}" for k, v in sorted(options.items())]
                    + [f"q.{k}={v}" for k, v in sorted(quant.items())])


def run_grid(args: argparse.Namespace, grid: str) -> list[dict]:
    data = DataConfig(name=args.data, root=args.data_root, image_size=32, channels=3)
    out = Path(args.out)
    records = []
    for seed in args.seeds:
        fp_dir = out / f"{args.model}/fp/seed{seed}"
        if not (fp_dir / "model.pt").is_file():
            if args.report:
                continue
            pretrain(RunConfig(model=args.model, data=data, method=method_config("ce"),
                               train=train_config(args, args.fp_epochs, args.fp_lr, seed)),
                     fp_dir, overwrite=True)
        teacher, state = load_teacher(fp_dir)
        fp_acc = json.loads((fp_dir / "summary.json").read_text())["test_acc"]
        records.append({"cell": "FP", "bits": "fp32", "seed": seed, "test_acc": fp_acc})
        for bits in args.bits:
            w, a = parse_bits(bits)
            for cell, (method, quantizer, options, *more) in GRIDS[grid].items():
                if args.cells and cell not in args.cells:
                    continue
                quant = more[0] if more else {}
                folder = cell_folder(method, quantizer, options, quant)
                run_dir = out / f"{args.model}/{bits}/{folder}/seed{seed}"
                if not (run_dir / "model.pt").is_file():
                    if args.report:
                        continue
                    config = RunConfig(model=args.model, data=data,
                                       method=method_config(method, options),
                                       # the pilot ran before re-estimation was a default
                                       quant=QuantConfig(w_bits=w, a_bits=a, quantizer=quantizer,
                                                         **{"bn_images": 0, **quant}),
                                       train=train_config(args, args.qat_epochs, args.qat_lr, seed,
                                                          cell in args.track_cells))
                    started = time.perf_counter()
                    qat(config, teacher, state, run_dir, overwrite=True)
                    print(f"{cell} {bits} seed {seed}: {time.perf_counter() - started:.0f}s", flush=True)
                summary = json.loads((run_dir / "summary.json").read_text())
                records.append({"cell": cell, "bits": bits, "seed": seed, "test_acc": summary["test_acc"],
                                "seconds": summary["seconds"], "run": str(run_dir)})
    return records


def summarize(records: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str], list[float]] = {}
    for r in records:
        groups.setdefault((r["bits"], r["cell"]), []).append(r["test_acc"])
    return [{"bits": b, "cell": c, "n": len(v), "mean": statistics.fmean(v),
             "std": statistics.stdev(v) if len(v) > 1 else 0.0, "values": v}
            for (b, c), v in groups.items()]


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    steps = f" of at most {args.max_steps} steps" if args.max_steps else ""
    lines = [f"{args.model} on {args.data} (32x32x3), {args.fp_epochs} FP + {args.qat_epochs} QAT "
             f"epochs{steps} (batch {args.batch_size}), seeds {','.join(map(str, args.seeds))}; "
             "test accuracy %, mean ± std over seeds", "",
             "| W/A | method | accuracy | per seed |", "|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['cell']} | {r['mean']:.2f} ± {r['std']:.2f} | "
              f"{' / '.join(f'{v:.2f}' for v in r['values'])} |" for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", type=lambda s: s.split(","), default=["table4"],
                        help=f"comma-separated grids: {', '.join(sorted(GRIDS))}")
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--data", default="fashion_mnist")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--bits", type=lambda s: s.split(","), default=["w4a4", "w2a4", "w2a2"])
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--fp-epochs", type=int, default=15)
    parser.add_argument("--qat-epochs", type=int, default=10)
    parser.add_argument("--fp-lr", type=float, default=0.1)
    parser.add_argument("--qat-lr", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (quick runs)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--cells", type=lambda s: s.split(","), default=[],
                        help="run only these cells of the grid (e.g. FPQ,KD) [default: all]")
    parser.add_argument("--track-cells", type=lambda s: s.split(","), default=[],
                        help="cells whose runs log the Hessian trace and gradient norms "
                        "(e.g. LSQ,FPQ) for trajectory plots")
    parser.add_argument("--track-every", type=int, default=20, help="steps between tracked values")
    parser.add_argument("--report", action="store_true",
                        help="train nothing: summarize the runs that have finished")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", default="runs/accuracy")
    parser.add_argument("--results", default="results/accuracy")
    args = parser.parse_args()
    unknown = set(args.grid) - set(GRIDS)
    if unknown:
        parser.error(f"unknown grid {', '.join(sorted(unknown))} (choose from {', '.join(sorted(GRIDS))})")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    for grid in args.grid:
        records = run_grid(args, grid)
        rows = summarize(records)
        name = f"{args.model}_{grid}"
        (results / f"{name}.json").write_text(json.dumps(
            {"settings": {**vars(args), "grid": grid}, "machine": machine_info(),
             "runs": records, "summary": rows}, indent=2) + "\n")
        (results / f"{name}.md").write_text(markdown(rows, args))
        print(markdown(rows, args), flush=True)


if __name__ == "__main__":
    run_main(main)
