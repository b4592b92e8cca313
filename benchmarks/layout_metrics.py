"""Layout figures of the code (issue 24): files and lines per package, imports that run up the
layers, package pairs that import each other, imports inside functions, functions over 80 lines.

    python benchmarks/layout_metrics.py

The layer order is the one ``tests/test_imports.py`` declares (``LAYERS``); the same parser
(``import_edges``) is used, so "before" and "after" are measured with one tool.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_imports import LAYERS, import_edges, layer_of, unit_of  # noqa: E402


def main() -> None:
    files = sorted((ROOT / "minigpt4").rglob("*.py")) + sorted((ROOT / "preprocessing").rglob("*.py"))
    per_unit: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    long_functions = []
    for path in files:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        text = path.read_text()
        per_unit[unit_of(module)][0] += 1
        per_unit[unit_of(module)][1] += len(text.splitlines())
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 80:
                    long_functions.append((length, f"{module}.{node.name}"))
    print("files and lines per package (top-level modules of minigpt4 each count as their own unit):")
    for unit, (n, lines) in sorted(per_unit.items()):
        print(f"  {unit:40s} {n:3d} files {lines:6d} lines")
    edges = import_edges()
    local = [e for e in edges if e.local]
    print(f"project imports: {len(edges)}, inside functions: {len(local)}")
    upward = sorted({(e.source, e.target) for e in edges
                     if layer_of(unit_of(e.source)) > layer_of(unit_of(e.target))})
    # layer index grows downward: commands = 0; an import to a smaller index runs upward
    print(f"imports that run upward: {len(upward)}")
    for s, t in upward:
        print(f"  {s} -> {t}")
    pairs = set()
    unit_edges = {(unit_of(e.source), unit_of(e.target)) for e in edges if unit_of(e.source) != unit_of(e.target)}
    for a, b in unit_edges:
        if (b, a) in unit_edges and a < b:
            pairs.add((a, b))
    print(f"package pairs importing each other: {len(pairs)}")
    for a, b in sorted(pairs):
        print(f"  {a} <-> {b}")
    print(f"functions over 80 lines: {len(long_functions)}")
    for length, name in sorted(long_functions, reverse=True):
        print(f"  {length:4d} {name}")
    print(f"layers: {LAYERS}")


if __name__ == "__main__":
    main()
