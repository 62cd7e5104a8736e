"""WebDataset shards keyed by a dense ``sample_id``: writing, safe reading, worker slices.

A shard set is a folder::

    DIR/dataset.json        class names, counts, image size (see ShardSetInfo)
    DIR/manifest.parquet    one row per sample (schemas/manifest.json)
    DIR/NAME-000000.tar     WebDataset records: KEY.png|KEY.jpg + KEY.cls
    DIR/poison.parquet      ground truth, only in sets made by ``asd-ray poison``

The data is untrusted: records are read by :mod:`asd_ray.data.records` (which
refuses any member but images, ``cls`` and ``json`` before its bytes are looked
at), and :class:`ShardSet` checks each one against the manifest. This module
knows nothing about losses or training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from PIL import Image

from asd_ray import progress, storage, tables
from asd_ray.data.records import MAX_PIXELS, decode_members, iter_records
from asd_ray.data.sources.base import Source, check_class_names
from asd_ray.errors import DataError
from asd_ray.files import parse_json
from asd_ray.storage import Location, ObjectVersion

PNG_MAX_SIZE = 64
JPEG_QUALITY = 95
DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
GROUND_TRUTH_FILE = "poison.parquet"
FORMAT_VERSION = 1
JPEG_MAX_SIDE = 65_535  # the JPEG format's largest side
_DECODE_CHUNK = 64  # records parsed before they are decoded
_CHANGED = "a shard was truncated or changed after it was made: re-make the shard set"
MAX_SHARDS = 1_000_000  # shard files one set may list
_MIN_RECORD_BYTES = 4 * 512  # a tar record: two members, each a 512-byte header and >= one data block
# Kept records closer than this are read as one range: reading through the bytes between
# costs less than opening another range (an object store's request takes ~10-50 ms).
_READ_THROUGH = 1 << 20


def sample_key(sample_id: int) -> str:
    """The record key of ``sample_id``: zero-padded, no dots (WebDataset splits on dots)."""
    return f"{sample_id:09d}"


# --------------------------------------------------------------------------- encoding


def encode_image(image: np.ndarray) -> tuple[bytes, str]:
    """Encode an (H, W, C) uint8 image: PNG (lossless) up to 64 px, else JPEG q95.

    Returns:
        (bytes, ext) with ext ``"png"`` or ``"jpg"``.
    """
    pil = _to_pil(image)
    buf = io.BytesIO()
    if max(image.shape[:2]) <= PNG_MAX_SIZE:
        pil.save(buf, format="PNG", compress_level=1)
        return buf.getvalue(), "png"
    pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), "jpg"


def _to_pil(image: np.ndarray) -> Image.Image:
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] not in (1, 3):
        raise DataError(f"image must be (H, W, 1|3) uint8, got {image.shape} {image.dtype}; convert it first")
    return Image.fromarray(image[:, :, 0] if image.shape[2] == 1 else image)


# --------------------------------------------------------------------------- writing


@dataclasses.dataclass(frozen=True)
class ShardSetInfo:
    """Contents of ``dataset.json``: what a reader needs before opening any shard."""

    name: str
    num_samples: int
    class_names: list[str]
    shards: list[dict[str, int | str]]  # [{"file": "train-000000.tar", "count": 10000}, ...]
    image_size: list[int] | None  # [H, W] when every image has it, else None (mixed)
    channels: int | None
    source: str
    attack: dict | None = None  # set for poisoned sets: attack name, params, parent folder
    format_version: int = FORMAT_VERSION

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


_SHARD_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.tar")
MAX_DATASET_JSON_BYTES = 64 * 1024**2  # 100,000 shards are about 6 MB
_REMAKE = "re-make the shard set with `asd-ray shards make`"


def read_dataset_info(path: Path | Location) -> ShardSetInfo:
    """Parse and check ``dataset.json``: every field of the right type, shard files inside the folder.

    Raises:
        DataError: naming the file, the field and the fix.
    """
    where = storage.location(path)
    return parse_dataset_info(storage.read_bytes(where, limit=MAX_DATASET_JSON_BYTES, fix=_REMAKE), where)


def parse_dataset_info(data: bytes, where: Location) -> ShardSetInfo:
    """:func:`read_dataset_info` of bytes already read from ``where``."""

    def bad(why: str) -> DataError:
        return DataError(f"{where}: {why}; {_REMAKE}")

    raw = parse_json(data, what=str(where), fix=_REMAKE)
    if not isinstance(raw, dict):
        raise bad("not a JSON object")
    fields = {f.name: f for f in dataclasses.fields(ShardSetInfo)}
    unknown = sorted(set(raw) - set(fields))
    missing = sorted(n for n, f in fields.items() if f.default is dataclasses.MISSING and n not in raw)
    if unknown or missing:
        raise bad(f"unexpected fields {unknown} / missing fields {missing}")

    def is_int(v, low: int = 0) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= low

    checks = {
        "name": isinstance(raw["name"], str),
        "num_samples": is_int(raw["num_samples"], 1),
        "class_names": isinstance(raw["class_names"], list),
        "shards": isinstance(raw["shards"], list)
        and all(
            isinstance(s, dict)
            and set(s) == {"file", "count"}
            and isinstance(s["file"], str)
            and _SHARD_FILE.fullmatch(s["file"])
            and is_int(s["count"])
            for s in raw["shards"]
        ),
        "image_size": raw["image_size"] is None
        or (
            isinstance(raw["image_size"], list)
            and len(raw["image_size"]) == 2
            and all(is_int(v, 1) for v in raw["image_size"])
            and _image_fits(*raw["image_size"])
        ),
        "channels": raw["channels"] is None or raw["channels"] in (1, 3),
        "source": isinstance(raw["source"], str),
        "attack": raw.get("attack") is None or _attack_record_ok(raw["attack"]),
        "format_version": is_int(raw.get("format_version", FORMAT_VERSION)),
    }
    wrong = [name for name, ok in checks.items() if not ok]
    if wrong:
        hint = " (shard files must be plain NAME.tar names inside the folder)" if wrong[0] == "shards" else ""
        raise bad(f"field {wrong[0]!r} has a wrong type or value{hint}")
    try:
        check_class_names(raw["class_names"], "class_names")
    except DataError as err:
        raise bad(str(err)) from None
    return ShardSetInfo(**raw)


def _image_fits(height: int, width: int) -> bool:
    """Whether a shard set may hold an image of this size: not larger than the readers decode
    (MAX_PIXELS) or than JPEG can encode (JPEG_MAX_SIDE per side)."""
    return height * width <= MAX_PIXELS and max(height, width) <= JPEG_MAX_SIDE


def _attack_record_ok(attack: object) -> bool:
    """The ``attack`` record ``asd-ray poison`` writes: JSON parameters, the clean parent's
    folder and identity (a hostile one must not reach a path or a lookup as another type)."""
    return (
        isinstance(attack, dict)
        and isinstance(attack.get("params", {}), dict)
        and isinstance(attack.get("clean", ""), str)
        and isinstance(attack.get("clean_identity", ""), str)
    )


MANIFEST_ROW_GROUP = 16_384  # manifest rows a writer holds before it writes them as one row group


@dataclasses.dataclass(frozen=True)
class WrittenManifest:
    """What :class:`ShardWriter` wrote into ``manifest.parquet``: enough for ``dataset.json``."""

    num_rows: int
    shapes: frozenset[tuple[int, int, int]]  # the (H, W, C) found


class ShardWriter:
    """Append records to ``NAME-000000.tar``, ``NAME-000001.tar``, ... and stream the manifest
    into ``manifest.parquet``, a row group every :data:`MANIFEST_ROW_GROUP` records, so the
    writer's memory does not grow with the set (ImageNet-21k has 14 M records).

    Used by :func:`write_shards` and by the attacks, which copy clean records'
    bytes unchanged and re-encode only the images they modify.
    """

    def __init__(self, folder: Path, name: str, samples_per_shard: int, num_classes: int):
        if samples_per_shard < 1:
            raise DataError(f"samples per shard must be >= 1, got {samples_per_shard}")
        if not name or any(c in name for c in "/.{} "):
            raise DataError(f"shard name {name!r} must be non-empty without / . {{ }} or spaces")
        self.folder, self.name = folder, name
        self.samples_per_shard, self.num_classes = samples_per_shard, num_classes
        self._tar: tarfile.TarFile | None = None
        self._shard_index, self._in_shard = -1, 0
        self._rows: dict[str, list] = {f: [] for f in tables.schema("manifest").names}
        self._manifest = pq.ParquetWriter(folder / MANIFEST_FILE, tables.schema("manifest"))
        self._written, self._shapes = 0, set()
        self._counts: list[dict[str, int | str]] = []

    def add(
        self, sample_id: int, image: bytes, ext: str, label: int, shape: Sequence[int], source: str
    ) -> None:
        """Write one record. ``shape`` is the decoded (H, W, C) of ``image``."""
        if not 0 <= label < self.num_classes:
            raise DataError(
                f"sample {sample_id} ({source}): label {label} is outside 0..{self.num_classes - 1}; "
                "fix the labels or the class list"
            )
        if self._tar is None or self._in_shard == self.samples_per_shard:
            self._next_shard()
        key, offset = sample_key(sample_id), self._tar.offset
        self._add_member(f"{key}.{ext}", image)
        self._add_member(f"{key}.cls", str(label).encode())
        shard = self._counts[-1]["file"]
        for column, value in zip(
            self._rows,
            (sample_id, key, shard, self._in_shard, offset, label, *shape, source),
            strict=True,
        ):
            self._rows[column].append(value)
        self._shapes.add(tuple(shape))
        self._in_shard += 1
        self._counts[-1]["count"] = self._in_shard
        if len(self._rows["sample_id"]) == MANIFEST_ROW_GROUP:
            self._write_rows()

    def close(self) -> tuple[WrittenManifest, list[dict[str, int | str]]]:
        """Finish the last shard and the manifest; what the manifest holds, and per-shard counts."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
        self._write_rows()
        self._manifest.close()
        if not self._counts:
            raise DataError("no samples to write: the source is empty")
        return WrittenManifest(self._written, frozenset(self._shapes)), self._counts

    def _write_rows(self) -> None:
        """The rows held, checked against the schema, as one row group of the manifest."""
        if self._rows["sample_id"]:
            self._manifest.write_table(tables.from_pydict(self._rows, "manifest"))
            self._written += len(self._rows["sample_id"])
            self._rows = {column: [] for column in self._rows}

    def _next_shard(self) -> None:
        if self._tar is not None:
            self._tar.close()
        self._shard_index += 1
        self._in_shard = 0
        file = f"{self.name}-{self._shard_index:06d}.tar"
        self._tar = tarfile.open(self.folder / file, "w", format=tarfile.USTAR_FORMAT)
        self._counts.append({"file": file, "count": 0})

    def _add_member(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o444, 0  # deterministic bytes
        self._tar.addfile(info, io.BytesIO(data))


def finish_shard_set(
    folder: Path,
    manifest: WrittenManifest,
    counts: list[dict[str, int | str]],
    *,
    class_names: Sequence[str],
    source: str,
    attack: dict | None = None,
) -> ShardSetInfo:
    """Write ``dataset.json`` into a folder of finished shards and their manifest (what
    :meth:`ShardWriter.close` returned): the mark that the set is complete."""
    heights, widths, channels = ({shape[axis] for shape in manifest.shapes} for axis in range(3))
    info = ShardSetInfo(
        name=str(counts[0]["file"]).rsplit("-", 1)[0],
        num_samples=manifest.num_rows,
        class_names=list(class_names),
        shards=counts,
        image_size=[*heights, *widths] if len(heights) == len(widths) == 1 else None,
        channels=next(iter(channels)) if len(channels) == 1 else None,
        source=source,
        attack=attack,
    )
    (folder / DATASET_FILE).write_text(json.dumps(dataclasses.asdict(info), indent=2) + "\n")
    return info


def check_replaceable(folder: Location) -> list[str]:
    """--overwrite replaces only an empty folder or a shard set made by asd-ray, and only if
    every entry is a regular file that set names (its shards in ``dataset.json``, its
    manifest, ``dataset.json`` and ground truth): a user's ``backup.tar`` is never deleted.

    Returns:
        The names of the set's entries (what replacing it deletes).
    """
    if folder.is_local and (not folder.local.is_dir() or folder.local.is_symlink()):
        raise DataError(
            f"{folder} is not a folder; --overwrite replaces only shard sets: choose another --out"
        )
    entries = storage.list_names(folder, limit=storage.MAX_LISTING)
    if not entries:
        return []
    refuse = "--overwrite replaces only a shard set's own files: move it away or choose another --out"
    if DATASET_FILE not in entries or not storage.is_file(folder / DATASET_FILE):
        raise DataError(
            f"{folder} is not a shard set made by asd-ray (it holds {entries[0]!r}) and has no "
            f"{DATASET_FILE}; {refuse}"
        )
    try:
        listed = {str(s["file"]) for s in read_dataset_info(folder / DATASET_FILE).shards}
    except DataError:
        raise DataError(
            f"{folder}/{DATASET_FILE} is not a readable shard set description; {refuse}"
        ) from None
    own = listed | {DATASET_FILE, MANIFEST_FILE, GROUND_TRUTH_FILE}
    for name in entries:
        entry = folder / name
        plain = not entry.is_local or (not entry.local.is_symlink() and entry.local.is_file())
        if name not in own or not plain or not storage.is_file(entry):
            raise DataError(f"{folder} holds {name!r}, which is not a file of its shard set; {refuse}")
    return entries


def new_shard_set_dir(out: str | Path | Location, *, overwrite: bool = False):
    """A temporary folder that becomes the shard set ``out`` on success (see tables.atomic_dir;
    at a URI, ``dataset.json`` is published last: a prefix without it is no shard set)."""
    return tables.atomic_dir(
        out, overwrite=overwrite, check_replaceable=check_replaceable, marker=DATASET_FILE
    )


def write_shards(
    source: Source,
    out: str | Path | Location,
    *,
    name: str = "train",
    samples_per_shard: int = 10_000,
    overwrite: bool = False,
) -> ShardSetInfo:
    """Write a source as a shard set in ``out`` (atomically: all or nothing).

    Images arrive either decoded (encoded here: PNG up to 64 px, else JPEG q95)
    or as original JPEG bytes, which are stored unchanged.
    """
    with new_shard_set_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, name, samples_per_shard, len(source.class_names))
        records = progress.bar(source.records, total=source.num_records, desc=f"shards make {name}")
        for sample_id, record in enumerate(records):
            if record.encoded is not None:
                shape = _encoded_shape(record.encoded, source=record.source)
            elif record.image is not None:
                shape = record.image.shape
            else:
                raise DataError(f"{record.source}: record has neither image nor bytes")
            _check_storable(shape, record.source)
            if record.encoded is not None:
                data, ext = record.encoded, record.ext or "jpg"
            else:
                data, ext = encode_image(record.image)
            writer.add(sample_id, data, ext, record.label, shape, record.source)
        manifest, counts = writer.close()
        info = finish_shard_set(tmp, manifest, counts, class_names=source.class_names, source=source.name)
    return info


