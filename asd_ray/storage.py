"""Where asd-ray reads and writes: a local path or an object-store URI, through one seam.

Every location a user names (shard sets, seed tables, ground truth, run folders,
model files, Ray Train's storage) is parsed here into a :class:`Location`: a local
path, ``s3://bucket/prefix`` or ``gs://bucket/prefix``. Objects are reached through
``pyarrow.fs`` (S3 and GCS are built into pyarrow's wheels; no other client), with
a file system built from :class:`~asd_ray.config.StorageConfig` and the standard
places for everything else: credentials from ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` / ``AWS_SESSION_TOKEN``, ``~/.aws`` or the instance role
(S3), Google's application default credentials (GCS); the endpoint from
``storage.endpoint``, else ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL`` (pyarrow
itself ignores both) or ``STORAGE_EMULATOR_HOST`` (GCS).

Why the care:

- ``pyarrow.fs.FileSystem.from_uri`` applies a URI's query string
  (``?endpoint_override=`` would send signed requests to another host) and routes
  ``fsspec+...`` and ``hf://`` URIs to other code: so only ``s3`` and ``gs`` are
  accepted, a query string, fragment or credentials in a URI are refused, and the file
  system is built from settings, never from the URI.
- A file system built with explicit keys pickles them in clear (Ray ships it to
  every worker): keys are never passed, each process builds its own file system from
  its environment (:attr:`Location.fs`), and a :class:`Location` pickles as text.
- Object keys come from users and from untrusted files (``dataset.json`` names shard
  files): a key with an empty, ``.`` or ``..`` segment is refused, and a child
  location is joined one checked segment at a time, so nothing escapes its prefix.
- Streaming a shard through ``open_input_stream`` unbuffered costs one ranged GET per
  read call (the README's "Reads" counts a shard's); :func:`open_stream` buffers 8 MiB,
  one GET per 8 MiB.

Writes publish whole objects: :func:`upload` sends a local file under a temporary
key and copies it onto its name on success, so a reader never sees half an object
and an interrupted upload leaves no object under the name.

A third backend (Azure's ``abfs://``, say) is: its scheme in :data:`SCHEMES`, its
bucket-name rule in :func:`_object` if it differs, its standard endpoint variable in
:func:`endpoint`, a branch in :func:`_build_filesystem` building pyarrow's file system
for it from the settings and the environment, and, where its metadata names the size
or version differently, a key in :func:`_version_of`; then a server fixture in the
tests' ``object_store.py`` and a param of the ``open_shard`` and ``backend`` fixtures.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime
import math
import os
import queue
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow.fs as pafs

from asd_ray.config import StorageConfig
from asd_ray.errors import DataError, StorageError

SCHEMES = ("s3", "gs")
STREAM_BUFFER = 8 * 1024**2  # bytes per ranged GET when streaming a shard
MAX_KEY_BYTES = 1024  # S3's and GCS's limit on an object name
MAX_OBJECT_BYTES = 5 * 1024**3  # S3 copies one object of at most 5 GiB in one request
MAX_LISTING = 1_000_000  # entries one listing may return (a listing is untrusted input too)
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):(//)?")
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,221}[a-z0-9]")
_PARTIAL = ".partial-"  # the infix of a temporary key; never a name asd-ray publishes
_RETRY_PAUSE_S = 0.5  # first pause before a stream is reopened; doubled each time, up to
_RETRY_PAUSE_MAX_S = 20.0


@dataclasses.dataclass(frozen=True)
class Location:
    """A local path or an object in a bucket, named as the user named it.

    ``scheme`` is ``""`` for a local path, else one of :data:`SCHEMES`; ``path`` is the
    local path as given, or ``bucket/key`` (no leading or trailing slash). A location
    carries its storage settings (no secrets), so a worker opens it as the driver does.
    """

    scheme: str
    path: str
    settings: StorageConfig = StorageConfig()

    def __str__(self) -> str:
        return f"{self.scheme}://{self.path}" if self.scheme else self.path

    def __fspath__(self) -> str:
        """A local location works wherever a path does; an object's never silently does."""
        if self.scheme:
            raise TypeError(f"{self} is an object-store URI, not a local path")
        return self.path

    @property
    def is_local(self) -> bool:
        return not self.scheme

    @property
    def local(self) -> Path:
        """The local path (only for a local location)."""
        return Path(os.fspath(self))

    @property
    def name(self) -> str:
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    @property
    def parent(self) -> Location:
        if self.is_local:
            return dataclasses.replace(self, path=str(self.local.absolute().parent))
        bucket_and_key = self.path.rsplit("/", 1)
        if len(bucket_and_key) == 1:
            raise DataError(f"{self}: a bucket has no parent; name a prefix inside it")
        return dataclasses.replace(self, path=bucket_and_key[0])

    def __truediv__(self, name: str) -> Location:
        """The child ``name`` (segments joined by ``/``; each checked: never empty, ``.``,
        ``..`` or absolute)."""
        parts = str(name).split("/")
        if str(name).startswith("/") or any(p in ("", ".", "..") or "\0" in p for p in parts):
            raise DataError(f"{self}: {name!r} is not a plain name inside it; name a file within")
        if self.is_local:
            return dataclasses.replace(self, path=str(self.local / name))
        return _object(self.scheme, f"{self.path}/{name}", self.settings, shown=str(self) + "/" + name)

    @property
    def fs(self) -> pafs.FileSystem:
        """This process's file system for the location (built once per settings)."""
        return _filesystem(self.scheme, self.settings)

    @property
    def fs_path(self) -> str:
        """The path ``fs`` takes: an absolute local path, or ``bucket/key``."""
        return str(self.local.absolute()) if self.is_local else self.path

    def with_settings(self, settings: StorageConfig) -> Location:
        return dataclasses.replace(self, settings=settings)


