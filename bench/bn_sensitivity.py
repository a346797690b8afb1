"""How much does a QAT run's test accuracy depend on its BatchNorm statistics estimate?
(issue: sound QAT, the acceptance "re-estimation moves no run by more than 0.5 points").

For each run folder (a probe of bench/converged.py keeps its checkpoint, whose model is the one
before the run's own re-estimation): the test accuracy with the running statistics as trained,
then re-estimated (flatq.train.batchnorm.reestimate_batchnorm, clean training images) from
12,800 images drawn with seeds 0, 1, 2 (seed 0 is the grid's own re-estimation) and from 25,600
images. If subsets of the same size move a run by points, its accuracy is sensitive to
statistics at the level of their sampling noise, and no re-estimation can keep it within 0.5.

    python bench/bn_sensitivity.py runs/converged/probes/pact-w2a2-s1-rerun ...
Appends to results/converged/bn_sensitivity.json (one entry per run folder).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import torch

from flatq.data import calibration_batches
from flatq.runs import load_model
from flatq.train.batchnorm import reestimate_batchnorm
from flatq.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flatq.train.loop import evaluate
from flatq.train.run_io import run_data
from machine import machine_info, run_main, save_report

ESTIMATES = ((12800, 0), (12800, 1), (12800, 2), (25600, 3))   # (images, subset seed)


def load_run(run_dir: Path):
    """The run's model as its checkpoint holds it (before the run's own re-estimation), and
    its data."""
    model, state = load_model(run_dir)
    model.load_state_dict(load_checkpoint(run_dir, CHECKPOINT_NAME)["model"])
    return model, run_data(state)[1]


def accuracy(model: torch.nn.Module, data) -> float:
    return evaluate(model, data.test, data.eval_pipeline, torch.device("cpu"))["acc"]


def reestimated_accuracy(model: torch.nn.Module, data, images: int, seed: int) -> float:
    """Test accuracy with the statistics re-estimated from `images` clean training images
    drawn with `seed` (the model itself is left as it is)."""
    reestimated = copy.deepcopy(model)
    reestimate_batchnorm(reestimated, calibration_batches(data.train, data.eval_pipeline,
                                                          images, seed, 128))
    return accuracy(reestimated, data)


def sensitivity(run_dir: Path) -> dict:
    model, data = load_run(run_dir)
    result = {"as trained": accuracy(model, data)}
    for images, seed in ESTIMATES:
        result[f"{images} images, seed {seed}"] = reestimated_accuracy(model, data, images, seed)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--results", type=Path,
                        default=Path("results/converged/bn_sensitivity.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    report = json.loads(args.results.read_text()) if args.results.is_file() else {"runs": {}}
    for run_dir in args.runs:
        report["runs"][run_dir.name] = sensitivity(run_dir)
        print(run_dir.name, report["runs"][run_dir.name], flush=True)
    save_report({**report, "machine": machine_info()}, args.results)


if __name__ == "__main__":
    run_main(main)
