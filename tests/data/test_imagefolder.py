"""`--data imagefolder`: a folder of PNGs written by the test trains end to end through the
CLI (CR too, on two crops per image), resumes mid-epoch to the run it would have been (with another number of DataLoader
workers), trains under a 2-rank gloo torchrun what one process trains, and every malformed
folder is refused in one line before anything is written. The CR run is watched: its loader must
hand CR two different crops of every image, (N, 2, C, H, W)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cli_helpers import assert_one_line, cli
from data_files import write_image_folder
from flatq.cli import main
from flatq.config import DataConfig, RunConfig, TrainConfig, method_config
from flatq.data import load_image_folder, make_loader
from flatq.methods.cr import CR
from flatq.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from flatq.runs import pretrain
from run_helpers import Interrupted, interrupt_at

HERE = Path(__file__).resolve().parents[1]   # tests/, where tiny_model_cli.py lives
FACTORY = "tiny_model_cli:TinyNoBN"     # tests/ is on sys.path (and PYTHONPATH below)
FOLDER = ["--data", "imagefolder", "--image-size", "16", "--device", "cpu", "--no-progress"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("images") / "data")


def _records(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    state = torch.load(run / "model.pt", weights_only=True)["model"]
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def test_folder_is_read_as_imagenet_transforms_of_uint8(folder):
    train, val = load_image_folder(folder, size=12, workers=0)
    assert (len(train), len(val), train.num_classes) == (24, 9, 3)
    assert train.classes == ["cat", "dog", "fox"]
    assert val.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    image, label = val[4]
    assert image.dtype == torch.uint8 and image.shape == (3, 12, 12) and label == 1
    train.set_epoch(0, seed=0)
    first = torch.get_rng_state()
    a, b = train[5][0], train[5][0]
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), first)  # caller's RNG kept
    train.set_epoch(1, seed=0)
    assert not torch.equal(train[5][0], a)                                  # a new crop


def test_two_views_are_two_crops_of_one_image(folder):
    """CR's views of an image folder: the first is the one-view crop, the second another one;
    evaluation images have no randomness, so their views coincide."""
    train, val = load_image_folder(folder, size=12, workers=0)
    two = train.with_views(2)
    train.set_epoch(2, seed=0), two.set_epoch(2, seed=0)
    views, label = two[5]
    assert views.dtype == torch.uint8 and views.shape == (2, 3, 12, 12) and label == train[5][1]
    assert torch.equal(views[0], train[5][0]) and not torch.equal(views[0], views[1])
    assert train.views == 1                                  # the original is left as it was
    pair = val.with_views(2)[4][0]
    assert torch.equal(pair[0], pair[1]) and torch.equal(pair[0], val[4][0])
    batch, _ = next(iter(make_loader(two, 4, range(8))))
    assert batch.shape == (4, 2, 3, 12, 12)


def test_workers_do_not_change_the_batches(folder):
    """Crops are seeded per (seed, epoch, image): 0 and 2 worker processes give the same."""
    batches = []
    for workers in (0, 2):
        train = load_image_folder(folder, size=12, workers=workers)[0]
        train.set_epoch(3, seed=1)
        loader = make_loader(train, 8, range(len(train)))
        batches.append(torch.cat([images for images, _ in loader]))
    assert torch.equal(*batches)


def test_folder_trains_and_quantizes_end_to_end(folder, tmp_path, capsys, monkeypatch):
    fp, q = tmp_path / "fp", tmp_path / "q"
    code, out, err = cli(["pretrain", "--model", "resnet8", *FOLDER, "--data-root", folder,
                          "--epochs", "2", "--batch-size", "8", "--lr", "0.1", "--workers", "2",
                          "--out", fp], capsys)
    assert code == 0, err
    assert [r["step"] for r in _records(fp)] == [3, 6]
    code, out, err = cli(["qat", "--from", fp, "--method", "fpq", "--bits", "w4a4", "--epochs",
                          "1", "--batch-size", "8", "--calib-images", "8", "--bn-images", "8",
                          "--device", "cpu", "--no-progress", "--out", q], capsys)
    assert code == 0, err
    assert json.loads((q / "summary.json").read_text())["kind"] == "qat"
    code, out, err = cli(["eval", q], capsys)
    assert code == 0 and "imagefolder" in out, (out, err)
    cr = ["qat", "--from", fp, "--method", "cr", "--bits", "w4a4", "--epochs", "1",
          "--batch-size", "8", "--calib-images", "8", "--bn-images", "8", "--device", "cpu",
          "--no-progress"]
    batches = []                           # what the trainer's loader hands CR, per step
    prepare = CR.prepare

    def recording_prepare(self, raw_images, *args, **kwargs):
        batches.append(raw_images.clone())
        return prepare(self, raw_images, *args, **kwargs)

    monkeypatch.setattr(CR, "prepare", recording_prepare)
    code, _, err = cli([*cr, "--out", tmp_path / "cr"], capsys)
    assert code == 0, err
    assert batches and all(b.dim() == 5 and b.shape[1] == 2 for b in batches)
    assert any(not torch.equal(b[:, 0], b[:, 1]) for b in batches)   # two crops, not one twice
    assert json.loads((tmp_path / "cr" / "summary.json").read_text())["kind"] == "qat"
    assert _records(tmp_path / "cr")[-1]["train_cr"] > 0    # the consistency term is on
    code, _, err = cli([*cr, "--unlabeled", "split:0.5", "--out", tmp_path / "cr-split"], capsys)
    assert_one_line(code, err, "qat", ["CR on an image folder", "method.unlabeled"])
    assert not (tmp_path / "cr-split").exists()


def test_resume_mid_epoch_ends_like_an_uninterrupted_run(folder, tmp_path):
    """Cut after step 5 (last checkpoint: step 4, one step into epoch 2) and resumed with 2
    workers where the whole run had none: the same records and weights, bit for bit."""
    def config(workers: int) -> RunConfig:
        train = TrainConfig(epochs=2, batch_size=8, lr=0.1, device="cpu", progress=False,
                            checkpoint_every_steps=1, track_every=1)
        data = DataConfig(name="imagefolder", root=str(folder), image_size=16, workers=workers)
        return RunConfig(model="resnet8", data=data, train=train, method=method_config("ce"))

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    pretrain(config(0), whole)
    with pytest.raises(Interrupted):
        pretrain(config(0), cut, callbacks=[interrupt_at(5)])
    saved = load_checkpoint(cut, CHECKPOINT_NAME)
    assert (saved["step"], saved["epoch"], saved["epoch_step"]) == (4, 1, 1)
    pretrain(config(2), cut, resume=True)
    assert _records(cut) == _records(whole)
    a, b = _weights(cut), _weights(whole)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_ranks_train_what_one_process_trains(folder, tmp_path):
    """BN-free model: the two ranks' half batches, with the crops each image gets whatever
    rank decodes it, make the one process's batch; the weights agree to float rounding."""
    args = ["pretrain", "--model", FACTORY, *FOLDER, "--data-root", str(folder), "--epochs",
            "2", "--batch-size", "8", "--lr", "0.5", "--workers", "1"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "flatq", *args, "--out",
                          str(tmp_path / "two")], env=ENV, text=True, capture_output=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5, msg=key)
    assert [r["step"] for r in _records(tmp_path / "two")] == [3, 6]