def location(value: str | os.PathLike | Location, settings: StorageConfig | None = None) -> Location:
    """Parse a location a user or a file named: a local path, ``s3://`` or ``gs://``.

    Raises:
        DataError: another scheme (``pipe:``, ``http://``, ``file://``, ...), a query
            string, fragment or credentials in the URI, a bad bucket name or key; one
            line naming the supported forms. The URI is not echoed when it may hold a
            secret.
    """
    if isinstance(value, Location):
        return value if settings is None else value.with_settings(settings)
    settings = settings or StorageConfig()
    text = os.fspath(value)
    if not isinstance(text, str):
        text = text.decode(errors="replace")
    if "\0" in text:
        raise DataError(f"{text!r}: a path may not hold a NUL character")
    match = _SCHEME.match(text)
    is_uri = match is not None and (match.group(2) or match.group(1).lower() == "pipe")
    if not is_uri:
        if match is not None and match.group(1).lower() in SCHEMES:  # what pathlib makes of s3://b/x
            raise DataError(
                f"{text}: did you mean {match.group(1).lower()}://...? Name a bucket as s3://bucket/prefix"
            )
        return Location("", text, settings)
    scheme = match.group(1).lower()
    if scheme == "file":
        raise DataError(f"{text}: give the local path itself, not a file:// URI")
    if scheme not in SCHEMES:
        raise DataError(
            f"{scheme}:{match.group(2) or ''}...: asd-ray reads and writes local paths, "
            f"s3://bucket/prefix and gs://bucket/prefix only; a {scheme}: location is refused"
        )
    return _object(scheme, text[match.end() :], settings, shown=text)


