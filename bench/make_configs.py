"""Write the FPQ paper's recipes (Tables 1-5) as configs/<data>/<model>/<bits>_<method>.yaml.

One YAML per table cell flatq can run, on CIFAR-10, CIFAR-100 and the Fashion-MNIST stand-in
(padded to 32x32, gray repeated to 3 channels, fewer epochs), plus one FP pre-training recipe
per data set and model (fp.yaml), and the table of cells, files and published accuracies in
configs/README.md (between its fpq markers; the rest of that file is left alone).

    python bench/make_configs.py           # (re)write the recipes
    python bench/make_configs.py --check   # exit 1 if a recipe on disk differs

Every recipe is validated by flatq.config.RunConfig before it is written. QAT recipes carry no
model (the teacher given with --from decides it) and no data root (it comes from the teacher's
run or --data-root), so they are used as
    flatq pretrain --config configs/cifar10/resnet18/fp.yaml --out runs/c10-r18-fp
    flatq qat --from runs/c10-r18-fp --config configs/cifar10/resnet18/w4a4_fpq.yaml --out RUN
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from flatq.config import RunConfig, method_config, parse_bits
from recipe_files import generate, replace_block

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
README = CONFIGS / "README.md"
BEGIN, END = "<!-- fpq-tables:begin (bench/make_configs.py) -->", "<!-- fpq-tables:end -->"

MODELS = ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2")
MODEL_TITLES = {"resnet18": "Res18", "resnet50": "Res50", "mobilenet_v1": "MBV1",
                "mobilenet_v2": "MBV2"}
BITS = ("w4a4", "w2a4", "w2a2")
# The paper's training protocol (Sec. 4): SGD, batch 256, lr 0.01, cosine, wd 5e-4, momentum
# 0.9, 200 epochs. It is stated once for all runs; we use it for FP pre-training too.
PROTOCOL = {"epochs": 200, "batch_size": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4}
# Fashion-MNIST stand-in: the same protocol with fewer epochs (ours; no published numbers).
STAND_IN_EPOCHS = {"fp": 30, "qat": 20}
DATA = {"cifar10": {"name": "cifar10"}, "cifar100": {"name": "cifar100"},
        "fashion_mnist": {"name": "fashion_mnist", "image_size": 32, "channels": 3}}
# The paper's 8-bit first/last layers and 100 calibration images (Sec. 4), stated explicitly.
QUANT = {"quantizer": "lsq", "edge_bits": 8, "calib_images": 100}
# The FPQ paper learns every step size from a calibration-range start (its Eq. 5), the 8-bit
# first and last layer too; flatq's default gives those two min-max ranges recomputed every
# step instead, which stops their channels from dying (docs/soundness.md). Paper cells keep
# the paper's setting.
PAPER_INIT = {"init": "minmax", "edge_weights": "learned", "edge_init": "minmax"}

# file suffix -> (table row, method name, quantizer options, method options). A baseline runs
# as its paper defines it: PACT with DoReFa weights (its paper's; flatq's default is min-max),
# LSQ+ with its continuous offset and MSE initialization (flatq's defaults: integer, min-max).
LSQ = {"quantizer": "lsq"}
METHODS = {
    "lsq": ("LSQ", "task", LSQ, {}),
    "lsqplus": ("LSQ+", "task", {"quantizer": "lsq+", "lsqplus_offset": "continuous",
                                "range_method": "mse"}, {}),
    "pact": ("PACT", "task", {"quantizer": "pact", "pact_weights": "dorefa"}, {}),
    "kd": ("KD", "kd", LSQ, {}),
    "fpq": ("FPQ", "fpq", LSQ, {}),
    "sam": ("LSQ+SAM", "sam", LSQ, {}),
}
SAM_MODELS = ("resnet18", "mobilenet_v2")       # Table 1: CIFAR-10 W4A4 only
# Table 2 (ablation) and Table 3 (p sweep): CIFAR-10 ResNet-18 W2A4. p = 0 is the CSD-only
# run and p = 0.1 the default FPQ run, so those two cells point at existing files.
ABLATION = {"fpq_sfp_only": ("+SFP", {"csd": False}), "fpq_csd_only": ("+CSD", {"sfp": False})}
P_SWEEP = (0.3, 0.5, 0.7, 0.9, 1.0)

# Published accuracies (%), FPQ paper Tables 4 (CIFAR-10) and 5 (CIFAR-100); columns are
# MODELS. Keys: (bits or "fp", table row).
PUBLISHED = {
    "cifar10": {
        ("fp", "FP"): (88.72, 89.95, 85.52, 85.81),
        ("w4a4", "PACT"): (88.15, 85.27, 80.77, 79.88),
        ("w4a4", "LSQ"): (86.69, 90.01, 82.39, 84.45),
        ("w4a4", "LSQ+"): (88.40, 90.30, 84.32, 84.30),
        ("w4a4", "KD"): (88.86, 90.34, 84.77, 83.79),
        ("w4a4", "FPQ"): (90.16, 90.62, 84.94, 85.53),
        ("w2a4", "PACT"): (87.55, 85.24, 69.04, 67.18),
        ("w2a4", "LSQ"): (88.36, 90.01, 78.15, 78.15),
        ("w2a4", "LSQ+"): (87.76, 89.62, 81.26, 77.00),
        ("w2a4", "KD"): (88.83, 90.18, 78.84, 75.56),
        ("w2a4", "FPQ"): (89.92, 90.39, 81.45, 79.33),
        ("w2a2", "PACT"): (76.90, 64.94, 11.71, 10.58),
        ("w2a2", "LSQ"): (87.60, 87.79, 75.29, 70.32),
        ("w2a2", "LSQ+"): (87.60, 86.10, 74.22, 72.18),
        ("w2a2", "KD"): (88.06, 89.20, 68.62, 67.15),
        ("w2a2", "FPQ"): (88.11, 89.40, 76.25, 73.00),
        ("w4a4", "LSQ+SAM"): (89.75, None, None, 84.72),
    },
    "cifar100": {
        ("fp", "FP"): (75.40, 78.94, 70.22, 71.30),
        ("w4a4", "PACT"): (74.17, 74.78, 64.65, 64.06),
        ("w4a4", "LSQ"): (75.30, 78.20, 68.63, 69.01),
        ("w4a4", "LSQ+"): (74.50, 77.39, 67.89, 68.25),
        ("w4a4", "KD"): (74.70, 78.80, 70.96, 71.66),
        ("w4a4", "FPQ"): (75.84, 78.8, 67.55, 68.24),
        ("w2a4", "PACT"): (73.77, 74.72, 49.98, 57.90),
        ("w2a4", "LSQ"): (74.93, 77.82, 65.13, 66.15),
        ("w2a4", "LSQ+"): (73.90, 76.61, 65.28, 66.24),
        ("w2a4", "KD"): (74.35, 77.34, 66.90, 63.77),
        ("w2a4", "FPQ"): (75.77, 78.11, 64.68, 65.35),
        ("w2a2", "PACT"): (65.16, 4.26, 3.25, 8.39),
        ("w2a2", "LSQ"): (71.80, 62.79, 55.53, 31.08),
        ("w2a2", "LSQ+"): (71.25, 64.21, 55.56, 30.08),
        ("w2a2", "KD"): (73.13, 63.16, 55.37, 28.56),
        ("w2a2", "FPQ"): (71.73, 65.23, 58.46, 33.16),
    },
}
TABLE2 = {"LSQ": 88.36, "+SFP": 89.30, "+CSD": 89.66, "+SFP +CSD (FPQ)": 89.92}
TABLE3 = {0.0: 89.66, 0.1: 89.92, 0.3: 89.90, 0.5: 89.83, 0.7: 89.59, 0.9: 89.68, 1.0: 89.48}


def published(data: str, bits: str, row: str, model: str) -> float | None:
    values = PUBLISHED.get(data, {}).get((bits, row))
    return None if values is None else values[MODELS.index(model)]


def train_section(data: str, stage: str) -> dict:
    if data == "fashion_mnist":
        return {**PROTOCOL, "epochs": STAND_IN_EPOCHS[stage]}
    return dict(PROTOCOL)


def fp_recipe(data: str, model: str) -> dict:
    return {"model": model, "data": DATA[data], "train": train_section(data, "fp"),
            "method": {"name": "ce"}}


def qat_recipe(data: str, bits: str, method: str, quant: dict, options: dict) -> dict:
    w_bits, a_bits = parse_bits(bits)
    config = method_config(method, options)
    return {"data": DATA[data], "train": train_section(data, "qat"),
            "quant": {"w_bits": w_bits, "a_bits": a_bits, **QUANT, **PAPER_INIT, **quant},
            "method": {"name": method, **config.to_dict()}}


class Recipe:
    """One YAML file: its path under configs/, what it reproduces, and its content."""

    def __init__(self, data: str, model: str, stem: str, title: str, body: dict,
                 number: float | None) -> None:
        self.path = CONFIGS / data / model / f"{stem}.yaml"
        self.data, self.model, self.stem, self.title, self.body = data, model, stem, title, body
        self.number = number
        RunConfig.from_dict(body)          # refuse to write anything flatq would not load

    @property
    def relpath(self) -> str:
        return str(self.path.relative_to(ROOT))

    def text(self) -> str:
        if self.data == "fashion_mnist":
            source = "Fashion-MNIST stand-in (ours, no published number)"
        else:
            shown = "not reported" if self.number is None else f"{self.number:.2f} %"
            source = f"published top-1: {shown}"
        if self.stem == "fp":
            usage = f"flatq pretrain --config {self.relpath} --out runs/{self.data}/{self.model}/fp"
        else:
            usage = (f"flatq qat --from runs/{self.data}/{self.model}/fp --config {self.relpath} "
                     f"--out runs/{self.data}/{self.model}/{self.stem}")
        header = (f"# FPQ paper, {self.title}; {source}.\n"
                  "# Written by bench/make_configs.py: edit that script and rerun it, not this file.\n"
                  f"# {usage}\n")
        return header + yaml.safe_dump(self.body, sort_keys=False)


def recipes() -> list[Recipe]:
    out: list[Recipe] = []
    for data in DATA:
        table = {"cifar10": "Table 4", "cifar100": "Table 5"}.get(data, "Tables 4/5 grid")
        for model in MODELS:
            name = f"{data} {model}"
            out.append(Recipe(data, model, "fp", f"{table}, {name}, full precision",
                              fp_recipe(data, model), published(data, "fp", "FP", model)))
            for bits in BITS:
                for suffix, (row, method, quant, options) in METHODS.items():
                    if suffix == "sam":
                        if bits != "w4a4" or model not in SAM_MODELS or data == "cifar100":
                            continue
                        where = "Table 1" if data == "cifar10" else "Table 1 grid"
                    else:
                        where = table
                    out.append(Recipe(data, model, f"{bits}_{suffix}",
                                      f"{where}, {name} {bits.upper()}, {row}",
                                      qat_recipe(data, bits, method, quant, options),
                                      published(data, bits, row, model)))
            if model != "resnet18" or data == "cifar100":
                continue
            grid = "" if data == "cifar10" else " grid"
            for suffix, (row, options) in ABLATION.items():
                out.append(Recipe(data, model, f"w2a4_{suffix}",
                                  f"Table 2{grid}, {name} W2A4, LSQ {row}",
                                  qat_recipe(data, "w2a4", "fpq", LSQ, options),
                                  TABLE2[row] if data == "cifar10" else None))
            for p in P_SWEEP:
                out.append(Recipe(data, model, f"w2a4_fpq_p{p}",
                                  f"Table 3{grid}, {name} W2A4, FPQ p = {p}",
                                  qat_recipe(data, "w2a4", "fpq", LSQ, {"p": p}),
                                  TABLE3[p] if data == "cifar10" else None))
    return out


def _cell(recipes_by_stem: dict[str, Recipe], stem: str) -> str:
    recipe = recipes_by_stem.get(stem)
    if recipe is None:
        return ""
    number = "-" if recipe.number is None else f"{recipe.number:.2f}"
    return f"{number} [{Path(recipe.relpath).name}]({recipe.path.relative_to(CONFIGS)})"


def readme_block(all_recipes: list[Recipe]) -> str:
    """The FPQ part of configs/README.md: every cell, its file, and the published number."""
    lines = [BEGIN, "## FPQ paper (Tables 1-5)", "",
             "Written by `bench/make_configs.py` (rerun it after changing a recipe there). Each cell: "
             "the published top-1 accuracy (%) and the recipe that reproduces it. Protocol "
             "(paper Sec. 4): SGD, batch 256, lr 0.01, cosine, weight decay 5e-4, momentum 0.9, "
             "200 epochs, 100 calibration images, first and last layer at 8 bits, asymmetric "
             "quantization, per-channel weights. The paper does not give its FP pre-training "
             "recipe; `fp.yaml` applies the same protocol. LSQ+ is `quantizer: lsq+` with "
             "`lsqplus_offset: continuous` (the paper's real-valued offset beta) and "
             "`range_method: mse` (the paper's MSE initialization of s and beta, searched over "
             "the ranges [k min, k max]; LSQ's weights then start from per-channel MSE ranges "
             "too, where the LSQ+ paper initializes symmetric weights from mu +- 3 sigma), and "
             "PACT is "
             "`quantizer: pact` with `pact_weights: dorefa` (the PACT paper's DoReFa weights, "
             "2 quantize_k(tanh(w) / (2 max|tanh(w)|) + 1/2) - 1, on the inner layers; the first "
             "and last layer take 8-bit min-max weights), both with method `task` (plain "
             "cross-entropy); KD uses our "
             "defaults T = 4, alpha = 0.9 (the paper gives none); LSQ+SAM uses rho = 0.05.", "",
             "Run a cell:", "", "```",
             "flatq pretrain --config configs/cifar10/resnet18/fp.yaml --out runs/cifar10/resnet18/fp",
             "flatq qat --from runs/cifar10/resnet18/fp --config configs/cifar10/resnet18/w4a4_fpq.yaml \\",
             "    --out runs/cifar10/resnet18/w4a4_fpq",
             "```", "",
             "Flags given after `--config` override the recipe (e.g. `--epochs 1`, `--seed 1`, "
             "`--data-root DIR`). QAT recipes name no model: the `--from` run decides it, so pass "
             "the teacher of the same data set and model as the recipe's folder.", ""]
    by = {(r.data, r.model, r.stem): r for r in all_recipes}
    for data, title in (("cifar10", "CIFAR-10 (Table 4)"), ("cifar100", "CIFAR-100 (Table 5)"),
                        ("fashion_mnist", "Fashion-MNIST stand-in (no published numbers; "
                         f"FP {STAND_IN_EPOCHS['fp']} epochs, QAT {STAND_IN_EPOCHS['qat']} epochs, "
                         "images padded to 32x32, gray repeated to 3 channels)")):
        lines += [f"### {title}", "",
                  "| W/A | method | " + " | ".join(MODEL_TITLES[m] for m in MODELS) + " |",
                  "|---|---|" + "---|" * len(MODELS)]
        rows = [("32/32", "FP", "fp")] + [
            (f"{b[1]}/{b[3]}", row, f"{b}_{suffix}") for b in BITS
            for suffix, (row, *_rest) in METHODS.items() if suffix != "sam"]
        for wa, row, stem in rows:
            cells = [_cell({s: r for (d, m, s), r in by.items() if d == data and m == model}, stem)
                     for model in MODELS]
            lines.append(f"| {wa} | {row} | " + " | ".join(cells) + " |")
        lines.append("")
    sections = (("cifar10", "CIFAR-10"), ("fashion_mnist", "Fashion-MNIST stand-in"))
    for data, title in sections:
        def cell(stem: str, model: str = "resnet18", d: str = data) -> str:
            return _cell({s: r for (dd, m, s), r in by.items() if dd == d and m == model}, stem)
        lines += [f"### Table 1: LSQ+SAM vs FPQ, W4A4, {title}", "",
                  "| method | Res18 | MBV2 |", "|---|---|---|",
                  f"| FP | {cell('fp')} | {cell('fp', 'mobilenet_v2')} |",
                  f"| LSQ+SAM | {cell('w4a4_sam')} | {cell('w4a4_sam', 'mobilenet_v2')} |",
                  f"| FPQ | {cell('w4a4_fpq')} | {cell('w4a4_fpq', 'mobilenet_v2')} |", "",
                  f"### Table 2: ablation, ResNet-18 W2A4, {title}", "",
                  "| SFP | CSD | ResNet-18 |", "|---|---|---|",
                  f"| | | {cell('w2a4_lsq')} |", f"| yes | | {cell('w2a4_fpq_sfp_only')} |",
                  f"| | yes | {cell('w2a4_fpq_csd_only')} |", f"| yes | yes | {cell('w2a4_fpq')} |",
                  "", f"### Table 3: SFP probability p, ResNet-18 W2A4, {title}", "",
                  "| p | ResNet-18 |", "|---|---|"]
        for p in TABLE3:
            stem = {0.0: "w2a4_fpq_csd_only", 0.1: "w2a4_fpq"}.get(p, f"w2a4_fpq_p{p}")
            shown = f"{TABLE3[p]:.2f}" if data == "cifar10" else "-"
            lines.append(f"| {p} | {shown} [{stem}.yaml]({data}/resnet18/{stem}.yaml) |")
        lines.append("")
    lines += ["p = 0 never perturbs, which is the CSD-only run; p = 0.1 is the FPQ default.", "",
              END]
    return "\n".join(lines) + "\n"


def readme_text(block: str) -> str:
    """configs/README.md with the FPQ block replaced (or appended); other text is kept."""
    current = README.read_text() if README.is_file() else (
        "# Recipes\n\nRecipes as `configs/<data>/<model>/<bits>_<method>.yaml`; each file's "
        "header says what it is and the command that runs it. The FPQ recipes reproduce "
        "published cells of the FPQ paper's Tables 1-5.\n\n")
    return replace_block(current, BEGIN, END, block)


def main(argv: list[str] | None = None) -> int:
    all_recipes = recipes()
    files = {r.path: r.text() for r in all_recipes}
    files[README] = readme_text(readme_block(all_recipes))
    return generate(__doc__.splitlines()[0], files, ROOT, f"{len(all_recipes)} recipes under "
                    f"{CONFIGS.relative_to(ROOT)}/, {{stale}} written", argv)


if __name__ == "__main__":
    sys.exit(main())