def test_imagenet_recipes_are_up_to_date_and_run_on_a_folder(folder, tmp_path, capsys):
    """The generated recipes match their generator; one runs (shortened, small images) with a
    local weights file as the teacher."""
    sys.path.insert(0, str(HERE.parent / "bench"))
    try:
        import make_imagenet_configs
    finally:
        sys.path.remove(str(HERE.parent / "bench"))
    assert make_imagenet_configs.main(["--check"]) == 0, capsys.readouterr().out
    from torchvision.models import resnet18
    weights = tmp_path / "resnet18.pth"
    torch.save(resnet18(num_classes=3).state_dict(), weights)
    recipe = HERE.parent / "configs" / "imagenet" / "resnet18" / "w2a4_fpq.yaml"
    code, out, err = cli(["qat", "--config", recipe, "--pretrained", weights, "--data-root",
                          folder, "--image-size", "32", "--epochs", "1", "--max-steps-per-epoch",
                          "1", "--batch-size", "8", "--workers", "0", "--calib-images", "8",
                          "--device", "cpu", "--no-progress", "--out", tmp_path / "q"], capsys)
    assert code == 0, err
    assert "torchvision:resnet18 w2a4 fpq" in out


def _broken(folder: Path, tmp_path: Path, case: str) -> Path:
    root = tmp_path / case
    if case == "missing folder":
        return root
    shutil.copytree(folder, root)
    if case == "no train":
        shutil.rmtree(root / "train")
    elif case == "no val":
        shutil.rmtree(root / "val")
    elif case == "no images":
        for path in root.glob("train/*/*.png"):
            path.rename(path.with_suffix(".txt"))
    elif case == "classes differ":
        (root / "val" / "fox").rename(root / "val" / "wolf")
    return root


@pytest.mark.parametrize("case, needles", [
    ("missing folder", ["not found", "DIR/train/CLASS"]),
    ("no train", ["no train/ folder"]),
    ("no val", ["no val/ folder"]),
    ("no images", ["has no images"]),
    ("classes differ", ["different classes", "only in train: fox", "only in val: wolf"]),
])
def test_malformed_folder_is_refused_in_one_line(folder, tmp_path, capsys, case, needles):
    root = _broken(folder, tmp_path, case)
    code, _, err = cli(["pretrain", "--model", "resnet8", *FOLDER, "--data-root", root,
                        "--out", tmp_path / "run"], capsys)
    assert_one_line(code, err, "pretrain", needles)
    assert not (tmp_path / "run").exists()


def test_image_that_cannot_be_decoded_is_one_line_from_a_worker(folder, tmp_path, capsys):
    root = _broken(folder, tmp_path, "corrupt")
    (root / "train" / "dog" / "3.png").write_bytes(b"not a png")
    code, _, err = cli(["pretrain", "--model", "resnet8", *FOLDER, "--data-root", root,
                        "--batch-size", "8", "--workers", "1", "--out", tmp_path / "run"],
                       capsys)
    assert_one_line(code, err, "pretrain", ["dog/3.png: cannot decode the image"])
