"""Metrics as JSON lines: one object per line, appended as training goes.

A process killed mid-append leaves a torn last line: readers skip it, and a resumed run drops
it with the records it will redo. A damaged line anywhere else is an error naming the line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..atomic import write_text_atomic
from ..errors import FlatqError


def _plain(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Append-only JSONL file of training records (`metrics.jsonl` in the run folder)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps({k: _plain(v) for k, v in record.items()}) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.is_file():
            return []
        text = self.path.read_bytes().decode("utf-8", errors="replace")
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):     # the torn tail of a killed append
                    break
                raise FlatqError(f"{self.path} line {number} is not a JSON record") from None
            if not isinstance(record, dict):
                raise FlatqError(f"{self.path} line {number} is not a JSON object")
            records.append(record)
        return records

    def truncate_after(self, step: int, epoch: int) -> None:
        """Drop what a resumed run will redo: records of global steps after `step`, and
        epoch-end records of epochs after `epoch` (a run killed between its epoch-end record
        and its checkpoint redoes that epoch's end from a step checkpoint of the same step)."""
        kept = [r for r in self.read() if r.get("step", 0) <= step
                and not ("test_acc" in r and r.get("epoch", 0) > epoch)]
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