def _check_storable(shape: Sequence[int], source: str) -> None:
    """Refuse an image the shard set could not hold or give back (:func:`_image_fits`)."""
    height, width = shape[:2]
    if not _image_fits(height, width):
        raise DataError(
            f"{source}: image is {height}x{width}, over the {MAX_PIXELS}-pixel (and {JPEG_MAX_SIDE} px "
            "per side) limit of a shard set; resize the source images (--image-size)"
        )


def _encoded_shape(data: bytes, *, source: str) -> tuple[int, int, int]:
    """(H, W, C) of encoded image bytes, read from the header only."""
    try:
        with Image.open(io.BytesIO(data)) as pil:
            return pil.height, pil.width, 1 if pil.mode == "L" else 3
    except OSError as err:
        raise DataError(f"{source}: not a readable image ({err}); remove the file") from None


# --------------------------------------------------------------------------- reading


class Sample(NamedTuple):
    """One decoded record (a NamedTuple: cheap to build once per image)."""

    sample_id: int
    key: str
    label: int
    image: np.ndarray  # (H, W, C) uint8
    shard: str


@dataclasses.dataclass(frozen=True)
class ShardSlice:
    """Records ``start <= i < stop`` (positions inside the shard) of one shard file."""

    path: Location
    start: int
    stop: int

    @property
    def count(self) -> int:
        return self.stop - self.start


