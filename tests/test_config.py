"""Configuration: YAML round trip, refusal of unknown keys, types and ranges, bit strings, and
the precedence defaults < YAML < command-line flags."""

import pytest
import yaml

import flatq.methods  # noqa: F401  (registers the method configs)
from flatq.cli import build_parser
from flatq.cli.options import build_run_config
from flatq.config import (DataConfig, QuantConfig, RunConfig, TrainConfig, load_yaml,
                          method_config, parse_bits, save_yaml)
from flatq.errors import ConfigError


def full_config() -> RunConfig:
    return RunConfig(
        model="mobilenet_v2",
        data=DataConfig(name="synthetic", image_size=32, channels=3, augment=False),
        train=TrainConfig(epochs=7, batch_size=32, lr=0.05, track=["hessian"],
                          max_steps_per_epoch=3),
        quant=QuantConfig(w_bits=2, a_bits=4, quantizer="lsq+", edge_bits=None,
                          overrides=[{"pattern": "features.1.*", "w_bits": 8}]),
        method=method_config("fpq", {"p": 0.3, "csd_weight": 0.5, "sfp_layers": ["features.*"]}))


def test_yaml_round_trip_with_method(tmp_path):
    config = full_config()
    save_yaml(config, tmp_path / "config.yaml")
    raw = load_yaml(tmp_path / "config.yaml")
    assert raw["method"]["name"] == "fpq" and raw["method"]["p"] == 0.3
    loaded = RunConfig.from_dict(raw)
    assert loaded == config
    assert type(loaded.method).__name__ == "FPQConfig"
    assert loaded.quant.bits == "w2a4"


def test_defaults_round_trip_without_quant(tmp_path):
    save_yaml(RunConfig(), tmp_path / "c.yaml")
    loaded = RunConfig.from_dict(load_yaml(tmp_path / "c.yaml"))
    assert loaded == RunConfig() and loaded.quant is None and loaded.method is None


def test_method_given_by_name_only():
    assert RunConfig.from_dict({"method": "kd"}).method == method_config("kd")


@pytest.mark.parametrize("raw, key, allowed", [
    ({"data": {"nmae": "synthetic"}}, "nmae", "name"),
    ({"train": {"epoch": 3}}, "epoch", "epochs"),
    ({"quant": {"wbits": 4}}, "wbits", "w_bits"),
    ({"method": {"name": "fpq", "prob": 0.2}}, "prob", "csd_weight"),
    ({"modle": "resnet8"}, "modle", "model"),
])
def test_unknown_key_named_with_allowed_keys(raw, key, allowed):
    with pytest.raises(ConfigError) as info:
        RunConfig.from_dict(raw)
    message = str(info.value)
    assert repr(key) in message and "allowed:" in message and allowed in message


def test_unknown_override_key_refused():
    with pytest.raises(ConfigError, match="bitz"):
        QuantConfig(overrides=[{"pattern": "a", "bitz": 2}])
    with pytest.raises(ConfigError, match="pattern"):
        QuantConfig(overrides=[{"w_bits": 2}])
    with pytest.raises(ConfigError, match="w_bits must be in 2..8"):
        QuantConfig(overrides=[{"pattern": "a", "w_bits": 9}])


@pytest.mark.parametrize("raw, field", [
    ({"train": {"epochs": "ten"}}, "train.epochs"),
    ({"train": {"lr": "fast"}}, "train.lr"),
    ({"train": {"batch_size": 3.5}}, "train.batch_size"),
    ({"data": {"augment": "maybe"}}, "data.augment"),
    ({"quant": {"w_bits": True}}, "quant.w_bits"),
    ({"method": {"name": "fpq", "sfp": "sometimes"}}, "method.sfp"),
    ({"model": 3}, "model"),
    ({"train": ["epochs", 3]}, "train"),
])
def test_wrong_type_names_the_field(raw, field):
    with pytest.raises(ConfigError, match=rf"^{field}: expected"):
        RunConfig.from_dict(raw)


def test_strings_of_the_right_type_are_accepted():
    config = RunConfig.from_dict({"train": {"epochs": "3", "lr": "0.5", "amp": "yes"}})
    assert (config.train.epochs, config.train.lr, config.train.amp) == (3, 0.5, True)


@pytest.mark.parametrize("raw, field", [
    ({"quant": {"w_bits": 1}}, "quant.w_bits"),
    ({"quant": {"a_bits": 9}}, "quant.a_bits"),
    ({"quant": {"edge_bits": 16}}, "quant.edge_bits"),
    ({"method": {"name": "fpq", "p": 1.5}}, "method.p"),
    ({"method": {"name": "fpq", "p": -0.1}}, "method.p"),
    ({"train": {"epochs": -1}}, "train.epochs"),
    ({"train": {"epochs": 0}}, "train.epochs"),
    ({"train": {"momentum": 1.5}}, "train.momentum"),
])
def test_out_of_range_names_the_field(raw, field):
    with pytest.raises(ConfigError, match=rf"^{field}: .* outside the allowed range"):
        RunConfig.from_dict(raw)


@pytest.mark.parametrize("raw, field", [
    ({"quant": {"quantizer": "lsqq"}}, "quant.quantizer"),
    ({"train": {"track": ["hessian", "curvature"]}}, "train.track"),
    ({"method": {"name": "fpq", "sfp_site": "middle"}}, "method.sfp_site"),
])
def test_invalid_choice_names_the_field(raw, field):
    with pytest.raises(ConfigError, match=rf"^{field}: .* is not one of"):
        RunConfig.from_dict(raw)


def test_unknown_method_lists_available():
    with pytest.raises(ConfigError, match=r"unknown method 'fpqq'; available: .*fpq"):
        RunConfig.from_dict({"method": {"name": "fpqq"}})