def _object(scheme: str, path: str, settings: StorageConfig, *, shown: str) -> Location:
    """An object location from ``bucket/key``, checked (``shown`` names it in a message)."""
    bucket, _, key = path.partition("/")
    if "@" in bucket or ":" in bucket:
        raise DataError(
            f"{scheme}:// URI with credentials or a port in it: credentials are never read from a "
            "URI (give them as AWS_* variables, ~/.aws or an instance role), the endpoint as storage.endpoint"
        )
    if "?" in path or "#" in path:
        before = re.split(r"[?#]", shown, maxsplit=1)[0]  # a presigned URL's signature is not shown
        raise DataError(
            f"{before}?...: a query string or fragment in a data URI is refused (it could redirect "
            "requests or carry a signature); set storage.endpoint / storage.region instead"
        )
    if not _BUCKET.fullmatch(bucket):
        raise DataError(
            f"{shown}: {bucket!r} is not a bucket name (3-63 lower-case letters, digits, dots and "
            "hyphens); name the location as s3://bucket/prefix"
        )
    key = key.rstrip("/")
    if key:
        parts = key.split("/")
        if any(p in ("", ".", "..") for p in parts) or any(ord(c) < 32 for c in key):
            raise DataError(
                f"{shown}: object keys with empty, '.' or '..' segments or control characters are "
                "refused (they could name objects outside the prefix); give a plain prefix"
            )
        if len(key.encode()) > MAX_KEY_BYTES:
            raise DataError(f"{shown[:80]}...: object key over {MAX_KEY_BYTES} bytes; use a shorter prefix")
    return Location(scheme, f"{bucket}/{key}" if key else bucket, settings)


# --------------------------------------------------------------------------- file systems

_FILESYSTEMS: dict[tuple, pafs.FileSystem] = {}
_FILESYSTEMS_LOCK = threading.Lock()


def _filesystem(scheme: str, settings: StorageConfig, *, sdk_retries: bool = True) -> pafs.FileSystem:
    """This process's file system for ``scheme`` (built once per settings). Streams of shard
    reads use one without the client's own retries (``sdk_retries=False``): they retry in
    :class:`_ResumingStream`, which counts every transient error for the run log."""
    # The variables a file system is built from are part of its key: a process whose
    # environment changed (a test, a notebook) never gets one built for another endpoint.
    key = (scheme, settings, sdk_retries, endpoint(scheme, settings), _region(settings))
    with _FILESYSTEMS_LOCK:
        if key not in _FILESYSTEMS:
            _FILESYSTEMS[key] = _build_filesystem(scheme, settings, sdk_retries=sdk_retries)
        return _FILESYSTEMS[key]


def endpoint(scheme: str, settings: StorageConfig) -> str | None:
    """The endpoint a scheme's requests go to: the setting, else the standard variable."""
    if settings.endpoint:
        return settings.endpoint
    if scheme == "s3":
        return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None
    if scheme == "gs":
        return os.environ.get("STORAGE_EMULATOR_HOST") or None
    return None


def _region(settings: StorageConfig) -> str | None:
    return settings.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or None


def _build_filesystem(scheme: str, settings: StorageConfig, *, sdk_retries: bool = True) -> pafs.FileSystem:
    """A file system from settings and this process's environment (never explicit keys:
    they would pickle in clear)."""
    if scheme == "":
        return pafs.LocalFileSystem()
    url = endpoint(scheme, settings)
    if scheme == "s3":
        options: dict[str, Any] = {
            "anonymous": settings.anonymous,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(
                max_attempts=settings.retries + 1 if sdk_retries else 1
            ),
        }
        if _region(settings):
            options["region"] = _region(settings)
        if url:
            options["endpoint_override"] = url
        return pafs.S3FileSystem(**options)
    if scheme == "gs":
        # Google's convention: an emulator named by STORAGE_EMULATOR_HOST takes no credentials.
        emulated = not settings.endpoint and bool(os.environ.get("STORAGE_EMULATOR_HOST"))
        options = {
            "anonymous": settings.anonymous or emulated,
            "retry_time_limit": datetime.timedelta(seconds=15 * (settings.retries + 1) if sdk_retries else 1),
        }
        if url:
            scheme_part, sep, host = url.partition("://")
            options["endpoint_override"] = host if sep else url
            options["scheme"] = scheme_part if sep else "https"
        return pafs.GcsFileSystem(**options)
    raise DataError(f"{scheme}: not a supported storage scheme; use one of {', '.join(SCHEMES)}")


