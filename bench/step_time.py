"""Time one training step: FP (CE), LSQ QAT (w4a4) and FPQ (w4a4, teacher + CSD + SFP p=0.1).

Targets (issues 3 and 10): LSQ step <= 1.3x the FP step, FPQ step <= 1.7x. The three steps
run interleaved (FP, LSQ, FPQ, then LSQ, FPQ, FP, ...: the order rotates each round) after a
warm-up, so that load from other processes hits them alike; the median of N steps is reported
with the load average before and after. Peak memory: on CUDA, max_memory_allocated
over the timed steps; on CPU, each setting runs in a fresh child process and we report the
peak resident set size of its first two training steps (VmHWM, reset once the models are
built) and how far it rises above the resident size before them: the memory training needs
(activations, gradients, optimizer state) beyond the models. Host memory: like the `flatq`
command, the bench first has glibc keep freed memory for reuse (flatq.allocator);
`--glibc-malloc` measures with glibc's default instead.

    .venv/bin/python bench/step_time.py                      # CPU, batch 32
    .venv/bin/python bench/step_time.py --device cuda --batch 256
    .venv/bin/python bench/step_time.py --models mobilenet_v2 --breakdown --no-memory

`--breakdown` adds two settings to the rotation that build FPQ up part by part: LSQ plus a
teacher forward whose output goes unused ("lsq+teacher") and FPQ without SFP ("fpq-sfp"), so
the differences of their ratios are the teacher's, CSD's and SFP's shares of the FPQ step.
`--channels-last` adds each method in channels-last layout (train.channels_last: the model
converted before quantization, as a run does) to the rotation, "lsq@nhwc" etc., and prints
their step times as ratios to the default layout's.
Writes results/bench_step_time.json (machine, settings, times, ratios, memory).
"""

from __future__ import annotations

import argparse
import os
import statistics
from pathlib import Path

import torch

from flatq.config import QuantConfig, TrainConfig
from flatq.methods import FPQ, FPQConfig, TaskObjective
from flatq.methods.base import Objective
from flatq.models import build_model
from flatq.quant import calibrate, quantize_model
from flatq.train.batchnorm import reestimate_batchnorm
from flatq.allocator import retain_freed_host_memory
from flatq.train.optim import build_optimizer

from machine import (machine_info, print_load, run_in_fresh_process, run_main, save_report,
                     status_mib, timed)

METHODS = ("fp", "lsq", "fpq")
PARTS = ("lsq+teacher", "fpq-sfp")
TARGETS = {"lsq": 1.3, "fpq": 1.7}
NUM_CLASSES = 10


