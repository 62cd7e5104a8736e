"""Writing shard sets: images encoded, records appended to tar shards, the manifest streamed,
``dataset.json`` written last, the folder published atomically.

What a set holds is described in :mod:`asd_ray.data.shard_layout`; the bytes written are
deterministic (no member timestamps), so the same source always makes the same set.
"""

from __future__ import annotations

import dataclasses
import io
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from asd_ray import progress, storage, tables
from asd_ray.data.records import MAX_PIXELS
from asd_ray.data.shard_layout import (
    DATASET_FILE,
    GROUND_TRUTH_FILE,
    JPEG_MAX_SIDE,
    MANIFEST_FILE,
    ShardSetInfo,
    image_fits,
    read_dataset_info,
    sample_key,
)
from asd_ray.data.sources.base import Source
from asd_ray.errors import DataError
from asd_ray.storage import Location

PNG_MAX_SIZE = 64
JPEG_QUALITY = 95
MANIFEST_ROW_GROUP = 16_384  # manifest rows a writer holds before it writes them as one row group


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
    """Refuse an image the shard set could not hold or give back (:func:`image_fits`)."""
    height, width = shape[:2]
    if not image_fits(height, width):
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