@pytest.mark.parametrize("text, bits", [("w4a4", (4, 4)), ("W2A4", (2, 4)), ("w8a2", (8, 2)),
                                        (" w3A5 ", (3, 5))])
def test_parse_bits_accepts(text, bits):
    assert parse_bits(text) == bits


@pytest.mark.parametrize("text", ["w4", "w9a4", "w1a1", "w4a9", "4a4", "w4a4x", "", "wa"])
def test_parse_bits_rejects(text):
    with pytest.raises(ConfigError, match="bits"):
        parse_bits(text)


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [epochs: 3\n")
    with pytest.raises(ConfigError, match="not valid YAML") as info:
        load_yaml(bad)
    assert "\n" not in str(info.value)


# -- precedence: defaults < YAML < flags -------------------------------------------------------

def write_yaml(path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def test_flags_override_yaml_override_defaults(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {
        "model": "resnet18",
        "data": {"name": "synthetic"},
        "train": {"epochs": 3, "lr": 0.2},
        "quant": {"w_bits": 2, "a_bits": 2, "quantizer": "pact"},
        "method": {"name": "fpq", "p": 0.3, "csd_weight": 2.0},
    })
    args = build_parser().parse_args([
        "qat", "--from", "fp", "--out", "q", "--config", recipe,
        "--epochs", "5", "--bits", "w4a3", "--p", "0.5", "--no-augment"])
    config = build_run_config(args, "lsq", quantized=True)
    assert config.train.epochs == 5                     # flag over YAML
    assert config.train.lr == 0.2                       # YAML over default
    assert config.train.batch_size == TrainConfig().batch_size  # default
    assert (config.quant.w_bits, config.quant.a_bits) == (4, 3)
    assert config.quant.quantizer == "pact"
    assert config.method.name == "fpq"
    assert config.method.p == 0.5 and config.method.csd_weight == 2.0
    assert config.data.name == "synthetic" and config.data.augment is False
    assert config.model == "resnet18"


def test_pretrain_defaults_without_yaml():
    args = build_parser().parse_args(["pretrain", "--out", "x", "--model", "resnet8",
                                      "--lr", "0.1", "--data", "synthetic"])
    config = build_run_config(args, "ce")
    assert config.method.name == "ce" and config.quant is None
    assert config.train == TrainConfig(lr=0.1)
    assert config.data == DataConfig(name="synthetic")


def test_method_flag_replaces_yaml_method(tmp_path):
    recipe = write_yaml(tmp_path / "r.yaml", {"method": {"name": "fpq", "p": 0.3}})
    args = build_parser().parse_args(["qat", "--from", "fp", "--out", "q", "--config", recipe,
                                      "--method", "kd", "--temperature", "2"])
    config = build_run_config(args, "lsq", quantized=True)
    assert config.method == method_config("kd", {"temperature": 2.0})


def test_method_option_for_another_method_refused():
    args = build_parser().parse_args(["qat", "--from", "fp", "--out", "q", "--method", "kd",
                                      "--p", "0.2"])
    with pytest.raises(ConfigError, match="--p does not apply to method 'kd'"):
        build_run_config(args, "lsq", quantized=True)


def test_bad_flag_value_is_a_config_error():
    args = build_parser().parse_args(["pretrain", "--out", "x", "--epochs", "many"])
    with pytest.raises(ConfigError, match="train.epochs: expected an integer"):
        build_run_config(args, "ce")


def test_qat_without_quant_flags_uses_default_bits():
    args = build_parser().parse_args(["qat", "--from", "fp", "--out", "q"])
    config = build_run_config(args, "lsq", quantized=True)
    assert config.quant == QuantConfig() and config.quant.bits == "w4a4"
    assert config.method == method_config("lsq")


def test_method_configs_known_after_plain_import():
    # A fresh interpreter: only `import flatq`, no import of flatq.methods by hand.
    import subprocess
    import sys
    code = ("import flatq\nfrom flatq.config import RunConfig\n"
            "c = RunConfig.from_dict({'method': {'name': 'fpq'}})\nprint(c.method.name)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "fpq"


def test_load_recipe_merges_sections_over_a_base(tmp_path):
    from flatq.config import load_recipe, merge_sections
    path = tmp_path / "r.yaml"
    path.write_text("train: {epochs: 3}\nquant: {w_bits: 2}\n")
    base = {"data": {"name": "synthetic"}, "train": {"lr": 0.5, "epochs": 9}}
    raw = load_recipe(path, base)
    assert raw == {"data": {"name": "synthetic"}, "train": {"lr": 0.5, "epochs": 3},
                   "quant": {"w_bits": 2}}
    assert base["train"] == {"lr": 0.5, "epochs": 9}        # the base is left as it was
    assert merge_sections({"model": "a"}, {"model": "b"}) == {"model": "b"}
    path.write_text("train: {epochs: 0}\n")
    with pytest.raises(ConfigError, match=r"r\.yaml: train\.epochs"):
        load_recipe(path)


def test_weight_and_input_quantizer_flags_and_the_lsq_alias():
    args = build_parser().parse_args([
        "qat", "--from", "fp", "--out", "q", "--method", "lsq", "--weight-quantizer", "lsq",
        "--input-quantizer", "pact"])
    config = build_run_config(args, "task", quantized=True)
    assert (config.quant.weight_family, config.quant.input_family) == ("lsq", "pact")
    assert config.method.name == "task" and config.method == method_config("lsq")
    with pytest.raises(ConfigError, match="weight_quantizer: 'nope' is not one of lsq"):
        QuantConfig(weight_quantizer="nope")
