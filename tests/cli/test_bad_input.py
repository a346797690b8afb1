"""Bad input through the `flatq` command: every case exits with status 2 and ONE line on
stderr naming the problem, no traceback, and leaves earlier output as it was.

Most cases run in-process (`flatq.cli.main`); a few run as real subprocesses to prove that
nothing but that line reaches the user.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cli_helpers import FAST, assert_one_line, cli, snapshot
from flatq.cli import main


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Real runs to point bad commands at, and broken files of every kind."""
    root = tmp_path_factory.mktemp("bad")
    f = {"root": root, "fp": root / "fp", "q": root / "q"}
    assert main(["pretrain", "--model", "resnet8", *FAST, "--out", str(f["fp"])]) == 0
    assert main(["qat", "--from", str(f["fp"]), "--bits", "w4a4", *FAST, "--out",
                 str(f["q"])]) == 0
    f["empty"] = root / "empty"
    f["empty"].mkdir()
    f["corrupt"] = root / "corrupt.pt"
    f["corrupt"].write_bytes((f["fp"] / "model.pt").read_bytes()[:3000])   # cut short
    f["foreign"] = root / "foreign.pt"
    torch.save({"weights": torch.ones(3), "epoch": 1}, f["foreign"])
    f["file"] = root / "a_file"
    f["file"].write_text("not a folder\n")
    # a tiny CIFAR-10 layout with one truncated batch
    cifar = root / "cifar" / "cifar-10-batches-py"
    cifar.mkdir(parents=True)
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3]}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (cifar / name).write_bytes(pickle.dumps(batch, protocol=2))
    whole = (cifar / "data_batch_3").read_bytes()
    (cifar / "data_batch_3").write_bytes(whole[:len(whole) // 2])
    f["cifar"] = root / "cifar"
    for name, text in {"unknown_key": "train:\n  epochz: 3\n",
                       "wrong_type": "train:\n  epochs: three\n",
                       "malformed": "train: [1, 2\n",
                       "not_mapping": "- pretrain\n- qat\n",
                       "section_not_mapping": "train: 5\n",
                       "unknown_method": "method: {name: sgd}\n",
                       "unknown_top": "trainer: {epochs: 3}\n"}.items():
        f[name] = root / f"{name}.yaml"
        f[name].write_text(text)
    return f


# (argv with {placeholders} for the fixture's paths, words the error line must contain)
CASES = {
    "unknown model": (["pretrain", "--model", "resnet99"], ["unknown model 'resnet99'"]),
    "unknown data set": (["pretrain", "--data", "imagenet"], ["unknown data set 'imagenet'"]),
    "unknown qat method": (["qat", "--from", "{fp}", "--method", "fpqq"],
                           ["--method", "invalid choice: 'fpqq'"]),
    "qat method for pretrain": (["pretrain", "--method", "fpq"], ["invalid choice: 'fpq'"]),
    "bits w0a4": (["qat", "--from", "{fp}", "--bits", "w0a4"], ["bits", "0", "2..8"]),
    "bits w1a1": (["qat", "--from", "{fp}", "--bits", "w1a1"], ["bits", "1", "2..8"]),
    "bits w9a4": (["qat", "--from", "{fp}", "--bits", "w9a4"], ["bits", "9", "2..8"]),
    "bits w4": (["qat", "--from", "{fp}", "--bits", "w4"], ["bits", "'w4'"]),
    "w-bits 0": (["qat", "--from", "{fp}", "--w-bits", "0"], ["quant.w_bits", "0"]),
    "p below 0": (["qat", "--from", "{fp}", "--method", "fpq", "--p", "-0.1"],
                  ["method.p", "-0.1"]),
    "p above 1": (["qat", "--from", "{fp}", "--method", "fpq", "--p", "1.5"],
                  ["method.p", "1.5"]),
    "negative epochs": (["pretrain", "--epochs", "-2"], ["train.epochs", "-2"]),
    "fractional epochs": (["pretrain", "--epochs", "1.5"], ["train.epochs", "'1.5'"]),
    "zero batch size": (["pretrain", "--batch-size", "0"], ["train.batch_size", "0"]),
    "nan learning rate": (["pretrain", "--lr", "nan"], ["train.lr", "nan"]),
    "infinite learning rate": (["pretrain", "--lr", "inf"], ["train.lr", "inf"]),
    "zero checkpoint interval": (["pretrain", "--checkpoint-every-steps", "0"],
                                 ["train.checkpoint_every_steps", "0"]),
    "missing data folder": (["pretrain", "--data", "cifar10", "--data-root", "{root}/nowhere"],
                            ["CIFAR-10 not found", "nowhere"]),
    "empty cifar folder": (["pretrain", "--data", "cifar10", "--data-root", "{empty}"],
                           ["CIFAR-10 not found", "empty"]),
    "empty fashion folder": (["pretrain", "--data", "fashion_mnist", "--data-root", "{empty}"],
                             ["Fashion-MNIST not found", "empty"]),
    "truncated cifar pickle": (["pretrain", "--data", "cifar10", "--data-root", "{cifar}"],
                               ["data_batch_3", "truncated or corrupt"]),
    "corrupt checkpoint": (["qat", "--from", "{corrupt}"], ["corrupt.pt", "corrupt"]),
    "foreign checkpoint": (["qat", "--from", "{foreign}"], ["foreign.pt", "not a flatq"]),
    "eval foreign checkpoint": (["eval", "{foreign}"], ["foreign.pt", "not a flatq"]),
    "eval missing run": (["eval", "{root}/no_such_run"], ["checkpoint not found", "no_such_run"]),
    "qat from missing run": (["qat", "--from", "{root}/no_such_run"], ["not found"]),
    "qat from quantized run": (["qat", "--from", "{q}"], ["expected a full-precision run"]),
    "qat data unlike the teacher's": (["qat", "--from", "{fp}", "--data", "digits"],
                                      ["data digits gives 1 channels", "trained with 3 / 10"]),
    "resume with another method": (["qat", "--from", "{fp}", "--resume", "--method", "kd",
                                    "--out", "{q}"], ["method task (this run: kd)"]),
    "unwritable output": (["pretrain", "--out", "{file}/sub"], ["cannot write", "a_file"]),
    "yaml unknown key": (["pretrain", "--config", "{unknown_key}"], ["'epochz'", "train"]),
    "yaml wrong type": (["pretrain", "--config", "{wrong_type}"], ["train.epochs", "'three'"]),
    "yaml malformed": (["pretrain", "--config", "{malformed}"], ["not valid YAML"]),
    "yaml not a mapping": (["pretrain", "--config", "{not_mapping}"], ["mapping"]),
    "yaml section not a mapping": (["pretrain", "--config", "{section_not_mapping}"],
                                   ["train", "mapping"]),
    "yaml unknown method": (["pretrain", "--config", "{unknown_method}"], ["unknown method 'sgd'"]),
    "yaml unknown section": (["pretrain", "--config", "{unknown_top}"], ["'trainer'"]),
    "yaml missing": (["pretrain", "--config", "{root}/none.yaml"], ["config file not found"]),
    "yaml is a folder": (["pretrain", "--config", "{empty}"], ["config file not found"]),
    "unknown quantizer": (["qat", "--from", "{fp}", "--quantizer", "lsqq"],
                          ["quant.quantizer", "'lsqq'"]),
    "unknown sfp site": (["qat", "--from", "{fp}", "--method", "fpq", "--sfp-site", "middle"],
                         ["method.sfp_site", "'middle'"]),
    "option of another method": (["qat", "--from", "{fp}", "--method", "kd", "--p", "0.2"],
                                 ["--p", "'kd'"]),
    "unknown track": (["pretrain", "--track", "hessian,curvature"],
                      ["train.track", "'curvature'"]),
    "bogus device": (["pretrain", "--device", "bogus"], ["device", "'bogus'"]),
    "bogus device for eval": (["eval", "{fp}", "--device", "gpu0"], ["device", "'gpu0'"]),
    "too many calibration images": (["qat", "--from", "{fp}", "--calib-images", "100000"],
                                    ["calibration", "100000"]),
    "image size below minimum": (["pretrain", "--image-size", "4"], ["data.image_size", "4"]),
    "resume without checkpoint": (["pretrain", "--resume", "--out", "{empty}"],
                                  ["--resume", "no checkpoint.pt"]),
}
if not torch.cuda.is_available():
    CASES["cuda without a gpu"] = (["pretrain", "--device", "cuda"], ["CUDA is not available"])


def _expand(argv: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_2(case, files, tmp_path, capsys):
    argv, needles = CASES[case]
    argv = _expand(argv, files)
    out = [] if "--out" in argv or argv[0] == "eval" else ["--out", str(tmp_path / "run")]
    before = {name: snapshot(files[name]) for name in ("fp", "q")}
    extra = [] if argv[0] == "eval" else FAST[2:] if "--data" in argv else FAST
    # the case's own flags come after the fast defaults, so they win
    code, _, err = cli([argv[0], *extra, *argv[1:], *out], capsys)
    assert_one_line(code, err, argv[0], needles)
    assert not (tmp_path / "run").exists()                      # nothing half-created
    assert {name: snapshot(files[name]) for name in ("fp", "q")} == before


def test_resume_with_another_model_leaves_the_run_as_it_was(files, tmp_path, capsys):
    run = tmp_path / "fp"
    shutil.copytree(files["fp"], run)
    before = snapshot(run)
    code, _, err = cli(["pretrain", "--resume", "--out", run, "--model", "mobilenet_v1"], capsys)
    assert_one_line(code, err, "pretrain", ["model resnet8", "mobilenet_v1"])
    assert snapshot(run) == before


def test_failed_overwrite_keeps_the_old_run(files, tmp_path, capsys):
    """--overwrite replaces a run only once the new one can start."""
    run = tmp_path / "fp"
    shutil.copytree(files["fp"], run)
    before = snapshot(run)
    code, _, err = cli(["pretrain", *FAST, "--data", "cifar10", "--data-root", files["empty"],
                        "--overwrite", "--out", run], capsys)
    assert_one_line(code, err, "pretrain", ["CIFAR-10 not found"])
    assert snapshot(run) == before


def test_existing_run_is_not_replaced_without_overwrite(files, capsys):
    before = snapshot(files["fp"])
    code, _, err = cli(["pretrain", *FAST, "--out", files["fp"]], capsys)
    assert_one_line(code, err, "pretrain", ["already holds a run", "--resume", "--overwrite"])
    assert snapshot(files["fp"]) == before


def test_unwritable_folder(files, tmp_path, capsys):
    """A read-only folder where the user can write anyway (root) is no test: then a path
    under a regular file stands in, which no one can create."""
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        writable = os.access(locked, os.W_OK)
        out = files["file"] / "run" if writable else locked / "run"
        code, _, err = cli(["pretrain", *FAST, "--out", out], capsys)
        assert_one_line(code, err, "pretrain", ["cannot write to run folder", str(out)])
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("case", ["unknown model", "bogus device", "yaml malformed",
                                  "truncated cifar pickle", "corrupt checkpoint",
                                  "unknown qat method"])
def test_no_traceback_reaches_a_real_terminal(case, files, tmp_path):
    argv = _expand(CASES[case][0], files)
    proc = subprocess.run([sys.executable, "-m", "flatq", *argv, "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert_one_line(proc.returncode, proc.stderr, argv[0], CASES[case][1])
    assert proc.stdout == ""
