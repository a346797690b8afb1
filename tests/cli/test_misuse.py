"""Real misuse, as a hurried user or hostile input would commit it (issue 25's cases): each ends
in exit 2 with one line naming the problem, or in the correct behaviour, and no case deletes or
changes a file the user did not ask flatq to replace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cli_helpers import FAST, assert_one_line, cli, snapshot
from flatq.cli import main
from flatq.train import loop
from flatq.train.checkpoint import CHECKPOINT_NAME, MODEL_NAME, load_checkpoint, save_atomic
from flatq.train.run_folder import LOCK_NAME, RunFolderLock

QAT = ["--bits", "w4a4", *FAST]


def flatq(argv: list) -> int:
    return main([str(a) for a in argv])


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> dict[str, Path]:
    """A finished FP run, a finished QAT run of it, and a second FP run with other weights."""
    root = tmp_path_factory.mktemp("misuse")
    runs = {"root": root, "fp": root / "fp", "fp2": root / "fp2", "q": root / "q"}
    assert flatq(["pretrain", "--model", "resnet8", *FAST, "--out", runs["fp"]]) == 0
    assert flatq(["pretrain", "--model", "resnet8", *FAST, "--seed", "1", "--out",
                 runs["fp2"]]) == 0
    assert flatq(["qat", "--from", runs["fp"], *QAT, "--out", runs["q"]]) == 0
    return runs


def copy_run(source: Path, target: Path) -> Path:
    target.mkdir(parents=True)
    for path in source.iterdir():
        (target / path.name).write_bytes(path.read_bytes())
    return target


# -- data loss -----------------------------------------------------------------------------

def test_empty_out_never_touches_the_current_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine\n")
    before = snapshot(tmp_path)
    code, _, err = cli(["pretrain", *FAST, "--overwrite", "--out", ""], capsys)
    assert_one_line(code, err, "pretrain", ["--out is empty"])
    assert snapshot(tmp_path) == before


def test_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    data = tmp_path / "my_data"
    data.mkdir()
    (data / "results.csv").write_text("a,b\n1,2\n")
    before = snapshot(data)
    code, _, err = cli(["pretrain", *FAST, "--overwrite", "--out", data], capsys)
    assert_one_line(code, err, "pretrain", ["holds files but no flatq run", "my_data"])
    assert snapshot(data) == before


@pytest.mark.parametrize("argv, needles", [
    (["qat", "--from", "{fp}", *QAT, "--method", "mec", "--experts", "1000"], ["experts"]),
    (["qat", "--from", "{fp}", *QAT, "--method", "fpq", "--sfp-layers", "nothing*"],
     ["nothing*"]),
    (["qat", "--from", "{fp}", *QAT, "--method", "fpq", "--csd-layers", "nothing*"],
     ["nothing*"]),
    (["qat", "--from", "{fp}", *QAT, "--data", "digits"], ["data digits"]),
    (["pretrain", *FAST, "--model", "vit_tiny", "--data", "fashion_mnist", "--data-root",
      "{fashion}"], ["vit_tiny", "cannot run", "(1, 28, 28)"]),
])
def test_overwrite_keeps_the_old_run_when_the_new_one_does_not_validate(
        argv, needles, made, tmp_path, capsys):
    from data_files import write_fashion_mnist
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    write_fashion_mnist(fashion, 32, 8)
    run = copy_run(made["q"], tmp_path / "run")
    before = snapshot(run)
    argv = [a.format(fp=made["fp"], fashion=fashion) for a in argv]
    code, _, err = cli([*argv, "--overwrite", "--out", run], capsys)
    assert_one_line(code, err, argv[0], needles)
    assert snapshot(run) == before


def test_overwrite_replaces_only_the_runs_own_files(made, tmp_path, capsys):
    run = copy_run(made["fp"], tmp_path / "run")
    (run / "my_notes.md").write_text("keep me\n")
    code, _, _ = cli(["pretrain", "--model", "resnet8", *FAST, "--seed", "3", "--overwrite",
                      "--out", run], capsys)
    assert code == 0
    assert (run / "my_notes.md").read_text() == "keep me\n"
    assert load_checkpoint(run)["config"]["train"]["seed"] == 3
    assert not (run / LOCK_NAME).exists()          # released and removed at the end


def test_demo_checks_everything_before_replacing_a_run(made, tmp_path, capsys):
    out = tmp_path / "runs"
    copy_run(made["fp"], out / "fp")
    before = snapshot(out / "fp")
    code, _, err = cli(["demo", "--out", out], capsys)
    assert_one_line(code, err, "demo", ["already holds a run", "--overwrite"])
    code, _, err = cli(["demo", "--out", out, "--overwrite", "--model", "resnet99"], capsys)
    assert_one_line(code, err, "demo", ["unknown model 'resnet99'"])
    code, _, err = cli(["demo", "--out", out, "--overwrite", "--bits", "w9a4"], capsys)
    assert_one_line(code, err, "demo", ["bits", "9"])
    code, _, err = cli(["demo", "--out", out, "--overwrite", "--methods", "task,fpqq"], capsys)
    assert_one_line(code, err, "demo", ["--methods", "unknown fpqq"])
    assert snapshot(out / "fp") == before


HOLD_LOCK = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from flatq.train.run_folder import RunFolderLock
    lock = RunFolderLock(Path(sys.argv[1]))
    print("held", flush=True)
    time.sleep(60)
""")


