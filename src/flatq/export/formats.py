"""Export formats by name: what `flatq export --format NAME` writes from a finished run.

A format is an `ExportFormat`: its name, the file suffix it writes, a line of help, and a
`write(model, state, output, options)` that writes the file and returns the lines to report.
`--format` offers exactly the registered names. Adding a format is its writer (in its own
module), its test and one `register_format(...)` line at the end of this file.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import ConfigError
from ..train.checkpoint import state_fingerprint
from ..train.run_io import load_model, run_data
from .packed import export_integer
from .onnx import export_onnx
from .runtime import WEIGHTS_KEY, OnnxModel, compare


@dataclass(frozen=True)
class ExportOptions:
    """What a writer may use beyond the model: the ONNX `storage` choice, how many test
    images to check the export on (0: none) and where the run's data set lives."""
    storage: str = "auto"
    check_images: int = 256
    data_root: str | None = None


Writer = Callable[[nn.Module, dict[str, Any], Path, ExportOptions], list[str]]


@dataclass(frozen=True)
class ExportFormat:
    name: str
    suffix: str
    help: str
    write: Writer


EXPORT_FORMATS: dict[str, ExportFormat] = {}


def register_format(fmt: ExportFormat) -> ExportFormat:
    """Make `fmt` choosable by its name (`flatq export --format NAME`, `export_run`)."""
    EXPORT_FORMATS[fmt.name] = fmt
    return fmt


def export_run(run: str | Path, format: str, output: str | Path,
               options: ExportOptions | None = None) -> list[str]:
    """Write the quantized run in `run` (a run folder or model.pt) as `format` to `output`.

    Args:
        run: a quantized run folder or its model.pt.
        format: a registered format name (`EXPORT_FORMATS`).
        output: the file to write; its suffix must be the format's.
        options: see `ExportOptions`.

    Returns:
        The lines that report what was written (and, for ONNX, how it agrees with PyTorch).

    Raises:
        ConfigError: an unknown format, a wrong suffix, a full-precision run, or a model the
            format cannot express.
        CheckpointError: `run` holds no readable run.
    """
    if format not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {format!r}; available: "
                          f"{', '.join(EXPORT_FORMATS)}")
    fmt, options = EXPORT_FORMATS[format], options or ExportOptions()
    if Path(output).suffix.lower() != fmt.suffix:
        raise ConfigError(f"-o {output}: --format {format} writes a {fmt.suffix} file; "
                          f"name the output *{fmt.suffix}")
    model, state = load_model(run)
    if state["meta"].get("quant") is None:
        raise ConfigError(f"{run} is a full-precision run; export needs a quantized one "
                          "(flatq qat)")
    return fmt.write(model.cpu(), state, Path(output), options)


def _write_integer(model: nn.Module, state: dict[str, Any], output: Path,
                   options: ExportOptions) -> list[str]:
    meta = state["meta"]
    written = export_integer(model, output, meta={
        k: meta[k] for k in ("model", "num_classes", "in_channels", "quant")})
    return [f"wrote {written.path}: {written.layers} quantized layers, "
            f"{written.file_bytes:,} bytes ({written.data_bytes:,} of tensors, the rest "
            f"manifest and headers) vs {written.fp32_bytes:,} bytes in FP32: "
            f"{written.ratio:.1f}x smaller"]


def _write_onnx(model: nn.Module, state: dict[str, Any], output: Path,
                options: ExportOptions) -> list[str]:
    if options.check_images < 0:
        raise ConfigError(f"--check-images must be >= 0, got {options.check_images}")
    _, data = run_data(state, options.data_root)
    count = min(max(options.check_images, 1), len(data.test))
    images = data.eval_pipeline(data.test.take(list(range(count)))[0], train=False)
    written = export_onnx(model, output, images[:1], storage=options.storage,
                          metadata={WEIGHTS_KEY: state_fingerprint(state["model"])},
                          check_input=images)
    target = state["meta"]["quant"].get("target", "paper")
    lines = [f"wrote {written.path}: opset {written.opset}, {len(written.layers)} quantized "
             f"layers (target {target}); storage: {written.storage_summary()}",
             f"size: {written.size_summary()}", written.check.summary()]
    if options.check_images:
        agreement = compare(OnnxModel(written.path), model, data.test, data.eval_pipeline,
                            limit=options.check_images)
        lines.append(agreement.describe())
    return lines


register_format(ExportFormat("onnx", ".onnx", "QDQ graph for onnxruntime", _write_onnx))
register_format(ExportFormat("int", ".npz", "packed integer weights (.npz)", _write_integer))
