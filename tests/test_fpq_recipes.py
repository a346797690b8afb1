"""Recipes under configs/: every YAML loads, the FPQ ones are what bench/make_configs.py writes,
and a recipe given to `flatq qat --config` merges with the teacher's data and with flags."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

import flatq.methods  # noqa: F401  (registers the method configs)
from flatq.cli import build_parser
from flatq.cli.options import build_run_config
from flatq.config import RunConfig, load_yaml
from flatq.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
# file-name suffix -> (method, quantizer), as configs/README.md documents them
SUFFIXES = {"lsq": ("task", "lsq"), "lsqplus": ("task", "lsq+"), "pact": ("task", "pact"),
            "kd": ("kd", "lsq"), "fpq": ("fpq", "lsq"), "sam": ("sam", "lsq")}


def bench_script(name: str):
    """A bench/ generator as a module (bench/ on the path, as when it runs as a script)."""
    if str(ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_configs():
    return bench_script("make_configs")


def test_every_yaml_under_configs_loads():
    paths = sorted(CONFIGS.rglob("*.yaml"))
    assert len(paths) >= 210
    for path in paths:
        RunConfig.from_dict(load_yaml(path))      # raises ConfigError naming the problem


def test_fpq_recipes_are_up_to_date_and_cover_every_table_cell(capsys):
    assert make_configs().main(["--check"]) == 0, capsys.readouterr().out
    for data in ("cifar10", "cifar100", "fashion_mnist"):
        for model in ("resnet18", "resnet50", "mobilenet_v1", "mobilenet_v2"):
            folder = CONFIGS / data / model
            fp = RunConfig.from_dict(load_yaml(folder / "fp.yaml"))
            assert (fp.model, fp.data.name, fp.quant, fp.method.name) == (model, data, None, "ce")
            for bits in ("w4a4", "w2a4", "w2a2"):
                for suffix, (method, quantizer) in SUFFIXES.items():
                    path = folder / f"{bits}_{suffix}.yaml"
                    sam_cell = bits == "w4a4" and model in ("resnet18", "mobilenet_v2") \
                        and data != "cifar100"
                    if suffix == "sam" and not sam_cell:
                        assert not path.exists(), path
                        continue
                    config = RunConfig.from_dict(load_yaml(path))
                    assert (config.quant.bits, config.quant.quantizer, config.method.name,
                            config.data.name) == (bits, quantizer, method, data), path
                    assert config.data.root is None and config.quant.edge_bits == 8
                    # PACT and LSQ+ as their papers: DoReFa weights; continuous offset, MSE init
                    assert (config.quant.pact_weights == "dorefa") == (suffix == "pact"), path
                    assert ((config.quant.lsqplus_offset, config.quant.range_method)
                            == ("continuous", "mse")) == (suffix == "lsqplus"), path
                    expected_epochs = 20 if data == "fashion_mnist" else 200
                    assert (config.train.epochs, config.train.batch_size, config.train.lr,
                            config.train.weight_decay, config.train.momentum) == \
                        (expected_epochs, 256, 0.01, 5e-4, 0.9), path
    ablation = {"w2a4_fpq_sfp_only": {"sfp": True, "csd": False},
                "w2a4_fpq_csd_only": {"sfp": False, "csd": True},
                **{f"w2a4_fpq_p{p}": {"sfp": True, "csd": True, "p": p}
                   for p in (0.3, 0.5, 0.7, 0.9, 1.0)}}
    for data in ("cifar10", "fashion_mnist"):
        for stem, values in ablation.items():
            method = RunConfig.from_dict(load_yaml(CONFIGS / data / "resnet18" / f"{stem}.yaml")).method
            assert {k: getattr(method, k) for k in values} == values, stem


def test_recipe_merges_with_the_teachers_data_and_flags_override_it():
    recipe = CONFIGS / "cifar10" / "resnet18" / "w2a4_fpq_p0.5.yaml"
    args = build_parser().parse_args(["qat", "--from", "unused", "--config", str(recipe),
                                      "--epochs", "3", "--csd-weight", "0.25", "--out", "unused"])
    teacher_data = {"name": "cifar10", "root": "/data/cifar", "image_size": None,
                    "channels": None, "augment": True}
    config = build_run_config(args, "lsq", base={"data": teacher_data}, quantized=True)
    assert config.data.root == "/data/cifar"                 # the recipe does not clobber it
    assert (config.train.epochs, config.train.lr, config.train.batch_size) == (3, 0.01, 256)
    assert (config.quant.bits, config.quant.quantizer) == ("w2a4", "lsq")
    assert (config.method.name, config.method.p, config.method.csd_weight) == ("fpq", 0.5, 0.25)


def test_fp_recipe_drives_pretrain():
    recipe = CONFIGS / "fashion_mnist" / "mobilenet_v2" / "fp.yaml"
    args = build_parser().parse_args(["pretrain", "--config", str(recipe), "--lr", "0.1",
                                      "--out", "unused"])
    config = build_run_config(args, "ce")
    assert (config.model, config.data.name, config.data.image_size, config.data.channels) == \
        ("mobilenet_v2", "fashion_mnist", 32, 3)
    assert (config.train.epochs, config.train.lr) == (30, 0.1)


@pytest.mark.parametrize("bad", ["{model: resnet18, train: {epochs: 0}}",
                                 "{quant: {w_bits: 4, quantiser: lsq}}"])
def test_a_broken_recipe_is_refused_by_name(tmp_path, bad):
    path = tmp_path / "bad.yaml"
    path.write_text(bad)
    with pytest.raises(ConfigError, match="epochs|quantiser"):
        RunConfig.from_dict(load_yaml(path))


def test_sibling_method_recipes_are_ours_and_claim_no_paper_cell():
    """Only the FPQ recipes reproduce published cells (issue 26 item 6). A CR, DNQ or MEC recipe
    must say in its header that it is ours, and the CR generator must match the files."""
    make_cr = bench_script("make_cr_configs")
    assert make_cr.main(["--check"]) == 0
    siblings = []
    for path in sorted(CONFIGS.rglob("*.yaml")):
        method = RunConfig.from_dict(load_yaml(path)).method.name
        if method not in ("cr", "dnq", "mec"):
            continue
        siblings.append(path)
        header = " ".join(line for line in path.read_text().splitlines() if line.startswith("#"))
        assert "our recipe, not a" in header.lower(), path
        assert "(paper cell)" not in header.lower(), path
    assert len(siblings) == 16                      # the CR recipes; there are no DNQ/MEC ones
    readme = (CONFIGS / "README.md").read_text()
    cr_block = readme.split(make_cr.BEGIN, 1)[1].split(make_cr.END, 1)[0]
    assert "not the CR paper's cells" in cr_block
