"""DDP on CPU (gloo): `torchrun --nproc_per_node 2` trains what one process trains.

Why the two must agree: the trainer draws one permutation per (seed, epoch) and rank r takes
every 2nd index of it, so at every step the two ranks' half-batches together are exactly the
single process's batch; DDP averages the two half-batch mean gradients, which is the
whole-batch mean gradient. That holds only without BatchNorm (each rank normalizes with its own
half-batch statistics; flatq uses plain BN, not SyncBN) and without augmentation (each rank
draws its own crops), so the model is tests/tiny_model_cli.py's BN-free net, the data the
synthetic set without augmentation. Quantized runs use LSQ, whose step-size gradient scale
1/sqrt(N Qp) must count the global batch in N (not the rank's half), and PACT, whose signed or
unsigned grid is chosen during calibration on rank 0 and must reach rank 1. The one-process
references run inside the test process. Results agree to float rounding (sums in another
order), not bit for bit.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tiny_model_cli
from flatq.cli import main
from flatq.config import DataConfig
from flatq.data import calibration_batches
from flatq.quant.quantizers import LSQQuantizer
from flatq.train.batchnorm import reestimate_batchnorm
from flatq.train.checkpoint import load_checkpoint
from flatq.train.loop import evaluate
from flatq.runs import load_model, prepare_data

HERE = Path(__file__).resolve().parents[1]    # tests/, where tiny_model_cli.py lives
CLI = str(HERE / "tiny_model_cli.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COMMON = ["--data", "synthetic", "--no-augment", "--epochs", "2", "--batch-size", "32",
          "--max-steps-per-epoch", "3", "--device", "cpu", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def tiny_nobn():
    """The BN-free test model in the registry while this file's in-process runs need it."""
    with tiny_model_cli.registered():
        yield


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ranks(cmd: list[str], world: int = 2) -> list[tuple[list[str], dict]]:
    """`cmd` as `world` ranks with the variables torchrun sets (without its agent process)."""
    port = str(_free_port())
    return [(cmd, {**ENV, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(world)]


def _start(jobs: dict[str, list[tuple[list[str], dict]]]) -> list:
    """Start every process of every named job at once."""
    return [(name, subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE))
            for name, job in jobs.items() for cmd, env in job]


def _wait(procs: list) -> None:
    """All must succeed; only rank 0 prints (torchrun's agent adds nothing on stdout)."""
    outs = {}
    for name, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name}:\n{out}\n{err}"
        outs.setdefault(name, []).append(out)
    for name, job in outs.items():
        lines = "".join(job).splitlines()
        assert [line.split()[0] for line in lines].count("epoch") == 2, (name, job)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_nobn) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    d = {name: root / name for name in ("fp1", "fp2", "q1", "q2", "l1", "l2", "fpq2")}
    fp = ["pretrain", "--model", "tiny_nobn", "--lr", "0.5", *COMMON]
    two = _start({"fp2": [([*TORCHRUN, CLI, *fp, "--out", str(d["fp2"])], ENV)]})
    assert main([*fp, "--out", str(d["fp1"])]) == 0
    qat = ["qat", "--from", str(d["fp1"]), "--bits", "w4a4", "--lr", "0.05", *COMMON]
    pact = [*qat, "--method", "lsq", "--quantizer", "pact"]
    lsq = [*qat, "--method", "lsq", "--quantizer", "lsq"]
    # FPQ's --p is not given as a flag: torchrun's own parser would take it for an
    # abbreviation of its --print-completion (see docs/scale.md).
    fpq = root / "fpq.yaml"
    fpq.write_text("method: {name: fpq, p: 0.5}\n")
    two += _start({"q2": _ranks([sys.executable, CLI, *pact, "--out", str(d["q2"])]),
                   "l2": _ranks([sys.executable, CLI, *lsq, "--out", str(d["l2"])]),
                   "fpq2": _ranks([sys.executable, CLI, *qat, "--config", str(fpq),
                                   "--out", str(d["fpq2"])])})
    assert main([*pact, "--out", str(d["q1"])]) == 0
    assert main([*lsq, "--out", str(d["l1"])]) == 0
    _wait(two)
    return d


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "model.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("one, two", [("fp1", "fp2"), ("q1", "q2"), ("l1", "l2")])
def test_two_ranks_train_what_one_process_trains(runs, one, two):
    a, b = _weights(runs[one]), _weights(runs[two])
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    ma, mb = _metrics(runs[one]), _metrics(runs[two])
    assert [r["step"] for r in ma] == [r["step"] for r in mb] == [3, 6]
    # training moved the model far more than the tolerance above
    assert abs(ma[1]["test_loss"] - ma[0]["test_loss"]) > 1e-3
    for ra, rb in zip(ma, mb):
        assert rb["test_acc"] == ra["test_acc"]
        for key in ("train_ce", "test_loss", "lr"):
            assert rb[key] == pytest.approx(ra[key], rel=1e-4, abs=1e-6)


