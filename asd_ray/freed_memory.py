"""Processes that give the memory they free back to the operating system at once.

Two kinds of process read a lot and keep little, and their peak grew with what they
had read rather than with what they held (jobs/BENCHMARKS.md, "Scale"):

- the commands that only read a run's tables (``asd-ray audit``, ``report``) hold one
  epoch's columns, drop them and read the next: Arrow's default pool (mimalloc) keeps
  what they dropped;
- a scoring actor walks every record of its share through a window of a few hundred
  KiB: with glibc's adaptive ``mmap`` threshold those windows come from the heap once
  the first is freed, and under CPU contention its heaps kept several times its share.
  (A training worker keeps glibc's default: its steps allocate host buffers of this
  size every step, which ``mmap`` would fault in afresh each time.)

glibc then maps every block of 128 KiB or more apart and unmaps it when freed
(:func:`return_large_blocks`), and a table command's Arrow allocates through ``malloc``
(:func:`prepare_command`). Arrow reads its pool choice once, when it loads: this module
imports nothing that loads it, and the CLI calls :func:`prepare_command` before its own
imports. Elsewhere than glibc only Arrow's pool changes.

A table command also keeps pandas out: pyarrow imports it, where it is installed, on its
first array only to ask whether a value is a pandas object. asd-ray never makes one and
does not depend on pandas, and its import cost ``asd-ray audit summary`` a third of its
time and a quarter of its memory (jobs/BENCHMARKS.md, "Start-up").
"""

from __future__ import annotations

import ctypes
import importlib.abc
import os
import sys
from collections.abc import Sequence

TABLE_COMMANDS = ("audit", "report")
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
_RETURNED_BLOCK_BYTES = 128 * 1024  # freed blocks this large go back to the operating system


def return_large_blocks() -> None:
    """From now on, glibc serves blocks of 128 KiB or more by ``mmap`` and returns them when
    freed (a fixed threshold: glibc's adaptive one is turned off)."""
    try:
        ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, _RETURNED_BLOCK_BYTES)
    except (OSError, AttributeError):  # not glibc
        pass


class _NoPandas(importlib.abc.MetaPathFinder):
    """Answers an import of pandas as if it were not installed (pyarrow then goes without it)."""

    def find_spec(self, name: str, path=None, target=None) -> None:
        if name.partition(".")[0] == "pandas":
            raise ModuleNotFoundError(f"asd-ray's table commands do without pandas ({name})", name=name)
        return None


def prepare_command(argv: Sequence[str]) -> None:
    """For a table command (``argv[0]`` in :data:`TABLE_COMMANDS`): Arrow's system pool
    (unless ``ARROW_DEFAULT_MEMORY_POOL`` is set), :func:`return_large_blocks`, and no
    pandas. Other commands (a run's driver) keep the defaults."""
    if not argv or argv[0] not in TABLE_COMMANDS:
        return
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    return_large_blocks()
    if "pandas" not in sys.modules:  # loaded already (a caller's own import): it stays usable
        sys.meta_path.insert(0, _NoPandas())
