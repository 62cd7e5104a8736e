"""Arrow tables checked against the versioned schemas in ``schemas/``.

Every table asd-ray writes or reads passes through :func:`validate`, so a column
of the wrong type or a null where none is allowed fails loudly at the boundary
instead of deep inside a split. Files are written under a temporary name and
renamed, so no reader ever sees half a table.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from asd_ray import storage
from asd_ray.errors import ConfigError, DataError, StorageError
from asd_ray.files import kind_of
from asd_ray.storage import Location

MAX_TABLE_BYTES = 4 * 1024**3  # a table read from object storage is held in memory
# Rows per Parquet row group written (pyarrow's default is 1,048,576): a reader of a few rows
# (``asd-ray audit sample``) decodes one group of this many, found by its sample_id statistics.
ROW_GROUP_ROWS = 65_536
TABLE_NAMES = ("manifest", "poison", "seeds", "scores", "splits", "metrics", "flags")

_UMASK = os.umask(0)
os.umask(_UMASK)

_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "float32": pa.float32(),
    "float64": pa.float64(),
    "string": pa.string(),
}


@functools.cache
def schema_document(name: str) -> dict[str, Any]:
    """The parsed JSON document of schema ``name`` (e.g. ``"manifest"``)."""
    if name not in (*TABLE_NAMES, "shard_record"):
        raise ValueError(f"unknown schema {name!r}; known: {', '.join(TABLE_NAMES)}")
    return json.loads(_schema_folder().joinpath(f"{name}.json").read_text())


def _schema_folder():
    """Where the schemas are: ``schemas/`` beside the package in a checkout (also the copy of
    one that ``ray job submit --working-dir`` unpacks on every node, where the resource
    package of an installed asd-ray is shadowed by the copy), else the installed resource
    package ``asd_ray.schemas``."""
    checkout = Path(__file__).resolve().parents[1] / "schemas"
    if (checkout / "manifest.json").is_file():
        return checkout
    return resources.files("asd_ray.schemas")


@functools.cache
def schema(name: str) -> pa.Schema:
    """``pyarrow.Schema`` of table ``name``, with name and version in its metadata."""
    doc = schema_document(name)
    fields = [pa.field(f["name"], _TYPES[f["type"]], nullable=f["nullable"]) for f in doc["fields"]]
    meta = {"asd_ray.schema": doc["name"], "asd_ray.schema_version": str(doc["version"])}
    return pa.schema(fields, metadata=meta)


def validate(
    table: pa.Table, name: str, *, where: str = "table", columns: Sequence[str] | None = None
) -> pa.Table:
    """Check ``table`` against schema ``name`` and return it in schema column order.

    Columns must match by name and exact type; non-nullable columns must hold no
    null. A file written under another version of the schema is refused. With
    ``columns``, ``table`` is a projection holding just those columns of the schema.

    Raises:
        DataError: naming ``where`` (a path, usually), the column and the fix.
    """
    expected = schema(name)
    if columns is not None:
        unknown = sorted(set(columns) - set(expected.names))
        if unknown:
            raise ValueError(f"{unknown}: not columns of the {name} schema")
        expected = pa.schema([f for f in expected if f.name in columns], metadata=expected.metadata)
    meta = table.schema.metadata or {}
    version = meta.get(b"asd_ray.schema_version")
    wanted = expected.metadata[b"asd_ray.schema_version"].decode()
    if version is not None and version.decode(errors="replace") != wanted:
        raise DataError(
            f"{where}: written with {name} schema v{version.decode(errors='replace')}, this asd-ray "
            f"reads v{wanted}; re-create it with this version"
        )
    twice = sorted({c for c in table.column_names if table.column_names.count(c) > 1})
    if twice:
        raise DataError(
            f"{where}: column {twice[0]!r} appears {table.column_names.count(twice[0])} times; "
            f"re-create the table with each column once (see schemas/{name}.json)"
        )
    missing = [f.name for f in expected if f.name not in table.column_names]
    extra = [c for c in table.column_names if c not in expected.names]
    if missing or extra:
        raise DataError(
            f"{where}: columns do not match the {name} schema "
            f"(missing: {missing or 'none'}, unexpected: {extra or 'none'}); see schemas/{name}.json"
        )
    for field in expected:
        column = table.column(field.name)
        if column.type != field.type:
            raise DataError(
                f"{where}: column {field.name!r} has type {column.type}, the {name} schema wants "
                f"{field.type}; cast it before writing (see schemas/{name}.json)"
            )
        if not field.nullable and column.null_count:
            raise DataError(
                f"{where}: column {field.name!r} holds {column.null_count} null(s) but may not; "
                f"fill every row (see schemas/{name}.json)"
            )
    return pa.Table.from_arrays([table.column(n) for n in expected.names], schema=expected)


def from_pydict(columns: dict[str, Any], name: str) -> pa.Table:
    """Build a validated table from plain columns, cast to the schema's types."""
    expected = schema(name)
    try:
        table = pa.Table.from_pydict(
            {f.name: pa.array(columns[f.name], type=f.type) for f in expected}, schema=expected
        )
    except KeyError as err:
        raise DataError(f"{name} table: column {err.args[0]!r} is missing") from None
    return validate(table, name)


