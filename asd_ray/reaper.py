"""Remove what a driver's local Ray leaves behind when the driver dies without
``ray.shutdown()`` (SIGKILL, the OOM killer).

Ray 2.60 stops its GCS and raylet with the driver that started them, but the
dashboard and runtime-env agents outlive it, re-parented to init, for good. A
:class:`Reaper` is a small process, in its own session so that a terminal's
Ctrl-C reaches the driver first, that notes the driver's descendants once a
second and kills the ones still alive (same pid and start time) once the
driver's end of a pipe closes: at a normal exit after ``ray.shutdown()`` as
after a kill. It never touches a cluster the driver only joined.

    python -m asd_ray.reaper PID    (reads stdin until EOF; started by the driver)
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
from pathlib import Path

_SNAPSHOT_S = 1.0


class Reaper:
    """The driver's handle on its reaper process."""

    def __init__(self, process: subprocess.Popen):
        self.process = process

    @classmethod
    def watch(cls) -> Reaper:
        """Start a reaper over this process's descendants."""
        process = subprocess.Popen(
            [sys.executable, "-m", "asd_ray.reaper", str(os.getpid())],
            stdin=subprocess.PIPE,
            start_new_session=True,
        )
        return cls(process)

    def close(self) -> None:
        """After ``ray.shutdown()``: let the reaper remove any stragglers, then exit."""
        self.process.stdin.close()
        self.process.wait(timeout=30)


def _processes() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, start time in clock ticks) of every process, from /proc."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ", which may hold spaces
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _is_ray(pid: int) -> bool:
    """A process Ray started: its program lives in the ray package, or Ray named it ``ray::``."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return False
    return b"/ray/" in command or command.startswith(b"ray::")


def ray_descendants(root: int, table: dict[int, tuple[int, int]]) -> dict[int, int]:
    """pid -> start time of the Ray processes ``root`` started and all of theirs.

    Only children of ``root`` that are Ray's count (a notebook's other children stay).
    """
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in table.items():
        children.setdefault(parent, []).append(pid)
    found, stack = {}, [pid for pid in children.get(root, []) if _is_ray(pid)]
    while stack:
        pid = stack.pop()
        found[pid] = table[pid][1]
        stack += children.get(pid, [])
    return found


def main() -> None:
    root = int(sys.argv[1])
    seen: dict[int, int] = {}
    while True:
        seen.update(ray_descendants(root, _processes()))
        ready, _, _ = select.select([sys.stdin.buffer], [], [], _SNAPSHOT_S)
        if ready and not os.read(sys.stdin.fileno(), 4096):
            break  # the driver closed the pipe or died
    seen.update(ray_descendants(root, _processes()))  # a driver that closed the pipe is still there
    table = _processes()
    for pid, started in seen.items():
        if pid in table and table[pid][1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


if __name__ == "__main__":
    main()
