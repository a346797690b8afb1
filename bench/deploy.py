"""Deployment speed and size: onnxruntime (CPU, one thread) on FP32, on its own static int8
quantizer and on flatq's exports for the onnxruntime target.

For ResNet-18 and MobileNetV2, in CIFAR form (flatq's registry, 32x32) and torchvision form
(224x224): latency at batch 1 and 32 of
  fp32     the float model exported by torch (BatchNorm folded by the exporter);
  ort_qdq  onnxruntime.quantization.quantize_static of that file (after its quant_pre_process):
           QDQ, per-channel int8
           weights, uint8 activations, min-max calibrated on the same 100 images;
  flatq_w8a8, flatq_w4a4  flatq.export of the model quantized with quant.target onnxruntime
           and calibrated on those images (no training: speed and size do not depend on it);
as ratios to fp32, file sizes, and how often predictions agree on held-out images (each
quantized model with the FP32 model; flatq's files also with their PyTorch model). The models
have random weights (no network here); agreement with FP32 measures quantization error only.

    .venv/bin/python bench/deploy.py            # ~5 min on two cores
Writes results/bench_deploy.json (README quotes it).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torchvision
from onnxruntime.quantization import (CalibrationDataReader, QuantFormat, QuantType,
                                      quantize_static)
from onnxruntime.quantization.shape_inference import quant_pre_process

from flatq import QuantConfig, calibrate, quantize_model
from flatq.export import OnnxModel, export_float_onnx, export_onnx
from flatq.models import build_model

from machine import machine_info, run_main, save_report

MODELS = {"resnet18_cifar": ("resnet18", 32), "mobilenet_v2_cifar": ("mobilenet_v2", 32),
          "resnet18_224": ("torchvision:resnet18", 224),
          "mobilenet_v2_224": ("torchvision:mobilenet_v2", 224)}
CALIBRATION_IMAGES = 100


def make_model(name: str) -> torch.nn.Module:
    """Random weights, in eval mode."""
    torch.manual_seed(0)
    if name.startswith("torchvision:"):
        model = getattr(torchvision.models, name.split(":")[1])(weights=None, num_classes=10)
    else:
        model = build_model(name, num_classes=10)
    return model.eval()


class _Reader(CalibrationDataReader):
    def __init__(self, images: np.ndarray) -> None:
        self.batches = iter([{"input": images[i:i + 10]} for i in range(0, len(images), 10)])

    def get_next(self):
        return next(self.batches, None)


def ort_quantize(fp32: Path, images: np.ndarray, path: Path) -> None:
    """onnxruntime's documented recipe: quant_pre_process (shape inference, graph
    optimization), then quantize_static."""
    prepared = path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantize_static(str(prepared), str(path), _Reader(images), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8)


def flatq_export(model: torch.nn.Module, bits: str, images: torch.Tensor,
                 path: Path) -> torch.nn.Module:
    qmodel = quantize_model(model, QuantConfig(w_bits=int(bits[1]), a_bits=int(bits[3]),
                                               target="onnxruntime"))
    calibrate(qmodel, images.split(10))
    # Random weights: near-tie roundings can spread past the export's check at 224 px, so the
    # check is left to the agreement columns below.
    export_onnx(qmodel.eval(), path, images[:1], verify=False)
    return qmodel


def bench_model(key: str, name: str, size: int, folder: Path, seconds: float,
                rounds: int) -> dict:
    model = make_model(name)
    gen = torch.Generator().manual_seed(1)
    calib = torch.randn(CALIBRATION_IMAGES, 3, size, size, generator=gen)
    held_out = torch.randn(64, 3, size, size, generator=gen)
    files = {"fp32": folder / f"{key}_fp32.onnx", "ort_qdq": folder / f"{key}_ort.onnx",
             "flatq_w8a8": folder / f"{key}_w8a8.onnx", "flatq_w4a4": folder / f"{key}_w4a4.onnx"}
    export_float_onnx(model, files["fp32"], calib[:1])
    ort_quantize(files["fp32"], calib.numpy(), files["ort_qdq"])
    torch_preds = {}
    for bits in ("w8a8", "w4a4"):
        qmodel = flatq_export(model, bits, calib, files[f"flatq_{bits}"])
        with torch.no_grad():
            torch_preds[f"flatq_{bits}"] = qmodel(held_out).argmax(1).numpy()
    sessions = {k: OnnxModel(p, threads=1) for k, p in files.items()}
    preds = {k: sess(held_out).argmax(1) for k, sess in sessions.items()}
    result: dict = {"input": size, "rounds": rounds, "variants": {}}
    for variant, path in files.items():
        row = {"bytes": path.stat().st_size, "size_ratio": path.stat().st_size
               / files["fp32"].stat().st_size,
               "agree_with_fp32": float((preds[variant] == preds["fp32"]).mean())}
        if variant in torch_preds:
            row["agree_with_pytorch"] = float((preds[variant] == torch_preds[variant]).mean())
        result["variants"][variant] = row
    for batch in (1, 32):
        images = torch.randn(batch, 3, size, size, generator=gen)
        per_round = interleaved_latencies(sessions, images, seconds, rounds)
        for variant, row in result["variants"].items():
            row[f"ms_batch{batch}"] = statistics.median(per_round[variant])
            row[f"ratio_batch{batch}"] = paired_ratio(per_round[variant], per_round["fp32"])
            if variant.startswith("flatq"):
                row[f"vs_ort_batch{batch}"] = paired_ratio(per_round[variant],
                                                           per_round["ort_qdq"])
    return result


def interleaved_latencies(sessions: dict[str, OnnxModel], images: torch.Tensor,
                          seconds: float, rounds: int) -> dict[str, list[float]]:
    """Each variant's latency in `rounds` rounds, the variants taking turns within a round
    (in a rotating order), so that load on a shared machine falls on all of them alike."""
    names = list(sessions)
    per_round: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            per_round[name].append(sessions[name].latency_ms(images, seconds / rounds))
    return per_round


def paired_ratio(latencies: list[float], reference: list[float]) -> float:
    """Median over rounds of the latency ratio measured within the same round."""
    return statistics.median(a / b for a, b in zip(latencies, reference))


def print_table(key: str, result: dict) -> None:
    print(f"\n{key} ({result['input']}x{result['input']}), onnxruntime, 1 thread")
    print(f"{'variant':<12}{'b1 ms':>9}{'x fp32':>8}{'x ort':>7}{'b32 ms':>10}{'x fp32':>8}"
          f"{'x ort':>7}{'bytes':>12}{'x fp32':>8}{'agree fp32':>11}{'agree torch':>12}")
    for variant, row in result["variants"].items():
        torch_agree = row.get("agree_with_pytorch")
        vs_ort = [f"{row[f'vs_ort_batch{b}']:.2f}" if f"vs_ort_batch{b}" in row else ""
                  for b in (1, 32)]
        print(f"{variant:<12}{row['ms_batch1']:>9.2f}{row['ratio_batch1']:>8.2f}{vs_ort[0]:>7}"
              f"{row['ms_batch32']:>10.1f}{row['ratio_batch32']:>8.2f}{vs_ort[1]:>7}"
              f"{row['bytes']:>12,}{row['size_ratio']:>8.3f}{row['agree_with_fp32']:>11.2f}"
              f"{'' if torch_agree is None else f'{torch_agree:.2f}':>12}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma separated")
    parser.add_argument("--seconds", type=float, default=2.0,
                        help="time per latency measurement (median of runs), split over rounds")
    parser.add_argument("--rounds", type=int, default=5,
                        help="interleaved rounds; ratios are medians of per-round ratios")
    parser.add_argument("--out", default="results/bench_deploy.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    info = machine_info()
    print(f"CPU: {info['cpu']} (int8 dot product: {', '.join(info['int8_dot_product']) or 'none'});"
          f" onnxruntime {ort.__version__}, one thread")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for key in args.models.split(","):
            name, size = MODELS[key]
            results[key] = bench_model(key, name, size, Path(folder), args.seconds,
                                       args.rounds)
            print_table(key, results[key])
    save_report({"machine": info, "onnxruntime": ort.__version__,
                 "calibration_images": CALIBRATION_IMAGES, "results": results}, args.out)


if __name__ == "__main__":
    run_main(main)