def id_order(
    ids: np.ndarray, *, where: str, fix: str, n: int | None = None, complete: bool = True
) -> np.ndarray:
    """Row order that sorts the sample ``ids``, which must be exactly 0..n-1, each once
    (or, not ``complete``, some of them: a part of a table, such as one row group).

    Rows are matched to samples by id, never by position, so a table re-saved in
    another order reads the same; a missing, repeated or foreign id is refused
    rather than silently shifting every row after it. ``n`` defaults to the
    largest id + 1.

    Raises:
        DataError: naming ``where``, the first offending id and ``fix``.
    """
    if len(ids) == 0:
        raise DataError(f"{where}: the table is empty; {fix}")
    if complete and n in (None, len(ids)) and ids[0] == 0 and (np.diff(ids) == 1).all():
        return np.arange(len(ids))  # written in sample_id order (every table asd-ray writes): no sort
    order = np.argsort(ids, kind="stable")
    ordered = ids[order]
    dup = ordered[1:][ordered[1:] == ordered[:-1]]
    if dup.size:
        raise DataError(f"{where}: sample id {dup[0]} appears more than once; {fix}")
    n = int(ordered[-1]) + 1 if n is None else n
    out = ordered[(ordered < 0) | (ordered >= n)]
    if out.size:
        raise DataError(f"{where}: sample id {out[0]} is outside 0..{n - 1}; {fix}")
    if complete and ordered.size != n:  # distinct ids in 0..n-1: the first gap is the first id missing
        gaps = np.flatnonzero(ordered != np.arange(ordered.size))
        first = int(gaps[0]) if gaps.size else ordered.size
        raise DataError(
            f"{where}: sample id {first} is missing ({n - ordered.size} of the ids 0..{n - 1}); {fix}"
        )
    return order


def by_sample_id(table: pa.Table, *, where: str, fix: str, n: int | None = None) -> pa.Table:
    """``table``'s rows in sample_id order, row i being sample i (:func:`id_order`)."""
    ids = table.column("sample_id").to_numpy()
    order = id_order(ids, where=where, fix=fix, n=n)
    return table if np.array_equal(order, np.arange(len(order))) else table.take(pa.array(order))


def write_parquet(
    table: pa.Table, path: str | Path | Location, name: str, *, overwrite: bool = True
) -> Path | Location:
    """Validate ``table`` against schema ``name`` and write it atomically to ``path``, a
    local path or an object-store URI (:func:`atomic_file`)."""
    where = storage.location(path)
    table = validate(table, name, where=str(where))
    # Dictionary pages for the string columns only (pools, names): tried on float and id
    # columns, which never repeat, they cost three times the write for nothing.
    strings = [f.name for f in table.schema if pa.types.is_string(f.type)]
    with atomic_file(where, overwrite=overwrite) as tmp:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_ROWS, use_dictionary=strings)
    return where.local if where.is_local else where


def read_parquet(
    path: str | Path | Location, name: str, *, rows: int | None = None, data: bytes | None = None
) -> pa.Table:
    """Read a whole Parquet file (a local path or an object of at most :data:`MAX_TABLE_BYTES`)
    and validate it against schema ``name`` (:class:`ParquetReader`, whose arguments these are)."""
    with ParquetReader(path, name, rows=rows, data=data) as reader:
        return reader.read()


