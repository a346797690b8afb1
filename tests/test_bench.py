"""The bench scripts' shared behaviour: a user mistake is one line, not a traceback; and
bench/converged.py's workers share a grid by claiming runs with a lock file (a run held by a
live worker is skipped by the others, a stopped worker's run is free again); a schedule that
borrows another's runs takes only those of its own widths, from a lender that trains alike;
the doubling rule compares three-seed means as trained."""

from __future__ import annotations

import dataclasses
import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
OTHER_WORKER = ("import sys; sys.path.insert(0, sys.argv[1]); from converged import claim; "
                "from pathlib import Path; print(claim(Path(sys.argv[2])) is not None)")


def converged_module() -> ModuleType:
    """bench/converged.py, imported as its workers import it (bench/ is not a package)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module("converged")
    finally:
        sys.path.remove(str(BENCH))


def other_worker_claims(lock_file: Path) -> bool:
    done = subprocess.run([sys.executable, "-c", OTHER_WORKER, str(BENCH), str(lock_file)],
                          capture_output=True, text=True, check=True)
    return done.stdout.strip() == "True"


def test_a_held_run_is_skipped_and_a_released_one_taken(tmp_path: Path) -> None:
    claim = converged_module().claim
    lock_file = tmp_path / "claims" / "w2a2-lsq-seed0"
    held = claim(lock_file)
    assert held is not None
    assert not other_worker_claims(lock_file)
    held.close()                      # as the kernel does when a worker ends
    assert other_worker_claims(lock_file)


def test_a_missing_run_is_one_line_and_exit_status_2(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(BENCH / "converged.py"), "qat", "--fp30-grid",
                           "--out", str(tmp_path / "runs"), "--results", str(tmp_path / "results")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"converged.py: error: checkpoint not found: {tmp_path / 'results' / 'fp30'}"]
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()


def test_a_borrowing_schedule_shows_its_lenders_runs_of_its_widths_only(tmp_path: Path) -> None:
    """fp30-w2a2-long's report includes fp30-lsq-long's W2A2 LSQ runs (not its W2A4 ones);
    a lender that trained otherwise is refused."""
    converged = converged_module()
    for bits in ("w2a2", "w2a4"):
        record = tmp_path / "runs" / bits / "lsq" / "seed0.json"
        record.parent.mkdir(parents=True)
        record.write_text(json.dumps({"cell": "LSQ", "bits": bits, "seed": 0}))
    plan = converged.SCHEDULES["fp30-w2a2-long"]
    assert [r["bits"] for r in converged.borrowed_records(plan, tmp_path)] == ["w2a2"]
    with pytest.raises(ValueError, match="trains otherwise"):
        converged.borrowed_records(dataclasses.replace(plan, epochs=40), tmp_path)


def test_the_doubling_rule_compares_three_seed_means_as_trained(tmp_path: Path) -> None:
    """89.55 -> 90.35 fails the rule (+0.80), 89.55 -> 89.65 passes it (+0.10); a cell with
    fewer than three seeds in either schedule is not judged; a shorter schedule's borrowed
    runs count as its own (fp30-w2a2-long shows fp30-lsq-long's LSQ)."""
    doubling = converged_module().doubling
    for schedule in ("fp30-grid", "fp30-lsq-long"):
        for seed, acc in enumerate((89.61, 89.25, 89.79)):
            record = tmp_path / schedule / "runs" / "w2a2" / "lsq" / f"seed{seed}.json"
            record.parent.mkdir(parents=True, exist_ok=True)
            record.write_text(json.dumps({"cell": "LSQ", "bits": "w2a2", "seed": seed,
                                          "test_acc_before_bn": acc}))
    row = {"cell": "LSQ", "bits": "w2a2", "n": 3, "before_bn": [90.45, 90.46, 90.14]}
    assert "+0.80): fp30-grid's length had not plateaued" in doubling([row], tmp_path, "fp30-grid")
    row["before_bn"] = [89.70, 89.50, 89.75]
    assert "+0.10): fp30-grid's length had plateaued" in doubling([row], tmp_path, "fp30-grid")
    assert doubling([{**row, "n": 2}], tmp_path, "fp30-grid") == ""
    assert "+0.10): fp30-w2a2-long's length had plateaued" in doubling([row], tmp_path,
                                                                       "fp30-w2a2-long")
