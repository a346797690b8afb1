"""Is a run's test accuracy limited by stale BatchNorm running statistics?

Evaluates each run as trained, then again after re-estimating every BatchNorm's running
mean and variance from training batches of the quantized model itself (no augmentation,
cumulative average; `flatq.train.batchnorm`, what `flatq qat --bn-images` does at the end of
training). A large gain means the running statistics lagged behind
the quantized conv outputs at the end of training (e.g. when a min-max weight range jumped).
The runs themselves are not changed.

    .venv/bin/python bench/bn_statistics.py runs/accuracy/resnet8/w4a4/*/seed0 \
        --out results/accuracy/bn_statistics.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flatq.train.run_io import run_data
from flatq.data import calibration_batches
from flatq.train.batchnorm import reestimate_batchnorm
from flatq.train.loop import evaluate
from flatq.runs import load_model
from machine import machine_info, run_main, save_report


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="finished run folders (with model.pt)")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    results = []
    prepared: dict[str, tuple] = {}   # runs on the same data share its loading and batches
    for run in args.runs:
        model, state = load_model(Path(run) / "model.pt")
        key = json.dumps(state["meta"]["data"], sort_keys=True)
        if key not in prepared:
            _, data = run_data(state, None)
            images = min(args.batches * args.batch_size, len(data.train))
            prepared[key] = data, calibration_batches(data.train, data.eval_pipeline, images,
                                                      args.seed, args.batch_size)
        data, batches = prepared[key]
        before = evaluate(model, data.test, data.eval_pipeline, device)["acc"]
        reestimate_batchnorm(model, batches)
        after = evaluate(model, data.test, data.eval_pipeline, device)["acc"]
        print(f"{run}: test acc {before:.2f}% -> {after:.2f}% with re-estimated BN statistics")
        results.append({"run": run, "test_acc": before, "test_acc_bn_reestimated": after})
    if args.out:
        save_report({"machine": machine_info(), "batches": args.batches,
                     "batch_size": args.batch_size, "seed": args.seed, "runs": results}, args.out)
    return results


if __name__ == "__main__":
    run_main(main)