class ParquetReader:
    """One Parquet file opened for reading some of its columns or row groups.

    The footer is checked before any row is read: the row count (a 5 MB file can
    declare 200 M rows) and the schema's names, types and version. Each read then checks
    the nulls of what it read. An object is read whole, once (at most
    :data:`MAX_TABLE_BYTES`). Row-group statistics come from the file and may lie: a
    caller that picks row groups by them must check the ids of the rows it gets.

    Args:
        rows: the row count the table must have.
        data: the file's bytes, when the caller has read them already (for a digest).

    Raises:
        DataError: naming the file: missing, not Parquet, another schema, another row count.
    """

    def __init__(
        self, path: str | Path | Location, name: str, *, rows: int | None = None, data: bytes | None = None
    ) -> None:
        self.where, self.name = storage.location(path), name
        if data is not None:
            source: Any = pa.BufferReader(data)
        elif self.where.is_local:
            if not self.where.local.is_file():
                raise DataError(f"{self.where}: no such {name} table; check the path")
            source = self.where.local
        else:
            fix = f"check the location of the {name} table"
            source = pa.BufferReader(storage.read_bytes(self.where, limit=MAX_TABLE_BYTES, fix=fix))
        with self._readable():
            self._file = pq.ParquetFile(source)
            schema_read = self._file.schema_arrow
        try:
            declared = self.metadata.num_rows
            if rows is not None and declared != rows:
                raise DataError(
                    f"{self.where}: {declared} rows where {rows} are expected; re-create the {name} table"
                )
            validate(schema_read.empty_table(), name, where=str(self.where))
        except BaseException:
            self.close()
            raise

    @property
    def metadata(self) -> pq.FileMetaData:
        """The file's footer: row count, row groups and their statistics."""
        return self._file.metadata

    def read(self, columns: Sequence[str] | None = None, row_groups: Sequence[int] | None = None) -> pa.Table:
        """The rows of ``row_groups`` (default all), only ``columns`` (default all, in schema
        order), validated."""
        with self._readable():
            if row_groups is None:
                table = self._file.read(columns=list(columns) if columns is not None else None)
            else:
                table = self._file.read_row_groups(
                    list(row_groups), columns=list(columns) if columns is not None else None
                )
        return validate(table, self.name, where=str(self.where), columns=columns)

    def row_groups_holding(self, column: str, value: int) -> list[int]:
        """Row groups whose statistics of integer ``column`` do not rule out ``value``
        (every group without statistics), ascending."""
        index = self._file.schema_arrow.get_field_index(column)
        found = []
        for group in range(self.metadata.num_row_groups):
            stats = self.metadata.row_group(group).column(index).statistics
            if stats is None or not stats.has_min_max or stats.min <= value <= stats.max:
                found.append(group)
        return found

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> ParquetReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _readable(self) -> Iterator[None]:
        """Arrow's errors on an invalid file, an unsupported codec or type, or an unreadable
        one, as one DataError naming the file."""
        try:
            yield
        except (pa.ArrowException, OSError) as err:
            reason = (str(err).strip().splitlines() or [""])[0]  # Arrow's messages may list a whole schema
            raise DataError(
                f"{self.where}: not a readable Parquet file ({type(err).__name__}: {reason}); re-create it"
            ) from None


