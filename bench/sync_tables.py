"""Copy generated reports into the Markdown files that quote them, between their markers.

A quoted table sits between `<!-- NAME table: PATH -->` and `<!-- end NAME table -->`, PATH
being the report relative to the repository root (e.g. results/converged/sound/converged.md,
written by `bench/converged.py report --sound`). Rerunning a report and then this script keeps
README and docs equal to the results they cite, without hand copying:

    .venv/bin/python bench/sync_tables.py              # README.md and docs/*.md
    .venv/bin/python bench/sync_tables.py --check      # exit 1 if any quote is stale
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUOTE = re.compile(r"(<!-- (?P<name>[\w-]+) table: (?P<path>\S+) -->\n)(?P<body>.*?)"
                   r"(<!-- end (?P=name) table -->)", re.DOTALL)


def synced(text: str) -> str:
    """`text` with every quoted table replaced by its report's current content."""
    def replace(match: re.Match) -> str:
        report = ROOT / match["path"]
        if not report.is_file():
            raise SystemExit(f"{match['name']} table quotes {match['path']}, which does not exist")
        return match.group(1) + report.read_text() + match.group(5)
    return QUOTE.sub(replace, text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args()
    stale = []
    for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = path.read_text()
        new = synced(text)
        if new != text:
            stale.append(path.relative_to(ROOT))
            if not args.check:
                path.write_text(new)
    verb = "stale" if args.check else "updated"
    print(f"{verb}: {', '.join(map(str, stale))}" if stale else "all quoted tables current")
    sys.exit(1 if args.check and stale else 0)


if __name__ == "__main__":
    main()
