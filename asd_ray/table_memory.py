"""Memory of the commands that only read a run's tables (``asd-ray audit``, ``report``).

Such a command reads one epoch's columns, drops them and reads the next. With Arrow's
default pool (mimalloc) and glibc's adaptive ``mmap`` threshold, what it dropped stays
resident, so its peak grew with what it had read rather than with what it holds
(jobs/BENCHMARKS.md, "Scale"). :func:`prepare` makes Arrow allocate through ``malloc``
and glibc map every block of 128 KiB or more apart, giving it back when freed. Arrow
reads its pool choice once, when it loads: this module imports nothing that loads it,
and the CLI calls :func:`prepare` before its own imports.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence

TABLE_COMMANDS = ("audit", "report")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_RETURNED_BLOCK_BYTES = 128 * 1024  # freed blocks this large go back to the operating system


def prepare(argv: Sequence[str]) -> None:
    """For a table command (``argv[0]`` in :data:`TABLE_COMMANDS`): Arrow's system pool
    (unless ``ARROW_DEFAULT_MEMORY_POOL`` is set) and glibc's fixed threshold. Other
    commands (a run's driver) keep the defaults."""
    if not argv or argv[0] not in TABLE_COMMANDS:
        return
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _RETURNED_BLOCK_BYTES)
    except (OSError, AttributeError):  # not glibc: Arrow's pool alone
        pass
