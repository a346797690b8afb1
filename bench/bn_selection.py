"""Would "re-estimate BatchNorm, keep it only if it does not hurt on held-out training images"
be safe as a default? (issue: sound QAT, BatchNorm policy "on by default if it helps every
method").

Re-estimation from clean training images helps some W2A2 runs and costs others up to ten
points (docs/soundness.md): a sensitive 2-bit network's accuracy jumps between levels under
small changes of its normalization. A policy that decides per run needs a signal that is not
the test set. For each run folder (a checkpoint before the run's own re-estimation): the test
accuracy as trained and re-estimated (12,800 clean training images, subset seed 0: the grid's
own re-estimation), and the accuracy of both on CHECK_IMAGES further training images disjoint
from that subset. The policy keeps the re-estimated statistics where the check accuracy does
not fall; the question is whether the policy's test accuracy is never much below either
choice, i.e. whether check and test accuracy move together.

    python bench/bn_selection.py runs/converged/probes/* runs/converged/long*/w2a2/*/seed*
Adds to results/converged/bn_selection.json after each run (runs already there are skipped, so
a stopped call continues).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from bn_sensitivity import accuracy
from flatq.data import calibration_batches, subset_batches
from flatq.runs import load_model
from flatq.train.batchnorm import accuracy_on, reestimate_batchnorm
from flatq.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flatq.train.run_io import run_data
from machine import machine_info, per_run_command, run_main, run_name, save_report

ESTIMATE_IMAGES, CHECK_IMAGES, SEED = 12800, 10000, 0


def check_accuracy(model: torch.nn.Module, data) -> float:
    """Accuracy (%) on the CHECK_IMAGES training images after the re-estimation subset in the
    same seeded order (so the two never overlap): what `flatq qat --bn-check` compares."""
    return accuracy_on(model, subset_batches(data.train, data.eval_pipeline, CHECK_IMAGES, SEED,
                                             skip=ESTIMATE_IMAGES, batch_size=500))


def selection(model: torch.nn.Module, data) -> dict:
    reestimated = copy.deepcopy(model)
    reestimate_batchnorm(reestimated, calibration_batches(data.train, data.eval_pipeline,
                                                          ESTIMATE_IMAGES, SEED, 128))
    result = {"test as trained": accuracy(model, data),
              "test re-estimated": accuracy(reestimated, data),
              "check as trained": check_accuracy(model, data),
              "check re-estimated": check_accuracy(reestimated, data)}
    keep = result["check re-estimated"] >= result["check as trained"]
    result["policy keeps re-estimated"] = keep
    result["test policy"] = result["test re-estimated" if keep else "test as trained"]
    return result


def main() -> None:
    args, report = per_run_command(__doc__, "results/converged/bn_selection.json")
    runs, loaded = report["runs"], {}   # loaded: data set by its config, read once for all runs
    for run_dir in args.runs:
        if run_name(run_dir) in runs:
            continue                     # measured by an earlier call: the file is the record
        if not (run_dir / "summary.json").is_file() or not (run_dir / CHECKPOINT_NAME).is_file():
            print(f"{run_dir}: not finished (no summary or checkpoint), skipped")
            continue                     # a running run's checkpoint is an earlier epoch
        model, state = load_model(run_dir)    # the model before the run's own re-estimation:
        model.load_state_dict(load_checkpoint(run_dir, CHECKPOINT_NAME)["model"])
        key = repr(sorted(state["meta"]["data"].items()))
        if key not in loaded:
            loaded[key] = run_data(state)[1]
        row = runs[run_name(run_dir)] = selection(model, loaded[key])
        print(f"{run_name(run_dir):<45} test {row['test as trained']:.2f} -> "
              f"{row['test re-estimated']:.2f}  check {row['check as trained']:.2f} -> "
              f"{row['check re-estimated']:.2f}  policy {row['test policy']:.2f}", flush=True)
        save_report({"machine": machine_info(), "estimate_images": ESTIMATE_IMAGES,
                     "check_images": CHECK_IMAGES, "runs": runs}, args.out)
    print(markdown(runs))


def markdown(runs: dict[str, dict]) -> str:
    """The record as a table, and the policy's largest losses against each fixed choice."""
    lines = ["| run | test: as trained / re-estimated | check: as trained / re-estimated "
             "| policy keeps | policy's test |", "|---|---|---|---|---|"]
    for name, r in runs.items():
        lines.append(f"| {name} | {r['test as trained']:.2f} / {r['test re-estimated']:.2f} | "
                     f"{r['check as trained']:.2f} / {r['check re-estimated']:.2f} | "
                     f"{'re-estimated' if r['policy keeps re-estimated'] else 'as trained'} | "
                     f"{r['test policy']:.2f} |")
    for choice in ("test as trained", "test re-estimated"):
        gaps = {name: r["test policy"] - r[choice] for name, r in runs.items()}
        worst, best = min(gaps, key=gaps.get), max(gaps, key=gaps.get)
        lines.append(f"\npolicy minus {choice[5:]}: from {gaps[worst]:+.2f} ({worst}) to "
                     f"{gaps[best]:+.2f} ({best}), mean {sum(gaps.values()) / len(gaps):+.2f}")
    return "\n".join(lines)


if __name__ == "__main__":
    run_main(main)
