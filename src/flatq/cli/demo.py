"""`flatq demo`: the main job end to end on real data in about ten minutes on two CPU cores.

Trains a small full-precision ResNet on Fashion-MNIST, quantizes it (W4A4, LSQ by default, for
onnxruntime's integer kernels), fine-tunes it, prints both test accuracies side by side, then
exports both models to ONNX and prints their onnxruntime accuracy, latency and file size.
Both configurations and both run folders are checked before the first run starts, so a bad
option never costs an existing run.
"""

from __future__ import annotations

import argparse

from ..config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config, parse_bits
from ..methods import QAT_METHODS
from ..models import check_model_name
from ..train.run_folder import check_run_folder
from ..quant.target import TARGETS
from ..runs import load_teacher, pretrain, qat
from .deploy import deploy_runs, print_deployment


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pretrain + quantize + fine-tune on Fashion-MNIST",
                       description="Train a small FP ResNet on Fashion-MNIST, quantize it and "
                       "fine-tune it, then print FP and quantized test accuracy. Existing runs in "
                       "OUT/fp and OUT/WxAy are replaced only with --overwrite.")
    p.add_argument("--out", default="runs/demo",
                   help="folder for the two runs [default: runs/demo]")
    p.add_argument("--model", default="resnet8", help="architecture [default: resnet8]")
    p.add_argument("--bits", default="w4a4", help="quantized bit widths [default: w4a4]")
    p.add_argument("--method", default="task", choices=QAT_METHODS + ["lsq"],
                   help="QAT method (lsq: the former name of task) [default: task]")
    p.add_argument("--fp-epochs", type=int, default=4, help="full-precision epochs [default: 4]")
    p.add_argument("--qat-epochs", type=int, default=2, help="QAT epochs [default: 2]")
    p.add_argument("--data-root", default=None, help="Fashion-MNIST folder (default: FLATQ_DATA "
                   "or /usr/share/datasets/fashion-mnist)")
    p.add_argument("--target", default="onnxruntime", choices=TARGETS,
                   help="what QAT models (quant.target) [default: onnxruntime]")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto [default: auto]")
    p.add_argument("--overwrite", action="store_true", help="replace the runs an earlier demo "
                   "left in OUT/fp and OUT/WxAy")
    p.set_defaults(func=run_demo)


def run_demo(args: argparse.Namespace) -> None:
    w_bits, a_bits = parse_bits(args.bits)
    data = DataConfig(name="fashion_mnist", root=args.data_root)
    fp_config = RunConfig(model=args.model, data=data, method=method_config("ce"),
                          train=TrainConfig(epochs=args.fp_epochs, batch_size=128, lr=0.1,
                                            device=args.device))
    qat_config = RunConfig(model=args.model, data=data, method=method_config(args.method),
                           quant=QuantConfig(w_bits=w_bits, a_bits=a_bits, target=args.target),
                           train=TrainConfig(epochs=args.qat_epochs, batch_size=128, lr=0.01,
                                             device=args.device))
    fp_dir, qat_dir = f"{args.out}/fp", f"{args.out}/{args.bits}"
    check_model_name(args.model)
    for folder in (fp_dir, qat_dir):
        check_run_folder(folder, resume=False, overwrite=args.overwrite)
    print(f"[1/2] full-precision {args.model} on Fashion-MNIST, {args.fp_epochs} epochs")
    pretrain(fp_config, fp_dir, overwrite=args.overwrite)
    teacher, state = load_teacher(fp_dir)
    print(f"[2/2] {args.method} QAT at {args.bits}, {args.qat_epochs} epochs")
    summary = qat(qat_config, teacher, state, qat_dir, overwrite=args.overwrite)
    print()
    print(f"{'model':<22}{'test accuracy':>14}")
    print(f"{args.model + ' FP32':<22}{summary['fp_test_acc']:>13.2f}%")
    print(f"{args.model + ' ' + args.bits + ' ' + args.method:<22}{summary['test_acc']:>13.2f}%")
    print(f"runs written to {fp_dir} and {qat_dir}")
    print()
    print("[deploy] both models as ONNX in onnxruntime (CPU, one thread, batch 32)")
    print_deployment(deploy_runs(fp_dir, qat_dir, args.out))
