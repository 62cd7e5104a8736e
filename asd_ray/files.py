"""Reading the small text files a user hands over or is handed: config files, a run
folder's records (``config.yaml``, ``inputs.json``, ``model/card.json``).

Such a file is untrusted input. It may be a FIFO (a read would hang), a link to
``/dev/zero`` or to a private key (a read would never end, or copy a secret into
a report), nested thousands of levels deep (the parsers recurse) or hold a number
of thousands of digits (Python refuses to convert it). So every read here opens
the file without following a link, accepts only a regular file, reads at most a
size cap, and checks nesting and value lengths before a parser builds anything;
each refusal is one line naming the file and the fix.

A file may also be an object in a bucket (an :class:`~asd_ray.storage.Location`):
:func:`read_file` reads it through :func:`asd_ray.storage.read_bytes` with the same
cap, and the same parsers check it. ``pathlib`` must never see a URI: it would read
``s3://bucket/x`` as the local folder ``s3:/bucket/x``.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from asd_ray.errors import DataError, UserError

if TYPE_CHECKING:  # storage builds on config, which reads its files here
    from asd_ray.storage import Location

MAX_TEXT_BYTES = 8 * 1024**2  # a run's card lists up to 10,000 class names; nothing we write is near this
MAX_DEPTH = 32  # our files nest 3 levels; the parsers recurse once per level
MAX_SCALAR = 4096  # characters of one value (a path's limit); Python converts ints of up to 4,300 digits


def read_regular_file(
    path: str | Path,
    *,
    what: str,
    fix: str,
    limit: int = MAX_TEXT_BYTES,
    error: type[UserError] = DataError,
    follow_links: bool = False,
) -> bytes:
    """The bytes of ``path``, which must be a regular file (not a link, FIFO or device) of
    at most ``limit`` bytes.

    Args:
        what: how the message names the file (``"--config x.yaml"``, or its path).
        fix: what the user should do, ending the message.
        error: the :class:`UserError` type raised (``ConfigError`` for settings files).
        follow_links: read through a symbolic link (a file the user names on the command
            line); the target must still be a regular file. A file inside a folder the
            user was handed is never read through one.

    Raises:
        ``error``: the file is missing, unreadable, a link or special file, or too large.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | (0 if follow_links else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags)
    except OSError as err:
        reason = "a symbolic link" if err.errno == errno.ELOOP else f"unreadable ({err.strerror})"
        raise error(f"{what}: {reason}; {fix}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(f"{what}: not a regular file ({kind_of(mode)}); {fix}")
        chunks, left = [], limit + 1
        while left and (chunk := os.read(fd, min(left, 1 << 20))):
            chunks.append(chunk)
            left -= len(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise error(f"{what}: larger than the {limit}-byte limit of such a file; {fix}")
    return data


def kind_of(mode: int) -> str:
    """What kind of file ``mode`` is, for a message ("a FIFO", "a folder")."""
    for test, name in (
        (stat.S_ISREG, "a regular file"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "a special file"


def decode_text(data: bytes, *, what: str, fix: str, error: type[UserError] = DataError) -> str:
    """``data`` as UTF-8 text, or one line saying it is not."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise error(f"{what}: not UTF-8 text; {fix}") from None


def parse_yaml(text: str, *, what: str, fix: str, error: type[UserError] = DataError) -> Any:
    """Plain YAML values (the safe loader: no tags that build objects), after a scan that
    refuses aliases, nesting deeper than :data:`MAX_DEPTH` and values longer than
    :data:`MAX_SCALAR` characters, so no parser recursion or number conversion can fail.

    Raises:
        ``error``: not YAML, or over a limit; the message names the line.
    """
    try:
        depth = 0
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            line = f" at line {event.start_mark.line + 1}"
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise error(f"{what}: anchors and aliases (&, *) are not accepted{line}; {fix}")
            if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
                depth += 1
                if depth > MAX_DEPTH:
                    raise error(f"{what}: nested deeper than {MAX_DEPTH} levels{line}; {fix}")
            elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR:
                raise error(
                    f"{what}: a value of {len(event.value)} characters{line}, over the "
                    f"{MAX_SCALAR}-character limit; {fix}"
                )
        return yaml.load(text, Loader=_Loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" at line {where.line + 1}" if where else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise error(f"{what}: not valid YAML{line} ({problem}); {fix}") from None


class _Loader(yaml.SafeLoader):
    """The safe loader, reading ``1e-3`` as a number as YAML 1.2 does (YAML 1.1 wants a dot,
    so ``--set mixmatch.lr=1e-3`` was a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_json(data: bytes | str, *, what: str, fix: str, error: type[UserError] = DataError) -> Any:
    """A JSON value nested at most :data:`MAX_DEPTH` levels, with no number longer than
    :data:`MAX_SCALAR` characters (each checked before it is converted).

    Raises:
        ``error``: not JSON, or over a limit.
    """

    def bounded(convert):
        def number(text: str) -> Any:
            if len(text) > MAX_SCALAR:
                raise error(f"{what}: a number over {MAX_SCALAR} characters long; {fix}")
            return convert(text)

        return number

    try:
        value = json.loads(data, parse_int=bounded(int), parse_float=bounded(float))
    except UserError:  # a number over the limit (a ValueError too)
        raise
    except RecursionError:  # the parser recurses once per level
        value = None
        depth = MAX_DEPTH + 1
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"{what}: not valid JSON ({type(err).__name__}); {fix}") from None
    else:
        depth = _depth(value)
    if depth > MAX_DEPTH:
        raise error(f"{what}: nested deeper than {MAX_DEPTH} levels; {fix}")
    return value


def _depth(value: Any) -> int:
    """How many lists and mappings deep ``value`` nests (iteratively: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack += [(child, level + 1) for child in children]
    return deepest


def read_file(
    path: str | Path | Location,
    *,
    what: str,
    fix: str,
    limit: int = MAX_TEXT_BYTES,
    follow_links: bool = False,
) -> bytes:
    """The bytes of a local file (:func:`read_regular_file`) or of an object (a non-local
    :class:`~asd_ray.storage.Location`, through :func:`asd_ray.storage.read_bytes`), at
    most ``limit`` of them either way."""
    from asd_ray.storage import Location, read_bytes

    if isinstance(path, Location) and not path.is_local:
        return read_bytes(path, limit=limit, what=what, fix=fix)
    return read_regular_file(path, what=what, fix=fix, limit=limit, follow_links=follow_links)


def read_json(
    path: str | Path | Location, *, fix: str, what: str | None = None, limit: int = MAX_TEXT_BYTES
) -> Any:
    """A regular JSON file or an object (:func:`read_file`) of at most ``limit`` bytes,
    parsed with :func:`parse_json`'s limits."""
    what = what or str(path)
    return parse_json(read_file(path, what=what, fix=fix, limit=limit), what=what, fix=fix)


def read_text(
    path: str | Path | Location,
    *,
    fix: str,
    what: str | None = None,
    limit: int = MAX_TEXT_BYTES,
    follow_links: bool = False,
) -> str:
    """A regular UTF-8 text file or an object (:func:`read_file`) of at most ``limit`` bytes."""
    what = what or str(path)
    data = read_file(path, what=what, fix=fix, limit=limit, follow_links=follow_links)
    return decode_text(data, what=what, fix=fix)
