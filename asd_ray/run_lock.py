"""One driver per run folder, and folders that take files before Ray starts.

``RUN/.lock`` is an OS lock (gone with its process, so a killed driver leaves none),
held from before the folder is checked to the run's end. A start that is refused takes
back what it made, so it leaves nothing behind.
"""

from __future__ import annotations

import fcntl
import os
import socket
import tempfile
import time
from pathlib import Path

from asd_ray.config import ClusterConfig
from asd_ray.errors import ConfigError, DataError
from asd_ray.run_folder import CONFIG_FILE, LOCK_FILE, open_to_append


def lock_run_folder(out: Path) -> RunFolderLock:
    """Hold ``RUN/.lock`` from before the folder is checked to the run's end; a second
    driver is refused with the owner named. The folder is created if missing, and must
    take new files.

    Raises:
        ConfigError: a file stands where the folder or one above it should be.
        DataError: another driver holds the folder, or no file can be created in it.
    """
    blocking = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise ConfigError(f"--out {out}: {blocking} is a file; name a folder for the run")
    lock = RunFolderLock(out, made=_missing_folders(out))
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock.take()
        tempfile.TemporaryFile(dir=out).close()  # a folder whose lock file exists may still be read-only
    except OSError as err:
        lock.close()
        raise DataError(
            f"run folder {out}: cannot write there ({err.strerror or type(err).__name__}); "
            "choose another --out or make it writable"
        ) from None
    except BaseException:
        lock.close()
        raise
    return lock


class RunFolderLock:
    """``RUN/.lock`` held by this driver. A run that ends before its first record
    (RUN/config.yaml) takes back what taking the lock made, the lock file and the
    folders, so a refused start leaves nothing behind."""

    def __init__(self, out: Path, made: list[Path]):
        self.out, self.path, self.made = out, out / LOCK_FILE, made  # made: deepest folder first
        self.handle = None
        self.made_file = False

    def take(self) -> None:
        """Lock the file now at ``RUN/.lock``: one that a driver ending its failed start
        unlinked while this one opened it would lock nothing, so that is tried again."""
        while True:
            self.made_file = self.made_file or not os.path.lexists(self.path)
            handle = open_to_append(self.path, readable=True)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                owner = handle.read().strip() or "another process"
                handle.close()
                raise DataError(
                    f"run folder {self.out} is being written by {owner}; wait for that run or choose another --out"
                ) from None
            try:
                current = os.stat(self.path, follow_symlinks=False).st_ino
            except FileNotFoundError:
                current = None
            if current == os.fstat(handle.fileno()).st_ino:
                break
            handle.close()
        self.handle = handle
        handle.seek(0)
        handle.truncate()
        handle.write(f"the asd-ray driver pid {os.getpid()} on {socket.gethostname()} since {time.ctime()}\n")
        handle.flush()

    def close(self) -> None:
        """Release the lock: another driver may take the folder."""
        try:
            if not (self.out / CONFIG_FILE).exists():  # no run started here
                if self.made_file and self.handle is not None:
                    self.path.unlink(missing_ok=True)
                _remove_empty(self.made)
        finally:
            if self.handle is not None:
                self.handle.close()


def check_cache_dir(cluster: ClusterConfig) -> None:
    """``cluster.cache_dir`` must take new files: the workers would find out only after
    Ray started, in a traceback. Folders made for the check are removed again."""
    if cluster.cache_dir is None:
        return
    folder = Path(cluster.cache_dir)
    made = _missing_folders(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(
            f"cluster.cache_dir {folder}: cannot create files there ({err.strerror or type(err).__name__}); "
            "name a writable folder (or leave it unset for the system's temporary folder)"
        ) from None
    finally:
        _remove_empty(made)


def _missing_folders(path: Path) -> list[Path]:
    """The folders ``path.mkdir(parents=True)`` would create, deepest first."""
    return [p for p in (path, *path.parents) if not p.exists()]


def _remove_empty(folders: list[Path]) -> None:
    """Remove ``folders`` (deepest first) while they are empty."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return