class ShardSet:
    """An opened shard folder (a local folder or an object-store prefix): its ``dataset.json``,
    manifest and shard files.

    Opening a set reads its manifest once, row group by row group, checks it and keeps
    only what reading records needs: each sample's label and record offset (12 bytes a
    sample; 17 when image sizes are mixed). ImageNet-21k's 14 M samples then cost 170 MB
    in every process that opens the set, not gigabytes. Other columns are read again
    from the manifest when asked for (:meth:`manifest_rows`, :meth:`manifest_batches`).

    Args:
        versions: each shard's size and ETag (objects) or mtime (local files) as another
            process saw them when it opened the set (:attr:`versions`); a shard that has
            changed since is refused when it is read.
    """

    def __init__(self, folder: str | Path | Location, *, versions: list[ObjectVersion] | None = None):
        self.folder = storage.location(folder)
        if self.folder.is_local:
            self.folder = storage.location(self.folder.local.absolute(), self.folder.settings)
            if not self.folder.local.is_dir():
                raise DataError(
                    f"shard folder {self.folder} does not exist; create it with `asd-ray shards make`"
                )
        meta_path = self.folder / DATASET_FILE
        entries = storage.list_names(self.folder, limit=MAX_SHARDS + 3)
        if DATASET_FILE not in entries or not storage.is_file(meta_path):
            found = "holds no files" if not entries else f"has no {DATASET_FILE}"
            raise DataError(f"shard folder {self.folder} {found}; create it with `asd-ray shards make`")
        dataset_bytes = storage.read_bytes(meta_path, limit=MAX_DATASET_JSON_BYTES, fix=_REMAKE)
        self.info = parse_dataset_info(dataset_bytes, meta_path)
        if self.info.format_version != FORMAT_VERSION:
            raise DataError(f"{meta_path}: format v{self.info.format_version} is not supported")
        self.paths = [self.folder / str(s["file"]) for s in self.info.shards]
        self._shard_of = {path.name: index for index, path in enumerate(self.paths)}
        counts = np.array([int(s["count"]) for s in self.info.shards], np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])  # shard i holds ids starts[i]..starts[i+1]-1
        self._check_listing(entries, meta_path)
        self._shard_sizes = self._check_sizes(meta_path)
        manifest_bytes = storage.read_bytes(
            self.folder / MANIFEST_FILE, limit=tables.MAX_TABLE_BYTES, fix=_REMAKE
        )
        self._identity = hashlib.sha256(manifest_bytes + dataset_bytes).hexdigest()
        self._versions = versions
        self._uniform_shape = None
        if self.info.image_size is not None and self.info.channels is not None:
            self._uniform_shape = (*self.info.image_size, self.info.channels)
        self._labels, self._offsets, self._shapes = self._read_index(manifest_bytes)

    # ------------------------------------------------------------------ the manifest

    def _read_index(self, data: bytes) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Check the manifest (``data``) row group by row group; return what is kept of it:
        labels (N,) int32, record offsets (N,) int64 and, for mixed sizes, (N, 3) uint16
        shapes. Only one row group's rows are ever decoded at a time."""
        n, where = len(self), self.folder / MANIFEST_FILE
        labels, offsets = np.empty(n, np.int32), np.empty(n, np.int64)
        shapes = None if self._uniform_shape else np.empty((n, 3), np.uint16)
        done = 0
        for batch in self._batches(data):
            rows = len(batch)
            if done + rows > n:
                break  # counted below: more rows than the metadata declared
            self._check_rows(batch, done)
            labels[done : done + rows] = batch.column("label").to_numpy()
            offsets[done : done + rows] = batch.column("offset").to_numpy()
            if shapes is not None:
                for axis, column in enumerate(("height", "width", "channels")):
                    shapes[done : done + rows, axis] = batch.column(column).to_numpy()
            done += rows
        if done != n:
            raise DataError(f"{where}: holds other than the {n} rows it declares; {_REMAKE}")
        self._check_offsets(offsets)
        return labels, offsets, shapes

    def _batches(self, data: bytes, columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """The manifest's rows (``columns`` of them, default all), a row group at a time,
        checked against its schema."""
        with tables.ParquetReader(
            self.folder / MANIFEST_FILE, "manifest", rows=len(self), data=data
        ) as reader:
            for group in range(reader.metadata.num_row_groups):
                yield from reader.read(columns, row_groups=[group]).to_batches()

    def _check_rows(self, batch: pa.RecordBatch, first: int) -> None:
        """One row group of the manifest (rows ``first``..) against ``dataset.json``: ids,
        keys, record places, labels and image sizes. Models are sized from them before any
        image is decoded, and the audit's review list hands each flagged sample's shard and
        key to a data-cleaning step."""
        where = f"{self.folder}/{MANIFEST_FILE}"
        ids = np.arange(first, first + len(batch))
        if not np.array_equal(batch.column("sample_id").to_numpy(), ids):
            raise DataError(f"{self.folder}: manifest sample ids are not 0..N-1 in order")
        expected_keys = pc.utf8_lpad(pc.cast(batch.column("sample_id"), pa.string()), 9, "0")
        wrong = np.flatnonzero(~pc.equal(batch.column("key"), expected_keys).to_numpy(zero_copy_only=False))
        if wrong.size:
            row = int(wrong[0])
            raise DataError(
                f"{where}: row {first + row} has key {batch.column('key')[row].as_py()!r}, asd-ray names "
                f"sample {first + row} {sample_key(first + row)!r}; {_REMAKE}"
            )
        files = [str(s["file"]) for s in self.info.shards]
        # shard names as indices into dataset.json's list (-1: a name it does not list)
        shard_index = pc.fill_null(pc.index_in(batch.column("shard"), pa.array(files)), -1).to_numpy()
        places = batch.column("index_in_shard").to_numpy()
        expected_index = np.searchsorted(self._starts, ids, side="right") - 1
        expected_places = ids - self._starts[expected_index]
        wrong = np.flatnonzero((shard_index != expected_index) | (places != expected_places))
        if wrong.size:
            row = int(wrong[0])
            raise DataError(
                f"{where}: row {first + row} places its record at "
                f"{batch.column('shard')[row].as_py()!r} #{places[row]}, {DATASET_FILE} at "
                f"{files[expected_index[row]]!r} #{expected_places[row]}; re-make the shard set"
            )
        labels = batch.column("label").to_numpy()
        outside = np.flatnonzero((labels < 0) | (labels >= self.info.num_classes))
        if outside.size:
            raise DataError(
                f"{where}: row {first + int(outside[0])} has label {int(labels[outside[0]])}, "
                f"outside the {self.info.num_classes} classes of {DATASET_FILE}; re-make the shard set"
            )
        heights, widths = (batch.column(c).to_numpy().astype(np.int64) for c in ("height", "width"))
        channels = batch.column("channels").to_numpy()
        if self._uniform_shape is None:
            # mixed sizes: each record is checked against its own row when decoded, but
            # buffers are sized from the rows before that
            bad = np.flatnonzero(
                (heights < 1)
                | (widths < 1)
                | (heights * widths > MAX_PIXELS)
                | (np.maximum(heights, widths) > JPEG_MAX_SIDE)
                | ~np.isin(channels, (1, 3))
            )
            if bad.size:
                row = int(bad[0])
                raise DataError(
                    f"{where}: row {first + row} claims a {heights[row]}x{widths[row]}x"
                    f"{channels[row]} image, which no shard set holds; re-make the shard set"
                )
            return
        for column, values, value in zip(
            ("height", "width", "channels"), (heights, widths, channels), self._uniform_shape
        ):
            differ = np.flatnonzero(values != value)
            if differ.size:
                raise DataError(
                    f"{where}: row {first + int(differ[0])} has {column} {values[differ[0]]}, "
                    f"{DATASET_FILE} says every image is {'x'.join(map(str, self._uniform_shape))}; "
                    "re-make the shard set"
                )

    def _check_offsets(self, offsets: np.ndarray) -> None:
        """Record offsets as a writer leaves them: each shard's first record at byte 0, each
        next one at least a record's size further, the last a record's size before the
        shard's end. Whether a record does lie at its offset is checked whenever it is read
        (:meth:`iter_checked` compares every record's place with its offset)."""
        counts = np.diff(self._starts)
        firsts = self._starts[:-1][counts > 0]
        step = np.diff(offsets)
        within = np.ones(len(step), bool)
        within[firsts[1:] - 1] = False  # the step from one shard's last record to the next's first
        room = np.repeat(self._shard_sizes, counts) - offsets
        checks = [
            (firsts[offsets[firsts] != 0], "is its shard's first record, which lies at byte 0"),
            (np.flatnonzero(within & (step < _MIN_RECORD_BYTES)) + 1, "is too close to the record before it"),
            (np.flatnonzero(room < _MIN_RECORD_BYTES), "is too close to its shard's end"),
        ]
        for rows, why in checks:
            if rows.size:
                row = int(rows[0])
                raise DataError(
                    f"{self.folder}/{MANIFEST_FILE}: row {row} places its record at byte {offsets[row]}, "
                    f"but it {why}; re-make the shard set"
                )

    def manifest_batches(self, columns: Sequence[str]) -> Iterator[pa.RecordBatch]:
        """The manifest's ``columns`` (and ``sample_id``), a row group at a time in id order,
        from the manifest this set was opened with (a changed file is refused)."""
        wanted = ["sample_id", *(c for c in columns if c != "sample_id")]
        yield from self._batches(self._manifest_bytes(), wanted)

    def manifest_rows(self, ids: np.ndarray, columns: Sequence[str]) -> pa.Table:
        """The manifest rows of sample ``ids`` (ascending order), ``columns`` of them (and
        ``sample_id``); only the row groups holding them are decoded."""
        ids = np.unique(np.asarray(ids, np.int64))
        if ids.size and not 0 <= ids[0] <= ids[-1] < len(self):
            raise ValueError(f"sample ids must lie in 0..{len(self) - 1}")
        wanted = ["sample_id", *(c for c in columns if c != "sample_id")]
        data = self._manifest_bytes()
        with tables.ParquetReader(
            self.folder / MANIFEST_FILE, "manifest", rows=len(self), data=data
        ) as reader:
            sizes = [reader.metadata.row_group(g).num_rows for g in range(reader.metadata.num_row_groups)]
            bounds = np.concatenate([[0], np.cumsum(sizes)])  # ids are 0..N-1 in order (checked on open)
            groups = np.unique(np.searchsorted(bounds, ids, side="right") - 1).tolist()
            pieces = [
                reader.read(wanted, row_groups=[g]).take(
                    pa.array(ids[(ids >= bounds[g]) & (ids < bounds[g + 1])] - bounds[g])
                )
                for g in groups
            ]
        return pa.concat_tables(pieces) if pieces else tables.schema("manifest").empty_table().select(wanted)

    def _manifest_bytes(self) -> bytes:
        """The manifest's bytes again, refused if they are not the ones the set was opened with."""
        data = storage.read_bytes(self.folder / MANIFEST_FILE, limit=tables.MAX_TABLE_BYTES, fix=_REMAKE)
        meta = storage.read_bytes(self.folder / DATASET_FILE, limit=MAX_DATASET_JSON_BYTES, fix=_REMAKE)
        if hashlib.sha256(data + meta).hexdigest() != self._identity:
            raise DataError(
                f"{self.folder}: its manifest changed since it was opened; a shard set must not change "
                "while it is read: restore it or re-make it"
            )
        return data

    # ------------------------------------------------------------------ files

    def _check_sizes(self, meta_path: Path) -> np.ndarray:
        """The counts of ``dataset.json`` against each other and the shard files' sizes, before
        the manifest they size is read (a hostile count must not allocate anything).

        Returns:
            (shards,) int64: each shard file's size.
        """
        counts = [int(s["count"]) for s in self.info.shards]
        if sum(counts) != self.info.num_samples:
            raise DataError(
                f"{meta_path}: the shards' counts add up to {sum(counts)}, num_samples is "
                f"{self.info.num_samples}; re-make the shard set"
            )
        sizes = self._sizes()
        for path, count in zip(self.paths, counts):
            size = sizes.get(path.name)
            if size is None:
                raise DataError(f"shard {path} is missing; re-make or re-copy the shard set")
            if count * _MIN_RECORD_BYTES > size:
                raise DataError(
                    f"{meta_path}: shard {path.name} is {f'{size} bytes' if size else 'empty'}, too small for the "
                    f"{count} records it is said to hold; re-make or re-copy the shard set"
                )
        return np.array([sizes[path.name] for path in self.paths], np.int64)

    def _sizes(self) -> dict[str, int]:
        """Each shard file's size by name (one listing of an object prefix), regular files only."""
        if not self.folder.is_local:
            try:
                found = self.folder.fs.get_file_info(
                    pafs.FileSelector(self.folder.fs_path, allow_not_found=True)
                )
            except OSError as err:
                raise storage.failure(self.folder, err, "listing it") from None
            return {f.base_name: f.size for f in found if f.type == pafs.FileType.File}
        return {p.name: p.local.stat().st_size for p in self.paths if p.local.is_file()}

    def _check_listing(self, entries: list[str], meta_path: Location) -> None:
        """An object prefix holds the set's own files only: a listing with more shards than
        ``dataset.json`` declares (a tampered or mixed-up prefix) is refused. A local folder
        may hold other files, as it always could."""
        if self.folder.is_local:
            return
        own = {p.name for p in self.paths} | {DATASET_FILE, MANIFEST_FILE, GROUND_TRUTH_FILE}
        extra = [name for name in entries if name not in own]
        if extra:
            raise DataError(
                f"{self.folder}: holds {len(extra)} object(s) that {DATASET_FILE} does not declare (first: "
                f"{extra[0]!r}); a shard set's prefix holds only its own files: move them or re-make the set"
            )

    def _expected(self, shard: Location) -> ObjectVersion | None:
        """The version another process saw of an object shard (None: nothing to compare)."""
        if self._versions is None or shard.is_local:
            return None
        if len(self._versions) != len(self.paths):  # dataset.json was rewritten since
            raise DataError(
                f"{self.folder}: lists {len(self.paths)} shards, {len(self._versions)} when the run opened it; "
                "a shard set must not change during a run: restore it or re-make it"
            )
        return self._versions[self._shard_of[shard.name]]

    @property
    def versions(self) -> list[ObjectVersion]:
        """Each shard's size and ETag (objects: one HEAD each, made once) or mtime (local)."""
        if self._versions is None:
            self._versions = storage.versions(self.paths)
        return self._versions

    # ------------------------------------------------------------------ samples

    def __len__(self) -> int:
        return self.info.num_samples

    @property
    def labels(self) -> np.ndarray:
        """(N,) int64 labels in sample-id order."""
        return self._labels.astype(np.int64)

    def require_uniform_size(self, why: str) -> tuple[int, int, int]:
        """(H, W, C) shared by every image, or a DataError naming a record that differs."""
        if self._uniform_shape is not None:
            return self._uniform_shape
        bad = np.flatnonzero((self._shapes != self._shapes[0]).any(1))
        if bad.size:
            row = int(bad[0])
            first, other = self._shapes[0], self._shapes[row]
            shard = self.paths[int(np.searchsorted(self._starts, row, side="right") - 1)].name
            raise DataError(
                f"{why} needs one image size, but {self.folder.name}/{shard} record {sample_key(row)!r} is "
                f"{'x'.join(map(str, other))} while the first is {'x'.join(map(str, first))} "
                f"({bad.size} differ); re-make the shards with --image-size"
            )
        return tuple(int(v) for v in self._shapes[0])

    def worker_slices(self, num_workers: int) -> list[list[ShardSlice]]:
        """Split the set into ``num_workers`` contiguous runs of equal sample count (+-1).

        Every sample is read by exactly one worker; a shard may be shared by neighbours
        (by more than two when it holds more than a share), each reading its own record
        range. Why contiguous runs: :func:`assign_slices`.
        """
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        counts = [int(s["count"]) for s in self.info.shards]
        return assign_slices(self.paths, counts, num_workers)

    def iter_samples(
        self, slices: Iterable[ShardSlice] | None = None, *, keep: np.ndarray | None = None
    ) -> Iterator[Sample]:
        """Decode samples (all, or those of ``slices``), checked against the manifest
        (see :meth:`iter_checked`)."""
        for sample, _ in self.iter_checked(slices, keep=keep):
            yield sample

    def iter_checked(
        self, slices: Iterable[ShardSlice] | None = None, *, keep: np.ndarray | None = None
    ) -> Iterator[tuple[Sample, dict[str, bytes]]]:
        """The one verified reader: every record decoded, counted and compared with the
        manifest (key, place, label, image size), with its members as stored (an attack
        copies an unchanged record's bytes). Every command reads shard sets through it, so
        a set one command refuses is refused by all.

        A slice is read from its first record's offset to its last record's end: those
        bytes must hold exactly its records, each where the manifest places it. The slices
        of a whole pass (every scoring pass) tile each shard from byte 0, so every pass
        checks that the manifest's offsets are where a plain walk of the tar finds each
        record: no offset can show a reader a record that others do not see.

        Args:
            keep: optional (N,) bool over sample ids; records outside it are skipped
                before decoding (their keys, places and count are still checked). Without
                ``slices``, only the byte ranges holding kept records are read
                (:meth:`_runs`): a share of every W-th sample, or a page's thumbnails,
                costs what it holds, not the set.
        """
        pieces = list(slices) if slices is not None else self._runs(keep)
        with contextlib.ExitStack() as streams:

            def opened(piece: ShardSlice) -> BinaryIO:
                start, stop = self._byte_range(piece)
                return streams.enter_context(
                    storage.open_stream(
                        piece.path, expected=self._expected(piece.path), start=start, stop=stop
                    )
                )

            upcoming = opened(pieces[0]) if pieces else None
            for at, piece in enumerate(pieces):
                # The next range opens now: its first bytes arrive while this one is walked.
                stream, upcoming = upcoming, opened(pieces[at + 1]) if at + 1 < len(pieces) else None
                try:
                    yield from self._walk(stream, piece, keep)
                finally:
                    stream.close()  # its memory goes now; the stack closes what an error leaves open

    def _walk(
        self, stream: BinaryIO, piece: ShardSlice, keep: np.ndarray | None
    ) -> Iterator[tuple[Sample, dict[str, bytes]]]:
        """The records of one slice from ``stream`` (its byte range), checked and decoded."""
        shard = self._shard_of[piece.path.name]
        base, count = int(self._starts[shard]), int(self._starts[shard + 1] - self._starts[shard])
        name, chunk, read = piece.path.name, [], 0
        first = base + piece.start
        start, stop = self._byte_range(piece)
        records = iter_records(stream, str(piece.path), base=start, to_end=stop is None)
        for index, key, members, offset in records:
            position = piece.start + index
            if position >= count:
                raise DataError(
                    f"{name}: holds more than the {count} records dataset.json lists; the "
                    "shard was changed after it was made: re-make the shard set"
                )
            sample_id, read = base + position, read + 1
            if key != sample_key(sample_id):
                raise DataError(
                    f"{name}: record {position} has key {key!r}, the manifest expects "
                    f"{sample_key(sample_id)!r}; the shard was changed after it was made: re-make the shard set"
                )
            if offset != self._offsets[sample_id]:
                raise DataError(
                    f"{name}: record {key!r} lies at byte {offset}, the manifest places it at byte "
                    f"{self._offsets[sample_id]}; the shard was changed after it was made: re-make the shard set"
                )
            if keep is not None and not keep[sample_id]:
                continue
            chunk.append((sample_id, key, members))
            if len(chunk) == _DECODE_CHUNK:
                yield from self._decode(chunk, name)
                chunk = []
        yield from self._decode(chunk, name)
        whole = piece.start == 0 and piece.stop == count
        self.check_read(
            np.arange(first, first + read),
            np.arange(first, base + piece.stop),
            where=name if whole else f"{name} #{piece.start}..#{piece.stop - 1}",
        )

    def _byte_range(self, piece: ShardSlice) -> tuple[int, int | None]:
        """Where a slice's records lie in its shard: from its first record's offset to the
        next record's, or to the shard's end (None: records past dataset.json's count are
        then found)."""
        shard = self._shard_of[piece.path.name]
        base, count = int(self._starts[shard]), int(self._starts[shard + 1] - self._starts[shard])
        start = int(self._offsets[base + piece.start]) if piece.start < count else 0
        return start, None if piece.stop >= count else int(self._offsets[base + piece.stop])

    def _runs(self, keep: np.ndarray | None) -> list[ShardSlice]:
        """The record ranges that hold the samples of ``keep`` (default: every shard whole),
        a range per stretch of a shard whose kept records lie less than :data:`_READ_THROUGH`
        bytes apart: reading through a gap that small costs less than opening another range."""
        counts = np.diff(self._starts)
        if keep is None:
            return [ShardSlice(path, 0, int(n)) for path, n in zip(self.paths, counts) if n]
        ids = np.flatnonzero(keep)
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        # where each kept record ends: the next record's offset, or its shard's end
        nxt = np.minimum(ids + 1, len(self) - 1)
        ends = np.where(ids + 1 < self._starts[shard_of + 1], self._offsets[nxt], self._shard_sizes[shard_of])
        breaks = (shard_of[1:] != shard_of[:-1]) | (self._offsets[ids[1:]] - ends[:-1] > _READ_THROUGH)
        runs = []
        for run in np.split(np.arange(len(ids)), np.flatnonzero(breaks) + 1):
            if run.size:
                shard = int(shard_of[run[0]])
                base = int(self._starts[shard])
                runs.append(
                    ShardSlice(self.paths[shard], int(ids[run[0]]) - base, int(ids[run[-1]]) - base + 1)
                )
        return runs

    def _decode(
        self, chunk: list[tuple[int, str, dict[str, bytes]]], shard: str
    ) -> Iterator[tuple[Sample, dict[str, bytes]]]:
        # Parsing a chunk of records, then decoding it, runs ~5% faster than
        # interleaving the two (the decoder's working set stays in cache).
        for sample_id, key, members in chunk:
            label, image = decode_members(members, self.info.num_classes, shard=shard, key=key)
            expected = int(self._labels[sample_id])
            shape = self._uniform_shape or tuple(int(v) for v in self._shapes[sample_id])
            if label != expected or image.shape != shape:
                raise DataError(
                    f"{shard}: record {key!r} (label {label}, image {image.shape}) disagrees with the "
                    f"manifest (label {expected}, image {shape}); the shard was changed "
                    "after it was made: re-make the shard set"
                )
            yield Sample(sample_id, key, label, image, shard), members

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """Decode the whole set into memory: images (N, H, W, C) uint8, labels (N,) int64."""
        h, w, c = self.require_uniform_size("loading into one array")
        images = np.empty((len(self), h, w, c), np.uint8)
        labels = np.empty(len(self), np.int64)
        for sample in self.iter_samples():  # counts every record against dataset.json
            images[sample.sample_id] = sample.image
            labels[sample.sample_id] = sample.label
        return images, labels

    def identity(self) -> str:
        """A sha256 of ``dataset.json`` and the manifest: names the set's records (keys,
        labels, sizes) wherever it is copied or however its location is spelled; model
        cards and seed tables cite it."""
        return self._identity

    def share_ids(
        self, slices: Iterable[ShardSlice] | None = None, *, keep: np.ndarray | None = None
    ) -> np.ndarray:
        """The sample ids a share holds, in reading order: the records of ``slices`` (default:
        all), of those only the ones where ``keep`` ((N,) bool) is true."""
        if slices is None:
            return np.flatnonzero(keep) if keep is not None else np.arange(len(self))
        starts = self._shard_offsets()
        ids = [np.arange(starts[s.path.name] + s.start, starts[s.path.name] + s.stop) for s in slices]
        ids = np.concatenate(ids) if ids else np.zeros(0, np.int64)
        return ids if keep is None else ids[keep[ids]]

    def check_read(self, ids: np.ndarray, expected: np.ndarray, *, where: str, cause: str = _CHANGED) -> None:
        """The one count check of a read: the sample ``ids`` read (by one reader of a shard,
        one process's share, or gathered from every scoring actor) must be ``expected``
        (:meth:`share_ids`), each once; order aside.

        Raises:
            DataError: naming ``where``, both counts, the first sample missing, read twice or
                not expected (its shard, place in it and key) and ``cause`` with the fix.
        """
        ids, expected = np.asarray(ids), np.asarray(expected)
        if ids.size == expected.size and np.array_equal(ids, expected):
            return
        unique, times = np.unique(ids, return_counts=True)
        wrong = [
            (np.setdiff1d(expected, unique), "missing"),
            (unique[times > 1], "read more than once"),
            (np.setdiff1d(unique, expected), "not expected here"),
        ]
        found = [
            f"{bad.size} {what}, the first sample {self._place(int(bad[0]))}"
            for bad, what in wrong
            if bad.size
        ]
        if found:
            raise DataError(
                f"{where}: read {ids.size} records where the manifest lists {expected.size}: "
                f"{'; '.join(found)}; {cause}"
            )

    def _place(self, sample_id: int) -> str:
        """Sample ``sample_id`` and where its record is (shard, place, key), for a message."""
        if not 0 <= sample_id < len(self):
            return f"id {sample_id} (outside the set's 0..{len(self) - 1})"
        shard = int(np.searchsorted(self._starts, sample_id, side="right") - 1)
        place = sample_id - int(self._starts[shard])
        return f"{sample_id} (record #{place} of {self.paths[shard].name}, key {sample_key(sample_id)!r})"

    def _shard_offsets(self) -> dict[str, int]:
        """Each shard's first sample id, by file name."""
        return {path.name: int(start) for path, start in zip(self.paths, self._starts[:-1])}


def assign_slices(
    paths: Sequence[Location], counts: Sequence[int], num_workers: int
) -> list[list[ShardSlice]]:
    """Cut shards with ``counts`` records into ``num_workers`` balanced contiguous runs.

    The scoring actors (:mod:`asd_ray.scoring_pool`) share a set this way: nothing in a
    scoring pass depends on which classes an actor holds (eval mode: batch norm uses its
    running statistics), so each actor opens only the shards its run covers. Ray Train
    workers instead take every W-th sample (see :mod:`asd_ray.train`), so that every
    worker's batches mix all classes even when the shards are sorted by class.
    """
    total = sum(counts)
    bounds = [total * w // num_workers for w in range(num_workers + 1)]
    result: list[list[ShardSlice]] = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        pieces, first = [], 0
        for path, count in zip(paths, counts):
            start, stop = max(lo - first, 0), min(hi - first, count)
            if start < stop:
                pieces.append(ShardSlice(path, start, stop))
            first += count
        result.append(pieces)
    return result


def inspect_shard_set(folder: str | Path | Location) -> dict:
    """Read and decode every record of a shard set and check it against its manifest.

    Returns:
        A JSON-able report: samples and shards, counts per class, image sizes,
        and whether a ground-truth table is present (and how many it poisons).

    Raises:
        DataError: on the first record that is unreadable or disagrees with the manifest.
    """
    shards = ShardSet(folder)
    per_class = np.zeros(shards.info.num_classes, np.int64)
    sizes: dict[str, int] = {}
    seen = 0
    samples = progress.bar(shards.iter_samples(), total=len(shards), desc="shards inspect")
    for sample in samples:  # checks and counts every record against the manifest
        per_class[sample.label] += 1
        size = "x".join(map(str, sample.image.shape))
        sizes[size] = sizes.get(size, 0) + 1
        seen += 1
    report = {
        "command": "shards inspect",
        "folder": str(shards.folder),
        "samples": seen,
        "shards": len(shards.paths),
        "classes": shards.info.num_classes,
        "per_class": {name: int(n) for name, n in zip(shards.info.class_names, per_class)},
        "image_sizes": sizes,
        "schema": "ok",
        "attack": (shards.info.attack or {}).get("params", {}).get("attack"),  # types checked on open
    }
    truth_path = shards.folder / GROUND_TRUTH_FILE
    if storage.exists(truth_path):
        truth = tables.read_parquet(truth_path, "poison", rows=seen)
        report["ground_truth_poisoned"] = int(np.sum(truth.column("is_poison").to_numpy()))
    return report
