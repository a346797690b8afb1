"""`flatq export`: a quantized run as ONNX (QDQ, integer weights) or as a packed integer file."""

from __future__ import annotations

import argparse

from ..export import EXPORT_FORMATS, STORAGE_CHOICES, ExportOptions, export_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="export a quantized run (ONNX or integer weights)",
                       description="Write a quantized run as ONNX with QuantizeLinear/"
                       "DequantizeLinear nodes and integer weights (checked in onnxruntime on "
                       "test images), or as an .npz of bit-packed integer weights with scales, "
                       "zero points, input grids and output points (flatq.export.load_integer "
                       "reads it back). Example: flatq export runs/q --format onnx -o q.onnx")
    p.add_argument("run", metavar="RUN", help="quantized run folder or model.pt")
    p.add_argument("--format", required=True, choices=list(EXPORT_FORMATS),
                   help="; ".join(f"{f.name}: {f.help}" for f in EXPORT_FORMATS.values()))
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


def run_export(args: argparse.Namespace) -> None:
    options = ExportOptions(storage=args.storage, check_images=args.check_images,
                            data_root=args.data_root)
    for line in export_run(args.run, args.format, args.output, options):
        print(line)
