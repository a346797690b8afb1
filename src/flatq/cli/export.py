"""`flatq export`: a quantized run as ONNX (QDQ, integer weights) or as a packed integer file."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..config import DataConfig
from ..errors import ConfigError
from ..export import (STORAGE_CHOICES, WEIGHTS_KEY, Agreement, OnnxModel, compare,
                      export_integer, export_onnx)
from ..train.checkpoint import state_fingerprint
from ..train.runs import DataBundle, load_model, prepare_data


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a quantized run (ONNX or integer weights)",
                       description="Write a quantized run as ONNX with QuantizeLinear/"
                       "DequantizeLinear nodes and integer weights (checked in onnxruntime on "
                       "test images), or as an .npz of bit-packed integer weights with scales "
                       "and zero points. Example: flatq export runs/q --format onnx -o q.onnx")
    p.add_argument("run", metavar="RUN", help="quantized run folder or model.pt")
    p.add_argument("--format", required=True, choices=("onnx", "int"),
                   help="onnx: QDQ graph for onnxruntime; int: packed integer weights (.npz)")
    p.add_argument("-o", "--output", required=True, metavar="PATH", help="file to write")
    p.add_argument("--storage", default="auto", choices=STORAGE_CHOICES,
                   help="ONNX element types of 2/4-bit tensors: narrow = INT2/UINT2 (opset 25) "
                   "and INT4/UINT4 (opset 21); int8 = int8/uint8 holding the narrow range "
                   "(opset 20); auto = narrow where the installed onnxruntime runs it "
                   "[default: auto]")
    p.add_argument("--check-images", type=int, default=256, metavar="N",
                   help="ONNX: the file is written only if onnxruntime agrees with PyTorch on "
                   "the first N test images (1 with 0), whose accuracies are then printed "
                   "unless N is 0 [default: 256]")
    p.add_argument("--data-root", default=None, help="where the data set lives, if not where "
                   "the run found it (ONNX: for the input shape and the check)")
    p.set_defaults(func=run_export)


def run_data(state: dict[str, Any], data_root: str | None) -> tuple[DataConfig, DataBundle]:
    """The data set a run was trained on, optionally found under another root."""
    data_cfg = DataConfig.from_dict(state["meta"]["data"])
    if data_root:
        data_cfg = DataConfig.from_dict({"root": data_root}, base=data_cfg)
    return data_cfg, prepare_data(data_cfg)


def describe_agreement(agreement: Agreement) -> str:
    """One line: both accuracies, differing predictions and the largest logit difference."""
    return (f"onnxruntime {agreement.onnx_acc:.2f}% vs PyTorch fake-quant "
            f"{agreement.torch_acc:.2f}% on {agreement.count} test images, "
            f"{agreement.differing} predictions differ, max |logit diff| "
            f"{agreement.max_abs_diff:.3g} (logits up to {agreement.max_abs_logit:.3g})")


SUFFIXES = {"onnx": ".onnx", "int": ".npz"}


def run_export(args: argparse.Namespace) -> None:
    suffix = SUFFIXES[args.format]
    if Path(args.output).suffix.lower() != suffix:
        raise ConfigError(f"-o {args.output}: --format {args.format} writes a {suffix} file; "
                          f"name the output *{suffix}")
    model, state = load_model(args.run)
    meta = state["meta"]
    if meta.get("quant") is None:
        raise ConfigError(f"{args.run} is a full-precision run; export needs a quantized one "
                          "(flatq qat)")
    model = model.cpu()
    if args.format == "int":
        written = export_integer(model, args.output, meta={
            k: meta[k] for k in ("model", "num_classes", "in_channels", "quant")})
        print(f"wrote {written.path}: {written.layers} quantized layers, {written.file_bytes:,} "
              f"bytes ({written.data_bytes:,} of tensors, the rest manifest and headers) vs "
              f"{written.fp32_bytes:,} bytes in FP32: {written.ratio:.1f}x smaller")
        return
    if args.check_images < 0:
        raise ConfigError(f"--check-images must be >= 0, got {args.check_images}")
    _, data = run_data(state, args.data_root)
    images = data.eval_pipeline(data.test.images[:max(args.check_images, 1)], train=False)
    written = export_onnx(model, args.output, images[:1], storage=args.storage,
                          metadata={WEIGHTS_KEY: state_fingerprint(state["model"])},
                          check_input=images)
    target = meta["quant"].get("target", "paper")
    print(f"wrote {written.path}: opset {written.opset}, {len(written.layers)} quantized layers "
          f"(target {target}); storage: {written.storage_summary()}")
    print(f"size: {written.size_summary()}")
    print(written.check.summary())
    if args.check_images:
        agreement = compare(OnnxModel(written.path), model, data.test, data.eval_pipeline,
                            limit=args.check_images)
        print(describe_agreement(agreement))