def test_quantizers_calibrated_once_and_broadcast(runs):
    """PACT picks a signed grid for inputs with negative values (the normalized image) during
    calibration; that choice is not a tensor, so it must travel with the broadcast state."""
    state = torch.load(runs["q2"] / "checkpoint.pt", weights_only=True)["model"]
    first = state["conv1.input_quantizer._extra_state"]
    inner = state["conv2.input_quantizer._extra_state"]
    assert first["signed"] is True and inner["signed"] is False   # ReLU output: unsigned
    ref = torch.load(runs["q1"] / "checkpoint.pt", weights_only=True)["model"]
    assert ref["conv1.input_quantizer._extra_state"] == first


def test_rank_zero_alone_writes_the_run_folder(runs):
    for name in ("fp2", "q2", "fpq2"):
        files = sorted(p.name for p in runs[name].iterdir())
        assert files == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "model.pt",
                         "summary.json"]
        assert [r["epoch"] for r in _metrics(runs[name])] == [1, 2]


def test_ranks_draw_their_own_noise_and_hooks_fire_inside_ddp(runs):
    state = torch.load(runs["fpq2"] / "checkpoint.pt", weights_only=True)
    rank0, rank1 = state["rng"]
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert not torch.equal(rank0["torch"], rank1["torch"])            # SFP noise values
    assert len(rank0["objective"]) == 1                               # SFP's coin flips
    assert not torch.equal(rank0["objective"][0], rank1["objective"][0])
    records = _metrics(runs["fpq2"])
    assert all(r["train_csd"] > 0 for r in records)                   # feature capture ran


def test_lsq_gradient_scale_counts_the_global_batch():
    """The half-batch step-size gradients of two ranks (replicas=2), averaged as DDP does,
    equal the whole-batch gradient of one process; with replicas=1 they are sqrt(2) too big."""
    torch.manual_seed(0)
    images = torch.randn(8, 3, 5, 5)
    quantizer = LSQQuantizer(4, signed=True)
    quantizer.start_observing()
    quantizer(images)
    quantizer.finish_observing()

    def step_size_grad(batch: torch.Tensor, replicas: int) -> torch.Tensor:
        quantizer.replicas, quantizer.scale.grad = replicas, None
        (quantizer(batch) * batch.cos()).sum().div(len(batch)).backward()   # a rank's mean
        return quantizer.scale.grad.clone()

    whole = step_size_grad(images, 1)
    halves = [step_size_grad(half, 2) for half in images.chunk(2)]
    torch.testing.assert_close((halves[0] + halves[1]) / 2, whole)
    per_rank = [step_size_grad(half, 1) for half in images.chunk(2)]
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, whole * 2 ** 0.5)