def _temporary_beside(path: Path, *, folder: bool) -> Path:
    """A new temporary file or folder in ``path``'s folder (created if missing). A path that
    cannot hold one (under a regular file, on /proc, read-only) is refused in one line;
    a full disk is left to the caller's StorageError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            return Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        return Path(tmp)
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise
        blocking = next((p for p in path.parents if p.exists() and not p.is_dir()), None)
        why = f"{blocking} is a file, not a folder" if blocking else f"cannot create files in {path.parent}"
        raise ConfigError(
            f"cannot write {path}: {why} ({err.strerror or type(err).__name__}); choose another output path"
        ) from None


def check_output(path: Path | Location, *, folder: bool = False, overwrite: bool = True) -> None:
    """Refuse to write the file (or ``folder``) ``path`` unless it is absent or a regular
    file (a real folder), and, when ``overwrite`` is false, unless it is absent.

    A rename replaces the name itself: a link the user named, a FIFO or ``/dev/null``
    would become a regular file (run as root, ``--out /dev/full`` "succeeded"). So only
    what asd-ray could have written is ever replaced, never through or over a link.
    At an object-store URI only ``overwrite`` is checked (objects are no links), an empty
    prefix counting as absent.

    Raises:
        ConfigError: ``path`` is a link, FIFO, device or socket, or a folder where a file
            is written (a file where a folder is).
        DataError: ``path`` exists and ``overwrite`` is false.
    """
    where = storage.location(path)
    if not where.is_local:
        if not overwrite and _holds_objects(where):
            raise DataError(f"{where} already exists; choose another --out or pass --overwrite")
        return
    try:
        mode = os.lstat(where.local).st_mode
    except OSError:  # absent, or under a path that cannot hold it (refused where it is written)
        return
    wanted, noun = (stat.S_ISDIR, "folder") if folder else (stat.S_ISREG, "file")
    if not wanted(mode):
        raise ConfigError(
            f"{path} is {kind_of(mode)}; name a {noun} to write (a link or special file is never replaced)"
        )
    if not overwrite:
        raise DataError(f"{path} already exists; choose another --out or pass --overwrite")


def _holds_objects(where: Location) -> bool:
    """Whether an object or objects under the prefix are at ``where``. An empty prefix is
    nothing: pyarrow leaves one (an empty ``prefix/`` marker) where it deleted the last object."""
    found = storage.info(where)
    if found.type == pafs.FileType.Directory:
        return bool(storage.list_names(where, limit=storage.MAX_LISTING))
    return found.type == pafs.FileType.File


@contextlib.contextmanager
def atomic_file(path: Path | Location, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    ``path`` is checked by :func:`check_output` before and again just before the rename.
    At an object-store URI the temporary file is local and is uploaded on success
    (:func:`asd_ray.storage.upload`: the object holds the whole file or is unchanged).
    """
    where = storage.location(path)
    if not where.is_local:
        with _staged(where, folder=False, overwrite=overwrite) as tmp:
            yield tmp
        return
    path = where.local
    check_output(path, overwrite=overwrite)
    tmp = _temporary_beside(path, folder=False)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)
        check_output(path, overwrite=overwrite)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(
    path: str | Path | Location,
    *,
    overwrite: bool = False,
    check_replaceable: Callable[[Location], list[str]] | None = None,
    marker: str | None = None,
) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; it becomes ``path`` only on success.

    On any error the temporary folder is removed, so a failed command leaves
    nothing half-written behind. At an object-store URI the folder is local and its
    files are uploaded on success, ``marker`` last (a reader takes the prefix for a
    complete set only once the marker is there); an object already at ``path`` is
    replaced only with ``overwrite``, after ``check_replaceable`` (which returns the
    names to delete) and with the old marker deleted first.

    Raises:
        ConfigError, DataError: ``path`` is not a folder, or exists and ``overwrite`` is
            false (:func:`check_output`).
    """
    where = storage.location(path)
    if not where.is_local:
        with _staged(
            where, folder=True, overwrite=overwrite, check_replaceable=check_replaceable, marker=marker
        ) as tmp:
            yield tmp
        return
    path = where.local.absolute()
    check_output(path, folder=True, overwrite=overwrite)
    if path.exists() and check_replaceable is not None:
        check_replaceable(where)  # raises if ``path`` is not the kind of folder overwrite may replace
    tmp = _temporary_beside(path, folder=True)
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_UMASK)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def _staged(
    where: Location,
    *,
    folder: bool,
    overwrite: bool,
    check_replaceable: Callable[[Location], list[str]] | None = None,
    marker: str | None = None,
) -> Iterator[Path]:
    """A local scratch file or folder that is published at object location ``where`` on
    success (and removed either way); a folder whose publishing fails is deleted again."""

    def check() -> list[str]:
        check_output(where, folder=folder, overwrite=overwrite)
        present = storage.list_names(where, limit=storage.MAX_LISTING) if folder else []
        if present and check_replaceable is not None:
            return check_replaceable(where)
        return present

    check()
    scratch = storage.scratch_folder("upload")
    try:
        target = scratch / (where.name if not folder else "folder")
        if folder:
            target.mkdir()
        yield target
        if not folder:
            storage.upload(target, where)
            return
        old = check()  # again: it may have changed meanwhile
        if old:
            first = [marker] if marker in old else []
            storage.delete_objects(where, first + [n for n in old if n != marker])
        try:
            storage.publish_folder(target, where, last=(marker,) if marker else ())
        except BaseException:  # an interrupt too: what was published is no set, and would block the next try
            published = [p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file()]
            with contextlib.suppress(DataError, StorageError):
                storage.delete_objects(where, published)
            raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
