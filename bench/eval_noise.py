"""How far does one test evaluation at the end of QAT move when only BatchNorm's running
statistics change? (issue: sound QAT, the plateau rule "the last fifth changes test accuracy by
less than 0.2 points").

At the end of a cosine schedule the learning rate is near zero, yet the sound grid's LSQ runs
move by about 0.2 points between consecutive evaluations 60 steps apart. Between two
evaluations a run also replaces its BatchNorm running statistics (momentum 0.1 over 60
batches keeps 0.9^60 = 0.2% of the old estimate). This bench isolates that part: for each run
folder, from the checkpoint (the model before the run's own re-estimation), REPEATS times:
forward STEPS augmented training batches of BATCH images in train mode without any gradient
step (weights, step sizes and frozen integers fixed; only the running statistics move, as in
training), then evaluate on the test set. The spread of those evaluations is the noise a
single evaluation carries from its statistics alone: the floor under any plateau rule that
compares two single evaluations.

    python bench/eval_noise.py runs/converged/sound/w2a2/lsq/seed* ...
Adds to results/converged/eval_noise.json after each run (runs already there are skipped).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from pathlib import Path

import torch

from bn_sensitivity import accuracy, load_run
from machine import machine_info, per_run_command, run_main, run_name, save_report

REPEATS, STEPS, BATCH = 6, 60, 128


def refreshed_statistics(model: torch.nn.Module, data, seed: int) -> torch.nn.Module:
    """A copy of `model` whose BatchNorm running statistics saw STEPS augmented training
    batches (drawn with `seed`) in train mode, with no parameter changed."""
    model = copy.deepcopy(model).train()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(STEPS):
            index = torch.randint(len(data.train), (BATCH,), generator=generator)
            images, _ = data.train.take(index)
            model(data.train_pipeline(images, train=True, generator=generator))
    return model.eval()


def noise(run_dir: Path) -> dict:
    model, data = load_run(run_dir)
    values = [accuracy(refreshed_statistics(model, data, seed), data) for seed in range(REPEATS)]
    return {"as trained": accuracy(model, data), "refreshed": values,
            "sd": statistics.stdev(values),
            "rms consecutive difference": math.sqrt(statistics.fmean(
                (b - a) ** 2 for a, b in zip(values, values[1:])))}


def recorded_noise(run_dir: Path, last: int = 6) -> float | None:
    """The run's own rms difference between consecutive evaluations over its last `last`
    evaluations (with 40 evaluations: the learning rate under 2.5% of its start), from its
    metrics file; None for a run that did not evaluate after each of its last epochs."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    tail = [(r["epoch"], r["test_acc"]) for r in map(json.loads, lines) if "test_acc" in r][-last:]
    if [epoch for epoch, _ in tail] != list(range(tail[0][0], tail[0][0] + len(tail))):
        return None
    acc = [value for _, value in tail]
    return math.sqrt(statistics.fmean((b - a) ** 2 for a, b in zip(acc, acc[1:])))


def main() -> None:
    args, report = per_run_command(__doc__, "results/converged/eval_noise.json")
    for run_dir in args.runs:
        name = run_name(run_dir)
        if name in report["runs"]:
            continue
        row = report["runs"][name] = {**noise(run_dir),
                                      "recorded rms consecutive difference":
                                      recorded_noise(run_dir)}
        recorded = row["recorded rms consecutive difference"]
        print(f"{name:<30} as trained {row['as trained']:.2f}  refreshed "
              f"{' '.join(f'{v:.2f}' for v in row['refreshed'])}  sd {row['sd']:.3f}  "
              f"rms diff {row['rms consecutive difference']:.3f} (training's own: "
              f"{'-' if recorded is None else f'{recorded:.3f}'})", flush=True)
        save_report({"machine": machine_info(), "repeats": REPEATS, "steps": STEPS,
                     "batch": BATCH, "runs": report["runs"]}, args.out)
    text = markdown(report["runs"])
    args.out.with_suffix(".md").write_text(text)
    print(text)


def markdown(runs: dict[str, dict]) -> str:
    """The runs as a table and, per width and method, the typical noise of one evaluation, what
    it does to the 0.2 rule, and how often a draw fell by more than a point."""
    lines = ["| run | as trained | statistics refreshed (6 draws) | sd | rms difference of "
             "consecutive draws | training's own, last 6 evaluations |",
             "|---|---|---|---|---|---|"]
    for name, r in runs.items():
        recorded = r["recorded rms consecutive difference"]
        lines.append(f"| {name} | {r['as trained']:.2f} | "
                     f"{' / '.join(f'{v:.2f}' for v in r['refreshed'])} | {r['sd']:.2f} | "
                     f"{r['rms consecutive difference']:.2f} | "
                     f"{'-' if recorded is None else f'{recorded:.2f}'} |")
    lines.append("")
    groups: dict[str, list[dict]] = {}
    for name, r in runs.items():
        _, width, method, _ = name.split("/")
        groups.setdefault(f"{width} {method.upper()}", []).append(r)
    for group, rows in sorted(groups.items()):
        sd = statistics.median(r["sd"] for r in rows)
        difference = sd * math.sqrt(2)   # two independent evaluations
        jumps = sum(statistics.median(r["refreshed"]) - v > 1 for r in rows for v in r["refreshed"])
        lines.append(f"- {group}: median sd of one evaluation {sd:.2f} points ({len(rows)} runs); "
                     f"with no drift at all a single run passes the 0.2 rule with probability "
                     f"{math.erf(0.2 / difference / math.sqrt(2)):.2f}, the mean of 3 seeds with "
                     f"{math.erf(0.2 * math.sqrt(3) / difference / math.sqrt(2)):.2f}; draws more "
                     f"than 1 point below their run's median: {jumps} of "
                     f"{sum(len(r['refreshed']) for r in rows)}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    run_main(main)
