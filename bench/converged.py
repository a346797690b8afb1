"""The converged grid on the Fashion-MNIST stand-in (issue: sound QAT), written down before it ran.

The pilot (README, bench/evidence.sh) fine-tuned for 200 steps; its differences between
methods were as large as float rounding moved single runs. This grid trains each QAT run until
LSQ plateaus, with flatq's defaults at the time it runs (each result stores its full config).

Model and data: ResNet-8 (CIFAR form, 78k parameters) on Fashion-MNIST padded to 32x32x3,
full test set (10,000 images), CPU, one thread per run.

FP model: one for all seeds (seed 0), batch 128, SGD lr 0.1 cosine, momentum 0.9, weight decay
5e-4, FP_EPOCHS full epochs. Plateau rule: the test accuracy at the end and at 80% of training
differ by less than 0.2 points (checked and reported, not assumed).

QAT: from that model, batch 128, lr 0.01 cosine, QAT_EPOCHS "epochs" of QAT_STEPS steps each
(each a fresh shuffle; evaluated after each), first and last layer 8 bits. Plateau rule as
above (LSQ must meet it, or the schedule is too short and the report says so). Every run also
reports its accuracy before BatchNorm re-estimation and its dead weight channels.

Cells (3 seeds each, seeds 0, 1, 2):
  W2A2 and W2A4: LSQ, KD, FPQ
  W2A4 only: +SFP (FPQ without CSD), +CSD (FPQ without SFP), FPQ with SFP before the input
  quantizer (the paper does not say which side of it; `after` is the default)
Runs are ordered seed-major within each stage so a stopped grid has whole seeds; finished runs
are skipped, so rerunning continues where it stopped. Several processes can share the work:
each claims the next run no live process holds (an fcntl lock on a file in
runs/converged/claims), so side-by-side workers stay busy until the last run:

    python bench/converged.py fp                       # the FP model (once)
    for k in 0 1; do python bench/converged.py qat & done; wait
    python bench/converged.py report                   # results/converged/*.{json,md}

The FP model's run files are kept in results/converged/fp/, so a fresh clone continues the
grid from the same model (`qat` uses runs/converged/fp when present, else that copy).

Added after the first 27 runs (issue 26, item 8: every method beside LSQ, same FP model, same
schedule): W2A2 cells for CR, MEC, SAM, LSQ+ (continuous offset, MSE initialization) and PACT
(DoReFa weights), each at flatq's defaults, 3 seeds; then, because LSQ+ came out ahead of
FPQ on seed 0 (90.89 vs 88.55), FPQ on LSQ+'s quantizer ("FPQ on LSQ+"). DNQ is not among them: it trains its own
FP model with noise and then quantizes after training (PTQ), so it has no QAT run here.

The long schedule (added when LSQ had not plateaued at 600 steps: its W2A2 runs gained 1.5-1.8
points from twice the steps, FPQ 0.7): the W2A2 LSQ / KD / FPQ cells at 20 x QAT_STEPS
= 1200 steps, everything else as above, in runs/converged/long and results/converged/long.
The three probes that had already run that schedule (LSQ seeds 0 and 1, FPQ seed 0) are its
first records:

    for k in 0 1; do python bench/converged.py qat --long & done; wait
    python bench/converged.py report --long

The longer schedule (added when LSQ had still gained 1.6 points from 600 to 1200 steps, FPQ
0.5, so that twice the steps again says whether FPQ's lead at W2A2 is speed of convergence):
the W2A2 LSQ and FPQ cells at 40 x QAT_STEPS = 2400 steps, everything else as above, in
runs/converged/longer and results/converged/longer (`qat --longer`, `report --longer`). KD is
left out to fit one session's CPU time (six runs of 20-45 CPU-minutes on two cores).

The sound schedule (added when the freezing probes had LSQ meet the plateau rule at 2400
steps, last fifth +0.06 / +0.19, and nothing shorter did): 40 x QAT_STEPS = 2400 steps with
iterative weight freezing (`--freeze-oscillations 0.005 --freeze-momentum 0.01`), W2A2 LSQ / KD /
FPQ and W2A4 LSQ / KD / FPQ / +SFP / +CSD, 3 seeds, everything else as above, in
runs/converged/sound and results/converged/sound (`qat --sound`, `report --sound`). W2A2 runs
first, then W2A4, seed-major within each width. The cell with SFP before the quantizer is left
out: the two sites did not differ at 600 steps (91.62 +- 0.10 after, 91.68 +- 0.08 before,
3 seeds; with freezing 91.79 both). The four probes that had already run this schedule (LSQ and
FPQ, W2A2, seeds 0 and 1) are its first records. It does not fit one session's CPU time
(about 20 runs of 20-45 CPU-minutes); it is staged across sessions like the grid above.

The one-session schedule (added because the sound grid took about 12 CPU-hours over three
sessions, the issue asks for one session's, about 6 CPU-hours on 2 cores): the sound schedule's
runs, cells and seeds, trained with `--channels-last` (oneDNN's NHWC convolutions: a step's
CPU time 0.76x for LSQ and 0.91x for FPQ on this CPU, measured by bench/step_time.py
--channels-last; numbers equal up to float rounding) and evaluated on the test
set every 8th of the 40 evaluation points (`--eval-every 8`; the sound grid spent about 40% of
an LSQ run evaluating; the plateau rule compares evaluations 4 and 5, i.e. steps 1920 and
2400, as before). Evaluation does not change training. Expected cost, written before the
runs: about 5.5 CPU-hours (LSQ about 11 CPU-minutes a run, FPQ about 16); the report's
measured figure replaces it.
Each record keeps its CPU seconds besides its wall seconds, so the total does not depend on
what else ran on the machine. In runs/converged/session and results/converged/session
(`qat --session`, `report --session`); its float rounding differs from the sound grid's, so
its runs are a second draw of the same grid, not a copy.

The FP model's plateau, by doubling (added when the FP rule above was found to have failed
unremarked, +1.51 points, and a 30-epoch FP model reached 93.41% against 92.60% at 15): under
cosine decay from scratch the last fifth always gains (the final decay), so the last-fifth rule
cannot pass for an FP model however long it trains. Rule, written before its 60-epoch run
finished: an FP model trained E epochs has plateaued if training 2E epochs, everything else
equal, changes the final test accuracy by less than 0.3 points (the 30-epoch run's last five
epochs spread 0.23 points, so a tighter bound would test noise). 15 -> 30 epochs: +0.81, fails.
30 -> 60: the run `flatq pretrain --model resnet8 --data fashion_mnist --image-size 32
--channels 3 --epochs 60 --batch-size 128 --lr 0.1 --seed 0 --device cpu --channels-last --out
runs/converged/fp-probes/fp60`, records in results/converged/fp-probes/fp60/. If 30 epochs
passes, the next grid starts from the 30-epoch model. (Result, added after the run: 93.68%,
+0.27 over 30 epochs; the rule holds, narrowly.)

The fp30-grid schedule (added with the doubling rule, before the 60-epoch FP run finished): the
session schedule unchanged (cells, seeds, 2400 steps, freezing, --channels-last,
--eval-every 8) from the 30-epoch FP model (93.41%, the probe above, trained with
--channels-last; `fp --fp30-grid` trains the same one, `qat --fp30-grid` finds it in
runs/converged/fp30 or results/converged/fp30). It is the grid item 3 asks for if the 60-epoch
run shows the 30-epoch model has plateaued; the report states the doubling rule's verdict
either way. LSQ's plateau is checked per run as before (the last fifth changes test accuracy by
less than 0.2 points) and, because a single pair of evaluations of a 2-bit model moves by tenths
(the session grid: +0.32 / +0.12 / +0.24 at W2A2), also on the mean of each width's three
seeds; the report gives both.

The fp30-lsq-long schedule (added, before any of its runs, when the fp30-grid's three LSQ W2A2
runs had gained +0.49 / +0.13 / +0.40 in their last fifth, mean +0.34: more than one
evaluation's noise explains, sd about 0.16 on a 3-seed mean of differences, see
bench/eval_noise.py): the fp30-grid's LSQ cells at twice the steps (80 x QAT_STEPS = 4800),
everything else unchanged, W2A2 and W2A4, seeds 0, 1, 2 (about 2 CPU-hours). Rules, written
before its runs: (a) the issue's last-fifth rule, per run and on each width's 3-seed mean; (b)
doubling, as for the FP model: LSQ's 2400 steps had plateaued at a width if 4800 steps change
its 3-seed mean final test accuracy (as trained) by less than 0.2 points. If (b) fails at
W2A2, the fp30-grid's W2A2 comparison is at a length where LSQ still gains, and the README says
so; whichever way it goes, both rules' outcomes are reported.

The fp30-w2a2-long schedule (added while the fp30-lsq-long runs trained, before any of them had
finished): the fp30-grid's W2A2 KD and FPQ cells at the same 4800 steps, everything else
unchanged, seeds 0, 1, 2, so that W2A2's comparison can be made at a length where LSQ's own
plateau is judged again, whatever fp30-lsq-long says of 2400 steps. Its report includes the
fp30-lsq-long's W2A2 LSQ runs (the same runs this schedule would train: same FP model, steps
and options), so LSQ is not trained twice. FPQ runs first (`qat --fp30-w2a2-long --cells
FPQ`), then KD; about 34 CPU-minutes an FPQ run and 23 a KD run (2.9 CPU-hours), so KD may land
in a later session. Rules, written before its runs: FPQ beats LSQ at W2A2 by more than the
seeds' spread if its lowest seed is above LSQ's highest, as trained and (reported beside it)
re-estimated; the fp30-grid's statement at 2400 steps stands at 4800 only if this holds; LSQ's
last fifth is judged per run and on the seed mean, as in fp30-lsq-long.
Both reports state rule (b) per cell against the fp30-grid (`doubling` lines; for FPQ and KD
too, as information: the rules above judge LSQ).

The fp30-lsq-longer schedule (added after fp30-lsq-long and FPQ's fp30-w2a2-long runs had
finished, KD's still training): LSQ's W2A2 runs had gained 0.80 points from 2400 to 4800 steps
and passed the last-fifth rule at 4800 only on the seed mean (+0.35 / -0.07 / +0.22, mean
+0.17), so whether 4800 steps is LSQ's plateau at W2A2 is judged the same way once more: the
W2A2 LSQ cell at 9600 steps (160 x QAT_STEPS), everything else unchanged, seeds 0, 1, 2, about
2 CPU-hours (`qat --fp30-lsq-longer`, `report --fp30-lsq-longer`). Rule, written before its
runs: 4800 steps had plateaued if 9600 change LSQ's 3-seed mean as trained by less than 0.2
points; then fp30-w2a2-long is the W2A2 comparison at a converged length. If not, LSQ's gain is
reported, and FPQ and KD would need the same length before W2A2 is judged.

The fp30-w2a2-longer schedule (added when two of fp30-lsq-longer's three runs had finished,
seed 0 +0.23 and seed 1 +0.52 over 4800 steps as trained, so that LSQ's mean cannot pass rule
(b) unless seed 2 falls by 0.15): the fp30-w2a2-long's KD and FPQ cells at 9600 steps, everything
else unchanged, seeds 0, 1, 2; its report borrows fp30-lsq-longer's LSQ runs. About 67
CPU-minutes an FPQ run and 52 a KD run (6 CPU-hours: more than one session; FPQ first, `qat
--fp30-w2a2-longer --cells FPQ`, then KD). Rules, written before its runs: as fp30-w2a2-long's
(FPQ beats LSQ, or KD, by more than the seeds' spread if its lowest seed is above the other's
highest, as trained, re-estimated beside it), and rule (b) per cell against fp30-w2a2-long.
What follows, written (after fp30-lsq-longer finished, before any FPQ or KD run at 9600 had)
so the next step does not depend on the outcome: if FPQ's lowest seed is not above LSQ's
highest at 9600 steps as trained, the README states that FPQ's W2A2 lead over LSQ does not
survive as the schedule lengthens toward LSQ's plateau (1.0 points at 2400, 0.35 at 4800, the
9600 value), and 19200 steps are not run (they could only ask whether LSQ passes FPQ); if it
is above, W2A2 is not called converged until a 19200-step schedule, written down before its
runs, shows LSQ's doubling rule passing or the lead holding there.

`probe` trains one run outside the grid with changed options (a BatchNorm policy, a longer
schedule, a method option, oscillation dampening or freezing) and keeps its record in results/converged/probes/NAME.json, e.g.

    python bench/converged.py probe --cell LSQ --bits w2a2 --seed 1 --bn-freeze 0.3 \
        --name lsq-w2a2-s1-freeze0.3
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import torch
import yaml

from flatq.config import DataConfig, QuantConfig, RunConfig, TrainConfig, method_config
from flatq.runs import load_teacher, pretrain, qat
from machine import machine_info, run_main, save_report

FP_EPOCHS = 15
QAT_EPOCHS, QAT_STEPS = 10, 60
BATCH = 128
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Schedule:
    """A longer QAT schedule over some of the cells: its own runs/ and results/ subfolder."""
    epochs: int                   # evaluations of QAT_STEPS steps
    cells: tuple[str, ...]
    widths: tuple[str, ...] = ("w2a2",)
    train: dict = field(default_factory=dict)   # TrainConfig options beyond the grid's
    fp_epochs: int = FP_EPOCHS                  # the FP model QAT starts from
    fp_channels_last: bool = False              # how that FP model was trained
    borrows: str | None = None   # a schedule whose runs of this one's widths its report shows
    doubles: str | None = None   # the schedule this one trains twice as long (doubling rule)

    def describe(self) -> str:
        extra = "".join(f", {k} {v}" for k, v in self.train.items())
        return (f"{self.epochs} x {QAT_STEPS} steps, {'/'.join(self.widths)}, "
                f"{'/'.join(self.cells)}{extra}, from the {self.fp_epochs}-epoch FP model")


# the session grid's training: oscillating weights frozen, NHWC convolutions, every 8th evaluation
SESSION_TRAIN = {"freeze_oscillations": 0.005, "freeze_momentum": 0.01, "channels_last": True,
                 "eval_every": 8}


def fp30_schedule(epochs: int, cells: tuple[str, ...], widths: tuple[str, ...],
                  **links: str) -> Schedule:
    """A schedule of the session grid's training from the plateaued 30-epoch FP model;
    `links`: borrows, doubles."""
    return Schedule(epochs, cells, widths, SESSION_TRAIN, fp_epochs=30, fp_channels_last=True,
                    **links)


SCHEDULES = {
    "long": Schedule(20, ("LSQ", "KD", "FPQ")),
    "longer": Schedule(40, ("LSQ", "FPQ")),
    "sound": Schedule(40, ("LSQ", "KD", "FPQ", "+SFP", "+CSD"), ("w2a2", "w2a4"),
                      {"freeze_oscillations": 0.005, "freeze_momentum": 0.01}),
    "session": Schedule(40, ("LSQ", "KD", "FPQ", "+SFP", "+CSD"), ("w2a2", "w2a4"),
                        SESSION_TRAIN),
    "fp30-grid": fp30_schedule(40, ("LSQ", "KD", "FPQ", "+SFP", "+CSD"), ("w2a2", "w2a4")),
    "fp30-lsq-long": fp30_schedule(80, ("LSQ",), ("w2a2", "w2a4"), doubles="fp30-grid"),
    "fp30-w2a2-long": fp30_schedule(80, ("KD", "FPQ"), ("w2a2",), borrows="fp30-lsq-long",
                                    doubles="fp30-grid"),
    "fp30-lsq-longer": fp30_schedule(160, ("LSQ",), ("w2a2",), doubles="fp30-lsq-long"),
    "fp30-w2a2-longer": fp30_schedule(160, ("KD", "FPQ"), ("w2a2",), borrows="fp30-lsq-longer",
                                      doubles="fp30-w2a2-long"),
}
# re-estimated after training, unconditionally (bn_check 0, as before --bn-check existed):
# the record keeps the accuracy before too, so bench/bn_selection.py can judge any policy
BN_IMAGES = 12800
# cell -> (bits, method, method options, quantization options)
CELLS = {
    "LSQ": (("w2a2", "w2a4"), "lsq", {}, {}),
    "KD": (("w2a2", "w2a4"), "kd", {}, {}),
    "FPQ": (("w2a2", "w2a4"), "fpq", {}, {}),
    "+SFP": (("w2a4",), "fpq", {"csd": False}, {}),
    "+CSD": (("w2a4",), "fpq", {"sfp": False}, {}),
    "FPQ, SFP before the quantizer": (("w2a4",), "fpq", {"sfp_site": "before"}, {}),
    # every other QAT method beside LSQ (issue 26, item 8), at flatq's defaults
    "CR": (("w2a2",), "cr", {}, {}),
    "MEC": (("w2a2",), "mec", {}, {}),
    "SAM": (("w2a2",), "sam", {}, {}),
    "LSQ+": (("w2a2",), "lsq", {}, {"quantizer": "lsq+", "lsqplus_offset": "continuous",
                                    "range_method": "mse"}),
    "PACT": (("w2a2",), "lsq", {}, {"quantizer": "pact", "pact_weights": "dorefa"}),
    # added when LSQ+ came out ahead of FPQ on seed 0: FPQ on LSQ+'s quantizer
    "FPQ on LSQ+": (("w2a2",), "fpq", {}, {"quantizer": "lsq+", "lsqplus_offset": "continuous",
                                          "range_method": "mse"}),
}
DATA = DataConfig(name="fashion_mnist", image_size=32, channels=3)


def plateau_change(accuracies: list[float]) -> float:
    """Test accuracy at the end minus at 80% of training (evaluations equally spaced)."""
    at = round(0.8 * len(accuracies)) - 1
    return accuracies[-1] - accuracies[at]


def epoch_accuracies(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r["test_acc"] for r in map(json.loads, lines) if "test_acc" in r]


def fp_name(epochs: int) -> str:
    """The FP model's folder under runs/converged and results/converged: `fp` for the grids'
    first FP model (FP_EPOCHS epochs), `fpE` for an E-epoch one."""
    return "fp" if epochs == FP_EPOCHS else f"fp{epochs}"


def train_fp(out: Path, results: Path, epochs: int = FP_EPOCHS,
             channels_last: bool = False) -> None:
    """Train the FP model (resuming a stopped run) and keep its finished run files in
    results/, so a later session continues the grid from the same model."""
    config = RunConfig(model="resnet8", data=DATA, method=method_config("ce"),
                       train=TrainConfig(epochs=epochs, batch_size=BATCH, lr=0.1, seed=0,
                                         device="cpu", progress=False,
                                         channels_last=channels_last))
    name = fp_name(epochs)
    if not (out / name / "model.pt").is_file():
        pretrain(config, out / name, resume=(out / name / "checkpoint.pt").is_file())
    (results / name).mkdir(parents=True, exist_ok=True)
    for file in ("model.pt", "config.yaml", "metrics.jsonl", "summary.json"):
        shutil.copyfile(out / name / file, results / name / file)


def fp_folder(out: Path, results: Path, epochs: int = FP_EPOCHS) -> Path:
    """The FP run to start QAT from: this machine's, else the one kept in results/."""
    name = fp_name(epochs)
    return out / name if (out / name / "model.pt").is_file() else results / name


