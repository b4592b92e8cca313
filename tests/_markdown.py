"""A strict reader of the markdown tables the project prints (tables.md, the quickstart's output).

:func:`markdown_tables` finds every table in a text and fails the test when one would not render:
a table is a block of consecutive lines starting with ``|``; it needs a header row, then a
separator row of ``---`` cells, and every row must have as many cells as the header. A separator
with no header row above it (the block starts with ``|---|``) renders as nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_SEPARATOR_CELL = re.compile(r"^:?-{3,}:?$")


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    line: int  # 1-based line of the header in the text

    def column(self, name: str) -> int:
        assert name in self.header, f"table at line {self.line} has no column {name!r}: {self.header}"
        return self.header.index(name)

    def row(self, label: str) -> list[str]:
        found = [r for r in self.rows if r[0] == label]
        assert len(found) == 1, f"table at line {self.line}: {len(found)} rows labelled {label!r}"
        return found[0]

    def cell(self, label: str, column: str) -> str:
        return self.row(label)[self.column(column)]


def _cells(line: str) -> list[str]:
    body = line.strip()
    assert body.startswith("|") and body.endswith("|"), f"a table row must start and end with '|': {line!r}"
    return [c.strip() for c in body[1:-1].split("|")]


def _is_separator(cells: list[str]) -> bool:
    return bool(cells) and all(_SEPARATOR_CELL.match(c) for c in cells)


def markdown_tables(text: str) -> list[Table]:
    """Every table of ``text``, each checked: header row, separator row, equal cell counts."""
    tables, block, start = [], [], 0
    for number, line in enumerate([*text.splitlines(), ""], 1):
        if line.lstrip().startswith("|"):
            if not block:
                start = number
            block.append(line)
            continue
        if block:
            tables.append(_check_block(block, start))
            block = []
    return tables


def _check_block(lines: list[str], start: int) -> Table:
    rows = [_cells(line) for line in lines]
    assert not _is_separator(rows[0]), f"line {start}: a table separator with no header row above it: {lines[0]!r}"
    assert len(rows) >= 2 and _is_separator(rows[1]), f"line {start}: a table header must be followed by a |---| row"
    width = len(rows[0])
    for offset, cells in enumerate(rows[1:], 1):
        assert len(cells) == width, (f"line {start + offset}: {len(cells)} cells, the header at line {start} has "
                                     f"{width}: {lines[offset]!r}")
    return Table(header=rows[0], rows=rows[2:], line=start)
