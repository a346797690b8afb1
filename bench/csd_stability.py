"""Why FPQ lost accuracy on the short Fashion-MNIST schedule: CSD-only descent on one batch.

From a full-precision run, quantize (flatq defaults: per-channel weights, first and last layer
8 bits), then take SGD steps (lr 0.01, momentum 0.9, the QAT recipe) on the CSD loss alone, on
one fixed batch of training images, twice: with every step size learned, and with the 8-bit
stem's weight step sizes frozen. Before the steps it prints, for each loss (CE, CSD), the largest
|grad| / |value| of every layer's weight step size: the stem's 8-bit step sizes are ~20x
smaller than the 4-bit ones while their LSQ gradient scale is about the same, so one SGD step
moves them by a large fraction of themselves, and CSD's gradient is several times CE's.

    .venv/bin/python bench/csd_stability.py runs/accuracy/resnet8/fp/seed0 --bits w4a4
Writes results/csd_stability.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from flatq.config import DataConfig, QuantConfig, parse_bits
from flatq.data.calibration import calibration_batches
from flatq.methods import FPQ, FPQConfig
from flatq.quant import calibrate, quantize_model
from flatq.runs import load_teacher, prepare_data

from machine import machine_info, run_main


def student_and_batch(run: str, bits: str, images: int, seed: int):
    teacher, state = load_teacher(run)
    data = prepare_data(DataConfig.from_dict(state["meta"]["data"]))
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(len(data.train), generator=generator)[:images].tolist()
    raw, labels = data.train.__getitems__(index)
    batch = (data.eval_pipeline(raw, False), labels)
    w, a = parse_bits(bits)
    student = quantize_model(teacher, QuantConfig(w_bits=w, a_bits=a))
    calibrate(student, calibration_batches(data.train, data.eval_pipeline, 100, 0),
              torch.device("cpu"))
    return teacher, student, batch


def step_size_ratios(objective: FPQ, batch, key: str) -> dict[str, float]:
    """max |grad| / |value| of each weight step size for one loss term."""
    objective.student.zero_grad()
    objective.losses(*batch)[key].backward()
    return {name: (p.grad.abs() / p.detach().abs()).max().item()
            for name, p in objective.student.named_parameters()
            if name.endswith("weight_quantizer.scale") and p.grad is not None}


def descend(run: str, bits: str, images: int, steps: int, freeze_stem: bool, seed: int) -> dict:
    torch.manual_seed(seed)
    teacher, student, batch = student_and_batch(run, bits, images, seed)
    objective = FPQ(student, teacher, FPQConfig(sfp=False)).train()
    ratios = {key: step_size_ratios(objective, batch, key) for key in ("ce", "csd")}
    first = next(m for m in student.modules() if hasattr(m, "weight_quantizer"))
    if freeze_stem:
        first.weight_quantizer.scale.requires_grad_(False)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01, momentum=0.9)
    trace = []
    for _ in range(steps):
        losses = objective.losses(*batch)
        trace.append({k: v.item() for k, v in losses.items()})
        optimizer.zero_grad()
        losses["csd"].backward()
        optimizer.step()
    objective.close()
    return {"freeze_stem_step_sizes": freeze_stem, "step_size_grad_over_value": ratios,
            "losses": trace}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="full-precision run folder")
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="results/csd_stability.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = [descend(args.run, args.bits, args.images, args.steps, freeze, args.seed)
               for freeze in (False, True)]
    for r in results:
        label = "stem step sizes frozen" if r["freeze_stem_step_sizes"] else "all step sizes learned"
        print(f"{label}: CSD per step " + " ".join(f"{t['csd']:.2f}" for t in r["losses"]))
    for key, ratios in results[0]["step_size_grad_over_value"].items():
        worst = max(ratios, key=ratios.get)
        print(f"{key}: largest |grad|/|value| of a weight step size: {ratios[worst]:.3g} ({worst}); "
              f"median over layers {sorted(ratios.values())[len(ratios) // 2]:.3g}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"settings": vars(args), "machine": machine_info(),
                                          "runs": results}, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    run_main(main)
