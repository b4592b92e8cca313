"""One progress display for preprocessing, training and evaluation.

On a terminal it is a tqdm bar. When the output is a file or a pipe (a log, CI, the quickstart's
captured output) a tqdm bar would write one ``\\r`` update per item — thousands of them in a log —
so :class:`LineProgress` prints a plain line at every ``step_percent`` of the total and at the end
instead: about 20 lines per bar, whatever the number of items.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Optional, TextIO

STEP_PERCENT = 5
"""A non-terminal progress line every this many percent of the total."""


class LineProgress:
    """tqdm's ``update`` / ``set_postfix`` / ``close`` interface, printing a few whole lines.

    Prints ``desc: done/total (P %) elapsed Xs[, key=value ...]`` each time ``done`` crosses
    a multiple of ``step_percent`` % of ``total`` and once more at the end.
    """

    def __init__(self, total: int, desc: str = "", file: Optional[TextIO] = None, step_percent: int = STEP_PERCENT):
        self.total = max(int(total), 0)
        self.desc = desc
        self.file = file
        self.n = 0
        self.postfix = ""
        self.step = max(1, -(-self.total * step_percent // 100))  # items per line, rounded up
        self.next_report = self.step
        self.start = time.perf_counter()
        self.printed = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self.next_report or self.n >= self.total:
            self._print()
            while self.next_report <= self.n:
                self.next_report += self.step

    def set_postfix(self, refresh: bool = True, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n != self.printed:  # stopped between two reports: say where
            self._print()

    def _print(self) -> None:
        if self.n == self.printed:
            return
        self.printed = self.n
        percent = 100 * self.n // self.total if self.total else 100
        line = f"{self.desc}: {self.n}/{self.total} ({percent} %) elapsed {time.perf_counter() - self.start:.0f}s"
        if self.postfix:
            line += f", {self.postfix}"
        print(line, file=self.file or sys.stderr, flush=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def progress(total: int, desc: str, unit: str = "it", file: Optional[TextIO] = None, leave: bool = True):
    """A progress display over ``total`` items: a tqdm bar on a terminal, else :class:`LineProgress`.

    Args:
        total: number of items.
        desc: what is counted (``"volumes"``, ``"pancreas_detection"``, ``"epoch 3"``).
        unit: tqdm's unit name.
        file: where to write (default ``sys.stderr``, read at call time so tests can capture it).
        leave: keep the finished tqdm bar on the screen.
    """
    stream = file or sys.stderr
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=True, leave=leave)
    return LineProgress(total, desc, file=stream)


def progress_callback(desc: str, unit: str = "it"):
    """A ``report(done, total)`` callback drawing :func:`progress` (for loops that count themselves)."""
    bar = None

    def report(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = progress(total, desc, unit=unit)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return report
