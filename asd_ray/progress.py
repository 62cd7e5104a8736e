"""Progress bars on stderr (tqdm) for the long steps, and the switch that silences them.

Bars show only on a terminal (tqdm's ``disable=None``) and never under ``--quiet``;
stdout is left to the final JSON line.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
_quiet = False
# C0/C1 controls (ANSI escapes start with ESC), zero-width and bidirectional marks, line
# separators: text from a data set or a model file (class names, keys, paths) must not
# steer the terminal or reorder what it shows.
_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff\ufff9-\ufffb]")


def terminal_safe(text: str, *, keep_newlines: bool = False) -> str:
    """``text`` with every control character written as its escape (``\\x1b``, ``\\u202e``)."""

    def escape(match: re.Match) -> str:
        char = match.group()
        if keep_newlines and char == "\n":
            return char
        return char.encode("unicode_escape").decode("ascii")

    return _UNSAFE.sub(escape, text)


def set_quiet(quiet: bool) -> None:
    """Silence (or allow) every bar of this process."""
    global _quiet
    _quiet = quiet


def bar(iterable: Iterable[T], *, total: int | None, desc: str, unit: str = "img") -> Iterator[T]:
    """``iterable`` with a bar (rate, ETA) on stderr."""
    return iter(
        tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=_disabled(), leave=False)
    )


def counter(*, total: int, desc: str, unit: str = "img", initial: int = 0) -> tqdm:
    """A bar advanced by hand (``.update(n)``, ``.set_postfix_str``); close it when done."""
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=_disabled(), initial=initial)


def write(line: str) -> None:
    """A human line on stderr that does not break an active bar."""
    if not _quiet:
        tqdm.write(terminal_safe(line, keep_newlines=True), file=sys.stderr)


def _disabled() -> bool | None:
    return True if _quiet else None  # None: tqdm shows bars on a terminal only