class TeacherForward(TaskObjective):
    """LSQ's loss plus an unused teacher forward (no grad): what running the teacher costs."""

    needs_teacher = True

    def __init__(self, student: torch.nn.Module, teacher: torch.nn.Module) -> None:
        super().__init__(student, teacher)

    def losses(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            self.teacher(images)
        return super().losses(images, labels)


def build_objective(method: str, model_name: str, images: torch.Tensor,
                    device: torch.device) -> tuple[Objective, torch.optim.Optimizer]:
    """The objective and optimizer of one setting, ready for `objective.step`; a setting
    "METHOD@nhwc" is METHOD in channels-last layout."""
    method, _, layout = method.partition("@")
    torch.manual_seed(0)
    fp = build_model(model_name, num_classes=NUM_CLASSES, in_channels=3).to(
        device, memory_format=torch.channels_last if layout == "nhwc" else torch.preserve_format)
    # An untrained model gets the BatchNorm statistics of `images`, as a trained teacher has:
    # otherwise calibration (eval mode) sees the activations of BN's initial running stats,
    # far smaller than the training-mode ones, and the CSD gradient of the badly clipped
    # student overflows within a step on MobileNetV2.
    reestimate_batchnorm(fp, [images])
    if method == "fp":
        objective: Objective = TaskObjective(fp)
    else:
        student = quantize_model(fp, QuantConfig(w_bits=4, a_bits=4))
        calibrate(student, [images], device)
        objective = {"lsq": lambda: TaskObjective(student),
                     "lsq+teacher": lambda: TeacherForward(student, fp),
                     "fpq-sfp": lambda: FPQ(student, fp, FPQConfig(p=0.1, sfp=False)),
                     "fpq": lambda: FPQ(student, fp, FPQConfig(p=0.1))}[method]()
    objective.train()
    return objective, build_optimizer(objective.student, TrainConfig())


def timed_step(objective: Objective, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, device: torch.device) -> tuple[float, float, float, int]:
    """One step's wall-clock seconds, CPU seconds, kernel part of those and minor page faults
    (see machine.Timing)."""
    t = timed(objective.step, images, labels, optimizer, device=device)
    return t.wall, t.cpu, t.system, t.page_faults


def summarize(times: list[tuple[float, float, float, int]]) -> dict[str, float]:
    """Median, min and max wall-clock ms, median CPU and kernel ms and median page faults."""
    wall = [1e3 * step[0] for step in times]
    return {"median_ms": statistics.median(wall), "min_ms": min(wall), "max_ms": max(wall),
            "cpu_median_ms": statistics.median(1e3 * step[1] for step in times),
            "kernel_median_ms": statistics.median(1e3 * step[2] for step in times),
            "page_faults_median": statistics.median(step[3] for step in times)}


def batch(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(size, 3, 32, 32, generator=gen)
    labels = torch.randint(0, NUM_CLASSES, (size,), generator=gen)
    return images.to(device), labels.to(device)


def time_model(model_name: str, size: int, steps: int, warmup: int, device: torch.device,
               methods: tuple[str, ...] = METHODS) -> dict[str, dict]:
    """Median step time (ms) of each method, interleaved; CUDA peak memory per method."""
    images, labels = batch(size, device)
    runs = {m: build_objective(m, model_name, images, device) for m in methods}
    times: dict[str, list[tuple[float, float, float, int]]] = {m: [] for m in methods}
    for i in range(warmup + steps):
        turn = i % len(methods)
        for method in methods[turn:] + methods[:turn]:
            objective, optimizer = runs[method]
            elapsed = timed_step(objective, optimizer, images, labels, device)
            if i >= warmup:
                times[method].append(elapsed)
    out = {m: summarize(t) for m, t in times.items()}
    if device.type == "cuda":
        for method, (objective, optimizer) in runs.items():
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            timed_step(objective, optimizer, images, labels, device)
            peak = torch.cuda.max_memory_allocated(device)
            out[method]["memory"] = {"kind": "cuda max_memory_allocated",
                                     "peak_mib": peak / 2**20,
                                     "step_mib": (peak - base) / 2**20}
    return out


def _reset_peak_rss() -> None:
    """Restart VmHWM from the current RSS (Linux >= 4.0), so that the peak is this setting's
    and not the parent's: getrusage's ru_maxrss is inherited across fork and exec."""
    Path("/proc/self/clear_refs").write_text("5")


def _cpu_memory_child(model_name: str, method: str, size: int, threads: int, retain: bool,
                      queue) -> None:
    if retain:
        retain_freed_host_memory()
    torch.set_num_threads(threads)
    device = torch.device("cpu")
    images, labels = batch(size, device)
    objective, optimizer = build_objective(method, model_name, images, device)
    before = status_mib("VmRSS")  # models built, no step yet
    _reset_peak_rss()
    for _ in range(2):
        objective.step(images, labels, optimizer)
    peak = status_mib("VmHWM")
    queue.put({"kind": "peak RSS (VmHWM) of the first 2 steps in a fresh process", "peak_mib": peak,
               "step_mib": peak - before})


def cpu_memory(model_name: str, method: str, size: int, threads: int, retain: bool) -> dict:
    """Peak RSS of one setting's training steps, measured in its own process."""
    return run_in_fresh_process(_cpu_memory_child, model_name, method, size, threads, retain)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet18,mobilenet_v2")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--batch", type=int, default=None, help="batch size [CPU: 32, CUDA: 256]")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method first")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurement")
    parser.add_argument("--glibc-malloc", action="store_true",
                        help="keep glibc's default malloc instead of retaining freed host memory "
                        "as the flatq command does (flatq.allocator)")
    parser.add_argument("--breakdown", action="store_true",
                        help=f"also time {' and '.join(PARTS)}: FPQ's parts one by one")
    parser.add_argument("--channels-last", action="store_true",
                        help="also time each method in channels-last layout")
    parser.add_argument("--out", default="results/bench_step_time.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    retained = not args.glibc_malloc and retain_freed_host_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = args.batch or (256 if device.type == "cuda" else 32)
    report = {"machine": {**machine_info(), "device": str(device)},
              "loadavg_before": os.getloadavg(),
              "settings": {"batch": size, "steps": args.steps, "warmup": args.warmup,
                           "image": [3, 32, 32], "bits": "w4a4", "quantizer": "lsq",
                           "fpq": {"p": 0.1, "csd": True, "csd_weight": 1.0},
                           "optimizer": "SGD momentum 0.9, wd 5e-4 (flatq build_optimizer)",
                           "host_memory": ("freed memory retained (flatq.allocator)"
                                           if retained else "malloc as configured")},
              "targets": TARGETS, "models": {}}
    for name in args.models.split(","):
        timed = METHODS + PARTS if args.breakdown else METHODS
        if args.channels_last:
            timed += tuple(f"{m}@nhwc" for m in METHODS)
        result = time_model(name, size, args.steps, args.warmup, device, timed)
        if device.type == "cpu" and not args.no_memory:
            for method in METHODS:
                result[method]["memory"] = cpu_memory(name, method, size, torch.get_num_threads(),
                                                      retained)
        fp = result["fp"]["median_ms"]
        ratios = {m: result[m]["median_ms"] / fp for m in TARGETS}
        result["ratios"] = ratios
        result["cpu_time_ratios"] = {m: result[m]["cpu_median_ms"] / result["fp"]["cpu_median_ms"]
                                     for m in TARGETS}
        result["meets_targets"] = {m: ratios[m] <= TARGETS[m] for m in TARGETS}
        report["models"][name] = result
        print(f"{name} (batch {size}, {device}): " + "  ".join(
            f"{m} {result[m]['median_ms']:.1f} ms" for m in timed))
        for m in TARGETS:
            verdict = "ok" if ratios[m] <= TARGETS[m] else "MISSED"
            print(f"  {m.upper()}/FP = {ratios[m]:.2f}x (target <= {TARGETS[m]}x) {verdict}; "
                  f"by CPU time {result['cpu_time_ratios'][m]:.2f}x")
        if args.breakdown:
            steps = {m: result[m]["cpu_median_ms"] / result["fp"]["cpu_median_ms"]
                     for m in ("lsq",) + PARTS + ("fpq",)}
            result["breakdown_cpu_time"] = {
                "fake_quantization": steps["lsq"] - 1,
                "teacher": steps["lsq+teacher"] - steps["lsq"],
                "csd": steps["fpq-sfp"] - steps["lsq+teacher"],
                "sfp": steps["fpq"] - steps["fpq-sfp"]}
            print("  FPQ's parts, by CPU time, in FP steps: " + ", ".join(
                f"{part} {share:+.2f}" for part, share in result["breakdown_cpu_time"].items()))
        if args.channels_last:
            result["channels_last_ratios"] = {
                m: result[f"{m}@nhwc"]["cpu_median_ms"] / result[m]["cpu_median_ms"]
                for m in METHODS}
            print("  channels-last / default layout, by CPU time: " + ", ".join(
                f"{m} {r:.2f}x" for m, r in result["channels_last_ratios"].items()))
        print("  per step, kernel time (mostly page faults) and minor page faults: " + "; ".join(
            f"{m} {result[m]['kernel_median_ms']:.0f} ms, {result[m]['page_faults_median']:.0f}"
            for m in timed))
        for m in METHODS:
            mem = result[m].get("memory")
            if mem:
                print(f"  {m} memory: peak {mem['peak_mib']:.0f} MiB, steps add "
                      f"{mem['step_mib']:.0f} MiB ({mem['kind']})")
    report["loadavg_after"] = os.getloadavg()
    print_load(report)
    save_report(report, args.out)
    return report


if __name__ == "__main__":
    run_main(main)
