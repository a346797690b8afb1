"""Crash and resume: a run SIGKILLed while writing a checkpoint, resumed, SIGKILLed again while
training, and resumed once more ends exactly where an uninterrupted run ends; FPQ's SFP coin
flips and DNQ's noise streams resume too; checkpoints load with weights_only=True and are
refused for another model or bit width; a non-finite loss stops the run naming the step and
the last good checkpoint, without writing non-finite weights."""

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

import tiny_model_cli
from run_helpers import Interrupted, interrupt_at
from flatq.cli import main
from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config
from flatq.errors import CheckpointError, FlatqError
from flatq.methods.task import TaskObjective
from flatq.train.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_atomic
from flatq.runs import build_from_meta, load_model, load_teacher, pretrain, qat

# 2 epochs of 3 steps on the synthetic set, with augmentation (so its draws must be replayed).
BASE = ["pretrain", "--model", "resnet8", "--data", "synthetic", "--epochs", "2", "--lr", "0.1",
        "--batch-size", "16", "--device", "cpu", "--no-progress"]
RUN = [*BASE, "--max-steps-per-epoch", "3", "--checkpoint-every-steps", "2"]
TOTAL_STEPS = 6
RUN_FILES = ["checkpoint.pt", "config.yaml", "metrics.jsonl", "model.pt", "summary.json"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}   # same thread count in every run: same sums

# `flatq` that SIGKILLs itself halfway through writing its Nth checkpoint file.
KILL_IN_SAVE = """
import io, os, signal, sys, torch
from flatq.cli import main
real, calls = torch.save, []
def save(obj, handle, *args, **kwargs):
    calls.append(obj)
    if len(calls) == int(sys.argv[1]):
        data = io.BytesIO()
        real(obj, data, *args, **kwargs)
        handle.write(data.getvalue()[:data.tell() // 2])
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, handle, *args, **kwargs)
torch.save = save
sys.exit(main(sys.argv[2:]))
"""


def _start(args: list[str], prefix: tuple[str, ...] = ("-m", "flatq")) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, *prefix, *args], env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _finish(proc: subprocess.Popen) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    return out


