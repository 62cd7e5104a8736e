"""A run folder at an object-store URI: staged on the driver's disk, published as it grows.

Objects cannot be appended to or renamed, and a run folder is written a record at a
time (a split table per epoch, the model, then the metrics row that commits the
epoch, a log line per event). So a run at ``s3://bucket/runs/r1`` is written, as a
local run is, into a staging folder on the driver's node; after every record the
driver publishes what changed (:meth:`StagedRun.publish`), each file as one whole
object, in the order that keeps the folder consistent: everything else, then the
metrics tables that commit an epoch, then the summary. A resume downloads the
published folder first, so any driver node can continue it. The training workers
never read this folder: what they need reaches them through Ray, and Ray Train
keeps its checkpoints in its own storage (``RUN/train`` at the URI, or
``cluster.storage``).
"""

from __future__ import annotations

import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from asd_ray import storage
from asd_ray.errors import DataError, StorageError, UserError
from asd_ray.progress import terminal_safe
from asd_ray.run_folder import CONFIG_FILE, LOCK_FILE, METRICS_FILE, METRICS_JSONL, SUMMARY_FILE, TRAIN_DIR
from asd_ray.storage import Location

MAX_RUN_FILES = 100_000  # objects a run folder holds besides Ray Train's (an epoch adds about 3)
MAX_RUN_FILE_BYTES = 16 * 1024**3  # a model file of the largest architectures stays far below
_COMMITS = (METRICS_JSONL, METRICS_FILE, SUMMARY_FILE)  # published last, in this order


class StagedRun:
    """The local staging folder of a run at ``target`` and what has been published of it."""

    def __init__(self, target: Location, staging: Path):
        self.target, self.staging = target, staging
        self._published: dict[str, tuple[int, int, int]] = {}  # name: (inode, size, mtime_ns) sent

    @classmethod
    def open(cls, target: Location, *, resume: bool, cache_dir: str | None) -> StagedRun:
        """A staging folder for ``target``: empty for a new run (the prefix must hold no
        run), or holding the published run for ``--resume``."""
        root = Path(cache_dir or tempfile.gettempdir())
        root.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(str(target).encode()).hexdigest()[:16]  # names the run in a listing
        staging = Path(tempfile.mkdtemp(prefix=f"asd-ray-run-{digest}-", dir=root))  # this driver's own
        run = cls(target, staging)
        try:
            everything = run._remote_files()
            names = [n for n in everything if not n.startswith(f"{TRAIN_DIR}/")]  # Ray Train's, read by it
            if resume:
                if CONFIG_FILE not in names:
                    raise DataError(f"--resume {target}: no {CONFIG_FILE} there; start a new run with --out")
                for name in names:
                    local = staging / name
                    local.parent.mkdir(parents=True, exist_ok=True)
                    storage.download(target / name, local, limit=MAX_RUN_FILE_BYTES)
                    run._published[name] = run._state(name)
            elif everything:  # a new run must not find another run's records or checkpoints
                raise DataError(
                    f"run folder {target} is not empty; pass --resume to continue it or choose another --out"
                )
        except OSError as err:  # this node's disk (full, unwritable), not the bucket
            run.close()
            raise StorageError(
                f"{staging}: cannot stage the run of {target} ({err.strerror or type(err).__name__}); free "
                "space there or set cluster.cache_dir to a folder with room"
            ) from None
        except BaseException:
            run.close()  # nothing of a refused start stays on this node
            raise
        return run

    def _remote_files(self) -> list[str]:
        """The run's objects below ``target``, as relative names."""
        selector = pafs.FileSelector(self.target.fs_path, recursive=True, allow_not_found=True)
        try:
            found = self.target.fs.get_file_info(selector)
        except OSError as err:
            raise storage.failure(self.target, err, "listing it") from None
        prefix = self.target.fs_path.rstrip("/") + "/"
        names = [
            f.path[len(prefix) :] for f in found if f.type == pafs.FileType.File and f.path.startswith(prefix)
        ]
        names = [n for n in names if not n.rsplit("/", 1)[-1].startswith(".partial-")]  # a killed upload's
        if len(names) > MAX_RUN_FILES:
            raise DataError(f"{self.target}: holds {len(names)} objects, more than a run folder; check --out")
        for name in names:
            self.target / name  # refuses a key with '.', '..' or empty segments
        return sorted(names)

    def _state(self, name: str) -> tuple[int, int, int]:
        """What tells a staged file's versions apart: an atomic rewrite is a new inode, an
        append a new size."""
        stat = (self.staging / name).stat()
        return stat.st_ino, stat.st_size, stat.st_mtime_ns

    def publish(self) -> None:
        """Upload every staged file that is new or changed since the last publish: the
        records first, then the metrics tables (an epoch's commit), then the summary."""
        changed = []
        for path in sorted(self.staging.rglob("*")):
            name = path.relative_to(self.staging).as_posix()
            if not path.is_file() or path.is_symlink() or name == LOCK_FILE or path.name.startswith("."):
                continue  # the lock is this node's; dot files are temporaries of atomic writes
            state = self._state(name)
            if self._published.get(name) != state:
                changed.append((name, state))  # the state before the upload: a later append is sent next time
        order = {name: i + 1 for i, name in enumerate(_COMMITS)}
        for name, state in sorted(changed, key=lambda pair: (order.get(pair[0], 0), pair[0])):
            storage.upload(self.staging / name, self.target / name)
            self._published[name] = state

    def close(self) -> None:
        """Remove the staging folder (after a last :meth:`publish` by the caller)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def finish(self, *, failing: bool) -> None:
        """Publish what the run wrote until here (its log's last lines too), then remove the
        staging folder. If that fails, the staging folder stays and is named; an error
        already on its way (``failing``: a bad input, an interrupt) keeps its own line and
        status."""
        try:
            self.publish()
        except (UserError, StorageError) as err:
            line = (
                f"asd-ray: {self.target}: the run's last records were not published ({err}); they are "
                f"kept in {self.staging}: copy them there, or continue with --resume from what the bucket holds"
            )
            if not failing:
                raise StorageError(line) from None
            print(terminal_safe(line), file=sys.stderr, flush=True)
            return
        self.close()

    def naming(self, err: BaseException) -> BaseException:
        """``err`` with the staging folder's path replaced by the run's URI in its message (a
        full disk stays named: it is this node's, not the bucket's)."""
        if not isinstance(err, UserError) or str(self.staging) not in str(err):
            return err
        renamed = type(err)(str(err).replace(str(self.staging), str(self.target)))
        renamed.__cause__ = err.__cause__
        return renamed
