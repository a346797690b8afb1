"""README and docs quote generated result tables between markers (bench/sync_tables.py): every
quote must equal the report file it names, so a rerun report cannot leave a stale table behind,
and a marker must name a file that exists."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "sync_tables.py"


def test_quoted_tables_match_their_reports() -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True,
                          text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_sync_replaces_a_stale_quote(tmp_path: Path, monkeypatch) -> None:
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import sync_tables
    finally:
        sys.path.remove(str(SCRIPT.parent))
    (tmp_path / "report.md").write_text("| a |\n|---|\n| 2 |\n")
    monkeypatch.setattr(sync_tables, "ROOT", tmp_path)
    text = "before\n<!-- x table: report.md -->\n| a |\n|---|\n| 1 |\n<!-- end x table -->\nafter\n"
    assert sync_tables.synced(text) == ("before\n<!-- x table: report.md -->\n| a |\n|---|\n"
                                        "| 2 |\n<!-- end x table -->\nafter\n")
