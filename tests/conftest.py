"""Fixtures several test files share: a small data set, a quantized model with settled
BatchNorm statistics, and a finished full-precision run to start QAT from.

Everything is built here on the fly (no data set needs to be installed). This folder is on
sys.path (pytest puts a rootdir conftest's folder there), so the helper modules beside this
file (cli_helpers, data_files, tiny_model_cli) import by name from the test folders below.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flatq import QuantConfig, calibrate, quantize_model
from flatq.cli import main
from flatq.data import ImageTensorDataset, load_dataset
from flatq.models import build_model

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


@pytest.fixture(scope="session")
def synthetic() -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """The synthetic data set (train, test), made in memory: no files needed."""
    return load_dataset("synthetic")


@pytest.fixture(scope="module")
def quantized_resnet8() -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor]:
    """(W4A4 resnet8, calibrated, with non-trivial BatchNorm statistics; its 16 images;
    their labels). Module-scoped: a test that changes the model must restore it."""
    torch.manual_seed(0)
    model = quantize_model(build_model("resnet8"), QuantConfig(w_bits=4, a_bits=4))
    images = torch.randn(16, 3, 32, 32)
    calibrate(model, [images])
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model.train()
        model(images * 2 + 0.5)
    return model, images, torch.arange(16) % 10


FP_RUN_FLAGS = ["--data", "synthetic", "--batch-size", "64", "--max-steps-per-epoch", "2",
                "--device", "cpu", "--no-progress", "--test-batch-size", "256"]


@pytest.fixture(scope="session")
def fp_run(tmp_path_factory) -> Path:
    """A finished full-precision resnet8 run on synthetic data (1 epoch of 2 steps): the
    teacher the QAT tests start from. Read it, never write into it."""
    out = tmp_path_factory.mktemp("fp_run") / "fp"
    assert main(["pretrain", "--model", "resnet8", "--epochs", "1", "--lr", "0.05",
                 *FP_RUN_FLAGS, "--out", str(out)]) == 0
    return out
