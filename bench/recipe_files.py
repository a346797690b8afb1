"""What the recipe generators (make_configs.py, make_cr_configs.py) share: their marked block of
configs/README.md, and writing (or checking) the files they generate."""

from __future__ import annotations

import argparse
from pathlib import Path


def replace_block(current: str, begin: str, end: str, block: str) -> str:
    """`current` with the text between the `begin` and `end` markers replaced by `block`
    (appended when the markers are missing); the text around it is kept."""
    if begin in current and end in current:
        head, rest = current.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        return head + block + ("\n" + tail if tail else "")  # keep one blank line
    return current.rstrip("\n") + "\n\n" + block


def write_or_check(files: dict[Path, str], check: bool, root: Path) -> tuple[int, list[Path]]:
    """Write the files whose content differs (or, with `check`, list them and return 1)."""
    stale = [p for p, text in files.items() if not p.is_file() or p.read_text() != text]
    if check:
        for path in stale:
            print(f"out of date: {path.relative_to(root)}")
        return (1 if stale else 0), stale
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[path])
    return 0, stale


def generate(description: str, files: dict[Path, str], root: Path, summary: str,
             argv: list[str] | None = None) -> int:
    """The generators' command line: write the out-of-date `files` and print `summary`
    (formatted with `stale`, the number written), or with --check list them and return 1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    code, stale = write_or_check(files, args.check, root)
    if args.check:
        return code
    print(summary.format(stale=len(stale)))
    return 0
