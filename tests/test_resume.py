"""Crash and resume: SIGKILL mid-run then --resume ends exactly where an uninterrupted run ends;
checkpoints are atomic, load with weights_only=True, are refused for another model or bit
width; a non-finite loss stops the run without writing non-finite weights."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flatq.cli import main
from flatq.config import QuantConfig, RunConfig, TrainConfig, DataConfig, method_config
from flatq.errors import CheckpointError
from flatq.methods.task import TaskObjective
from flatq.models import build_model
from flatq.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from flatq.train.runs import build_from_meta, load_model

# 2 epochs of 3 steps on the synthetic set, with augmentation (so its draws must be replayed).
BASE = ["pretrain", "--model", "resnet8", "--data", "synthetic", "--epochs", "2", "--lr", "0.1",
        "--batch-size", "16", "--device", "cpu", "--no-progress"]
RUN = [*BASE, "--max-steps-per-epoch", "3"]
TOTAL_STEPS = 6
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # same thread count in every run: same sums


def _start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "flatq", *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def _kill_at_first_checkpoint(procs: dict[str, subprocess.Popen],
                              dirs: dict[str, Path]) -> dict[str, dict]:
    """SIGKILL each run as soon as its first checkpoint exists; the checkpoints they left."""
    left, deadline = dict(procs), time.monotonic() + 300
    while left:
        for name, proc in list(left.items()):
            if (dirs[name] / CHECKPOINT_NAME).exists():
                proc.send_signal(signal.SIGKILL)
                del left[name]
            assert proc.poll() is None or proc.returncode == -signal.SIGKILL, \
                proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.01)
    for name, proc in procs.items():
        proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        assert not (dirs[name] / "model.pt").exists(), f"{name}: finished before the kill"
    return {name: load_checkpoint(dirs[name], CHECKPOINT_NAME) for name in procs}


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock times."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run, and two runs SIGKILLed and resumed: after the first epoch's
    checkpoint, and after a mid-epoch step checkpoint (--checkpoint-every-steps 2)."""
    root = tmp_path_factory.mktemp("resume")
    dirs = {name: root / name for name in ("whole", "epoch", "step")}
    whole = _start([*RUN, "--out", str(dirs["whole"])])
    epoch = _start([*RUN, "--out", str(dirs["epoch"])])
    step = _start([*RUN, "--checkpoint-every-steps", "2", "--out", str(dirs["step"])])
    killed = _kill_at_first_checkpoint({"epoch": epoch, "step": step}, dirs)
    assert killed["epoch"]["epoch_step"] == 0 and 0 < killed["epoch"]["step"] < TOTAL_STEPS
    assert killed["step"]["epoch_step"] > 0, "the step run was not killed mid-epoch"
    resumed = [_start(["pretrain", "--resume", "--out", str(dirs[n])]) for n in ("epoch", "step")]
    for proc in (whole, *resumed):
        _finish(proc)
    return dirs


