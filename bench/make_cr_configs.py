"""Write the CR recipes, configs/<data>/<model>/<bits>_cr*.yaml, and their README block.

None of these recipes is a setting or a table cell of the CR paper (arXiv 2402.13497): only its
abstract and summary were readable to us, so its training schedule and its CR hyper-parameters
are not known. The recipes combine the FPQ paper's QAT protocol (methods.md section 2) with
flatq's own CR defaults (docs/cr.md, "Provenance"). The CIFAR files cover ResNet-18 and
MobileNetV2 (the two networks the CR abstract reports on, for CIFAR-10) on CIFAR-10/100 at
W4A4, W2A4 and W2A2; the Fashion-MNIST stand-in (padded to 32x32, gray repeated to 3
channels) runs the same recipe in a few minutes and adds the unlabeled-data pair: `split:0.5`
against the same labeled half without unlabeled data.

    python bench/make_cr_configs.py           # write what is out of date
    python bench/make_cr_configs.py --check   # exit 1 if a recipe on disk differs
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from flatq.config import parse_bits
from recipe_files import generate, replace_block

ROOT = Path(__file__).resolve().parent.parent / "configs"
README = ROOT / "README.md"
BEGIN, END = "<!-- cr-recipes:begin (bench/make_cr_configs.py) -->", "<!-- cr-recipes:end -->"

CR = {"name": "cr", "ema_decay": 0.99, "teacher_batchnorm": "batch", "temperature": 1.0,
      "lambda_max": 1.0, "schedule": "sigmoid", "ramp_fraction": 0.3, "unlabeled": "none",
      "unlabeled_ratio": 1.0, "labeled_fraction": 1.0}
# The FPQ paper's QAT protocol (methods.md section 2), used for CR too.
PROTOCOL = {"epochs": 200, "batch_size": 256, "lr": 0.01, "momentum": 0.9,
            "weight_decay": 5e-4}
STAND_IN = {"name": "fashion_mnist", "image_size": 32, "channels": 3}
# Every recipe's second header line: what it is and is not.
PROVENANCE = ("# Our recipe, not a CR-paper setting or table cell: the FPQ paper's QAT protocol "
              "with flatq's CR defaults (ours; docs/cr.md, Provenance).")


def recipe(data: dict, bits: str, train: dict, method: dict) -> dict:
    w_bits, a_bits = parse_bits(bits)
    return {"data": data, "train": train,
            "quant": {"w_bits": w_bits, "a_bits": a_bits, "quantizer": "lsq"},
            "method": method}


def text(path: Path, note: str, config: dict) -> str:
    header = (f"# {note}\n{PROVENANCE}\n"
              f"# flatq qat --from FP_RUN --config {path.relative_to(ROOT.parent)} --out RUN\n")
    return header + yaml.safe_dump(config, sort_keys=False)


def recipes() -> dict[Path, str]:
    files = {}
    for data in ("cifar10", "cifar100"):
        for model in ("resnet18", "mobilenet_v2"):
            for bits in ("w4a4", "w2a4", "w2a2"):
                path = ROOT / data / model / f"{bits}_cr.yaml"
                files[path] = text(path, f"CR, {data} {model} {bits.upper()}",
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
            path = ROOT / "fashion_mnist" / "resnet18" / f"{bits}_cr{suffix}.yaml"
            files[path] = text(path, f"{note}, resnet18 {bits.upper()}",
                               recipe(STAND_IN, bits, short, {**CR, **change}))
    return files


def readme_block(paths: list[Path]) -> str:
    def link(path: Path) -> str:
        rel = path.relative_to(ROOT).as_posix()
        return f"[{rel}]({rel})"
    cifar = [p for p in paths if p.parts[-3] != "fashion_mnist"]
    stand_in = [p for p in paths if p.parts[-3] == "fashion_mnist"]
    return "\n".join([
        BEGIN,
        "## CR recipes (ours, not the CR paper's cells)",
        "",
        "Written by `bench/make_cr_configs.py`. These are **not** settings or table cells of the "
        "CR paper (arXiv 2402.13497) and carry no published number: its training schedule and CR "
        "hyper-parameters were not readable to us. Each recipe is the FPQ paper's QAT protocol "
        "(SGD, batch 256, lr 0.01, cosine, weight decay 5e-4, momentum 0.9, 200 epochs, LSQ, "
        "first and last layer at 8 bits) with flatq's own CR defaults (EMA decay 0.999, "
        "temperature 1, lambda_max 1, sigmoid ramp over the first 30% of steps; all ours, see "
        "[docs/cr.md](../docs/cr.md)). The networks (ResNet-18, MobileNetV2) are the two the CR "
        "abstract reports on for CIFAR-10; CIFAR-100 and the bit widths follow the FPQ tables.",
        "",
        "- CIFAR-10/100: " + ", ".join(link(p) for p in cifar),
        "- Fashion-MNIST stand-in (20 epochs; `_split` holds out half the training set as "
        "unlabeled data, `_half_labels` is its control with the same labeled half and no "
        "unlabeled data): " + ", ".join(link(p) for p in stand_in),
        END,
        "",
    ])


def readme_text(block: str) -> str:
    """configs/README.md with the CR block replaced (or appended); other text is kept."""
    current = README.read_text() if README.is_file() else "# Recipes\n\n"
    return replace_block(current, BEGIN, END, block)


def main(argv: list[str] | None = None) -> int:
    files = recipes()
    files[README] = readme_text(readme_block(sorted(files)))
    return generate(__doc__.splitlines()[0], files, ROOT.parent,
                    f"{len(files) - 1} CR recipes under configs/, {{stale}} files written", argv)


if __name__ == "__main__":
    sys.exit(main())