def test_a_second_run_into_a_held_folder_is_refused(made, tmp_path, capsys):
    run = copy_run(made["fp"], tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        before = {p: v for p, v in snapshot(run).items() if p != LOCK_NAME}
        for argv in (["pretrain", *FAST, "--overwrite", "--out", run],
                     ["pretrain", "--resume", "--epochs", "2", "--out", run]):
            code, _, err = cli(argv, capsys)
            assert_one_line(code, err, "pretrain", ["in use by pid", str(holder.pid)])
        assert {p: v for p, v in snapshot(run).items() if p != LOCK_NAME} == before
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing: the kernel dropped its lock, the folder is free
    code, _, _ = cli(["pretrain", "--resume", "--epochs", "2", "--out", run], capsys)
    assert code == 0


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def test_resume_of_a_finished_run_keeps_its_summary(made, tmp_path, capsys):
    run = copy_run(made["q"], tmp_path / "run")
    before = _summary(run)
    assert {"train_ce", "lr", "seconds"} <= set(before)
    assert cli(["qat", "--resume", "--out", run], capsys)[0] == 0     # no --from needed
    assert _summary(run) == before


def test_kill_while_model_pt_is_written_resumes_to_the_same_summary(made, tmp_path, capsys):
    run = copy_run(made["fp"], tmp_path / "run")
    before = _summary(run)
    (run / MODEL_NAME).unlink()                       # killed before the rename
    (run / "summary.json").unlink()
    (run / f".{MODEL_NAME}.x1y2.tmp").write_bytes(b"PK half")
    assert cli(["pretrain", "--resume", "--out", run], capsys)[0] == 0
    assert _summary(run) == before
    assert not list(run.glob(".*.tmp"))


def test_kill_between_epoch_record_and_checkpoint_logs_the_epoch_once(tmp_path, monkeypatch,
                                                                      capsys):
    """A step checkpoint falls on the epoch's last step; the kill comes after the epoch's
    record was appended, before the epoch-end checkpoint replaced the step one."""
    run = tmp_path / "run"
    argv = ["pretrain", "--model", "resnet8", *FAST, "--epochs", "2",
            "--checkpoint-every-steps", "1", "--out", run]
    real_save = loop.Trainer.save_checkpoint
    calls = []

    def killed_at_epoch_end(self):
        calls.append(self.epoch_step)
        if self.epoch == 1 and self.epoch_step == 0:   # the epoch-end save of epoch 1
            raise KeyboardInterrupt
        real_save(self)

    monkeypatch.setattr(loop.Trainer, "save_checkpoint", killed_at_epoch_end)
    assert cli(argv, capsys)[0] == 130
    monkeypatch.setattr(loop.Trainer, "save_checkpoint", real_save)
    assert cli(["pretrain", "--resume", "--out", run], capsys)[0] == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if "test_acc" in r] == [1, 2]


# -- silently ignoring what was asked ------------------------------------------------------

