"""Is a W2A2 run's dependence on its BatchNorm statistics sampling noise? (issue: sound QAT)

bench/bn_sensitivity.py found that re-estimating the same trained run from different 12,800-
image subsets moves some W2A2 runs by two points. If that is the statistics' sampling noise
acting on a sensitive network, the spread of the accuracy over subsets shrinks as the subsets
grow (about as 1 / sqrt(images)), and the running averages a run ends with, which weigh about
the last 128 x (2 - 0.1) / 0.1 = 2,432 augmented images (BatchNorm momentum 0.1, batch 128),
are a draw from the noisiest of these distributions. For each run folder: the accuracy as
trained, re-estimated from SEEDS subsets of each size in SIZES, and from the whole training
set (deterministic: one value). With --augmented, instead: re-estimated from AUGMENTED_IMAGES
images through the training pipeline (random crops and flips, as the running averages saw them)
and, like training itself, as BatchNorm's own moving average (momentum 0.1) over 40 augmented
batches of 128 starting from the trained statistics; two draws each.

    python bench/bn_sampling.py runs/converged/probes/sam-w2a2-s2-rerun ...
    python bench/bn_sampling.py --augmented runs/converged/probes/pact-w2a2-s1-rerun
Appends to results/converged/bn_sampling.json (one entry per run folder and mode).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from pathlib import Path

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from bn_sensitivity import accuracy, load_run, reestimated_accuracy
from flatq.train.batchnorm import reestimate_batchnorm
from machine import machine_info, run_main, save_report

SIZES = (2560, 12800)
SEEDS = (10, 11, 12, 13, 14)   # not the grid's own subset seeds 0-3
AUGMENTED_IMAGES, AUGMENTED_SEEDS = 12800, (20, 21)


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


def augmented_batches(data, images: int, seed: int) -> list[torch.Tensor]:
    """`images` training images chosen by `seed`, through the training pipeline."""
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))
    crops = torch.Generator().manual_seed(seed + 1)
    return [data.train_pipeline(data.train.take(order[i:i + 128])[0], train=True,
                                generator=crops)
            for i in range(0, images, 128)]


def augmented(run_dir: Path) -> dict:
    model, data = load_run(run_dir)
    result: dict = {"as trained": accuracy(model, data)}
    for seed in AUGMENTED_SEEDS:
        reestimated = copy.deepcopy(model)
        reestimate_batchnorm(reestimated, augmented_batches(data, AUGMENTED_IMAGES, seed))
        result[f"{AUGMENTED_IMAGES} augmented images, seed {seed}"] = accuracy(reestimated, data)
    for seed in AUGMENTED_SEEDS:
        moved = copy.deepcopy(model).eval()
        norms = [m for m in moved.modules() if isinstance(m, _BatchNorm)]
        for norm in norms:
            norm.train()          # momentum 0.1, from the trained statistics, as in training
        with torch.no_grad():
            for images in augmented_batches(data, 40 * 128, seed):
                moved(images)
        result[f"moving average over 40 augmented batches, seed {seed}"] = accuracy(moved, data)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--augmented", action="store_true",
                        help="re-estimate from augmented images instead (see above)")
    parser.add_argument("--results", type=Path,
                        default=Path("results/converged/bn_sampling.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    for run_dir in args.runs:
        result = augmented(run_dir) if args.augmented else sampling(run_dir)
        print(run_dir.name, json.dumps(result), flush=True)
        report = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": {}}
        key = f"{run_dir.name}, augmented" if args.augmented else run_dir.name
        report["runs"][key] = result
        save_report({**report, "machine": machine_info()}, args.results)


if __name__ == "__main__":
    run_main(main)