@pytest.mark.parametrize("name", ["epoch", "step"])
def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(runs, name):
    assert _records(runs[name]) == _records(runs["whole"])
    summary = {k: v for k, v in json.loads((runs[name] / "summary.json").read_text()).items()
               if k != "seconds"}
    whole = {k: v for k, v in json.loads((runs["whole"] / "summary.json").read_text()).items()
             if k != "seconds"}
    assert summary == whole and summary["step"] == TOTAL_STEPS
    a, b = load_model(runs[name])[0].state_dict(), load_model(runs["whole"])[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_load_with_weights_only(runs):
    for name in (CHECKPOINT_NAME, "model.pt"):
        state = torch.load(runs["whole"] / name, map_location="cpu", weights_only=True)
        assert state["meta"]["model"] == "resnet8"
    state = torch.load(runs["whole"] / CHECKPOINT_NAME, weights_only=True)
    assert state["epoch"] == 2 and state["epoch_step"] == 0 and len(state["rng"]) == 1
    assert {"model", "optimizer", "scheduler", "objective", "config"} <= state.keys()


def test_crash_while_saving_keeps_the_good_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / CHECKPOINT_NAME
    save_atomic({"step": 1, "w": torch.ones(3)}, path)
    real_save = torch.save

    def half_then_crash(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a zip file")   # bytes reach the temporary file...
        raise OSError(28, "No space left on device")  # ...and then the disk is full

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError):
        save_atomic({"step": 2, "w": torch.zeros(3)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    state = load_checkpoint(path)
    assert state["step"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == [CHECKPOINT_NAME]   # no temporary left


def _fake_run(run_dir: Path, model: str, quant: QuantConfig | None) -> None:
    """A checkpoint as the trainer writes it, for `model` at `quant`."""
    meta = {"model": model, "num_classes": 10, "in_channels": 3, "quant":
            quant.to_dict() if quant else None, "data": DataConfig(name="synthetic").to_dict()}
    save_atomic({"meta": meta, "model": build_from_meta(meta).state_dict()},
                run_dir / CHECKPOINT_NAME)


def test_resume_refuses_a_checkpoint_of_another_bit_width(tmp_path, capsys):
    teacher = tmp_path / "fp"
    _fake_run(teacher, "resnet8", None)
    (teacher / CHECKPOINT_NAME).rename(teacher / "model.pt")
    run = tmp_path / "q"
    _fake_run(run, "resnet8", QuantConfig(w_bits=4, a_bits=4))
    before = (run / CHECKPOINT_NAME).read_bytes()
    code = main(["qat", "--from", str(teacher), "--bits", "w2a4", "--resume", "--out", str(run),
                 "--epochs", "1", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "w_bits" in err[0] and "4" in err[0] and "2" in err[0]
    assert (run / CHECKPOINT_NAME).read_bytes() == before and not (run / "config.yaml").exists()


def test_load_model_refuses_weights_of_another_model(tmp_path):
    _fake_run(tmp_path, "resnet8", None)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    state["meta"]["model"] = "mobilenet_v1"
    save_atomic({k: v for k, v in state.items() if k != "format"}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="do not fit model mobilenet_v1"):
        load_model(tmp_path)


def _all_finite(state: dict) -> bool:
    return all(torch.isfinite(v).all() for v in state.values()
               if isinstance(v, torch.Tensor) and v.is_floating_point())


def test_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real = TaskObjective.losses

    def nan_on_fourth_step(self, images, labels, **extra):
        calls["n"] += 1
        out = real(self, images, labels, **extra)
        return {k: v * math.nan for k, v in out.items()} if calls["n"] == 4 else out

    monkeypatch.setattr(TaskObjective, "losses", nan_on_fourth_step)
    run = tmp_path / "nan"
    code = main([*BASE, "--checkpoint-every-steps", "1", "--max-steps-per-epoch", "2",
                 "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "non-finite loss" in err[0] and "step 4 (epoch 2)" in err[0]
    assert f"last good checkpoint: {run / CHECKPOINT_NAME}" in err[0]
    state = load_checkpoint(run, CHECKPOINT_NAME)
    assert state["step"] == 3 and _all_finite(state["model"])
    assert not (run / "model.pt").exists()


def test_huge_learning_rate_ends_with_one_line_and_finite_checkpoint(tmp_path):
    run = tmp_path / "lr"
    proc = subprocess.run([sys.executable, "-m", "flatq", *BASE, "--lr", "1e6",
                           "--max-steps-per-epoch", "4", "--checkpoint-every-steps", "1",
                           "--out", str(run)], env=ENV, capture_output=True, text=True,
                          timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "non-finite" in err[0] and "step" in err[0] and "Traceback" not in proc.stderr
    if (run / CHECKPOINT_NAME).exists():
        assert _all_finite(load_checkpoint(run, CHECKPOINT_NAME)["model"])