@pytest.mark.parametrize("argv, needles", [
    (["pretrain", "--resume", "--momentum", "0.5"], ["train.momentum 0.9 -> 0.5",
                                                     "may change"]),
    (["pretrain", "--resume", "--data", "digits"], ["data.name 'synthetic' -> 'digits'"]),
    (["pretrain", "--resume", "--batch-size", "8"], ["train.batch_size 16 -> 8"]),
    (["qat", "--resume", "--from", "{fp2}"], ["teacher", "other weights"]),
    (["qat", "--resume", "--method", "fpq", "--p", "0.2"], ["method"]),
])
def test_resume_refuses_options_it_cannot_apply(argv, needles, made, tmp_path, capsys):
    source = made["q"] if argv[0] == "qat" else made["fp"]
    run = copy_run(source, tmp_path / "run")
    before = snapshot(run)
    argv = [a.format(fp2=made["fp2"]) for a in argv]
    code, _, err = cli([*argv, "--epochs", "2", "--out", run], capsys)
    assert_one_line(code, err, argv[0], needles)
    assert snapshot(run) == before


def test_resume_may_train_longer_and_ignores_a_damaged_config_yaml(made, tmp_path, capsys):
    run = copy_run(made["fp"], tmp_path / "run")
    (run / "config.yaml").write_bytes(b"\xff\xfe not utf-8")
    assert cli(["pretrain", "--resume", "--epochs", "2", "--out", run], capsys)[0] == 0
    assert _summary(run)["epoch"] == 2
    (run / "config.yaml").unlink()
    assert cli(["pretrain", "--resume", "--epochs", "3", "--out", run], capsys)[0] == 0
    assert _summary(run)["epoch"] == 3


def test_resume_with_a_new_learning_rate_applies_it(made, tmp_path, capsys):
    """The documented fix for a diverged run: the schedule continues where it was, scaled."""
    longer = ["--epochs", "3", "--lr", "0.1"]
    reference = tmp_path / "whole"
    assert flatq(["pretrain", "--model", "resnet8", *FAST, *longer, "--out", reference]) == 0
    run = copy_run(made["fp"], tmp_path / "run")
    code, out, _ = cli(["pretrain", "--resume", *longer, "--out", run], capsys)
    assert code == 0 and "peak learning rate 0.01 -> 0.1" in out
    resumed = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    whole = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert resumed[1]["epoch"] == 2 and resumed[1]["lr"] > 0.01     # mid-schedule, scaled up
    assert resumed[1]["lr"] == pytest.approx(whole[1]["lr"])
    assert load_checkpoint(run, CHECKPOINT_NAME)["config"]["train"]["lr"] == 0.1


def test_eval_refuses_another_runs_export(made, tmp_path, capsys):
    other = tmp_path / "other"
    assert flatq(["qat", "--from", made["fp2"], *QAT, "--out", other]) == 0
    onnx_file = tmp_path / "other.onnx"
    assert flatq(["export", other, "--format", "onnx", "-o", onnx_file,
                 "--check-images", "0"]) == 0
    code, _, err = cli(["eval", made["q"], "--onnx", onnx_file], capsys)
    assert_one_line(code, err, "eval", ["other weights", str(made["q"])])
    code, out, _ = cli(["eval", other, "--onnx", onnx_file], capsys)
    assert code == 0 and "onnxruntime" in out


