"""CR (consistency regularization): EMA teacher, consistency loss, unlabeled data, lambda
schedules, trainer plumbing (two views, training-set split), resume and the CLI."""

import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from data_files import write_fashion_mnist
from flatq.cli import main
from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, load_yaml
from flatq.data import BatchPipeline, ImageTensorDataset, load_fashion_mnist, make_synthetic
from flatq.errors import CheckpointError, ConfigError, DataError
from flatq.methods import CR, CRConfig, build_objective
from flatq.methods.cr import SCHEDULES, consistency_weight
from flatq.methods.ema import EMATeacher
from flatq.data.unlabeled import draw_unlabeled, parse_unlabeled, split_training_set
from flatq.quant import calibrate, quantize_model
from flatq.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flatq.train.loop import Trainer

PIPELINE = BatchPipeline((0.5,), (0.22,), crop_padding=1, flip=True)
EVAL_PIPELINE = BatchPipeline((0.5,), (0.22,))


def tiny_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))


def tiny_student(seed: int = 0, quantizer: str = "lsq") -> nn.Module:
    student = quantize_model(tiny_net(seed), QuantConfig(w_bits=2, a_bits=2, quantizer=quantizer))
    g = torch.Generator().manual_seed(seed)
    calibrate(student, [torch.randn(16, 3, 8, 8, generator=g)], torch.device("cpu"))
    return student