def _killed(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, err


def _kill_at_next_checkpoint(proc: subprocess.Popen, path: Path) -> None:
    """SIGKILL `proc` from outside as soon as it has replaced the checkpoint at `path`."""
    before, deadline = path.stat().st_ino, time.monotonic() + 300
    while path.stat().st_ino == before:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    _killed(proc)


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl without the wall-clock times."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted run, and beside it the same run (step checkpoints every 2 steps)
    killed twice: halfway through writing its second checkpoint (epoch 1's, after step 3),
    so it resumes mid-epoch from step 2; then by an outside SIGKILL as soon as that resumed
    process has saved a new checkpoint, so it resumes again from there."""
    root = tmp_path_factory.mktemp("resume")
    dirs = {name: root / name for name in ("whole", "killed")}
    killed, ckpt = dirs["killed"], dirs["killed"] / CHECKPOINT_NAME
    whole = _start([*RUN, "--out", str(dirs["whole"])])
    _killed(_start(["2", *RUN, "--out", str(killed)], prefix=("-c", KILL_IN_SAVE)))
    state = load_checkpoint(killed, CHECKPOINT_NAME)             # the old one, whole
    assert (state["step"], state["epoch"], state["epoch_step"]) == (2, 0, 2)
    assert len(list(killed.glob(".checkpoint.pt.*.tmp"))) == 1   # the half-written one
    assert not (killed / "model.pt").exists()
    second = _start(["pretrain", "--resume", "--out", str(killed)])
    _kill_at_next_checkpoint(second, ckpt)
    state = load_checkpoint(killed, CHECKPOINT_NAME)
    assert 2 < state["step"] < TOTAL_STEPS and not (killed / "model.pt").exists()
    _finish(_start(["pretrain", "--resume", "--out", str(killed)]))
    _finish(whole)
    return dirs


def test_killed_and_resumed_run_ends_like_an_uninterrupted_one(runs):
    assert _records(runs["killed"]) == _records(runs["whole"])
    summary = {k: v for k, v in json.loads((runs["killed"] / "summary.json").read_text()).items()
               if k != "seconds"}
    whole = {k: v for k, v in json.loads((runs["whole"] / "summary.json").read_text()).items()
             if k != "seconds"}
    assert summary == whole and summary["step"] == TOTAL_STEPS
    a, b = load_model(runs["killed"])[0].state_dict(), load_model(runs["whole"])[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the half-written temporary file is gone, nothing else is left behind
    assert sorted(p.name for p in runs["killed"].iterdir()) == RUN_FILES


@pytest.fixture(scope="module")
def tiny_nobn():
    """The BN-free test model in the registry while this file's in-process runs need it."""
    with tiny_model_cli.registered():
        yield


def _same_run(a: Path, b: Path) -> None:
    assert _records(a) == _records(b)
    wa, wb = load_model(a)[0].state_dict(), load_model(b)[0].state_dict()
    assert wa.keys() == wb.keys()
    for key, value in wb.items():
        assert torch.equal(wa[key], value) if torch.is_tensor(value) else wa[key] == value, key


def test_random_streams_of_methods_resume(tiny_nobn, tmp_path):
    """Interrupted after step 3 (last checkpoint: step 2, mid-epoch) and resumed, DNQ (noise
    coins and values) and FPQ (SFP coin flips with p = 0.5, noise from the global RNG) end
    as their uninterrupted runs. BN-free tiny model: the method's streams are what matters."""
    train = TrainConfig(epochs=1, batch_size=16, lr=0.05, device="cpu", progress=False,
                        max_steps_per_epoch=4, checkpoint_every_steps=2, track_every=1)
    dnq = RunConfig(model="tiny_nobn", data=DataConfig(name="synthetic"), train=train,
                    method=method_config("dnq"))
    fpq = RunConfig(model="tiny_nobn", data=DataConfig(name="synthetic"), train=train,
                    quant=QuantConfig(w_bits=4, a_bits=4), method=method_config("fpq", {"p": 0.5}))
    runs = {"dnq": lambda out, **kw: pretrain(dnq, out, **kw),
            # FPQ starts from the finished DNQ run (a full-precision model)
            "fpq": lambda out, **kw: qat(fpq, *load_teacher(tmp_path / "dnq_whole"), out, **kw)}
    for name, run in runs.items():
        whole, cut = tmp_path / f"{name}_whole", tmp_path / f"{name}_cut"
        run(whole)
        with pytest.raises(Interrupted):
            run(cut, callbacks=[interrupt_at(3)])
        saved = load_checkpoint(cut, CHECKPOINT_NAME)
        assert (saved["step"], saved["epoch_step"]) == (2, 2) and saved["rng"][0]["objective"]
        run(cut, resume=True)
        _same_run(cut, whole)


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
    with pytest.raises(FlatqError, match="disk is full"):       # one line, not a traceback
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
    with pytest.raises(CheckpointError, match="do not fit model mobilenet_v1") as refused:
        load_model(tmp_path)
    assert "Missing key(s)" in str(refused.value)       # says which weights do not fit


def test_load_model_names_a_run_trained_before_residual_output_points(tmp_path):
    _fake_run(tmp_path, "resnet8", QuantConfig(w_bits=4, a_bits=4, target="onnxruntime"))
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    blocks = {k for k in state["model"] if k.startswith("stages.") and ".output_point." in k
              and ".residual." not in k and ".shortcut." not in k}
    assert blocks                                        # the blocks' own points exist
    state["model"] = {k: v for k, v in state["model"].items() if k not in blocks}
    save_atomic({k: v for k, v in state.items() if k != "format"}, tmp_path / "model.pt")
    with pytest.raises(CheckpointError, match="before flatq gave residual blocks an output"):
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


def test_huge_learning_rate_ends_with_one_line_and_finite_checkpoint(tmp_path, capsys):
    """A real divergence (no patched loss): the run stops at the first non-finite loss or
    weights; whatever checkpoint it left is finite."""
    run = tmp_path / "lr"
    code = main([*BASE, "--lr", "1e6", "--max-steps-per-epoch", "4", "--checkpoint-every-steps",
                 "1", "--out", str(run)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert "non-finite" in err[0] and "step" in err[0]
    if (run / CHECKPOINT_NAME).exists():
        assert _all_finite(load_checkpoint(run, CHECKPOINT_NAME)["model"])
    assert not (run / "model.pt").exists()


def test_a_checkpoint_saying_lsq_resumes_as_task(tmp_path):
    """`lsq`, the former name of the plain-task-loss method, still loads and resumes."""
    fast = ["--data", "synthetic", "--batch-size", "16", "--device", "cpu", "--no-progress",
            "--max-steps-per-epoch", "1"]
    assert main(["pretrain", "--epochs", "1", *fast, "--out", str(tmp_path / "fp")]) == 0
    run = tmp_path / "q"
    assert main(["qat", "--from", str(tmp_path / "fp"), "--method", "lsq", "--epochs", "1",
                 *fast, "--out", str(run)]) == 0
    assert json.loads((run / "summary.json").read_text())["method"] == "task"
    state = load_checkpoint(run, CHECKPOINT_NAME)     # as a run written before the rename
    state["config"]["method"]["name"] = "lsq"
    save_atomic({k: v for k, v in state.items() if k != "format"}, run / CHECKPOINT_NAME)
    assert main(["qat", "--resume", "--epochs", "2", *fast, "--out", str(run)]) == 0
    assert load_checkpoint(run, CHECKPOINT_NAME)["epoch"] == 2
    assert RunConfig.from_dict({"method": "lsq"}).method.name == "task"