def test_global_batch_must_split_evenly_over_the_ranks(tiny_nobn, tmp_path, monkeypatch,
                                                       capsys):
    monkeypatch.setattr("flatq.train.distributed.world_size", lambda: 3)
    code = main(["pretrain", "--model", "tiny_nobn", *COMMON, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["flatq pretrain: error: train.batch_size: 32 is not divisible "
                                 "by the 3 DDP ranks"]
    assert not (tmp_path / "r").exists()  # refused before the run folder is made


def test_bn_reestimation_on_two_ranks_saves_what_one_process_computes(tmp_path):
    """qat --bn-images under two ranks: every rank re-estimates on the same images, so the
    saved statistics equal a one-process re-estimation of the trained weights, and the
    distributed test accuracy (each rank evaluates its share with its own model) equals the
    saved model's accuracy in one process."""
    fp, q = tmp_path / "fp", tmp_path / "q"
    assert main(["pretrain", "--model", "resnet8", "--lr", "0.1", *COMMON, "--out", str(fp)]) == 0
    _wait(_start({"q": _ranks([sys.executable, CLI, "qat", "--from", str(fp), "--bits", "w4a4",
                               "--lr", "0.01", *COMMON, "--bn-images", "64",
                               "--out", str(q)])}))
    model, state = load_model(q)
    reference, _ = load_model(q)
    reference.load_state_dict(load_checkpoint(q / "checkpoint.pt")["model"])  # as trained
    data = prepare_data(DataConfig.from_dict(state["meta"]["data"]))
    reestimate_batchnorm(reference, calibration_batches(data.train, data.eval_pipeline, 64, 0, 32))
    saved, expected = model.state_dict(), reference.state_dict()
    trained = load_checkpoint(q / "checkpoint.pt")["model"]
    running = [k for k in saved if "running_" in k]
    assert running and not all(torch.equal(saved[k], trained[k]) for k in running)
    for key in running:
        torch.testing.assert_close(saved[key], expected[key])
    summary = json.loads((q / "summary.json").read_text())
    assert summary["bn_images"] == 64
    one_process = evaluate(model, data.test, data.eval_pipeline, torch.device("cpu"))
    assert summary["test_acc"] == pytest.approx(one_process["acc"])


def test_two_rank_summary_is_the_saved_models_accuracy(tmp_path):
    """With BatchNorm and augmentation the ranks' running statistics drift apart after the
    last synchronizing forward; every rank evaluates (and rank 0 saves) rank 0's, so the
    summary's accuracy is what `flatq eval` of the saved model measures."""
    fp = tmp_path / "fp"
    cmd = [sys.executable, "-m", "flatq", "pretrain", "--model", "resnet8", "--data", "synthetic",
           "--epochs", "2", "--batch-size", "32", "--max-steps-per-epoch", "4", "--lr", "0.1",
           "--device", "cpu", "--no-progress", "--out", str(fp)]
    _wait(_start({"fp": _ranks(cmd)}))
    model, state = load_model(fp)
    data = prepare_data(DataConfig.from_dict(state["meta"]["data"]))
    one_process = evaluate(model, data.test, data.eval_pipeline, torch.device("cpu"))
    summary = json.loads((fp / "summary.json").read_text())
    assert summary["test_acc"] == pytest.approx(one_process["acc"])
    assert summary["test_loss"] == pytest.approx(one_process["loss"], rel=1e-5)


def test_sync_bn_needs_cuda(tmp_path):
    cmd = [sys.executable, "-m", "flatq", "pretrain", "--model", "resnet8", "--data", "synthetic",
           "--epochs", "1", "--batch-size", "32", "--max-steps-per-epoch", "1", "--device",
           "cpu", "--sync-bn", "--no-progress", "--out", str(tmp_path / "r")]
    procs = _start({"r": _ranks(cmd)})
    errors = [proc.communicate(timeout=300)[1] for _, proc in procs]
    assert all(proc.returncode == 2 for _, proc in procs)
    assert "--sync-bn needs CUDA" in errors[0] and "Traceback" not in errors[0]
    assert not (tmp_path / "r").exists()
