"""How often onnxruntime and flatq's fake-quant model disagree, image by image.

Both quantize as round(x/s) + z in float32, but onnxruntime sums convolutions in another
order, so now and then an activation rounds to the neighbouring integer and moves the rest of
that image's forward pass. Models are calibrated on random images (no training), as in
tests/export/test_export.py; an image counts as affected when its largest logit difference
exceeds 1e-5 of the logit scale. (`flatq.export.compare` measures accuracy agreement on a data
set; this bench measures the per-image logit difference on random inputs.)

    .venv/bin/python bench/onnx_agreement.py
Writes results/bench_onnx_agreement.json (docs/export.md quotes it).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from flatq import QuantConfig, calibrate, quantize_model
from flatq.config import parse_bits
from flatq.export import OnnxModel, export_onnx
from flatq.models import build_model
from flatq.models.vit import VisionTransformer

from machine import machine_info, run_main, save_report

CASES = (("resnet8", "w4a4"), ("resnet8", "w2a2"), ("mobilenet_v2", "w4a4"), ("vit", "w4a4"))
AFFECTED = 1e-5


def make_model(name: str) -> torch.nn.Module:
    if name == "vit":  # two blocks: big enough for attention, small enough to run in seconds
        return VisionTransformer(dim=48, depth=2, heads=3)
    return build_model(name, num_classes=10)


def disagreement(name: str, bits: str, seed: int, images: int, folder: Path) -> dict:
    """Affected images, largest relative logit difference and argmax agreement of one model."""
    torch.manual_seed(seed)
    w_bits, a_bits = parse_bits(bits)
    model = quantize_model(make_model(name), QuantConfig(w_bits=w_bits, a_bits=a_bits))
    calibrate(model, [torch.randn(32, 3, 32, 32)])
    model.eval()
    x = torch.randn(images, 3, 32, 32, generator=torch.Generator().manual_seed(1000 + seed))
    path = folder / f"{name}_{bits}_{seed}.onnx"
    export_onnx(model, path, x[:1])
    with torch.no_grad():
        reference = model(x).numpy()
    logits = OnnxModel(path)(x)
    per_image = np.abs(logits - reference).max(axis=1) / np.abs(reference).max()
    return {"affected": int((per_image > AFFECTED).sum()), "images": images,
            "max_relative": float(per_image.max()),
            "argmax_agree": int((logits.argmax(1) == reference.argmax(1)).sum())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--images", type=int, default=64, help="random images per model")
    parser.add_argument("--out", default="results/bench_onnx_agreement.json")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for name, bits in CASES:
            runs = [disagreement(name, bits, seed, args.images, Path(folder))
                    for seed in range(args.seeds)]
            affected = sum(r["affected"] for r in runs)
            total = sum(r["images"] for r in runs)
            worst = max(r["max_relative"] for r in runs)
            agree = sum(r["argmax_agree"] for r in runs)
            print(f"{name} {bits}: {affected} of {total} images affected, max logit difference "
                  f"{worst:.1e} of the logit scale, predictions agree on {agree} of {total}")
            results[f"{name}_{bits}"] = runs
    save_report({"machine": machine_info(), "seeds": args.seeds, "images": args.images,
                 "affected_above": AFFECTED, "results": results}, args.out)


if __name__ == "__main__":
    run_main(main)
