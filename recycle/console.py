"""Where recycle talks to people: tables and results on stdout, logs, progress and errors on
stderr. Library drivers take a :class:`Reporter` (default: this one) so that the CLI, a
pipeline and a notebook see the same lines; nothing here decides what to compute.

Data (task texts, expert names from a registry) is printed literally: no Rich markup, no
emoji codes, no highlighting.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

# Piped to a file, tables keep their full width instead of being squeezed into 80 columns.
console = Console(soft_wrap=True, markup=False, emoji=False, highlight=False,
                  width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 250)
err_console = Console(stderr=True, soft_wrap=True, markup=False, emoji=False, highlight=False)


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    """A table of plain one-line cells on stdout, as Rich draws it (heavy head, left-justified,
    one space of padding), written line by line: Rich renders each cell through its layout
    engine, about 1 CPU-second per thousand rows. Anything else (wider than the console, a
    line break in a cell, no rows, a terminal's bold header) goes to Rich itself."""
    from rich.cells import cell_len
    from rich.table import Table

    cells = [list(headers), *rows]
    widths = [max(cell_len(r[i]) for r in cells) + 2 for i in range(len(headers))]
    if not rows or console.is_terminal or sum(widths) + len(widths) + 1 > console.width \
            or any("\n" in c or "\r" in c for r in cells for c in r):
        table = Table(*headers)
        for r in rows:
            table.add_row(*r)
        console.print(table, markup=False)
        return

    def line(left, fill, mid, right, values=None):
        if values is None:
            return left + mid.join(fill * w for w in widths) + right
        return left + mid.join(f" {v}{' ' * (w - 2 - cell_len(v))} " for v, w in zip(values, widths)) + right

    out = [line("┏", "━", "┳", "┓"), line("┃", "", "┃", "┃", headers), line("┡", "━", "╇", "┩"),
           *(line("│", "", "│", "│", r) for r in rows), line("└", "─", "┴", "┘")]
    console.file.write("\n".join(out) + "\n")
    console.file.flush()


def info(message: str) -> None:
    """One line to stderr, printed as it is (no markup)."""
    err_console.print(message, highlight=False, markup=False)


def progress(*extra_columns, enabled: bool = True) -> Progress:
    """The one progress bar of long work (spinner, description, bar, M/N done, any extra
    columns, elapsed), on stderr."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        console=err_console,
        transient=False,
        disable=not enabled,
    )


class Reporter:
    """What a library driver says while it works: ``say`` (a log line), ``ok`` / ``fail``
    (one finished item), and ``bar(description, total)`` (a progress bar for a block).

    ``quiet=True`` keeps failures and drops the rest (for library use)."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self._bar: Progress | None = None
        self._task = None

    def _print(self, message: str) -> None:
        if self._bar is not None:
            self._bar.console.print(message, highlight=False, markup=False)
        else:
            info(message)

    def say(self, message: str) -> None:
        if not self.quiet:
            self._print(message)

    def ok(self, message: str) -> None:
        self.say(f"✓ {message}")

    def fail(self, message: str) -> None:
        self._print(f"✗ {message}")

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    @contextmanager
    def bar(self, description: str, total: int) -> Iterator[Reporter]:
        with progress(enabled=not self.quiet) as bar:
            self._bar, self._task = bar, bar.add_task(description, total=total)
            try:
                yield self
            finally:
                self._bar, self._task = None, None


QUIET = Reporter(quiet=True)
