"""The largest learned weight step size of each layer in finished QAT runs.

A weight step size larger than twice a channel's largest |weight| quantizes the whole channel
to its zero point: the channel is dead (flatq.quant.health; docs/soundness.md says how the 8-bit
stem gets there).

    .venv/bin/python bench/step_sizes.py runs/accuracy/resnet8/w4a4/*/seed* --out results/accuracy/step_sizes.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from flatq.analysis.step_sizes import weight_step_sizes
from flatq.runs import load_model
from machine import run_main, save_report


def layer_step_sizes(run: str) -> list[dict]:
    """Per quantized layer: largest weight step size, largest |weight|, dead channels."""
    return weight_step_sizes(load_model(run)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--out", default="results/accuracy/step_sizes.json")
    args = parser.parse_args()
    unfinished = [run for run in args.runs if not (Path(run) / "model.pt").is_file()]
    if unfinished:
        print(f"skipped, not finished: {', '.join(unfinished)}")
    report = {run: layer_step_sizes(run) for run in args.runs if run not in unfinished}
    for run, rows in report.items():
        dead = [f"{r['layer']}:{r['dead_channels']}" for r in rows if r["dead_channels"]]
        first = rows[0]
        print(f"{run}: first layer max step {first['max_step']:.3g} (max |w| "
              f"{first['max_abs_weight']:.3g}); dead channels {', '.join(dead) or 'none'}")
    save_report(report, args.out)


if __name__ == "__main__":
    run_main(main)
