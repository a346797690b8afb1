"""Models from outside the registry through the CLI and YAML recipes: `torchvision:NAME` and
a user's `package.module:factory` each train a step; a local weights file starts pretrain
and is the teacher of qat; every bad name or weights file is one line, before data loads."""

from __future__ import annotations

import pytest
import torch

import tiny_model_cli
from cli_helpers import FAST, assert_one_line, cli
from flatq.models import build_model, native_input_size
from flatq.runs import load_model

FACTORY = "tiny_model_cli:TinyNoBN"     # tests/ is on sys.path under pytest


def test_torchvision_resnet18_trains_a_step(tmp_path, capsys):
    code, out, err = cli(["pretrain", "--model", "torchvision:resnet18", *FAST,
                          "--out", tmp_path / "tv"], capsys)
    assert code == 0, err
    model, state = load_model(tmp_path / "tv")
    assert type(model).__name__ == "ResNet" and model.fc.out_features == 10
    assert state["meta"]["model"] == "torchvision:resnet18"


def test_torchvision_input_size_is_the_weights_crop():
    assert native_input_size("torchvision:resnet18") == 224
    assert native_input_size("torchvision:inception_v3") == 299
    assert native_input_size("resnet8") is None and native_input_size(FACTORY) is None


def test_user_factory_trains_a_step_from_a_yaml_recipe(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model: {FACTORY}\ndata: {{name: synthetic}}\n")
    code, out, err = cli(["pretrain", "--config", recipe, *FAST, "--out", tmp_path / "fp"],
                         capsys)
    assert code == 0, err
    model, state = load_model(tmp_path / "fp")
    assert isinstance(model, tiny_model_cli.TinyNoBN) and state["meta"]["model"] == FACTORY
    code, out, err = cli(["qat", "--from", tmp_path / "fp", "--bits", "w4a4", *FAST,
                          "--out", tmp_path / "q"], capsys)
    assert code == 0, err


def test_factory_gets_only_the_keywords_it_takes():
    model = build_model("torch.nn:Identity", num_classes=4, in_channels=3)
    assert isinstance(model, torch.nn.Identity)


def test_pretrained_file_starts_pretrain_and_is_qats_teacher(tmp_path, capsys):
    weights = tiny_model_cli.TinyNoBN(num_classes=10, in_channels=3).state_dict()
    weights = {k: torch.full_like(v, 0.01) for k, v in weights.items()}
    path = tmp_path / "tiny.pth"
    torch.save(weights, path)
    code, _, err = cli(["pretrain", "--model", FACTORY, "--pretrained", path, *FAST, "--lr", "0",
                        "--weight-decay", "0", "--momentum", "0", "--out", tmp_path / "fp"],
                       capsys)
    assert code == 0, err
    trained = load_model(tmp_path / "fp")[0].state_dict()
    assert all(torch.equal(trained[k], weights[k]) for k in weights)   # lr 0: still the file
    code, out, err = cli(["qat", "--model", FACTORY, "--pretrained", path, "--bits", "w4a4",
                          *FAST, "--out", tmp_path / "q"], capsys)
    assert code == 0, err
    assert load_model(tmp_path / "q")[1]["meta"]["source"] == str(path)
    code, out, err = cli(["qat", "--resume", "--epochs", "2", "--out", tmp_path / "q"], capsys)
    assert code == 0, err


@pytest.mark.parametrize("model, needles", [
    ("torchvision:resnet_999", ["torchvision has no classification model 'resnet_999'"]),
    ("no_such_module_xyz:build", ["cannot import module 'no_such_module_xyz'", "PYTHONPATH"]),
    ("math:no_such_factory", ["module 'math' has no attribute 'no_such_factory'"]),
    ("math:pi", ["'pi' is a float, not a callable"]),
    ("resnet99", ["unknown model 'resnet99'", "torchvision:NAME"]),
])
def test_bad_model_name_is_one_line_before_data_loads(tmp_path, capsys, model, needles):
    code, _, err = cli(["pretrain", "--model", model, "--data", "imagefolder", "--data-root",
                        tmp_path / "nowhere", "--out", tmp_path / "run"], capsys)
    assert_one_line(code, err, "pretrain", needles)
    assert not (tmp_path / "run").exists()


def test_factory_that_returns_no_module_is_one_line(tmp_path, capsys):
    code, _, err = cli(["pretrain", "--model", "collections:OrderedDict", *FAST,
                        "--out", tmp_path / "run"], capsys)
    assert_one_line(code, err, "pretrain", ["returned a OrderedDict, not a torch.nn.Module"])
    assert not (tmp_path / "run").exists()


def test_weights_file_that_does_not_fit_is_one_line(tmp_path, capsys):
    path = tmp_path / "other.pth"
    torch.save(tiny_model_cli.TinyNoBN(num_classes=5).state_dict(), path)
    code, _, err = cli(["pretrain", "--model", FACTORY, "--pretrained", path, *FAST,
                        "--out", tmp_path / "run"], capsys)
    assert_one_line(code, err, "pretrain", ["does not fit model", "fc.weight (5, 8)",
                                            "(model: (10, 8))"])
    code, _, err = cli(["pretrain", "--model", FACTORY, "--pretrained", tmp_path / "none.pth",
                        *FAST, "--out", tmp_path / "run"], capsys)
    assert_one_line(code, err, "pretrain", ["none.pth: no such file"])
    code, _, err = cli(["qat", "--from", tmp_path / "run", "--pretrained", path, "--bits",
                        "w4a4", *FAST, "--out", tmp_path / "q"], capsys)
    assert_one_line(code, err, "qat", ["either --from or --model with --pretrained"])
    assert not (tmp_path / "run").exists() and not (tmp_path / "q").exists()
