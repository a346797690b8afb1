"""Whole runs through the Python API on the synthetic data set: pre-training, QAT, the run
folder's files, loading a finished model, and resume ending where an uninterrupted run ends."""

import dataclasses
import json

import pytest
import torch

import flatq.methods  # noqa: F401  (registers the method configs)
from flatq import calibrate, quantize_model
from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, load_yaml, method_config
from flatq.data import calibration_batches
from flatq.errors import CheckpointError, ConfigError, FlatqError
from flatq.train.checkpoint import load_checkpoint
from flatq.train.loop import evaluate
from flatq.runs import load_model, load_teacher, prepare_data, pretrain, qat

DATA = DataConfig(name="synthetic")
CPU = torch.device("cpu")


def train_config(epochs: int, lr: float) -> TrainConfig:
    return TrainConfig(epochs=epochs, batch_size=32, lr=lr, device="cpu", progress=False,
                       max_steps_per_epoch=4, seed=3, track_every=1)


def qat_config() -> RunConfig:
    return RunConfig(model="resnet8", data=DATA, method=method_config("lsq"),
                     quant=QuantConfig(w_bits=4, a_bits=4, quantizer="lsq"),
                     train=train_config(epochs=2, lr=0.01))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One FP run and one QAT run from it, shared by the tests below."""
    root = tmp_path_factory.mktemp("runs")
    fp_config = RunConfig(model="resnet8", data=DATA, method=method_config("ce"),
                          train=train_config(epochs=3, lr=0.1))
    fp_summary = pretrain(fp_config, root / "fp")
    teacher, state = load_teacher(root / "fp")
    data = prepare_data(DATA)
    quant = qat_config().quant
    calibrated = calibrate(quantize_model(teacher, quant),
                           calibration_batches(data.train, data.eval_pipeline, quant.calib_images,
                                               quant.calib_seed))
    after_calibration = evaluate(calibrated, data.test, data.eval_pipeline, CPU)
    q_summary = qat(qat_config(), teacher, state, root / "q")
    return {"root": root, "fp": fp_summary, "q": q_summary, "data": data,
            "calibrated": after_calibration, "teacher": teacher, "state": state}


def test_fp_training_learns(runs):
    chance = 100.0 / runs["data"].num_classes
    assert runs["fp"]["test_acc"] > 4 * chance
    records = [json.loads(line) for line in (runs["root"] / "fp" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert [r["step"] for r in records] == [4, 8, 12]
    assert records[-1]["train_ce"] < records[0]["train_ce"]


def test_qat_improves_on_calibration(runs):
    q, calibrated = runs["q"], runs["calibrated"]
    assert q["kind"] == "qat" and q["bits"] == "w4a4" and q["method"] == "task"
    assert q["fp_test_acc"] == runs["fp"]["test_acc"]
    # Fine-tuning must lower the test loss of the freshly calibrated model and keep its accuracy.
    assert q["test_loss"] < calibrated["loss"]
    assert q["test_acc"] >= calibrated["acc"] - 2.0
    assert q["test_acc"] > 40.0


@pytest.mark.parametrize("run", ["fp", "q"])
def test_run_folder_files(runs, run):
    folder = runs["root"] / run
    for name in ("checkpoint.pt", "model.pt", "metrics.jsonl", "config.yaml", "summary.json"):
        assert (folder / name).is_file(), name
    config = RunConfig.from_dict(load_yaml(folder / "config.yaml"))
    assert config.model == "resnet8" and config.data == DATA
    assert (config.quant is None) == (run == "fp")
    assert json.loads((folder / "summary.json").read_text()) == runs[run]


@pytest.mark.parametrize("run", ["fp", "q"])
def test_model_file_loads_safely_and_reproduces_summary(runs, run):
    folder = runs["root"] / run
    raw = torch.load(folder / "model.pt", map_location="cpu", weights_only=True)
    assert raw["meta"]["model"] == "resnet8"
    model, state = load_model(folder / "model.pt")
    assert not model.training
    assert (state["meta"]["quant"] is None) == (run == "fp")
    result = evaluate(model, runs["data"].test, runs["data"].eval_pipeline, CPU)
    assert result["acc"] == runs[run]["test_acc"]
    assert result["loss"] == pytest.approx(runs[run]["test_loss"], abs=1e-6)


def test_teacher_file_untouched_by_qat(runs):
    model, _ = load_model(runs["root"] / "fp")
    for key, value in model.state_dict().items():
        assert torch.equal(value, runs["teacher"].state_dict()[key]), key


def test_qat_leaves_the_teacher_object_as_it_was_and_a_second_run_trains_its_weights(runs):
    """Objectives freeze a copy of the teacher, never the teacher itself: after a qat run
    (lsq in the fixture, then fpq, which hooks and freezes its teacher) the object keeps its
    requires_grad flags, mode and hooks, and a second run from it trains the student's weights,
    not only its quantizers."""
    teacher = runs["teacher"]
    flags = [p.requires_grad for p in teacher.parameters()]
    assert all(flags)
    mode = teacher.training
    config = dataclasses.replace(qat_config(), method=method_config("fpq"))
    qat(config, teacher, runs["state"], runs["root"] / "q2")
    assert [p.requires_grad for p in teacher.parameters()] == flags
    assert teacher.training == mode
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in teacher.modules())
    student, _ = load_model(runs["root"] / "q2")
    trained, start = student.state_dict(), teacher.state_dict()
    for name in ("stem.0.weight", "stages.1.0.residual.0.0.weight", "linear.weight"):
        assert not torch.equal(trained[name], start[name]), name


def test_qat_with_bn_images_records_both_accuracies_and_saves_the_new_statistics(runs):
    config = qat_config()
    config = dataclasses.replace(config, quant=dataclasses.replace(config.quant, bn_images=64,
                                                                   bn_check=0))
    summary = qat(config, runs["teacher"], runs["state"], runs["root"] / "bn")
    assert summary["bn_images"] == 64 and "test_acc_before_bn" in summary
    model, state = load_model(runs["root"] / "bn")
    trained = load_checkpoint(runs["root"] / "bn" / "checkpoint.pt")["model"]
    saved = model.state_dict()
    assert int(saved["stem.1.num_batches_tracked"]) == 64 // config.train.batch_size
    assert not torch.equal(saved["stem.1.running_mean"], trained["stem.1.running_mean"])
    assert torch.equal(saved["stem.0.weight"], trained["stem.0.weight"])   # weights untouched
    assert state["summary"]["test_acc"] == summary["test_acc"]


def test_qat_with_bn_check_keeps_the_new_statistics_only_where_held_out_images_say_so(runs):
    """The summary's check accuracies are the model's own on the held-out images: the
    checkpoint's model (before re-estimation) gives `bn_check_acc_before`, and the saved
    model gives `bn_check_acc_after` if it kept the new statistics, else the one before."""
    config = qat_config()
    quant = dataclasses.replace(config.quant, bn_images=64, bn_check=96)
    summary = qat(dataclasses.replace(config, quant=quant), runs["teacher"], runs["state"],
                  runs["root"] / "bn-check")
    assert summary["bn_check"] == 96
    assert summary["bn_kept"] == (summary["bn_check_acc_after"] >= summary["bn_check_acc_before"])
    model, _ = load_model(runs["root"] / "bn-check")
    trained = load_checkpoint(runs["root"] / "bn-check" / "checkpoint.pt")["model"]
    as_trained, _ = load_model(runs["root"] / "bn-check")
    as_trained.load_state_dict(trained)
    data = runs["data"]
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(0))
    images, labels = data.train.take(order[64:64 + 96])
    images = data.eval_pipeline(images, train=False)

    def accuracy(net):
        with torch.no_grad():
            return 100.0 * float((net.eval()(images).argmax(1) == labels).float().mean())

    assert accuracy(as_trained) == pytest.approx(summary["bn_check_acc_before"])
    saved_stats_changed = not torch.equal(model.state_dict()["stem.1.running_mean"],
                                          trained["stem.1.running_mean"])
    assert saved_stats_changed == summary["bn_kept"]
    expected = summary["bn_check_acc_after" if summary["bn_kept"] else "bn_check_acc_before"]
    assert accuracy(model) == pytest.approx(expected)


def test_bn_images_0_keeps_the_running_averages_of_training(runs, tmp_path):
    """model.pt holds the checkpoint's statistics and the summary has no re-estimation in it
    (the fixture's run, at the defaults, re-estimates with a check)."""
    assert "bn_kept" in runs["q"]
    config = qat_config()
    config = dataclasses.replace(config, quant=dataclasses.replace(config.quant, bn_images=0))
    summary = qat(config, runs["teacher"], runs["state"], tmp_path / "kept")
    assert "test_acc_before_bn" not in summary and "bn_kept" not in summary
    model, _ = load_model(tmp_path / "kept")
    trained = load_checkpoint(tmp_path / "kept" / "checkpoint.pt")["model"]
    assert torch.equal(model.state_dict()["stem.1.running_mean"], trained["stem.1.running_mean"])


def test_bn_subsets_beyond_the_training_set_are_cut_with_a_note(runs, tmp_path, capsys):
    """The defaults (12,800 + 10,000 images) run on small data sets too: half the training set
    is re-estimated from and the rest checks it, and the run's config records what ran."""
    config = qat_config()
    config = dataclasses.replace(config, quant=dataclasses.replace(
        config.quant, bn_images=10**7, bn_check=10**7))
    summary = qat(config, runs["teacher"], runs["state"], tmp_path / "cut")
    train_size = len(runs["data"].train)
    assert (summary["bn_images"], summary["bn_check"]) == (train_size // 2,
                                                           train_size - train_size // 2)
    assert (f"has {train_size} training images, so --bn-images 10000000 -> {train_size // 2}, "
            f"--bn-check 10000000 -> {train_size - train_size // 2}") in capsys.readouterr().out
    saved = load_yaml(tmp_path / "cut" / "config.yaml")
    assert saved["quant"]["bn_images"] == train_size // 2


def test_qat_refuses_quantized_source(runs):
    with pytest.raises(FlatqError, match="expected a full-precision run"):
        load_teacher(runs["root"] / "q")


class Interrupt(KeyboardInterrupt):
    """Stands for Ctrl-C in the middle of the second epoch."""


def test_resume_matches_uninterrupted_run(runs, tmp_path):
    config = qat_config()
    steps = config.train.max_steps_per_epoch

    def interrupt(step, objective, images, labels):
        if step == steps + 1:  # one optimizer step into epoch 2, after epoch 1's checkpoint
            raise Interrupt

    teacher, state = load_teacher(runs["root"] / "fp")
    with pytest.raises(Interrupt):
        qat(config, teacher, state, tmp_path / "q", callbacks=[interrupt])
    assert (tmp_path / "q" / "checkpoint.pt").is_file()
    assert not (tmp_path / "q" / "model.pt").exists()
    with pytest.raises(FlatqError, match="already holds a run"):
        qat(config, teacher, state, tmp_path / "q")

    teacher, state = load_teacher(runs["root"] / "fp")
    resumed = qat(config, teacher, state, tmp_path / "q", resume=True)
    reference = runs["q"]
    assert resumed["step"] == reference["step"] == 2 * steps
    assert resumed["test_acc"] == reference["test_acc"]
    for key in ("test_loss", "train_ce"):
        assert resumed[key] == pytest.approx(reference[key], abs=1e-6), key
    records = [json.loads(line) for line in (tmp_path / "q" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2]
    ours, theirs = load_model(tmp_path / "q")[0].state_dict(), \
        load_model(runs["root"] / "q")[0].state_dict()
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(ours[key], value, rtol=0, atol=1e-6, msg=key)


def test_resume_without_checkpoint_refused(tmp_path):
    config = RunConfig(model="resnet8", data=DATA, method=method_config("ce"),
                       train=train_config(epochs=1, lr=0.1))
    with pytest.raises(CheckpointError, match="no checkpoint.pt"):
        pretrain(config, tmp_path / "nothing", resume=True)


def test_eval_every_skips_test_evaluations_and_leaves_training_as_it_was(runs, tmp_path):
    """--eval-every 2 over 3 epochs evaluates after epochs 2 and 3 only; the weights end
    exactly where the every-epoch run's do (evaluation puts BatchNorm in eval mode and draws
    no random numbers)."""
    config = qat_config()
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=3))
    sparse = dataclasses.replace(config, train=dataclasses.replace(config.train, eval_every=2))
    teacher, state = load_teacher(runs["root"] / "fp")
    qat(config, teacher, state, tmp_path / "every")
    teacher, state = load_teacher(runs["root"] / "fp")
    summary = qat(sparse, teacher, state, tmp_path / "sparse")
    records = [json.loads(line) for line in (tmp_path / "sparse" / "metrics.jsonl").open()]
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert ["test_acc" in r for r in records] == [False, True, True]
    dense = [json.loads(line) for line in (tmp_path / "every" / "metrics.jsonl").open()]
    assert [r["test_acc"] for r in dense[1:]] == [r["test_acc"] for r in records[1:]]
    assert summary["test_acc"] == dense[-1]["test_acc"]
    ours, theirs = (load_model(tmp_path / name)[0].state_dict() for name in ("sparse", "every"))
    for key, value in theirs.items():
        assert torch.equal(ours[key], value) if isinstance(value, torch.Tensor) \
            else ours[key] == value, key


def test_channels_last_trains_the_channels_last_model_like_the_default_layout(runs, tmp_path):
    """FPQ (hooks on both models, SFP noise, CSD) and oscillation freezing with
    --channels-last: the student and the teacher copy run in NHWC layout, and the losses and
    the trained weights match the default layout's up to float rounding."""
    config = dataclasses.replace(qat_config(), method=method_config("fpq"))
    config = dataclasses.replace(config, train=dataclasses.replace(
        config.train, freeze_oscillations=0.05))
    nhwc = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                 channels_last=True))
    layouts = []

    def layout(step, objective, images, labels):
        for model in (objective.student, objective.teacher):
            convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
            layouts.append(all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
                           and not all(w.is_contiguous() for w in convs))   # 1x1: both

    teacher, state = load_teacher(runs["root"] / "fp")
    default = qat(config, teacher, state, tmp_path / "nchw")
    teacher, state = load_teacher(runs["root"] / "fp")
    summary = qat(nhwc, teacher, state, tmp_path / "nhwc", callbacks=[layout])
    assert layouts and all(layouts)
    for key in ("train_ce", "train_csd", "test_loss"):
        assert summary[key] == pytest.approx(default[key], rel=5e-3), key
    # 4-bit rounding turns float rounding into whole-step flips of a few activations: the
    # weights stay within 0.5% (relative norm), the BatchNorm statistics within a few percent;
    # a layout bug (channels mixed up) would be off by order one
    ours, theirs = (load_model(tmp_path / name)[0] for name in ("nhwc", "nchw"))
    buffers = dict(theirs.named_buffers())
    for key, value in theirs.state_dict().items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            change = (ours.state_dict()[key] - value).norm() / value.norm().clamp_min(1e-12)
            assert change < (0.03 if key in buffers else 0.005), key