def batch(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def nudge(model: nn.Module, seed: int = 1, scale: float = 0.05) -> None:
    """Move every float parameter and BN statistic of `model` a little, as a step would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.add_(0.1)


# -- EMA teacher ------------------------------------------------------------------------------

@pytest.mark.parametrize("quantizer", ["lsq", "lsq+", "minmax"])
def test_ema_update_is_exactly_decay_teacher_plus_rest_student(quantizer):
    student = tiny_student(quantizer=quantizer)
    ema = EMATeacher(student, decay=0.9)
    nudge(student)
    before = {k: v.clone() for k, v in ema.model.named_parameters()}
    ema.update(student)
    for name, s in student.named_parameters():
        expected = 0.9 * before[name] + (1 - 0.9) * s.detach()
        assert torch.equal(dict(ema.model.named_parameters())[name], expected), name
        assert not torch.equal(expected, s), name  # the average is not a plain copy
    for (name, t), s in zip(ema.model.named_buffers(), student.buffers()):
        assert torch.equal(t, s), name  # buffers (BN stats, zero points, ranges) copied


def test_averaged_teacher_batchnorm_averages_running_statistics_like_weights():
    student = tiny_student()
    ema = EMATeacher(student, decay=0.9, batchnorm="averaged")
    nudge(student)
    before = [m.running_mean.clone() for m in ema.model.modules() if isinstance(m, nn.BatchNorm2d)]
    ema.update(student)
    after = [m.running_mean for m in ema.model.modules() if isinstance(m, nn.BatchNorm2d)]
    now = [m.running_mean for m in student.modules() if isinstance(m, nn.BatchNorm2d)]
    for t0, t1, s in zip(before, after, now, strict=True):
        assert torch.allclose(t1, 0.9 * t0 + 0.1 * s, atol=1e-7)
        assert not torch.allclose(t1, s)


def test_batch_teacher_batchnorm_normalizes_with_batch_statistics_and_keeps_the_running_ones():
    student = tiny_net()                 # float: its train-mode output varies per image
    with torch.no_grad():
        student(batch(16, seed=3))       # running statistics that differ from a batch's
    ema = EMATeacher(student, decay=0.9, batchnorm="batch")
    x = batch(16)
    reference = tiny_net()               # the same weights: BN in train mode, a plain forward
    reference.eval()
    for m in reference.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.train()
    stats = [m.running_var.clone() for m in ema.model.modules() if isinstance(m, nn.BatchNorm2d)]
    ema.model.eval()                     # whoever set the mode, the teacher's call decides it
    with torch.no_grad():
        assert torch.allclose(ema(x), reference(x), atol=1e-5)
        assert ema(x).std(0).amax() > 1e-3           # the images are told apart
        assert not torch.allclose(ema(x), student.eval()(x), atol=1e-3)
    for before, m in zip(stats, (m for m in ema.model.modules() if isinstance(m, nn.BatchNorm2d))):
        assert torch.equal(before, m.running_var)


def test_unknown_teacher_batchnorm_mode_is_refused():
    with pytest.raises(ConfigError, match="teacher_batchnorm"):
        CRConfig(teacher_batchnorm="frozen").validate()


def test_ema_teacher_is_a_frozen_copy_in_eval_mode():
    student = tiny_student()
    objective = CR(student, config=CRConfig())
    assert objective.ema.model is not student
    assert not objective.ema.model.training
    assert all(not p.requires_grad for p in objective.ema.model.parameters())
    for (n, t), s in zip(objective.ema.model.state_dict().items(), student.state_dict().values()):
        if isinstance(t, torch.Tensor):
            assert torch.equal(t, s), n
    objective.train()
    assert student.training and not objective.ema.model.training


# -- consistency term -------------------------------------------------------------------------

@pytest.mark.parametrize("teacher_batchnorm", ["copied", "averaged"])
def test_consistency_zero_for_identical_views_and_networks_positive_otherwise(teacher_batchnorm):
    # (batch statistics: test_batch_teacher_batchnorm_... above; this tiny net's train-mode
    # output does not depend on the image, so it cannot tell views apart)
    student = tiny_student()
    objective = CR(student, config=CRConfig(schedule="constant",
                                            teacher_batchnorm=teacher_batchnorm))
    objective.train(False)  # student in eval mode: the same function as its fresh EMA copy
    x = batch()
    labels = torch.arange(8) % 10
    assert objective.losses(x, labels, teacher_images=x)["cr"].item() == 0.0
    assert objective.losses(x, labels, teacher_images=batch(seed=5))["cr"].item() > 1e-6
    nudge(student)
    assert objective.losses(x, labels, teacher_images=x)["cr"].item() > 1e-6


def test_consistency_matches_tau_squared_kl_and_its_gradient_reaches_only_the_student():
    student = tiny_student()
    objective = CR(student, config=CRConfig(schedule="constant", lambda_max=0.7,
                                            temperature=2.0))
    objective.train()
    nudge(objective.ema.model, scale=0.5)
    x1, x2 = batch(seed=1), batch(seed=2)
    cr = objective.losses(x2, torch.zeros(8, dtype=torch.long), teacher_images=x1)["cr"]
    with torch.no_grad():  # reference in float64: KL(teacher || student) at temperature 2
        p_t = torch.softmax(objective.ema.model(x1).double() / 2.0, 1)
        p_s = torch.softmax(student(x2).double() / 2.0, 1)
    reference = 0.7 * 4.0 * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    assert reference > 0.01
    torch.testing.assert_close(cr.double(), reference, rtol=1e-4, atol=0.0)
    cr.backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in objective.ema.model.parameters())


def test_unlabeled_images_enter_the_loss_only_through_the_consistency_term():
    x, labels = batch(seed=1), torch.arange(8) % 10
    unlabeled_a, unlabeled_b = batch(12, seed=2), batch(12, seed=3) * 3
    teacher_x = batch(seed=4)

    def run(unlabeled, lambda_max):
        student = tiny_student()
        objective = CR(student, config=CRConfig(schedule="constant", lambda_max=lambda_max))
        objective.train()  # train mode: BatchNorm uses batch statistics
        nudge(objective.ema.model)
        out = objective.losses(x, labels, teacher_images=torch.cat([teacher_x, unlabeled]),
                               unlabeled_images=unlabeled)
        sum(out.values()).backward()
        plain = nn.functional.cross_entropy(student(x), labels)
        return out, plain, [p.grad.clone() for p in student.parameters()]

    (a, plain, grads_a), (b, _, grads_b) = run(unlabeled_a, 0.0), run(unlabeled_b, 0.0)
    assert torch.equal(a["ce"], b["ce"]) and torch.equal(a["ce"], plain)  # CE: labeled only
    assert torch.equal(sum(a.values()), sum(b.values()))
    assert all(torch.equal(ga, gb) for ga, gb in zip(grads_a, grads_b))
    (c, _, _), (d, _, _) = run(unlabeled_a, 1.0), run(unlabeled_b, 1.0)
    assert torch.equal(c["ce"], d["ce"])
    assert not torch.allclose(c["cr"], d["cr"])


def test_teacher_and_student_batches_must_match():
    objective = CR(tiny_student(), config=CRConfig())
    with pytest.raises(ValueError, match="teacher sees 4 images, the student 8"):
        objective.losses(batch(), torch.zeros(8, dtype=torch.long), teacher_images=batch(4))


# -- schedules --------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule,progress,expected", [
    ("constant", 0.0, 2.0), ("constant", 0.5, 2.0),
    ("linear", 0.0, 0.0), ("linear", 0.15, 1.0), ("linear", 0.3, 2.0), ("linear", 0.9, 2.0),
    ("sigmoid", 0.0, 2.0 * math.exp(-5.0)), ("sigmoid", 0.15, 2.0 * math.exp(-1.25)),
    ("sigmoid", 0.3, 2.0), ("sigmoid", 1.0, 2.0),
    ("cosine", 0.0, 0.0), ("cosine", 0.075, 1.0 - math.cos(math.pi / 4)),
    ("cosine", 0.15, 1.0), ("cosine", 0.6, 2.0),
])
def test_schedule_closed_forms(schedule, progress, expected):
    assert consistency_weight(schedule, progress, 0.3, 2.0) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_schedule_ends_at_lambda_max_without_ramp_or_progress(schedule):
    assert consistency_weight(schedule, None, 0.3, 2.0) == 2.0
    assert consistency_weight(schedule, 0.0, 0.0, 2.0) == 2.0


# -- unlabeled data ---------------------------------------------------------------------------

def test_unlabeled_spec_parsing_and_bad_values():
    assert parse_unlabeled("none").kind == "none"
    assert parse_unlabeled("split:0.25").fraction == 0.25
    assert parse_unlabeled("/data/cifar").path == "/data/cifar"
    for bad in ("split:1.5", "split:0", "split:abc"):
        with pytest.raises(ConfigError, match="split:F with 0 < F < 1"):
            CRConfig(unlabeled=bad)
    with pytest.raises(DataError, match="existing folder"):
        CR(tiny_student(), config=CRConfig(unlabeled="/no/such/folder")).training_set(
            make_synthetic(train_size=20, test_size=4, size=8)[0])


def test_split_holds_out_unlabeled_images_and_matches_labeled_fraction():
    train = make_synthetic(train_size=40, test_size=4, size=8)[0]
    labeled, unlabeled = split_training_set(train, 0.25, 1.0)
    assert len(labeled) == 30 and len(unlabeled) == 10
    rows = {tuple(img.flatten().tolist()) for img in train.images}
    assert len(rows) == 40  # synthetic images are distinct, so sets of rows identify images
    seen = {tuple(img.flatten().tolist()) for img in labeled.images}
    held = {tuple(img.flatten().tolist()) for img in unlabeled}
    assert seen | held == rows and not seen & held
    # The control without unlabeled data trains on the very same labeled images.
    half, none = split_training_set(train, 0.5, 1.0)[0], split_training_set(train, 0.0, 0.5)
    assert torch.equal(half.images, none[0].images) and none[1] is None
    assert torch.equal(half.labels, none[0].labels)
    with pytest.raises(DataError, match="too small"):
        split_training_set(train, 0.5, 0.01)


def test_draw_unlabeled_is_reproducible_from_the_generator():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)
    a = draw_unlabeled(images, 7, torch.Generator().manual_seed(3))
    b = draw_unlabeled(images, 7, torch.Generator().manual_seed(3))
    assert a.shape == (7, 1, 1, 1) and torch.equal(a, b)


def test_prepare_gives_two_independent_views_and_unlabeled_views():
    train = make_synthetic(train_size=40, test_size=4, size=8)[0]
    objective = CR(tiny_student(), config=CRConfig(unlabeled="split:0.5", unlabeled_ratio=1.5))
    labeled = objective.training_set(train)
    raw, labels = labeled.images[:8], labeled.labels[:8]
    images, out_labels, extra = objective.prepare(raw, labels, PIPELINE,
                                                  torch.Generator().manual_seed(0))
    assert torch.equal(out_labels, labels) and images.shape == (8, 3, 8, 8)
    assert extra["unlabeled_images"].shape == (12, 3, 8, 8)
    assert extra["teacher_images"].shape == (20, 3, 8, 8)
    assert not torch.equal(images, extra["teacher_images"][:8])  # independent augmentation
    plain = CR(tiny_student(), config=CRConfig())
    _, _, extra = plain.prepare(raw, labels, PIPELINE, torch.Generator().manual_seed(0))
    assert set(extra) == {"teacher_images"}


def test_prepare_takes_the_views_an_image_folder_cropped():
    """(N, 2, C, H, W) from an image folder: view 0 to the student, view 1 to the teacher,
    each only normalized (the folder's train pipeline has no augmentation of its own)."""
    raw = torch.randint(0, 256, (4, 2, 3, 8, 8), dtype=torch.uint8,
                        generator=torch.Generator().manual_seed(0))
    images, _, extra = CR(tiny_student()).prepare(raw, torch.zeros(4, dtype=torch.long),
                                                  EVAL_PIPELINE)
    assert torch.equal(images, EVAL_PIPELINE(raw[:, 0], train=True))
    assert torch.equal(extra["teacher_images"], EVAL_PIPELINE(raw[:, 1], train=True))


def test_unlabeled_folder_loads_another_copy_of_the_data_set(tmp_path):
    write_fashion_mnist(tmp_path, 64, 8)
    full = load_fashion_mnist(tmp_path)[0]
    small = ImageTensorDataset(full.images[:32], full.labels[:32], 10, "fashion_mnist")
    objective = CR(tiny_student(), config=CRConfig(unlabeled=str(tmp_path)))
    assert objective.training_set(small) is small
    assert objective.unlabeled_images.shape == full.images.shape
    with pytest.raises(DataError, match="labeled training set itself"):
        objective.training_set(full)


# -- trainer: end to end, schedule plumbing, resume ------------------------------------------

def cr_config(epochs: int = 2) -> RunConfig:
    return RunConfig(model="tiny", data=DataConfig(name="synthetic"),
                     train=TrainConfig(epochs=epochs, batch_size=8, lr=0.05, device="cpu",
                                       progress=False, track_every=1),
                     quant=QuantConfig(w_bits=2, a_bits=2),
                     method=CRConfig(unlabeled="split:0.5", schedule="linear",
                                     ramp_fraction=0.5, ema_decay=0.9))


def make_trainer(run_dir, callbacks=()):
    train, test = make_synthetic(train_size=48, test_size=16, size=8)
    config = cr_config()
    objective = build_objective(config.method, tiny_student(), None)
    meta = {"model": "tiny", "quant": config.quant.to_dict()}
    run_dir.mkdir(parents=True, exist_ok=True)
    return Trainer(objective, train, test, PIPELINE, EVAL_PIPELINE, config, run_dir, meta,
                   list(callbacks), torch.device("cpu"))


class Stop(Exception):
    pass


def test_cr_trains_end_to_end_and_resumes_with_its_ema_teacher(tmp_path):
    def record(step, objective, images, labels):
        return {"progress": objective.progress, "weight": objective.weight()}

    full = make_trainer(tmp_path / "full", [record])
    assert len(full.train_set) == 24 and full.steps_per_epoch == 3  # half held out
    result = full.fit()
    assert math.isfinite(result["train_cr"]) and result["train_cr"] > 0
    rows = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text()
            .splitlines() if "weight" in line]
    assert [r["progress"] for r in rows] == [(r["step"] - 1) / 6 for r in rows]
    assert [r["weight"] for r in rows] == [consistency_weight("linear", (r["step"] - 1) / 6,
                                                              0.5, 1.0) for r in rows]
    start = tiny_student().state_dict()
    assert not torch.equal(full.objective.ema.state_dict()["0.weight"], start["0.weight"])

    def stop_in_epoch_two(step, objective, images, labels):
        if step == 4:
            raise Stop
    interrupted = make_trainer(tmp_path / "cut", [stop_in_epoch_two])
    with pytest.raises(Stop):
        interrupted.fit()
    saved = load_checkpoint(tmp_path / "cut", CHECKPOINT_NAME)
    assert saved["epoch"] == 1
    resumed = make_trainer(tmp_path / "cut")
    resumed.resume()
    teacher = resumed.objective.ema.state_dict()
    for key, value in saved["objective"]["ema_teacher"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(teacher[key], value), key
    assert not torch.equal(teacher["0.weight"], start["0.weight"])
    resumed.fit()
    final, reference = resumed.objective.ema.state_dict(), full.objective.ema.state_dict()
    for key, value in reference.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(final[key], value), key


def test_resume_refuses_a_checkpoint_without_cr_teacher():
    with pytest.raises(CheckpointError, match="no CR teacher"):
        CR(tiny_student(), config=CRConfig()).load_state_dict({})


# -- command line -----------------------------------------------------------------------------

def test_cli_qat_with_cr_and_held_out_unlabeled_split(tmp_path, capsys):
    fp, out = tmp_path / "fp", tmp_path / "cr"
    assert main(["pretrain", "--model", "resnet8", "--data", "synthetic", "--epochs", "1",
                 "--max-steps-per-epoch", "1", "--batch-size", "16", "--device", "cpu",
                 "--out", str(fp)]) == 0
    assert main(["qat", "--from", str(fp), "--method", "cr", "--bits", "w2a2", "--unlabeled",
                 "split:0.5", "--unlabeled-ratio", "0.5", "--epochs", "1",
                 "--max-steps-per-epoch", "2", "--batch-size", "16", "--calib-images", "16",
                 "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "cr" and summary["bits"] == "w2a2"
    assert summary["step"] == 2 and summary["train_cr"] >= 0
    state = load_checkpoint(out, CHECKPOINT_NAME)
    assert "ema_teacher" in state["objective"]
    assert state["config"]["method"]["unlabeled"] == "split:0.5"
    capsys.readouterr()
    assert main(["qat", "--from", str(fp), "--method", "cr", "--unlabeled", "split:2",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "split:F with 0 < F < 1" in capsys.readouterr().err


RECIPES = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*/*/*_cr*.yaml"))


def test_cr_recipes_parse_and_match_their_file_names():
    assert len(RECIPES) == 16
    for path in RECIPES:
        config = RunConfig.from_dict(load_yaml(path))
        assert config.method.name == "cr", path
        assert config.quant.bits == path.name.split("_")[0], path
        assert config.data.name == path.parent.parent.name, path
