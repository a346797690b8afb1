"""The analysis files `flatq analyze` writes and `flatq plot` draws, assembled for any caller.

One file per analysis: `{"kind": ..., <the analysis's settings>, "runs": [entry, ...]}`, an
entry per run with its label, path, model and bits beside the numbers. A library user makes
the same plottable file as the CLI with, e.g.:

    runs = open_runs(["runs/lsq", "runs/fpq"], device)
    entries = [hessian_entry(run, batches=4, batch_size=128) for run in runs]
    write_report(report("hessian", entries, params="weights"), "hessian.json")
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import ConfigError
from .features import PERCENTILES, feature_statistics
from .hessian import hessian_report
from .noise import output_variance
from .sources import Run, first_images, fixed_batches, open_run


def open_runs(paths: Sequence[str | Path], device: torch.device,
              labels: Sequence[str] | None = None,
              data_root: str | None = None) -> Iterator[Run]:
    """Open each run in turn (one model in memory at a time), labelled by `labels` or by
    its folder name.

    Raises:
        ConfigError: `labels` does not give one label per run.
        CheckpointError: a path holds no readable run.
    """
    labels = list(labels) if labels else [None] * len(paths)
    if len(labels) != len(paths):
        raise ConfigError(f"--labels gives {len(labels)} labels for {len(paths)} runs")
    for path, label in zip(paths, labels):
        yield open_run(path, device, data_root, label)


def _entry(run: Run) -> dict[str, Any]:
    return {"label": run.label, "path": str(run.path), "model": run.meta["model"],
            "bits": run.bits}


def hessian_entry(run: Run, batches: int = 4, batch_size: int = 128, params: str = "weights",
                  samples: int = 32, top_k: int = 3, iters: int = 100, tol: float = 1e-3,
                  seed: int = 0, progress: Callable | None = None) -> dict[str, Any]:
    """One run's entry of a hessian file: `hessian_report` on `batches` fixed training
    batches of `batch_size` images (no augmentation), drawn by `seed`."""
    device = next(run.model.parameters()).device
    fixed = fixed_batches(run.data.train, run.data.eval_pipeline, batches, batch_size, seed,
                          device)
    report_ = hessian_report(run.model, fixed, params, samples, top_k, iters, tol, seed,
                             progress)
    return {**_entry(run), **report_}


def noise_entry(run: Run, sigmas: Sequence[float], repeats: int = 10, images: int = 500,
                output: str = "logits", seed: int = 0) -> dict[str, Any]:
    """One run's entry of a noise file: `output_variance` on its first `images` test images."""
    device = next(run.model.parameters()).device
    x, labels = first_images(run.data.test, run.data.eval_pipeline, images, device)
    curve = output_variance(run.model, x, labels, list(sigmas), repeats, output, seed)
    return {**_entry(run), "images": len(x), "curve": curve}


def features_entry(run: Run, layer: str, images: int = 256, bins: int = 100) -> dict[str, Any]:
    """One run's entry of a features file: `feature_statistics` of `layer`'s output on its
    first `images` test images."""
    device = next(run.model.parameters()).device
    x, _ = first_images(run.data.test, run.data.eval_pipeline, images, device)
    return {**_entry(run), "images": len(x), **feature_statistics(run.model, layer, x, bins)}


def report(kind: str, entries: list[dict[str, Any]], **settings: Any) -> dict[str, Any]:
    """The file `flatq plot` draws: its kind, the analysis's settings and one entry per run.
    A features file also records the percentiles its entries hold."""
    if kind == "features":
        settings.setdefault("percentiles", list(PERCENTILES))
    return {"kind": kind, **settings, "runs": entries}


def write_report(result: dict[str, Any], path: str | Path) -> Path:
    """Write an analysis file as JSON (creating its folder).

    Raises:
        ConfigError: the file cannot be written.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
    except OSError as exc:
        raise ConfigError(f"--out {path}: cannot write ({exc.strerror})") from None
    return path
