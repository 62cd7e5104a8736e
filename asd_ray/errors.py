"""Errors raised on bad input, and on a run that cannot write its outputs.

Every message names the offending shard/key/value and says how to fix it: the
datasets are untrusted, so a failure must be explicit, never a silent skip.

Only these types are a user's mistake: the command line prints their one line
and exits 2. Any other exception is a bug in asd-ray and keeps its traceback
(exit 1), so a real defect is never reported as the user's fault.
"""

import errno
import re
from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix: bad input data or a bad setting (exit status 2)."""


class DataError(UserError, ValueError):
    """Bad or unsafe input data (shards, manifests, source folders, tables, model files)."""


class ConfigError(UserError, ValueError):
    """A bad setting: a config field, a command-line flag or an attack parameter."""


class StorageError(RuntimeError):
    """Storage failed, not the input: the run folder's disk is full (the epochs written so far
    are intact and resumable), or an object store stayed unreachable after its retries."""


_USER_ERROR_LINE = re.compile(r"(?:asd_ray\.errors\.)?(DataError|ConfigError): (.+)")


def user_error_of(err: BaseException) -> UserError | None:
    """The user's mistake behind an error that crossed process boundaries (a Ray actor
    or Ray Train worker that stopped on bad data or a bad setting), so the user sees
    its one line; None when the error is not the user's.

    Follows the chain of causes, then falls back to the last ``DataError: ...`` or
    ``ConfigError: ...`` line of the error's text (Ray carries remote tracebacks as text).
    """
    for current in _causes(err):
        if isinstance(current, UserError):
            return type(current)((str(current).strip().splitlines() or [""])[0])
    lines = [m.groups() for m in map(_USER_ERROR_LINE.search, str(err).splitlines()) if m]
    if not lines:
        return None
    kind, message = lines[-1]
    return (DataError if kind == "DataError" else ConfigError)(message.strip())


def _causes(err: BaseException):
    """``err`` and every error behind it, also across Ray's process boundaries."""
    queue, seen = [err], set()
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        yield current
        queue += [getattr(current, "cause", None), current.__cause__, current.__context__]
        queue += list(getattr(current, "worker_failures", {}).values())


def storage_error_of(err: BaseException, run_folder: Path, *, resumable: bool = True) -> StorageError | None:
    """A one-line :class:`StorageError` when ``err`` comes from a full disk (here, or in
    a Ray Train worker writing a checkpoint), else None. Its advice is ``--resume`` when
    ``run_folder`` holds a started run (RUN/config.yaml), else to start it again."""
    full = any(
        (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e)
        for e in _causes(err)
    )
    if not full:
        return None
    if not resumable:
        return StorageError(
            f"{run_folder}: no space left on device before the run's first record; "
            "free space, then start it again with the same command"
        )
    return StorageError(
        f"{run_folder}: no space left on device; every finished epoch is intact: "
        f"free space, then continue with asd-ray run --resume {run_folder}",
    )
