"""Cost of the MEC-Quant term per training step (issue 8).

Measures, on a quantized model (default ResNet-18, w4a4 LSQ, batch 256):
  term: forward + backward of the MEC term alone (coding rate of the captured penultimate
        embedding, back-propagated to the embedding: the only extra work MEC adds, since the
        network's backward pass is shared with the cross-entropy),
  mec:  one whole QAT step with the MEC objective (forward, CE + MEC, backward, SGD update),
  lsq:  one whole QAT step with plain cross-entropy, for the step-time ratio mec / lsq.
The three run interleaved after a warm-up so that load from other processes hits them alike.
Such load only ever adds time, so the headline ratios use the fastest of the timed
repetitions (best of N); medians are reported too. The headline number is term / mec.

    .venv/bin/python bench/mec_cost.py                        # resnet18, batch 256
    .venv/bin/python bench/mec_cost.py --batch 64 --steps 3   # quicker on a small CPU
    .venv/bin/python bench/mec_cost.py --device cuda --experts 4

On 2 loaded CPU cores one ResNet-18 step at batch 256 takes 15 to 80 seconds, so even
--warmup 1 --steps 3 takes 5 to 15 minutes and the default (2 + 5 rounds of two steps each)
longer; use --batch to shorten it. Writes results/bench_mec.json (machine, settings, times, fraction).
"""

from __future__ import annotations

import argparse
import copy
import statistics

import torch

from flatq.config import QuantConfig, parse_bits
from flatq.methods import MEC, MECConfig, TaskObjective
from flatq.models import available_models, build_model
from flatq.quant import calibrate, quantize_model

from machine import machine_info, run_main, save_report, timed


def measure(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(0)
    w_bits, a_bits = parse_bits(args.bits)
    model = build_model(args.model, num_classes=10, in_channels=3)
    student = quantize_model(model, QuantConfig(w_bits=w_bits, a_bits=a_bits)).to(device)
    images = torch.randn(args.batch, 3, 32, 32, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    calibrate(student, [images[:100]], device)

    config = MECConfig(beta=1.0, order=args.order, experts=args.experts)
    mec = MEC(copy.deepcopy(student), config=config)
    lsq = TaskObjective(student)
    optimizers = {name: torch.optim.SGD(obj.student.parameters(), lr=1e-4, momentum=0.9)
                  for name, obj in (("mec", mec), ("lsq", lsq))}
    mec.train()
    lsq.train()
    with torch.no_grad():
        mec.student(images)
    (features,) = mec.features.take()
    embedding = features.detach().requires_grad_()

    def term() -> None:
        embedding.grad = None
        (-config.beta * mec.coding_rate(embedding)).backward()

    # The term is cheap: time it several times per round, so some timings escape the load.
    runs = {"lsq": (lambda: lsq.step(images, labels, optimizers["lsq"]), 1),
            "mec": (lambda: mec.step(images, labels, optimizers["mec"]), 1),
            "term": (term, args.term_repeats)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_ in range(args.warmup + args.steps):
        last = {}
        for name in names[round_ % 3:] + names[:round_ % 3]:  # rotate: no order bias
            fn, repeats = runs[name]
            seconds = [timed(fn, device=device).wall for _ in range(repeats)]
            last[name] = statistics.median(seconds)
            if round_ >= args.warmup:
                times[name].extend(seconds)
        kind = "warm-up" if round_ < args.warmup else "timed"
        print(f"round {round_ + 1}/{args.warmup + args.steps} ({kind}): "
              + ", ".join(f"{n} {last[n]:.4g}s" for n in names), flush=True)
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    return {
        "machine": machine_info(), "device": str(device),
        "settings": {"model": args.model, "batch": args.batch, "bits": args.bits,
                     "quantizer": "lsq", "order": args.order, "experts": args.experts,
                     "embedding_dim": embedding[0].numel(), "warmup": args.warmup,
                     "steps": args.steps, "term_repeats": args.term_repeats},
        "seconds": {"lsq_step": best["lsq"], "mec_step": best["mec"],
                    "mec_term_fwd_bwd": best["term"]},
        "median_seconds": {"lsq_step": median["lsq"], "mec_step": median["mec"],
                           "mec_term_fwd_bwd": median["term"]},
        "all_seconds": times,
        "mec_term_fraction_of_step": best["term"] / best["mec"],
        "mec_term_fraction_of_step_medians": median["term"] / median["mec"],
        "mec_step_over_lsq_step": best["mec"] / best["lsq"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18", choices=available_models())
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--bits", default="w4a4")
    parser.add_argument("--order", type=int, default=4)
    parser.add_argument("--experts", type=int, default=1)
    parser.add_argument("--steps", type=int, default=5, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--term-repeats", type=int, default=10,
                        help="timings of the MEC term per round")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="results/bench_mec.json")
    args = parser.parse_args()
    result = measure(args)
    save_report(result, args.out)
    s = result["seconds"]
    print(f"{args.model} batch {args.batch} {args.bits} on {result['device']}: "
          f"LSQ step {s['lsq_step']:.4g}s, MEC step {s['mec_step']:.4g}s, "
          f"MEC term fwd+bwd {s['mec_term_fwd_bwd'] * 1e3:.3g} ms")
    print(f"MEC term / MEC step = {result['mec_term_fraction_of_step']:.3%} (medians: "
          f"{result['mec_term_fraction_of_step_medians']:.3%}); "
          f"MEC step / LSQ step = {result['mec_step_over_lsq_step']:.3f}")


if __name__ == "__main__":
    run_main(main)
