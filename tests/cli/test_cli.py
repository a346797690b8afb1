"""The `flatq` command: help of every subcommand, a pretrain -> qat -> eval pipeline, the
console entry, and bad input ending with one line on stderr and exit status 2."""

import argparse
import json
import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from flatq.cli import build_parser, main

FAST = ["--data", "synthetic", "--epochs", "1", "--max-steps-per-epoch", "2",
        "--batch-size", "16", "--device", "cpu", "--no-progress"]


def run_cli(argv, capsys):
    """(exit status, stdout, stderr) of `flatq argv`, run in-process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help and usage errors
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def subcommands() -> list[str]:
    action = next(a for a in build_parser()._actions
                  if isinstance(a, argparse._SubParsersAction))
    return list(action.choices)


def test_main_help(capsys):
    code, out, _ = run_cli(["--help"], capsys)
    assert code == 0
    for name in ("pretrain", "qat", "eval", "demo"):
        assert name in out


@pytest.mark.parametrize("command", subcommands())
def test_subcommand_help(command, capsys):
    code, out, err = run_cli([command, "--help"], capsys)
    assert code == 0 and err == ""
    assert out.startswith("usage: flatq " + command)


def test_console_script_is_main():
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "flatq"]
    assert script.load() is main


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """pretrain -> qat (FPQ, W2A4) -> eval through main(), in-process."""
    root = tmp_path_factory.mktemp("cli")
    assert main(["pretrain", "--model", "resnet8", "--lr", "0.1", "--out", str(root / "fp"),
                 *FAST]) == 0
    assert main(["qat", "--from", str(root / "fp"), "--bits", "w2a4", "--method", "fpq",
                 "--p", "0.5", "--lr", "0.01", "--out", str(root / "q"), *FAST]) == 0
    return root


def test_pipeline_writes_runs(pipeline):
    summary = json.loads((pipeline / "q" / "summary.json").read_text())
    assert summary["bits"] == "w2a4" and summary["method"] == "fpq"
    config = (pipeline / "q" / "config.yaml").read_text()
    assert "p: 0.5" in config and "w_bits: 2" in config and "name: synthetic" in config


def test_eval_json_matches_summary(pipeline, capsys):
    code, out, err = run_cli(["eval", pipeline / "q", "--json", "--device", "cpu"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    summary = json.loads((pipeline / "q" / "summary.json").read_text())
    assert result["bits"] == "w2a4" and result["model"] == "resnet8"
    assert result["data"] == "synthetic"
    assert result["acc"] == summary["test_acc"]


def test_eval_through_python_dash_m(pipeline):
    proc = subprocess.run([sys.executable, "-m", "flatq", "eval", str(pipeline / "fp"),
                           "--device", "cpu"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((pipeline / "fp" / "summary.json").read_text())
    assert f"resnet8 fp32 on synthetic: test acc {summary['test_acc']:.2f}%" in proc.stdout


def test_bad_input_through_python_dash_m(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flatq", "eval", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"flatq eval: error: checkpoint not found: {tmp_path / 'none'}"]


def assert_one_line_error(code, err, *needles):
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("argv, needles", [
    (["pretrain", "--model", "resnet99"], ["unknown model 'resnet99'", "resnet8"]),
    (["pretrain", "--data", "imagenet"], ["unknown data set 'imagenet'", "cifar10"]),
    (["pretrain", "--data", "cifar10", "--data-root", "/nonexistent"],
     ["CIFAR-10", "/nonexistent"]),
    (["pretrain", "--data", "fashion_mnist", "--data-root", "/nonexistent"], ["/nonexistent"]),
    (["pretrain", "--epochs", "zero"], ["train.epochs", "'zero'"]),
    (["pretrain", "--lr", "-1"], ["train.lr", "-1"]),
    (["pretrain", "--config", "/nonexistent.yaml"], ["config file not found"]),
])
def test_bad_pretrain_input(argv, needles, tmp_path, capsys):
    code, _, err = run_cli([*argv, "--out", tmp_path / "run"], capsys)
    assert_one_line_error(code, err, "flatq pretrain: error:", *needles)


@pytest.mark.parametrize("argv, needles", [
    (["--bits", "w9a4"], ["bits", "9", "2..8"]),
    (["--bits", "w4"], ["bits", "'w4'", "wXaY"]),
    (["--bits", "w1a1"], ["bits", "1", "2..8"]),
    (["--p", "1.5", "--method", "fpq"], ["method.p", "1.5"]),
    (["--p", "0.2", "--method", "kd"], ["--p", "'kd'"]),
])
def test_bad_qat_input(argv, needles, pipeline, tmp_path, capsys):
    code, _, err = run_cli(["qat", "--from", pipeline / "fp", *argv, "--out", tmp_path / "q",
                            *FAST], capsys)
    assert_one_line_error(code, err, "flatq qat: error:", *needles)
    assert not (tmp_path / "q").exists()


def test_unknown_method_refused(pipeline, tmp_path, capsys):
    code, _, err = run_cli(["qat", "--from", pipeline / "fp", "--method", "fpqq",
                            "--out", tmp_path / "q"], capsys)
    assert code == 2 and "Traceback" not in err
    assert "invalid choice: 'fpqq'" in err.strip().splitlines()[-1]  # argparse: usage, then it


@pytest.mark.parametrize("command", ["qat", "eval"])
def test_corrupt_checkpoint(command, tmp_path, capsys):
    bad = tmp_path / "random.pt"
    bad.write_bytes(bytes(range(256)) * 16)
    argv = ["qat", "--from", bad, "--out", tmp_path / "q"] if command == "qat" else ["eval", bad]
    code, _, err = run_cli(argv, capsys)
    assert_one_line_error(code, err, f"flatq {command}: error:", str(bad), "corrupt")
    assert "weights_only" not in err


def test_quantized_run_refused_as_teacher(pipeline, tmp_path, capsys):
    code, _, err = run_cli(["qat", "--from", pipeline / "q", "--out", tmp_path / "q2"], capsys)
    assert_one_line_error(code, err, "expected a full-precision run", "w2a4")


def test_existing_run_not_overwritten(pipeline, capsys):
    before = (pipeline / "fp" / "model.pt").read_bytes()
    code, _, err = run_cli(["pretrain", "--out", pipeline / "fp", *FAST], capsys)
    assert_one_line_error(code, err, "already holds a run", "--overwrite", str(pipeline / "fp"))
    assert (pipeline / "fp" / "model.pt").read_bytes() == before


def test_sfp_p_alias_passes_through_torchruns_parser(capsys):
    """torchrun reads a bare --p as an abbreviation of its own option; --sfp-p reaches flatq."""
    from torch.distributed.run import get_args_parser
    launch = ["--nproc_per_node", "2", "-m", "flatq", "qat", "--from", "runs/fp", "--out", "q"]
    with pytest.raises(SystemExit):
        get_args_parser().parse_args([*launch, "--p", "0.3"])
    assert "ambiguous option: --p" in capsys.readouterr().err
    passed = get_args_parser().parse_args([*launch, "--sfp-p", "0.3"]).training_script_args
    args = build_parser().parse_args(passed)
    assert vars(args)["method.p"] == "0.3"