def fp_doubled(results: Path, epochs: int) -> Path | None:
    """The run files of the same FP model trained twice as long (the FP plateau rule's
    comparison), kept as a grid's FP model or as a probe; None if neither was trained."""
    for folder in (results / fp_name(2 * epochs), results / "fp-probes" / f"fp{2 * epochs}"):
        if (folder / "metrics.jsonl").is_file():
            return folder
    return None


def qat_runs() -> list[tuple[str, str, int]]:
    """(cell, bits, seed) of every QAT run, seed-major."""
    return [(cell, bits, seed) for seed in SEEDS
            for cell, (widths, *_) in CELLS.items() for bits in widths]


def qat_config(cell: str, bits: str, seed: int, method_options: dict | None = None,
               epochs: int = QAT_EPOCHS, **train_options) -> RunConfig:
    """The run of `cell` at `bits` and `seed`; a probe changes method or training options."""
    _, method, options, quant = CELLS[cell]
    return RunConfig(model="resnet8", data=DATA,
                     method=method_config(method, {**options, **(method_options or {})}),
                     quant=QuantConfig(w_bits=int(bits[1]), a_bits=int(bits[3]),
                                       bn_images=BN_IMAGES, bn_check=0, **quant),
                     train=TrainConfig(epochs=epochs, batch_size=BATCH, lr=0.01, seed=seed,
                                       device="cpu", progress=False,
                                       max_steps_per_epoch=QAT_STEPS, **train_options))


