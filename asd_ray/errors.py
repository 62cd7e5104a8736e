"""Errors raised on bad input.

Every message names the offending shard/key/value and says how to fix it: the
datasets are untrusted, so a failure must be explicit, never a silent skip.
"""

import re


class DataError(ValueError):
    """Bad or unsafe input data (shards, manifests, source folders, tables)."""


_DATA_ERROR_LINE = re.compile(r"(?:asd_ray\.errors\.)?DataError: (.+)")


def data_error_of(err: BaseException) -> DataError | None:
    """The DataError behind an error that crossed process boundaries (a Ray actor or
    Ray Train worker that stopped on bad data), so the user sees its one line.

    Follows ``cause`` / ``__cause__`` / ``worker_failures`` links, then falls back to
    the last ``DataError: ...`` line of the error's text (Ray carries remote
    tracebacks as text).
    """
    queue, seen = [err], set()
    while queue:
        current = queue.pop(0)
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, DataError):
            return DataError(str(current).strip().splitlines()[0])
        queue += [getattr(current, "cause", None), current.__cause__]
        queue += list(getattr(current, "worker_failures", {}).values())
    lines = [m.group(1) for m in map(_DATA_ERROR_LINE.search, str(err).splitlines()) if m]
    return DataError(lines[-1].strip()) if lines else None
