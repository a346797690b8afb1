"""A full-precision run and its quantized run side by side in onnxruntime: accuracy, latency
and file size of their ONNX exports (the end of `flatq demo`; `flatq.cli.deploy` prints it)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..export import OnnxModel, compare, export_float_onnx, export_onnx
from ..train.run_io import load_model, run_data

LATENCY_BATCH = 32


@dataclass(frozen=True)
class Deployed:
    """One exported model in onnxruntime."""

    name: str
    path: Path
    accuracy: float  # onnxruntime, whole test set
    latency_ms: float  # one thread, batch LATENCY_BATCH
    file_bytes: int


def deploy_runs(fp_dir: str, qat_dir: str, out: str) -> list[Deployed]:
    """Export the runs' models to OUT/fp32.onnx and OUT/<quantized run>.onnx (the quantized
    one checked by the export) and measure both in onnxruntime."""
    rows = []
    for run in (fp_dir, qat_dir):
        model, state = load_model(run)
        model = model.cpu()
        _, data = run_data(state, None)
        count = min(256, len(data.test))
        images = data.eval_pipeline(data.test.take(list(range(count)))[0], train=False)
        quantized = state["meta"].get("quant") is not None
        path = Path(out) / f"{Path(run).name if quantized else 'fp32'}.onnx"
        if quantized:
            size = export_onnx(model, path, images[:1], check_input=images).file_bytes
        else:
            size = export_float_onnx(model, path, images[:1])
        session = OnnxModel(path, threads=1)
        accuracy = compare(session, model, data.test, data.eval_pipeline).onnx_acc
        latency = session.latency_ms(images[:LATENCY_BATCH])
        name = state["meta"]["model"] + (" " + Path(run).name if quantized else " FP32")
        rows.append(Deployed(name, path, accuracy, latency, size))
    return rows
