"""Is a W2A2 run's dependence on its BatchNorm statistics sampling noise? (issue: sound QAT)

bench/bn_sensitivity.py found that re-estimating the same trained run from different 12,800-
image subsets moves some W2A2 runs by two points. If that is the statistics' sampling noise
acting on a sensitive network, the spread of the accuracy over subsets shrinks as the subsets
grow (about as 1 / sqrt(images)), and the running averages a run ends with, which weigh about
the last 128 x (2 - 0.1) / 0.1 = 2,432 augmented images (BatchNorm momentum 0.1, batch 128),
are a draw from the noisiest of these distributions. For each run folder: the accuracy as
trained, re-estimated from SEEDS subsets of each size in SIZES, and from the whole training
set (deterministic: one value).

    python bench/bn_sampling.py runs/converged/probes/sam-w2a2-s2-rerun ...
Appends to results/converged/bn_sampling.json (one entry per run folder).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from bn_sensitivity import accuracy, load_run, reestimated_accuracy
from machine import machine_info, save_report

SIZES = (2560, 12800)
SEEDS = (10, 11, 12, 13, 14)   # not the grid's own subset seeds 0-3


def sampling(run_dir: Path) -> dict:
    model, data = load_run(run_dir)
    result: dict = {"as trained": accuracy(model, data)}
    for images in SIZES:
        values = [reestimated_accuracy(model, data, images, seed) for seed in SEEDS]
        result[f"{images} images"] = {"values": values, "mean": statistics.fmean(values),
                                      "sd": statistics.stdev(values)}
    result[f"all {len(data.train)} images"] = reestimated_accuracy(model, data,
                                                                   len(data.train), 0)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--results", type=Path,
                        default=Path("results/converged/bn_sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run_dir in args.runs:
        result = sampling(run_dir)
        print(run_dir.name, json.dumps(result), flush=True)
        report = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": {}}
        report["runs"][run_dir.name] = result
        save_report({**report, "machine": machine_info()}, args.results)


if __name__ == "__main__":
    main()