def for_ray_train(where: Location) -> tuple[str, pafs.FileSystem | None]:
    """``(storage_path, storage_filesystem)`` for Ray Train's ``RunConfig``: a local
    absolute path, or ``bucket/prefix`` with this seam's file system."""
    if where.is_local:
        return str(where.local.absolute()), None
    return where.path, where.fs


# --------------------------------------------------------------------------- errors


_DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY", "SIGNATURE_DOES_NOT_MATCH", "Forbidden", "HTTP status 403")
_MISSING = ("NO_SUCH_", "does not exist")


def failure(where: Location, err: OSError, doing: str) -> DataError | StorageError:
    """One line for a failed operation: forbidden or missing (the user's to fix: DataError),
    or unreachable after the retries (StorageError), with the fix. The client's text never
    holds a key (checked in the tests)."""
    text = str(err)
    if isinstance(err, PermissionError) or any(code in text for code in _DENIED):
        return DataError(
            f"{where}: access denied ({doing}); check the credentials (AWS_* variables, ~/.aws, the "
            "instance role, or GOOGLE_APPLICATION_CREDENTIALS) and the bucket's permissions"
        )
    if isinstance(err, FileNotFoundError) or any(code in text for code in _MISSING):
        return DataError(f"{where}: does not exist ({doing}); check the location")
    reason = (text.strip().splitlines() or [type(err).__name__])[0][:300]
    return StorageError(f"{where}: {doing} failed ({reason}); check storage.endpoint and the network")


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass(frozen=True)
class ObjectVersion:
    """What identifies one object's content without reading it: its size and ETag (objects)
    or modification time (local files, where no ETag exists)."""

    size: int
    tag: str

    def __str__(self) -> str:
        return f"{self.size} bytes, {self.tag}"


def info(where: Location) -> pafs.FileInfo:
    """The file info of ``where`` (``type`` is ``FileType.NotFound`` when absent)."""
    try:
        return where.fs.get_file_info(where.fs_path)
    except OSError as err:
        raise failure(where, err, "looking it up") from None


def exists(where: Location) -> bool:
    return info(where).type != pafs.FileType.NotFound


def is_file(where: Location) -> bool:
    return info(where).type == pafs.FileType.File


def list_names(where: Location, *, limit: int, folders: bool = False) -> list[str]:
    """The names directly inside folder/prefix ``where`` (only its folders/prefixes with
    ``folders``), sorted, without the temporary keys of uploads (one a killed upload left
    must not make a set look tampered with); more than ``limit`` is an error."""
    try:
        found = where.fs.get_file_info(pafs.FileSelector(where.fs_path, allow_not_found=True))
    except OSError as err:
        raise failure(where, err, "listing it") from None
    if len(found) > limit:
        raise DataError(
            f"{where}: holds {len(found)} entries, more than the {limit} expected here; "
            "point at the set's own prefix"
        )
    return sorted(
        f.base_name
        for f in found
        if (not folders or f.type == pafs.FileType.Directory) and not f.base_name.startswith(_PARTIAL)
    )


def version(where: Location) -> ObjectVersion:
    """Size and ETag of an object (one HEAD), or size and mtime of a local file."""
    if where.is_local:
        stat = where.local.stat()
        return ObjectVersion(stat.st_size, f"mtime {stat.st_mtime_ns}")
    try:
        with where.fs.open_input_stream(where.fs_path) as stream:
            meta = stream.metadata()
    except OSError as err:
        raise failure(where, err, "reading its size and ETag") from None
    return _version_of(meta)


def versions(places: list[Location]) -> list[ObjectVersion]:
    """:func:`version` of many objects, 16 lookups at a time."""
    if all(p.is_local for p in places):
        return [version(p) for p in places]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        return list(pool.map(version, places))