@pytest.mark.parametrize("argv, needles", [
    (["pretrain", *FAST, "--batch-size", "100000"], ["--batch-size 100000 exceeds"]),
    (["pretrain", *FAST, "--epochs", "2", "--warmup-epochs", "2"], ["--warmup-epochs 2"]),
    (["export", "{q}", "--format", "int", "-o", "{out}/x.onnx"], ["--format int", ".npz"]),
    (["export", "{q}", "--format", "onnx", "-o", "{out}/x.npz"], ["--format onnx", ".onnx"]),
    (["analyze", "noise", "{q}", "--sigmas", "0,nan", "--out", "{out}/n.json"],
     ["sigmas", "nan"]),
    (["analyze", "noise", "{q}", "--sigmas", "0,-1", "--out", "{out}/n.json"],
     ["sigmas", "-1"]),
])
def test_silent_mistakes_are_refused(argv, needles, made, tmp_path, capsys):
    argv = [a.format(q=made["q"], out=tmp_path) for a in argv]
    if argv[0] == "pretrain":
        argv += ["--out", str(tmp_path / "run")]
    code, _, err = cli(argv, capsys)
    assert_one_line(code, err, argv[0], needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# -- one line instead of a traceback -------------------------------------------------------

def test_out_that_is_a_file_a_symlink_or_too_long(made, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    code, _, err = cli(["pretrain", *FAST, "--out", a_file], capsys)
    assert_one_line(code, err, "pretrain", ["is a file"])
    link = tmp_path / "link"
    link.symlink_to(copy_run(made["fp"], tmp_path / "real"))
    before = snapshot(tmp_path / "real")
    code, _, err = cli(["pretrain", *FAST, "--overwrite", "--out", link], capsys)
    assert_one_line(code, err, "pretrain", ["symbolic link", "real"])
    assert snapshot(tmp_path / "real") == before
    code, _, err = cli(["pretrain", *FAST, "--out", tmp_path / ("n" * 300)], capsys)
    assert_one_line(code, err, "pretrain", ["longer than 255 bytes"])


def test_full_disk_while_checkpointing_is_one_line(tmp_path, monkeypatch, capsys):
    def full_disk(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk)
    code, _, err = cli(["pretrain", "--model", "resnet8", *FAST, "--out", tmp_path / "run"],
                       capsys)
    assert_one_line(code, err, "pretrain", ["cannot write", CHECKPOINT_NAME, "disk full"])


def test_non_utf8_yaml_and_huge_seed(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_bytes(b"train:\n  epochs: 1 \xff\n")
    code, _, err = cli(["pretrain", *FAST, "--config", recipe, "--out", tmp_path / "a"], capsys)
    assert_one_line(code, err, "pretrain", ["not UTF-8"])
    code, _, err = cli(["pretrain", *FAST, "--seed", str(2**64), "--out", tmp_path / "b"], capsys)
    assert_one_line(code, err, "pretrain", ["train.seed", "outside the allowed range"])


def test_torn_last_metrics_line_is_dropped_on_resume(made, tmp_path, capsys):
    run = copy_run(made["fp"], tmp_path / "run")
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 99, "epo')                  # killed mid-append
    assert cli(["pretrain", "--resume", "--epochs", "2", "--out", run], capsys)[0] == 0
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(line) for line in lines)
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


@pytest.mark.parametrize("key", ["num_classes", "model"])
def test_checkpoint_missing_metadata(made, tmp_path, key, capsys):
    state = load_checkpoint(made["fp"])
    del state["meta"][key]
    broken = tmp_path / "broken.pt"
    save_atomic({k: v for k, v in state.items() if k != "format"}, broken)
    for argv in (["eval", broken], ["qat", "--from", broken, *QAT, "--out", tmp_path / "q"]):
        code, _, err = cli(argv, capsys)
        assert_one_line(code, err, argv[0], ["broken.pt", key])


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00", b'{"kind": "noise", "ru',
                                     b'{"kind": "noise"}', b"[1, 2]"])
def test_plot_of_a_file_that_is_not_an_analysis(content, tmp_path, capsys):
    source = tmp_path / "a.json"
    source.write_bytes(content)
    code, _, err = cli(["plot", source, "-o", tmp_path / "a.png"], capsys)
    assert_one_line(code, err, "plot", ["a.json"])
    assert not (tmp_path / "a.png").exists()


def test_plot_to_an_unwritable_path(made, tmp_path, capsys):
    analysis = tmp_path / "noise.json"
    assert flatq(["analyze", "noise", made["q"], "--images", "8", "--repeats", "2",
                 "--sigmas", "0,0.1", "--out", analysis]) == 0
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = cli(["plot", analysis, "-o", blocker / "n.png"], capsys)
    assert_one_line(code, err, "plot", ["cannot write", "n.png"])


def test_features_of_a_model_with_nan_weights(made, tmp_path, capsys):
    state = load_checkpoint(made["fp"])
    state["model"] = {k: torch.full_like(v, float("nan")) if v.is_floating_point() else v
                      for k, v in state["model"].items()}
    broken = tmp_path / "nan.pt"
    save_atomic({k: v for k, v in state.items() if k != "format"}, broken)
    code, _, err = cli(["analyze", "features", broken, "--layer", "stem.0", "--images", "8",
                        "--out", tmp_path / "f.json"], capsys)
    assert_one_line(code, err, "analyze", ["non-finite", "stem.0"])
    assert not (tmp_path / "f.json").exists()


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    """flock conflicts between two open files even in one process, so a notebook that starts
    two runs into one folder is refused too."""
    first = RunFolderLock(tmp_path)
    try:
        with pytest.raises(Exception, match="in use by pid " + str(os.getpid())):
            RunFolderLock(tmp_path)
    finally:
        first.release()
    assert not (tmp_path / LOCK_NAME).exists()
