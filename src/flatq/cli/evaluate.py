"""`flatq eval`: test accuracy of a finished run (full-precision or quantized)."""

from __future__ import annotations

import argparse
import json

from ..export import OnnxModel, compare
from ..train.checkpoint import state_fingerprint
from ..train.loop import evaluate, resolve_device
from ..train.run_io import load_model, run_data


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="test accuracy of a run",
                       description="Evaluate a run folder or model.pt on its data set's test "
                       "split.")
    p.add_argument("run", metavar="RUN", help="run folder or model.pt")
    p.add_argument("--data-root", default=None, help="where the data set lives, if not where "
                   "the run found it")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto [default: auto]")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--onnx", default=None, metavar="MODEL.onnx", help="also run this export "
                   "of the run in onnxruntime and compare it with the PyTorch model")
    p.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> None:
    model, state = load_model(args.run)
    data_cfg, data = run_data(state, args.data_root)
    device = resolve_device(args.device)
    result = evaluate(model.to(device), data.test, data.eval_pipeline, device)
    result = {"run": args.run, "model": state["meta"]["model"], "data": data_cfg.name,
              "bits": "fp32" if state["meta"]["quant"] is None else
              f"w{state['meta']['quant']['w_bits']}a{state['meta']['quant']['a_bits']}", **result}
    agreement = None
    if args.onnx:
        exported = OnnxModel(args.onnx)
        exported.check_exported_from(state_fingerprint(state["model"]), args.run)
        agreement = compare(exported, model, data.test, data.eval_pipeline)
        result["onnx"] = {"path": args.onnx, "acc": agreement.onnx_acc,
                          "differing": agreement.differing,
                          "max_abs_diff": agreement.max_abs_diff}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['model']} {result['bits']} on {result['data']}: test acc "
              f"{result['acc']:.2f}%  loss {result['loss']:.4f}")
        if agreement is not None:
            print(agreement.describe())
