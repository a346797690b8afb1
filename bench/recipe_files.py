"""What the recipe generators (make_configs.py, make_cr_configs.py) share: their marked block of
configs/README.md, and writing (or checking) the files they generate."""

from __future__ import annotations

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
