"""`flatq demo`: the main job end to end on real data in about ten minutes on two CPU cores.

Trains a small full-precision ResNet on Fashion-MNIST, quantizes it (W2A4, for onnxruntime's
integer kernels) and fine-tunes it twice from the same FP model, with plain LSQ and with FPQ,
prints the test accuracies side by side, then exports the FP and the FPQ model to ONNX and
prints their onnxruntime accuracy, latency and file size.
Both configurations and both run folders are checked before the first run starts, so a bad
option never costs an existing run.
"""

from __future__ import annotations

import argparse

from ..config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config, parse_bits
from ..errors import ConfigError
from ..methods import QAT_METHODS
from ..models import check_model_name
from ..train.run_folder import check_run_folder
from ..quant.target import TARGETS
from ..runs import load_teacher, pretrain, qat
from ..runs.deploy import deploy_runs
from .deploy import print_deployment


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="pretrain + quantize + fine-tune on Fashion-MNIST",
                       description="Train a small FP ResNet on Fashion-MNIST, quantize it and "
                       "fine-tune it with each method, then print FP and quantized test accuracy "
                       "and deploy the last in onnxruntime. Existing runs in OUT/fp and "
                       "OUT/WxAy-METHOD are replaced only with --overwrite.")
    p.add_argument("--out", default="runs/demo",
                   help="folder for the two runs [default: runs/demo]")
    p.add_argument("--model", default="resnet8", help="architecture [default: resnet8]")
    p.add_argument("--bits", default="w2a4", help="quantized bit widths [default: w2a4]")
    p.add_argument("--methods", default="task,fpq", type=lambda s: s.split(","),
                   help="comma-separated QAT methods, each from the same FP model (task: plain "
                   f"LSQ; choices: {', '.join(QAT_METHODS)}) [default: task,fpq]")
    p.add_argument("--fp-epochs", type=int, default=4, help="full-precision epochs [default: 4]")
    p.add_argument("--qat-epochs", type=int, default=1,
                   help="QAT epochs of each method [default: 1]")
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
    unknown = [m for m in args.methods if m not in QAT_METHODS + ["lsq"]]
    if unknown or not args.methods:
        raise ConfigError(f"--methods: unknown {', '.join(unknown) or '(none given)'}; choose "
                          f"from {', '.join(QAT_METHODS)}")
    data = DataConfig(name="fashion_mnist", root=args.data_root)
    fp_config = RunConfig(model=args.model, data=data, method=method_config("ce"),
                          train=TrainConfig(epochs=args.fp_epochs, batch_size=128, lr=0.1,
                                            device=args.device))
    qat_configs = {method: RunConfig(
        model=args.model, data=data, method=method_config(method),
        quant=QuantConfig(w_bits=w_bits, a_bits=a_bits, target=args.target),
        train=TrainConfig(epochs=args.qat_epochs, batch_size=128, lr=0.01, device=args.device))
        for method in args.methods}
    fp_dir = f"{args.out}/fp"
    qat_dirs = {method: f"{args.out}/{args.bits}-{method}" for method in args.methods}
    check_model_name(args.model)
    for folder in (fp_dir, *qat_dirs.values()):
        check_run_folder(folder, resume=False, overwrite=args.overwrite)
    steps = len(args.methods) + 1
    print(f"[1/{steps}] full-precision {args.model} on Fashion-MNIST, {args.fp_epochs} epochs")
    pretrain(fp_config, fp_dir, overwrite=args.overwrite)
    teacher, state = load_teacher(fp_dir)
    summaries = {}
    for step, (method, config) in enumerate(qat_configs.items(), start=2):
        print(f"[{step}/{steps}] {method} QAT at {args.bits}, {args.qat_epochs} epoch(s)")
        summaries[method] = qat(config, teacher, state, qat_dirs[method],
                                overwrite=args.overwrite)
    print()
    print(f"{'model':<24}{'test accuracy':>14}{'dead channels':>15}")
    first = next(iter(summaries.values()))
    print(f"{args.model + ' FP32':<24}{first['fp_test_acc']:>13.2f}%")
    for method, summary in summaries.items():
        print(f"{args.model + ' ' + args.bits + ' ' + method:<24}{summary['test_acc']:>13.2f}%"
              f"{summary.get('dead_channels', 0):>15}")
    print(f"runs written to {fp_dir} and {', '.join(qat_dirs.values())}")
    print()
    last = args.methods[-1]
    print(f"[deploy] FP32 and {args.bits} {last} as ONNX in onnxruntime (CPU, one thread, "
          "batch 32)")
    print_deployment(deploy_runs(fp_dir, qat_dirs[last], args.out))
