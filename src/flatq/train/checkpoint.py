"""Checkpoints: written atomically, read with weights_only=True, checked before use.

A checkpoint is a plain dict of tensors and primitive values, so `torch.load(weights_only=True)`
reads it (no pickled code runs). It is written to a temporary file in the same folder and
renamed over the old one (flatq.atomic), so a crash mid-write never replaces a good checkpoint.
"""

from __future__ import annotations

import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from ..atomic import replace_atomically, write_error
from ..errors import CheckpointError

FORMAT = "flatq-checkpoint-v1"
CHECKPOINT_NAME = "checkpoint.pt"   # full training state, rewritten every epoch
MODEL_NAME = "model.pt"             # final weights and metadata of a finished run


def save_atomic(state: dict[str, Any], path: str | Path) -> None:
    """Write `state` to `path` so that readers see either the old or the new file, never half."""
    path = Path(path)
    try:
        replace_atomically(path, lambda handle: torch.save({"format": FORMAT, **state}, handle))
    except (OSError, RuntimeError) as exc:
        raise write_error(path, exc) from None


def state_fingerprint(state: dict[str, Any]) -> str:
    """A short hash of a state_dict's names and tensor bytes: the identity of a set of weights
    (a QAT run's teacher, the model an ONNX file was exported from), whatever file holds it."""
    digest = hashlib.sha256()
    for name in sorted(state):
        value = state[name]
        if isinstance(value, torch.Tensor):
            digest.update(name.encode())
            raw = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
            digest.update(raw.numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve(path: str | Path, name: str = MODEL_NAME) -> Path:
    """A run folder means its `name` file; a file path is taken as it is."""
    path = Path(path)
    if path.is_dir():
        candidate = path / name
        if not candidate.is_file() and name == MODEL_NAME and (path / CHECKPOINT_NAME).is_file():
            candidate = path / CHECKPOINT_NAME
        path = candidate
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _load_error_reason(exc: BaseException) -> str:
    """The first sentence of what went wrong in torch.load. For weights-only refusals that is
    the WeightsUnpickler's own error, not torch's preamble, which advises weights_only=False
    (running code from a file we just found corrupt or foreign)."""
    text = str(exc)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0].split(". ")[0] if lines else type(exc).__name__


def load_checkpoint(path: str | Path, name: str = MODEL_NAME) -> dict[str, Any]:
    """Read a flatq checkpoint; anything else (corrupt, foreign, truncated) is refused by name."""
    path = resolve(path, name)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError,
            OSError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: it is corrupt or not a PyTorch "
                              f"file ({_load_error_reason(exc)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a flatq checkpoint (no '{FORMAT}' marker)")
    return state
