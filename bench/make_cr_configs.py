"""Write the CR recipes: configs/<data>/<model>/<bits>_cr*.yaml.

The CIFAR cells are the paper's (ResNet-18 and MobileNetV2 on CIFAR-10/100 at W4A4, W2A4,
W2A2); the Fashion-MNIST stand-in (padded to 32x32, gray repeated to 3 channels) runs the
same recipe in a few minutes and adds the unlabeled-data pair: `split:0.5` against the same
labeled half without unlabeled data. Every value here is ours where the paper's is not known
(see docs/cr.md). Run from the repository root: python bench/make_cr_configs.py
"""

from __future__ import annotations

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent / "configs"

CR = {"name": "cr", "ema_decay": 0.999, "temperature": 1.0, "lambda_max": 1.0,
      "schedule": "sigmoid", "ramp_fraction": 0.3, "unlabeled": "none", "unlabeled_ratio": 1.0,
      "labeled_fraction": 1.0}
# The FPQ paper's QAT protocol (methods.md section 2), used for CR too.
PROTOCOL = {"epochs": 200, "batch_size": 256, "lr": 0.01, "momentum": 0.9,
            "weight_decay": 5e-4}
STAND_IN = {"name": "fashion_mnist", "image_size": 32, "channels": 3}


def recipe(data: dict, bits: str, train: dict, method: dict) -> dict:
    return {"data": data, "train": train,
            "quant": {"w_bits": int(bits[1]), "a_bits": int(bits[3]), "quantizer": "lsq"},
            "method": method}


def write(path: Path, note: str, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# {note}\n# Written by bench/make_cr_configs.py; defaults are ours where the "
              f"paper's are unknown (docs/cr.md).\n"
              f"# flatq qat --from FP_RUN --config {path.relative_to(ROOT.parent)} --out RUN\n")
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))


def main() -> None:
    for data in ("cifar10", "cifar100"):
        for model in ("resnet18", "mobilenet_v2"):
            for bits in ("w4a4", "w2a4", "w2a2"):
                write(ROOT / data / model / f"{bits}_cr.yaml",
                      f"CR, {data} {model} {bits.upper()} (paper cell)",
                      recipe({"name": data}, bits, PROTOCOL, CR))
    short = {**PROTOCOL, "epochs": 20}
    variants = {
        "": ("CR on the Fashion-MNIST stand-in", {}),
        "_split": ("CR with half the training set as unlabeled data (labels dropped)",
                   {"unlabeled": "split:0.5"}),
        "_half_labels": ("control for _split: the same labeled half, no unlabeled data",
                         {"labeled_fraction": 0.5}),
    }
    for bits in ("w4a4", "w2a2"):
        for suffix, (note, change) in variants.items():
            if suffix and bits != "w2a2":
                continue
            write(ROOT / "fashion_mnist" / "resnet18" / f"{bits}_cr{suffix}.yaml",
                  f"{note}, resnet18 {bits.upper()}",
                  recipe(STAND_IN, bits, short, {**CR, **change}))


if __name__ == "__main__":
    main()