def _version_of(meta: dict[str, bytes]) -> ObjectVersion:
    """An object's version from its stream's metadata (the GET or HEAD response headers)."""
    headers = {str(k).lower(): bytes(v).decode(errors="replace") for k, v in meta.items()}
    size_text = headers.get("content-length") or headers.get("size") or ""  # S3 / GCS
    size = int(size_text) if size_text.isdigit() else -1
    tag = headers.get("etag", "").strip('"')
    return ObjectVersion(size, f"etag {tag}" if tag else "no etag")


def read_bytes(
    where: Location, *, limit: int, what: str | None = None, fix: str = "check the location"
) -> bytes:
    """The bytes of the object ``where`` (at most ``limit``: a larger one is refused before
    it is read). Local files are read by :func:`asd_ray.files.read_regular_file`."""
    from asd_ray.files import read_regular_file  # files builds on this module for its paths

    label = what or str(where)
    if where.is_local:
        return read_regular_file(where.local, what=label, fix=fix, limit=limit)
    found = info(where)
    if found.type == pafs.FileType.NotFound:
        raise DataError(f"{label}: does not exist; {fix}")
    if found.type != pafs.FileType.File:
        raise DataError(f"{label}: a prefix, not an object; {fix}")
    if found.size is not None and found.size > limit:
        raise DataError(f"{label}: {found.size} bytes, over the {limit}-byte limit of such a file; {fix}")
    with open_stream(where, expected=None) as stream:
        data = stream.read(limit + 1)
    if len(data) > limit:
        raise DataError(f"{label}: larger than the {limit}-byte limit of such a file; {fix}")
    return data


class RetryCounter:
    """Transient read failures retried in this process (a run reports them in its log)."""

    _count = 0
    _lock = threading.Lock()

    @classmethod
    def add(cls) -> None:
        with cls._lock:
            cls._count += 1

    @classmethod
    def take(cls) -> int:
        """The count since the last take (and reset it)."""
        with cls._lock:
            count, cls._count = cls._count, 0
            return count


class _ResumingStream:
    """A read stream over an object that survives dropped connections and busy servers: a
    failed open or read is retried up to ``storage.retries`` times in a row, with backoff
    (capped), the object reopened at the offset reached after checking that its size and
    ETag have not changed; each retry is counted (:class:`RetryCounter`). A read that makes
    progress renews the allowance, and the object must end at the size it had. A stream
    of a range ``[start, stop)`` ends at ``stop``."""

    def __init__(
        self, where: Location, expected: ObjectVersion | None, start: int = 0, stop: int | None = None
    ):
        self.where, self.offset, self.stop, self.version = where, start, stop, expected
        self.fs = _filesystem(where.scheme, where.settings, sdk_retries=False)
        self.closed = threading.Event()  # set by the reader that gives the stream up
        self._stream: Any = None
        self._renew()
        self._retrying(self._reopen, "opening it")

    def _renew(self) -> None:
        self._pause, self._retries_left = _RETRY_PAUSE_S, self.where.settings.retries

    def _retrying(self, action: Any, doing: str) -> Any:
        while True:
            try:
                return action()
            except (FileNotFoundError, PermissionError) as err:
                raise failure(self.where, err, doing) from None
            except OSError as err:
                self._drop()
                if self._retries_left == 0 or _is_refusal(err) or self.closed.is_set():
                    raise failure(self.where, err, doing) from None
                self._retries_left -= 1
                RetryCounter.add()
                self.closed.wait(self._pause)
                self._pause = min(2 * self._pause, _RETRY_PAUSE_MAX_S)

    def _reopen(self) -> None:
        """Open the object at the offset reached (a ranged read after a failure)."""
        if self.offset == 0 and self.stop is None:
            stream = self.fs.open_input_stream(self.where.fs_path, compression=None)
        else:
            stream = self.fs.open_input_file(self.where.fs_path)
            stream.seek(self.offset)
        found = _version_of(stream.metadata())
        if self.version is not None and found != self.version:
            stream.close()
            raise DataError(
                f"{self.where}: changed since the shard set was opened (now {found}, was {self.version}); "
                "objects must not change during a run: restore it or re-make the shard set"
            )
        self.version, self._stream = found, stream

    def read(self, size: int) -> bytes:
        def attempt() -> bytes:
            if self._stream is None:
                self._reopen()
            return self._stream.read(size)

        if self.stop is not None:
            size = min(size, self.stop - self.offset)
            if size <= 0:
                return b""
        data = self._retrying(attempt, f"reading at byte {self.offset}")
        self.offset += len(data)
        if data:
            self._renew()
        elif self.version is not None and 0 <= self.version.size != self.offset:
            raise DataError(
                f"{self.where}: ended at byte {self.offset} of its {self.version.size}; it changed while "
                "it was read: restore it or re-make the shard set"
            )
        return data

    def _drop(self) -> None:
        if self._stream is not None:
            with contextlib.suppress(OSError):
                self._stream.close()
            self._stream = None

    def close(self) -> None:
        self.closed.set()
        self._drop()


