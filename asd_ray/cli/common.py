"""What every ``asd-ray`` command shares: one-line usage errors, human lines, tables."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from asd_ray import progress, storage
from asd_ray.errors import UserError
from asd_ray.storage import Location


def place(value: str) -> str:
    """The argparse ``type`` of a path argument: a local path or an ``s3://`` / ``gs://``
    URI. Any other scheme (``pipe:``, ``http://``, ``file://``, ...), a query string or
    credentials in a URI is one usage line, exit 2 (:func:`asd_ray.storage.location`,
    which never echoes a URI that may hold a secret)."""
    try:
        storage.location(value)
    except UserError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return value


def local_place(value: str) -> str:
    """The argparse ``type`` of a path to a file this machine reads from its own disk (raw
    source data, memory-mapped arrays, a trigger image, a config file read before any
    storage setting is known): a local path, or one usage line for a URI."""
    if not storage.location(place(value)).is_local:
        raise argparse.ArgumentTypeError(
            f"{value}: this argument takes a local path only (it is read from this machine's disk); "
            "copy it here and give its local path"
        )
    return value


def shown(where: str | Location) -> str:
    """How a command's JSON names a location: a local path made absolute, a URI as given."""
    return str(storage.absolute(storage.location(where)))


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


_PRINTED_ROWS = 4096  # rows of an Arrow table formatted at a time


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows as an aligned text table (floats to 4 significant digits, None as '-')."""
    return "\n".join(_table_lines(lambda: [rows], columns))


def print_table(
    rows: Sequence[dict[str, Any]] | Any, columns: Sequence[str], title: str | None = None
) -> None:
    """A table that is the command's product (``asd-ray audit``): on stdout. ``rows`` may be
    an Arrow table (a whole epoch's polluted pool): it is formatted a batch of rows at a
    time, once for the column widths and once to print, never as one dict per row."""
    if title:
        print(progress.terminal_safe(title, keep_newlines=True))
    if hasattr(rows, "to_batches"):
        table = rows

        def batches() -> Iterator[list[dict[str, Any]]]:
            return (batch.to_pylist() for batch in table.to_batches(max_chunksize=_PRINTED_ROWS))
    else:

        def batches() -> Iterator[Sequence[dict[str, Any]]]:
            return iter([rows])

    for line in _table_lines(batches, columns):
        print(line)
    sys.stdout.flush()


def _table_lines(
    batches: Callable[[], Iterable[Sequence[dict[str, Any]]]], columns: Sequence[str]
) -> Iterator[str]:
    """The lines of a table whose rows ``batches()`` yields (called twice: widths, then lines)."""

    def cell(value: Any) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.4g}"
        return progress.terminal_safe(str(value))

    widths = [len(c) for c in columns]
    for batch in batches():
        for row in batch:
            widths = [max(w, len(cell(row.get(c)))) for w, c in zip(widths, columns)]
    yield "  ".join(c.rjust(w) for c, w in zip(columns, widths))
    yield "  ".join("-" * w for w in widths)
    for batch in batches():
        for row in batch:
            yield "  ".join(cell(row.get(c)).rjust(w) for c, w in zip(columns, widths))
