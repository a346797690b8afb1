"""Write the ImageNet QAT recipes, configs/imagenet/<model>/<bits>_<method>.yaml, and their
README block.

ResNet-18, ResNet-50 and MobileNetV2 from torchvision (`torchvision:NAME`), each method of the
FPQ tables but SAM (LSQ, LSQ+, PACT, KD, FPQ; set as bench/make_configs.py sets them) at W4A4
and W2A4, on an ImageNet folder (`--data imagefolder`, the ImageFolder layout) at 224x224.
These are our recipes, not published cells: the FPQ paper reports no ImageNet number. Each
fine-tunes torchvision's pretrained float model (the teacher, given as a local weights file)
for 30 epochs with SGD, global batch 256 over all ranks, lr 0.01, cosine, bfloat16 autocast,
and the LSQ paper's weight decay for the weight bit width (2.5e-5 at 4 bits, 1e-4 at 2 bits).

    python bench/make_imagenet_configs.py           # (re)write the recipes
    python bench/make_imagenet_configs.py --check   # exit 1 if a recipe on disk differs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from make_configs import METHODS, QUANT
from flatq.config import RunConfig, method_config
from recipe_files import replace_block, write_or_check

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
README = CONFIGS / "README.md"
BEGIN, END = ("<!-- imagenet-recipes:begin (bench/make_imagenet_configs.py) -->",
              "<!-- imagenet-recipes:end -->")

MODELS = {"resnet18": "resnet18-f37072fd.pth", "resnet50": "resnet50-0676ba61.pth",
          "mobilenet_v2": "mobilenet_v2-b0353104.pth"}    # torchvision's IMAGENET1K_V1 files
BITS = ("w4a4", "w2a4")
WEIGHT_DECAY = {4: 2.5e-5, 2: 1e-4}       # LSQ paper, by weight bit width
PROTOCOL = {"epochs": 30, "batch_size": 256, "lr": 0.01, "momentum": 0.9, "amp": True}
DATA = {"name": "imagefolder", "image_size": 224}
PROVENANCE = ("# Our recipe, not a published cell: the FPQ paper reports no ImageNet number "
              "(bench/make_imagenet_configs.py says what it sets and why).")


def recipe(model: str, bits: str, method: str, quant: dict, options: dict) -> dict:
    w_bits, a_bits = int(bits[1]), int(bits[3])
    return {"model": f"torchvision:{model}", "data": dict(DATA),
            "train": {**PROTOCOL, "weight_decay": WEIGHT_DECAY[w_bits]},
            "quant": {"w_bits": w_bits, "a_bits": a_bits, **QUANT, **quant},
            "method": {"name": method, **method_config(method, options).to_dict()}}


def text(path: Path, model: str, bits: str, row: str, body: dict) -> str:
    RunConfig.from_dict(body)          # refuse to write anything flatq would not load
    rel = path.relative_to(ROOT)
    header = (f"# ImageNet {model} {bits.upper()}, {row}, from torchvision's float weights.\n"
              f"{PROVENANCE}\n"
              f"# torchrun --nproc-per-node 8 -m flatq qat --config {rel} "
              f"--pretrained {MODELS[model]} --data-root /data/imagenet "
              f"--out runs/imagenet/{model}/{path.stem}\n")
    return header + yaml.safe_dump(body, sort_keys=False)


def recipes() -> dict[Path, str]:
    files = {}
    for model in MODELS:
        for bits in BITS:
            for suffix, (row, method, quant, options) in METHODS.items():
                if suffix == "sam":
                    continue
                path = CONFIGS / "imagenet" / model / f"{bits}_{suffix}.yaml"
                files[path] = text(path, model, bits, row,
                                   recipe(model, bits, method, quant, options))
    return files


def readme_block(paths: list[Path]) -> str:
    """The ImageNet part of configs/README.md: what the recipes set and how to run them."""
    def link(path: Path) -> str:
        rel = path.relative_to(CONFIGS).as_posix()
        return f"[{path.stem}]({rel})"
    lines = [BEGIN, "## ImageNet recipes (ours, no published cell)", "",
             "Written by `bench/make_imagenet_configs.py`. QAT of torchvision's ResNet-18, "
             "ResNet-50 and MobileNetV2 on an ImageNet folder in the ImageFolder layout "
             "(`DIR/train/CLASS/*.JPEG`, `DIR/val/CLASS/*.JPEG`; `--data imagefolder`), starting "
             "from torchvision's float ImageNet weights as a local file (`--pretrained`; flatq "
             "downloads nothing). 30 epochs, SGD, global batch 256 split over the ranks, lr 0.01, "
             "cosine, bfloat16 autocast on CUDA, weight decay 2.5e-5 at 4-bit and 1e-4 at 2-bit "
             "weights (the LSQ paper's), first and last layer at 8 bits, 224x224 crops with "
             "torchvision's ImageNet transforms. The methods are set as in the FPQ tables above. "
             "The FPQ paper reports no ImageNet number, so these cells have none. Run one on 8 "
             "GPUs (more machines: README, *From one GPU to several machines*):", "", "```",
             "torchrun --nproc-per-node 8 -m flatq qat --config "
             "configs/imagenet/resnet18/w4a4_fpq.yaml \\",
             "    --pretrained resnet18-f37072fd.pth --data-root /data/imagenet "
             "--out runs/imagenet/resnet18/w4a4_fpq",
             "```", "",
             "| model | " + " | ".join(b.upper() for b in BITS) + " |", "|---|---|---|"]
    for model in MODELS:
        cells = [", ".join(link(p) for p in paths if p.parent.name == model
                           and p.stem.startswith(bits)) for bits in BITS]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    return "\n".join([*lines, END, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    files = recipes()
    current = README.read_text() if README.is_file() else "# Recipes\n\n"
    files[README] = replace_block(current, BEGIN, END, readme_block(sorted(files)))
    code, stale = write_or_check(files, args.check, ROOT)
    if not args.check:
        print(f"{len(files) - 1} ImageNet recipes; wrote {len(stale)} file(s)")
    return code


if __name__ == "__main__":
    sys.exit(main())
