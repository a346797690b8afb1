"""The import direction: every package of flatq imports only packages below it.

    errors < atomic, allocator < config < data < models < quant < methods < train
    < analysis, export < runs < cli

(`errors`, `atomic`, `allocator` and `config` may be imported from anywhere; `analysis` and
`export` sit side by side and import neither each other.) The test reads every module's imports with
`ast`, those inside functions and under TYPE_CHECKING included, and fails on an import that
points up the stack.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import flatq

ROOT = Path(flatq.__file__).parent

LEVELS = {"errors": 0, "atomic": 1, "allocator": 1, "config": 2, "data": 3, "models": 4, "quant": 5,
          "methods": 6, "train": 7, "analysis": 8, "export": 8, "runs": 9, "cli": 10}
FACES = {"__init__", "__main__"}    # flatq/__init__.py and __main__.py may import anything


def _unit(parts: tuple[str, ...]) -> str:
    """The package (or top-level module) a module path inside flatq belongs to."""
    return parts[0].removesuffix(".py")


def _imports(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """(line, module path inside flatq) of every flatq import in `path`."""
    package = path.relative_to(ROOT).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                module = tuple(node.module.split(".")) if node.module else ()
                targets = [base + module] if module else [base + (a.name,) for a in node.names]
            elif node.module and node.module.split(".")[0] == "flatq":
                targets = [tuple(node.module.split(".")[1:])]
            else:
                continue
        elif isinstance(node, ast.Import):
            targets = [tuple(a.name.split(".")[1:]) for a in node.names
                       if a.name.split(".")[0] == "flatq"]
        else:
            continue
        found += [(node.lineno, t) for t in targets if t]
    return found


def upward_imports() -> list[str]:
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        source = _unit(rel.parts)
        if source in FACES:
            continue
        assert source in LEVELS, f"{rel}: a new package; give it a level in LEVELS"
        for line, target in _imports(path):
            unit = _unit(target)
            if unit == source:
                continue
            assert unit in LEVELS, f"{rel}:{line}: imports unknown flatq.{'.'.join(target)}"
            if LEVELS[unit] >= LEVELS[source]:
                bad.append(f"{rel}:{line} ({source}) imports flatq.{'.'.join(target)} ({unit})")
    return bad


def test_no_upward_imports():
    assert upward_imports() == []


def test_the_walk_sees_imports_of_every_form(tmp_path, monkeypatch):
    package = tmp_path / "flatq" / "train"
    package.mkdir(parents=True)
    module = package / "example.py"
    module.write_text("from ..errors import FlatqError\nfrom . import loop\n"
                      "import flatq.cli\ndef late():\n    from flatq.runs import qat\n"
                      "from .. import export\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path / "flatq")
    assert sorted(t for _, t in _imports(module)) == [
        ("cli",), ("errors",), ("export",), ("runs",), ("train", "loop")]
