"""What every ``asd-ray`` command shares: one-line usage errors, human lines, tables."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from typing import Any

from asd_ray import progress
from asd_ray.files import not_a_uri


def local_path(value: str) -> str:
    """The argparse ``type`` of every path argument of every command: a local path, or
    one usage line (exit 2) for a URI (:func:`asd_ray.files.not_a_uri`)."""
    problem = not_a_uri(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes in one line, like every other error (``--help`` shows the usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_quiet(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-q", "--quiet", action="store_true", help="no progress bars or human lines on stderr"
    )


def say(line: str) -> None:
    """A human line: stderr (stdout carries only the command's JSON), silent under --quiet."""
    progress.write(line)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table (floats to 4 significant digits, None as '-')."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return progress.terminal_safe(str(value))

    grid = [list(columns)] + [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in grid) for i in range(len(columns))]
    lines = ["  ".join(v.rjust(w) for v, w in zip(line, widths)) for line in grid]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> None:
    """A table that is the command's product (``asd-ray audit``): on stdout."""
    if title:
        print(progress.terminal_safe(title, keep_newlines=True))
    print(format_table(rows, columns))
    sys.stdout.flush()