class _ReadAhead:
    """Reads an object's next range in a thread while the caller walks the one before, so
    the network wait overlaps decoding: without it, a scorer's load took the local time
    plus the whole raw read time (measured, jobs/BENCHMARKS.md). Holds at most three
    ranges: the one being walked, one ready, one arriving. Only the thread touches the
    object's stream, and closes it."""

    def __init__(self, source: _ResumingStream):
        self._source = source
        self._ready: queue.Queue = queue.Queue(maxsize=1)
        self._chunk, self._at, self._ended = b"", 0, False
        self._thread = threading.Thread(target=self._fetch, name="asd-ray-read-ahead", daemon=True)
        self._thread.start()

    def _fetch(self) -> None:
        try:
            while not self._source.closed.is_set():
                data = self._source.read(STREAM_BUFFER)
                self._hand_over(data)
                if not data:
                    return
        except BaseException as err:  # noqa: BLE001 - handed to the reader, who raises it
            self._hand_over(err)
        finally:
            self._source.close()

    def _hand_over(self, item: bytes | BaseException) -> None:
        while not self._source.closed.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        parts, wanted = [], size if size >= 0 else math.inf
        while wanted > 0 and not self._ended:
            if self._at == len(self._chunk):
                item = self._ready.get()
                if isinstance(item, BaseException):
                    self._ended = True
                    raise item
                if not item:
                    self._ended = True
                    break
                self._chunk, self._at = item, 0
            take = int(min(wanted, len(self._chunk) - self._at))
            parts.append(self._chunk[self._at : self._at + take])
            self._at += take
            wanted -= take
        return b"".join(parts)

    def close(self) -> None:
        """Stop the thread: it ends after the range in flight (a retry's pause is cut short)
        and closes the object's stream itself."""
        self._source.closed.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._ready.get_nowait()
        self._chunk, self._ended = b"", True


class _Limited:
    """The first ``size`` bytes of a stream (a range of a local file)."""

    def __init__(self, stream: BinaryIO, size: int):
        self._stream, self._left = stream, size

    def read(self, size: int = -1) -> bytes:
        size = self._left if size < 0 else min(size, self._left)
        data = self._stream.read(size)
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._stream.close()


def _is_refusal(err: OSError) -> bool:
    """An error no retry can mend: access denied, a missing bucket or key."""
    return any(code in str(err) for code in (*_DENIED, *_MISSING))


@contextlib.contextmanager
def open_stream(
    where: Location, *, expected: ObjectVersion | None = None, start: int = 0, stop: int | None = None
) -> Iterator[BinaryIO]:
    """A read stream (``read(n)`` only) over ``where``: a buffered local file, or an object
    read in 8 MiB ranges that resumes after a dropped connection.

    Args:
        expected: the object's version when its set was opened; a changed object is refused.
        start, stop: read only bytes ``start <= i < stop`` (default: all).
    """
    if where.is_local:
        size = None if stop is None else stop - start
        try:
            handle = open(where.local, "rb", buffering=min(1 << 20, max(size or 1 << 20, 1)))
            handle.seek(start)
        except OSError as err:
            raise failure(where, err, "opening it") from None
        with handle:
            yield handle if size is None else _Limited(handle, size)
        return
    stream = _ReadAhead(_ResumingStream(where, expected, start, stop))
    try:
        yield stream  # type: ignore[misc]
    finally:
        stream.close()