def run_folder(out: Path, cell: str, bits: str, seed: int) -> Path:
    slug = cell.lower().replace("+", "plus-").replace(",", "").replace(" ", "-").strip("-")
    return out / bits / slug / f"seed{seed}"


def claim(lock_file: Path) -> IO | None:
    """An open, locked `lock_file` if no other live process holds it, else None. The kernel
    drops the lock when its process ends, however it ends, so a stopped worker's run is free."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    handle = open(lock_file, "a")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return handle
    except BlockingIOError:
        handle.close()
        return None


def train_qat(out: Path, results: Path, cells: list[str] | None = None,
              schedule: str | None = None) -> None:
    """Train the runs not yet recorded and not held by another live worker (of `cells` only,
    if given; the cells of `schedule`, a key of SCHEDULES, if given)."""
    plan = SCHEDULES.get(schedule)
    teacher, state = load_teacher(fp_folder(out, results, plan.fp_epochs if plan else FP_EPOCHS))
    runs = [run for run in qat_runs() if cells is None or run[0] in cells]
    epochs, train_options = QAT_EPOCHS, {}
    if plan:
        epochs, train_options = plan.epochs, plan.train
        runs = sorted((run for run in runs if run[0] in plan.cells and run[1] in plan.widths),
                      key=lambda run: plan.widths.index(run[1]))   # stable: seed-major within
        out, results = out / schedule, results / schedule
    for cell, bits, seed in runs:
        run_dir = run_folder(out, cell, bits, seed)
        record = results / "runs" / run_dir.relative_to(out).with_suffix(".json")
        lock_file = out / "claims" / "-".join(run_dir.relative_to(out).parts)
        held = None if record.is_file() else claim(lock_file)
        if held is None:    # finished (here or in a session whose results were committed) or
            continue        # another worker's
        with held:
            if not record.is_file():     # finished by another worker since the check above
                config = qat_config(cell, bits, seed, epochs=epochs, **train_options)
                train_run(config, teacher, state, run_dir, record, cell, bits, seed)


def train_run(config: RunConfig, teacher, state, run_dir: Path, record: Path, cell: str,
              bits: str, seed: int) -> None:
    """Train one run (resuming a stopped one) and write its record."""
    started, cpu = time.perf_counter(), time.process_time()
    resumed = (run_dir / "checkpoint.pt").is_file()
    qat(config, teacher, state, run_dir, resume=resumed, overwrite=not resumed)
    save_report(run_record(run_dir, cell, bits, seed, time.perf_counter() - started,
                           time.process_time() - cpu, resumed), record)


def probe(out: Path, results: Path, args: argparse.Namespace) -> None:
    """One run outside the grid, with the options `args` changes."""
    changes = {key: value for key, value in (("bn_freeze", args.bn_freeze),
                                              ("dampen", args.dampen),
                                              ("freeze_oscillations", args.freeze_oscillations),
                                              ("freeze_momentum", args.freeze_momentum))
               if value}
    config = qat_config(args.cell, args.bits, args.seed, json.loads(args.method_options),
                        epochs=args.epochs, **changes)
    teacher, state = load_teacher(fp_folder(out, results))
    train_run(config, teacher, state, out / "probes" / args.name,
              results / "probes" / f"{args.name}.json", args.cell, args.bits, args.seed)


def run_record(run_dir: Path, cell: str, bits: str, seed: int, seconds: float,
               cpu_seconds: float, resumed: bool) -> dict:
    """One finished run's record; `cpu_seconds` is this process's CPU time for it (a resumed
    run's counts only the part trained in this process, so `cost` prices it otherwise)."""
    summary = json.loads((run_dir / "summary.json").read_text())
    accuracies = epoch_accuracies(run_dir)
    return {"cell": cell, "bits": bits, "seed": seed, "test_acc": summary["test_acc"],
            "test_acc_before_bn": summary.get("test_acc_before_bn"),
            "dead_channels": summary.get("dead_channels"),
            "dead_channel_layers": summary.get("dead_channel_layers"),
            "frozen_share": summary.get("frozen_share"),
            "epoch_test_acc": accuracies, "plateau_change": plateau_change(accuracies),
            "seconds": seconds, "cpu_seconds": cpu_seconds, "resumed": resumed,
            "config": yaml.safe_load((run_dir / "config.yaml").read_text()),
            "machine": machine_info()}


def report(out: Path, results: Path, schedule: str | None = None) -> None:
    """results/converged/converged.{json,md} (with a `schedule`: results/converged/SCHEDULE/)."""
    plan = SCHEDULES.get(schedule)
    fp_epochs = plan.fp_epochs if plan else FP_EPOCHS
    fp_dir, doubled = fp_folder(out, results, fp_epochs), fp_doubled(results, fp_epochs)
    records = schedule_records(results, schedule)
    folder = results / schedule if schedule else results     # where this report is written
    checked = checked_policy(results, schedule)
    fp = epoch_accuracies(fp_dir) if (fp_dir / "metrics.jsonl").is_file() else []
    rows = []
    for cell, (widths, *_) in CELLS.items():
        for bits in widths:
            runs = sorted((r for r in records if r["cell"] == cell and r["bits"] == bits),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            values = [r["test_acc"] for r in runs]
            rows.append({"bits": bits, "cell": cell, "n": len(runs),
                         "seeds": [r["seed"] for r in runs],
                         "mean": statistics.fmean(values),
                         "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                         "values": values,
                         "before_bn": [r["test_acc_before_bn"] for r in runs],
                         "checked": [checked.get(run_folder(Path(), cell, bits, r["seed"]))
                                     for r in runs],
                         "dead_channels": [r["dead_channels"] for r in runs],
                         "plateau_change": [r["plateau_change"] for r in runs]})
    rows.sort(key=lambda r: r["bits"])
    fp_row = {"epochs": fp_epochs, "test_acc": fp[-1], "plateau_change": plateau_change(fp),
              "doubled_test_acc": epoch_accuracies(doubled)[-1] if doubled else None} \
        if fp else None
    save_report({"fp": fp_row, "cells": rows, "machine": machine_info(),
                 "schedule": {"fp_epochs": fp_epochs,
                              "qat_epochs": plan.epochs if plan else QAT_EPOCHS,
                              "qat_steps_per_epoch": QAT_STEPS, "batch_size": BATCH}},
                folder / "converged.json")
    doubled_text = doubling(rows, results, plan.doubles) if plan and plan.doubles else ""
    text = (markdown(fp_row, rows) + acceptance(rows) + doubled_text + cost(records)
            + probes_markdown(folder / "probes"))
    (folder / "converged.md").write_text(text)
    print(text)


def read_records(results: Path) -> list[dict]:
    """Every finished run's record under a grid's or schedule's results folder."""
    return [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("*.json"))]


def schedule_records(results: Path, schedule: str | None) -> list[dict]:
    """The records a schedule's report shows (the grid's without one): its own runs and the
    runs it borrows; `results` is the folder holding every schedule's (results/converged)."""
    plan = SCHEDULES.get(schedule)
    borrowed = borrowed_records(plan, results / plan.borrows) if plan and plan.borrows else []
    return borrowed + read_records(results / schedule if schedule else results)


def borrowed_records(plan: Schedule, folder: Path) -> list[dict]:
    """The records of `plan.borrows` at `plan`'s widths: runs `plan` would otherwise train
    again, so both schedules must train alike (checked here, not assumed)."""
    lender = SCHEDULES[plan.borrows]
    same = ("epochs", "train", "fp_epochs", "fp_channels_last")
    if any(getattr(lender, key) != getattr(plan, key) for key in same):
        raise ValueError(f"schedule {plan.borrows} trains otherwise than the one borrowing it")
    return [record for record in read_records(folder) if record["bits"] in plan.widths]


def doubling(rows: list[dict], results: Path, shorter: str) -> str:
    """The doubling rule per cell with all seeds in both schedules: the 3-seed mean as trained
    here against the same cell in schedule `shorter` (half the steps; its borrowed runs
    included) under `results`; under 0.2 points of change the shorter schedule had plateaued."""
    records = schedule_records(results, shorter)
    lines = []
    for r in rows:
        before = [x["test_acc_before_bn"] for x in records
                  if x["cell"] == r["cell"] and x["bits"] == r["bits"]]
        if r["n"] != len(SEEDS) or len(before) != len(SEEDS):
            continue
        was, now = statistics.fmean(before), statistics.fmean(r["before_bn"])
        verdict = "had plateaued" if abs(now - was) < 0.2 else "had not plateaued"
        lines.append(f"- doubling, {r['bits']} {r['cell']} (mean of the seeds as trained): "
                     f"{shorter} {was:.2f} -> {now:.2f} ({now - was:+.2f}): "
                     f"{shorter}'s length {verdict} (rule: under 0.2 in size)")
    return "\n".join(lines) + "\n" if lines else ""


def checked_policy(results: Path, schedule: str | None) -> dict[Path, float]:
    """Test accuracy under flatq's default BatchNorm policy (re-estimate, keep only if held-out
    training images do not get worse) per run folder relative to its schedule, as
    bench/bn_selection.py measured it on the run's checkpoint; runs it has not measured are
    absent. The grid itself re-estimates unconditionally and records both accuracies."""
    path = results / "bn_selection.json"
    if not path.is_file():
        return {}
    prefix = Path(schedule or "")
    return {Path(name).relative_to(prefix): run["test policy"]
            for name, run in json.loads(path.read_text())["runs"].items()
            if Path(name).is_relative_to(prefix) and not name.startswith("probes/")}


def acceptance(rows: list[dict]) -> str:
    """The issue's acceptance items, counted over the runs in the table."""
    if not rows:
        return ""
    dead = sum(n or 0 for r in rows for n in r["dead_channels"])
    moves = [after - before for r in rows for after, before in zip(r["values"], r["before_bn"])]
    low = []
    for r in rows:
        for key, label in (("before_bn", "as trained"), ("values", "re-estimated"),
                           ("checked", "checked")):
            values = r[key]
            if None in values or len(values) < 3:
                continue
            median = statistics.median(values)
            low += [f"{r['bits']} {r['cell']} seed {seed} {label} ({median - v:.2f} below)"
                    for seed, v in zip(r["seeds"], values) if median - v > 3]
    lsq = [abs(c) for r in rows if r["cell"] == "LSQ" for c in r["plateau_change"]]
    lines = ["", f"- dead channels, all runs: {dead}",
             f"- runs more than 3 points below their cell's median: "
             f"{'; '.join(low) if low else 'none'}",
             f"- unconditional BatchNorm re-estimation moved runs by {min(moves):+.2f} to "
             f"{max(moves):+.2f} points ({sum(abs(m) > 0.5 for m in moves)} of {len(moves)} by "
             f"more than 0.5)"]
    checked = [c - before for r in rows for c, before in zip(r["checked"], r["before_bn"])
               if c is not None]
    if checked:
        lines.append(f"- flatq's default, the checked re-estimation (bench/bn_selection.py, "
                     f"{len(checked)} of {len(moves)} runs measured), moved them by "
                     f"{min(checked):+.2f} to {max(checked):+.2f} points "
                     f"({sum(abs(m) > 0.5 for m in checked)} by more than 0.5)")
    if lsq:
        lines.append(f"- LSQ's last fifth: largest change {max(lsq):.2f} points "
                     f"({sum(c < 0.2 for c in lsq)} of {len(lsq)} runs under 0.2)")
        means = [f"{r['bits']} {statistics.fmean(r['plateau_change']):+.2f}" for r in rows
                 if r["cell"] == "LSQ" and r["n"] == len(SEEDS)]
        if means:
            lines.append(f"- LSQ's last fifth, mean of the seeds: {', '.join(means)} "
                         "(the rule on the mean: under 0.2 in size)")
    return "\n".join(lines) + "\n"


def cost(records: list[dict]) -> str:
    """The runs' CPU time, per method and in all, against the ~6 CPU-hours of one session on
    two cores. Records from before `cpu_seconds` was kept are left out; a run resumed in a
    new process (its `cpu_seconds` covers only the rest) is priced at its cell's mean over the
    runs trained in one go."""
    timed = [r for r in records if r.get("cpu_seconds")]
    per_cell: dict[str, list[float]] = {}
    for r in timed:
        if not r.get("resumed"):
            per_cell.setdefault(r["cell"], []).append(r["cpu_seconds"] / 60)
    priced = [r for r in timed if r["cell"] in per_cell]
    if not priced:
        return ""
    minutes = [statistics.fmean(per_cell[r["cell"]]) if r.get("resumed")
               else r["cpu_seconds"] / 60 for r in priced]
    cells = ", ".join(f"{cell} {statistics.fmean(m):.1f}" for cell, m in per_cell.items())
    resumed = sum(bool(r.get("resumed")) for r in priced)
    note = f"; resumed runs, priced at their cell's mean: {resumed}" if resumed else ""
    return (f"- CPU time: {sum(minutes) / 60:.2f} CPU-hours for {len(priced)} of "
            f"{len(records)} runs (mean CPU-minutes per run: {cells}{note})\n")


def probes_markdown(folder: Path) -> str:
    """The probes (`probe` stage) as a table: what each changed and what came out."""
    records = {p.stem: json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))}
    if not records:
        return ""
    lines = ["", "Probes (one run each, outside the grid; results/converged/probes/):", "",
             "| probe | cell | W/A | seed | steps | BN freeze | dampen | freezing (momentum; "
             "share frozen) | method options | accuracy (BN re-estimated) | before | "
             "last fifth |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in records.items():
        train, method = r["config"]["train"], r["config"]["method"]
        defaults = method_config(method["name"]).to_dict()
        changed = {k: v for k, v in method.items() if k != "name" and defaults.get(k) != v}
        lines.append(f"| {name} | {r['cell']} | {r['bits']} | {r['seed']} | "
                     f"{train['epochs'] * train['max_steps_per_epoch']} | {train['bn_freeze']} | "
                     f"{train.get('dampen', 0.0)} | {freezing(train, r)} | "
                     f"{json.dumps(changed) if changed else '-'} | {r['test_acc']:.2f} | "
                     f"{r['test_acc_before_bn']:.2f} | {r['plateau_change']:+.2f} |")
    return "\n".join(lines) + "\n"


def freezing(train: dict, record: dict) -> str:
    """A probe's --freeze-oscillations setting and the share of tracked weights it froze."""
    if not train.get("freeze_oscillations"):
        return "-"
    return (f"{train['freeze_oscillations']} ({train['freeze_momentum']}; "
            f"{100 * record['frozen_share']:.1f}%)")


def markdown(fp: dict | None, rows: list[dict]) -> str:
    def seeds(values: list, fmt: str = ".2f") -> str:
        return " / ".join("-" if v is None else format(v, fmt) for v in values)

    lines = []
    if fp:
        doubled = fp["doubled_test_acc"]
        lines += [f"FP model ({fp['epochs']} epochs): {fp['test_acc']:.2f}% (last fifth changed "
                  f"it by {fp['plateau_change']:+.2f} points; "
                  + (f"{2 * fp['epochs']} epochs reach {doubled:.2f}%, "
                     f"{doubled - fp['test_acc']:+.2f}: the doubling rule (< 0.3) "
                     f"{'holds' if abs(doubled - fp['test_acc']) < 0.3 else 'fails'})"
                     if doubled is not None else f"not yet trained for {2 * fp['epochs']})"), ""]
    with_checked = any(v is not None for r in rows for v in r["checked"])
    lines += ["| W/A | method | accuracy (BN re-estimated) | per seed | before re-estimation | "
              + ("checked re-estimation (flatq's default) | " if with_checked else "")
              + "dead channels | last fifth of QAT |",
              "|---|---|---|---|---|" + ("---|" if with_checked else "") + "---|---|"]
    def spread(r: dict) -> str:
        return f"± {r['std']:.2f}" if r["n"] > 1 else "(1 seed)"

    lines += [f"| {r['bits']} | {r['cell']} | {r['mean']:.2f} {spread(r)} | "
              f"{seeds(r['values'])} | {seeds(r['before_bn'])} | "
              + (f"{seeds(r['checked'])} | " if with_checked else "")
              + f"{seeds(r['dead_channels'], 'd')} | {seeds(r['plateau_change'], '+.2f')} |"
              for r in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("stage", choices=("fp", "qat", "report", "probe"))
    parser.add_argument("--cells", help="qat: only these cells, comma separated")
    for name, plan in SCHEDULES.items():
        parser.add_argument(f"--{name}", dest="schedule", action="store_const", const=name,
                            help=f"fp, qat, report: the {name} schedule ({plan.describe()})")
    probing = parser.add_argument_group("probe: one run of a cell with changed options")
    probing.add_argument("--name", help="the probe's record: results/converged/probes/NAME.json")
    probing.add_argument("--cell", choices=list(CELLS), default="LSQ")
    probing.add_argument("--bits", default="w2a2")
    probing.add_argument("--seed", type=int, default=0)
    probing.add_argument("--epochs", type=int, default=QAT_EPOCHS,
                         help=f"evaluations of {QAT_STEPS} steps each")
    probing.add_argument("--bn-freeze", type=float, default=0.0,
                         help="freeze BatchNorm for this fraction of training at its end")
    probing.add_argument("--dampen", type=float, default=0.0,
                         help="oscillation dampening's final weight (flatq qat --dampen)")
    probing.add_argument("--freeze-oscillations", type=float, default=0.0,
                         help="final threshold of iterative weight freezing "
                              "(flatq qat --freeze-oscillations)")
    probing.add_argument("--freeze-momentum", type=float, default=0.0,
                         help="its moving averages' momentum (default: flatq's)")
    probing.add_argument("--method-options", default="{}", help="JSON, e.g. "
                         '''{"teacher_batchnorm": "batch"}''')
    parser.add_argument("--out", default="runs/converged")
    parser.add_argument("--results", default="results/converged")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out, results = Path(args.out), Path(args.results)
    if args.stage == "fp":
        plan = SCHEDULES.get(args.schedule)
        train_fp(out, results, *((plan.fp_epochs, plan.fp_channels_last) if plan else ()))
    elif args.stage == "qat":
        cells = args.cells.split(",") if args.cells else None
        if cells and set(cells) - set(CELLS):
            parser.error(f"unknown cells {sorted(set(cells) - set(CELLS))}; one of {list(CELLS)}")
        train_qat(out, results, cells, args.schedule)
    elif args.stage == "probe":
        if not args.name:
            parser.error("probe needs --name")
        probe(out, results, args)
    else:
        report(out, results, args.schedule)


if __name__ == "__main__":
    run_main(main)
