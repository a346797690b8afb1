"""Is the deployed model as accurate as the QAT model it came from? (issue 22's accuracy target)

From the converged grid's FP model (ResNet-8 on the Fashion-MNIST stand-in, 92.60%; see
bench/converged.py) this trains QAT runs for the onnxruntime deployment target with the grid's
schedule (10 x 60 steps, batch 128, lr 0.01 cosine, method `task` = LSQ, seed 0), and one run
of the paper's target at the same width for what modelling the runtime's arithmetic costs in
training. Each onnxruntime run is exported (`flatq export --format onnx`, default options) and
evaluated on the full test set (10,000 images) in onnxruntime at its default settings beside
the PyTorch fake-quant model: both accuracies, predictions that differ, largest logit
difference. Target: the export within 0.3 points of the QAT model.

    python bench/deploy_accuracy.py            # ~15 min on one core; runs/deploy_accuracy/
Writes results/bench_deploy_accuracy.json. Needs the Fashion-MNIST files (FLATQ_DATA or the
Debian package) and the grid's FP model (results/converged/fp is committed).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from converged import BATCH, DATA, QAT_EPOCHS, QAT_STEPS, fp_folder
from flatq.config import QuantConfig, RunConfig, TrainConfig, method_config
from flatq.export import OnnxModel, compare, export_run
from flatq.runs import load_model, load_teacher, qat
from flatq.train.loop import evaluate
from flatq.train.run_io import run_data
from machine import machine_info, run_main, save_report

# (bits, deployment target): the onnxruntime runs are exported; the paper run is the reference
RUNS = (("w8a8", "onnxruntime"), ("w4a4", "onnxruntime"), ("w4a4", "paper"))


def train(out: Path, bits: str, target: str) -> Path:
    """The QAT run (skipped when it finished before)."""
    run_dir = out / f"{bits}-{target}"
    if (run_dir / "model.pt").is_file():
        return run_dir
    teacher, state = load_teacher(fp_folder(Path("runs/converged"), Path("results/converged")))
    config = RunConfig(model="resnet8", data=DATA, method=method_config("task"),
                       quant=QuantConfig(w_bits=int(bits[1]), a_bits=int(bits[3]),
                                         target=target),
                       train=TrainConfig(epochs=QAT_EPOCHS, batch_size=BATCH, lr=0.01, seed=0,
                                         device="cpu", progress=False,
                                         max_steps_per_epoch=QAT_STEPS))
    qat(config, teacher, state, run_dir, resume=(run_dir / "checkpoint.pt").is_file(),
        overwrite=not (run_dir / "checkpoint.pt").is_file())
    return run_dir


def measure(run_dir: Path, target: str) -> dict:
    model, state = load_model(run_dir)
    _, data = run_data(state)
    summary = json.loads((run_dir / "summary.json").read_text())
    result = {"qat_acc": evaluate(model, data.test, data.eval_pipeline,
                                  torch.device("cpu"))["acc"],
              "dead_channels": summary["dead_channels"],
              "dead_channel_layers": summary["dead_channel_layers"]}
    if target != "onnxruntime":
        return result
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        export_run(run_dir, "onnx", onnx_file)
        agreement = compare(OnnxModel(onnx_file), model, data.test, data.eval_pipeline)
        size = onnx_file.stat().st_size
    return {**result, "onnx_acc": agreement.onnx_acc, "differing": agreement.differing,
            "images": agreement.count, "max_abs_logit_diff": agreement.max_abs_diff,
            "onnx_bytes": size, "within_0.3": abs(agreement.onnx_acc - result["qat_acc"]) <= 0.3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/deploy_accuracy")
    parser.add_argument("--results", default="results/bench_deploy_accuracy.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = {}
    for bits, target in RUNS:
        rows[f"{bits}-{target}"] = measure(train(Path(args.out), bits, target), target)
        print(bits, target, rows[f"{bits}-{target}"], flush=True)
    save_report({"machine": machine_info(), "seed": 0, "runs": rows}, args.results)


if __name__ == "__main__":
    run_main(main)