# --------------------------------------------------------------------------- writing


def upload(source: Path, where: Location) -> None:
    """Publish local file ``source`` as the object ``where``: sent under a temporary key,
    then copied onto its name, so the name holds the whole file or nothing new."""
    size = source.stat().st_size  # a local problem is the local file's, not the bucket's
    if size > MAX_OBJECT_BYTES:
        raise DataError(
            f"{source}: {size} bytes, over the {MAX_OBJECT_BYTES}-byte limit of one copy in object "
            "storage; make it smaller (shards: a lower --samples-per-shard)"
        )
    partial = where.parent / f"{_PARTIAL}{uuid.uuid4().hex}-{where.name}"  # a dot name: no reader takes it
    src = open(source, "rb")  # noqa: SIM115 - closed below, with the stream
    try:
        with src, where.fs.open_output_stream(partial.fs_path) as out:
            shutil.copyfileobj(src, out, STREAM_BUFFER)
        where.fs.copy_file(partial.fs_path, where.fs_path)
    except OSError as err:
        raise failure(where, err, "writing it") from None
    finally:
        with contextlib.suppress(OSError):
            where.fs.delete_file(partial.fs_path)


def publish_folder(source: Path, where: Location, *, last: tuple[str, ...] = ()) -> None:
    """Upload every file of local folder ``source`` (recursively) under prefix ``where``;
    the names in ``last`` after all others, in that order (the marker that makes the set
    complete, like a shard set's ``dataset.json``)."""
    files = sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink())
    relative = [p.relative_to(source).as_posix() for p in files]
    rank = {name: i + 1 for i, name in enumerate(last)}
    for path, name in sorted(zip(files, relative), key=lambda pair: (rank.get(pair[1], 0), pair[1])):
        upload(path, where / name)


def delete_objects(where: Location, names: list[str]) -> None:
    """Delete the objects ``names`` under ``where`` (missing ones are fine)."""
    for name in names:
        try:
            where.fs.delete_file((where / name).fs_path)
        except FileNotFoundError:
            continue
        except OSError as err:
            raise failure(where / name, err, "deleting it") from None


def download(where: Location, target: Path, *, limit: int) -> None:
    """Copy the object ``where`` to local file ``target`` (at most ``limit`` bytes)."""
    found = info(where)
    if found.type != pafs.FileType.File:
        raise DataError(f"{where}: does not exist or is a prefix; check the location")
    if found.size is not None and found.size > limit:
        raise DataError(f"{where}: {found.size} bytes, over the {limit}-byte limit of such a file")
    with open_stream(where) as stream, open(target, "wb") as out:
        copied = 0
        while chunk := stream.read(STREAM_BUFFER):
            copied += len(chunk)
            if copied > limit:
                raise DataError(f"{where}: grew past the {limit}-byte limit while being read")
            out.write(chunk)


def scratch_folder(prefix: str) -> Path:
    """A new private local folder for staging an object-store write."""
    return Path(tempfile.mkdtemp(prefix=f"asd-ray-{prefix}-"))


def lexists(where: Location) -> bool:
    """Whether anything is at ``where``: a local name even when it is a link or a dangling
    one (the readers then refuse it by name), or an object."""
    return os.path.lexists(where.local) if where.is_local else exists(where)


def absolute(where: Location) -> Location:
    """``where`` with a local path made absolute (how outputs are reported); a URI as it is."""
    return dataclasses.replace(where, path=str(where.local.absolute())) if where.is_local else where
