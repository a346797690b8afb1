"""What the command-line tests share: fast run flags, an in-process `flatq` call, a folder
snapshot (to prove nothing changed) and the one-line error check."""

from __future__ import annotations

from pathlib import Path

from flatq.cli import main

FAST = ["--data", "synthetic", "--epochs", "1", "--max-steps-per-epoch", "1", "--batch-size",
        "16", "--device", "cpu", "--no-progress"]


def cli(argv, capsys) -> tuple[int, str, str]:
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:          # argparse errors exit from parse_args
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def assert_one_line(code: int, err: str, command: str, needles: list[str]) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"flatq {command}: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
