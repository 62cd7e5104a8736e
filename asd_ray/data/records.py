"""WebDataset records, read safely: shard paths, the records of one shard, their labels and images.

The data is untrusted, so the reader parses tar headers itself
(:mod:`asd_ray.data.tar`) and reads only image members (decoded by PIL), ``cls``
(an ASCII integer) and ``json`` (accepted, never parsed); any other member, such
as a pickle, is refused before its bytes are looked at.

This is the layer below both users of the reader: shard sets
(:mod:`asd_ray.data.shards`, which also checks every record against its
manifest) and the foreign-shard source (:mod:`asd_ray.data.sources.webdataset`).
It imports neither, so the shard writer can take a
:class:`~asd_ray.data.sources.Source` without an import cycle.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import braceexpand
import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from asd_ray import storage, tables
from asd_ray.config import StorageConfig
from asd_ray.data.tar import tar_members
from asd_ray.errors import DataError
from asd_ray.storage import Location

_LAYOUT = tables.schema_document("shard_record")
IMAGE_EXTS = tuple(_LAYOUT["image_members"])
SAFE_EXTS = tuple(_LAYOUT["readable_members"])
MAX_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs), and when written
_PIL_FORMATS = ("PNG", "JPEG", "PPM", "WEBP")  # PIL never probes other decoders
MAX_SHARD_PATHS = 100_000
"""Most shard files one brace pattern (or list of them) may name, counted before expanding:
``{000000..999999}{000..999}`` would otherwise build 10^9 names."""
MAX_BRACE_DEPTH = 4  # brace groups nested deeper than this are refused before parsing


# --------------------------------------------------------------------------- shard paths


def expand_shard_paths(
    spec: str | Path | Sequence[str | Path], settings: StorageConfig | None = None
) -> list[Location]:
    """Shard locations from a folder or prefix, a file, a brace pattern or a list of those;
    each a local path or an ``s3://`` / ``gs://`` URI (:func:`asd_ray.storage.location`).

    ``pipe:`` and every other scheme are refused: shard URLs must never run commands or
    reach anything but the storage a user named.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    paths: list[Location] = []
    for item in specs:
        text = str(item)
        storage.location(text, settings)  # refuses other schemes, query strings, '..' keys
        if (
            "{" not in text
            and storage.info(place := storage.location(text, settings)).type == pafs.FileType.Directory
        ):
            names = storage.list_names(place, limit=MAX_SHARD_PATHS)
            paths.extend(place / name for name in names if name.endswith(".tar"))
            continue
        if _brace_depth(text) > MAX_BRACE_DEPTH:
            raise DataError(
                f"shard pattern {text!r} nests braces deeper than {MAX_BRACE_DEPTH} levels; "
                "list the shards with one {a..b} range per number"
            )
        count = len(paths) + _expansion_count(text)
        if count > MAX_SHARD_PATHS:
            raise DataError(
                f"shard pattern {text!r} names {count} files, over the limit of {MAX_SHARD_PATHS}; "
                "check the {a..b} ranges"
            )
        try:
            paths.extend(storage.location(p, settings) for p in braceexpand.braceexpand(text))
        except braceexpand.UnbalancedBracesError:
            raise DataError(f"shard pattern {text!r} has unbalanced braces; fix the pattern") from None
    missing = [str(p) for p in paths if not storage.is_file(p)]
    if missing:
        raise DataError(f"shard {missing[0]} does not exist ({len(missing)} missing); check the path")
    if not paths:
        raise DataError(f"no shards (*.tar) found in {specs}; run `asd-ray shards make` first")
    return paths


def _brace_depth(pattern: str) -> int:
    depth = deepest = 0
    for char in re.sub(r"\\.", "", pattern):  # escaped characters are literals
        depth += (char == "{") - (char == "}")
        deepest = max(deepest, depth)
    return deepest


def _expansion_count(pattern: str) -> int:
    """How many names ``braceexpand(pattern)`` yields, without expanding: it follows
    braceexpand's grammar (a product of literals and brace groups; a group is an integer
    or letter range, a comma list whose counts add up, or literal braces around a pattern)."""
    count, start, depth, pos = 1, 0, 0, 0
    while pos < len(pattern):
        if pattern[pos] == "\\":
            pos += 2
            continue
        if pattern[pos] == "{":
            start = pos if depth == 0 else start
            depth += 1
        elif pattern[pos] == "}":
            depth -= 1
            if depth == 0:
                count *= _group_count(pattern[start + 1 : pos])
        pos += 1
    return count


def _group_count(expr: str) -> int:
    if match := braceexpand.int_range_re.match(expr):
        first, last, step = match.groups()
        step = int(step or 1) or 1
        return abs(int(last) - int(first)) // step + 1
    if match := braceexpand.char_range_re.match(expr):
        return len(braceexpand.make_char_range(*match.groups()))
    items, start, depth, pos = [], 0, 0, 0
    while pos < len(expr):
        if expr[pos] == "\\":
            pos += 2
            continue
        depth += (expr[pos] == "{") - (expr[pos] == "}")
        if expr[pos] == "," and depth == 0:
            items.append(expr[start:pos])
            start = pos + 1
        pos += 1
    if depth != 0 or not items:  # not a list: literal braces around a pattern
        return _expansion_count(expr)
    return sum(_expansion_count(item) for item in [*items, expr[start:]])


# --------------------------------------------------------------------------- records


def iter_records(
    stream: BinaryIO,
    where: str,
    *,
    start: int = 0,
    stop: int | None = None,
    base: int = 0,
    to_end: bool = True,
) -> Iterator[tuple[int, str, dict[str, bytes], int]]:
    """Yield ``(index, key, members, offset)`` of one shard, members only of safe types;
    ``offset`` is where the record's first header lies in the shard.

    Args:
        stream: the shard, read with ``read(n)`` only (a local file or an object
            storage stream); ``where``, its path or URL, names it in messages.
        start, stop: the records to yield; those before ``start`` are still walked
            and checked, but their data is dropped as it is read.
        base, to_end: where ``stream`` starts in the shard and whether it runs to the
            shard's end (see :func:`~asd_ray.data.tar.tar_members`): a range of records
            read alone, whose indices count from its first record.

    Raises:
        DataError: on a refused member type (pickle, ...), a duplicate key or a
            record without an image or ``cls``, naming shard and key.
    """
    shard = where.rsplit("/", 1)[-1]
    current_key, members, index, seen, offset = None, {}, -1, set(), base
    keep_data = _from_record(start) if start else None
    # tar_members sees what tarfile sees, or refuses
    walk = tar_members(stream, where, keep_data=keep_data, offsets=True, base=base, to_end=to_end)
    for name, data, at in walk:
        key, dot, ext = _split_name(name)
        if not dot:
            raise DataError(f"{where}: member {name!r} has no extension; expected KEY.EXT")
        if key.endswith("/") or not key:
            raise DataError(f"{shard}: member {name!r} has an empty record key; name it KEY.EXT")
        ext = ext.lower()
        if "." in ext and ext.rsplit(".", 1)[1] in SAFE_EXTS:
            raise DataError(
                f"{shard}: member {name!r} would be record {key!r} with a {ext!r} member: WebDataset "
                "splits a name at its first dot, so record keys may not contain dots; rename the record"
            )
        if ext not in SAFE_EXTS:
            raise DataError(
                f"{shard}: record {key!r} has a {ext!r} member; asd-ray reads only "
                f"{', '.join(SAFE_EXTS)} because the data is untrusted (pickle, torch and numpy "
                "members can run code): re-make the shard with images and cls only"
            )
        if key != current_key:
            if index >= start:
                _check_members(shard, current_key, members)
                yield index, current_key, members, offset
            if key in seen:
                raise DataError(
                    f"{shard}: duplicate key {key!r}; every record needs its own key: re-make the shard"
                )
            seen.add(key)
            index += 1
            if stop is not None and index >= stop:
                return
            current_key, members, offset = key, {}, at
        if ext in members:
            raise DataError(f"{shard}: record {key!r} has two {ext!r} members; re-make the shard")
        if index >= start:
            members[ext] = data
    if current_key is not None and index >= start:
        _check_members(shard, current_key, members)
        yield index, current_key, members, offset


def _split_name(name: str) -> tuple[str, str, str]:
    """(key, dot, extension) as WebDataset splits a member name: at the first dot of its
    last path component; the key keeps the folder."""
    slash = name.rfind("/") + 1
    key, dot, ext = name[slash:].partition(".")
    return name[:slash] + key, dot, ext


def _from_record(start: int) -> Callable[[str], bool]:
    """``keep_data`` for :func:`tar_members`: False for the members of the first ``start``
    records, counted as :func:`iter_records` counts them (a new key, a new record)."""
    current_key, index = None, -1

    def keep(name: str) -> bool:
        nonlocal current_key, index
        key = _split_name(name)[0]
        if key != current_key:
            current_key, index = key, index + 1
        return index >= start

    return keep


def _check_members(shard: str, key: str, members: dict[str, bytes]) -> None:
    if "cls" in members and len(members) - ("json" in members) == 2:
        return  # fast path: members are safe types, so the other one is the image
    images = [e for e in members if e in IMAGE_EXTS]
    if "cls" not in members:
        raise DataError(
            f"{shard}: record {key!r} has no 'cls' member (label); every record needs "
            "KEY.cls with the label as a decimal integer"
        )
    if len(images) != 1:
        raise DataError(
            f"{shard}: record {key!r} has {len(images)} image members ({images}); "
            "every record needs exactly one"
        )


def parse_label(data: bytes, num_classes: int, *, shard: str, key: str) -> int:
    """Parse a ``cls`` member and check it is a class index in ``0..num_classes-1``."""
    try:
        label = int(data)  # int() takes ASCII digits as bytes, with optional sign and spaces
    except ValueError:
        raise DataError(
            f"{shard}: record {key!r} has cls {data[:20]!r}, not an integer label; fix the label or "
            "re-make the shard from its source"
        ) from None
    if not 0 <= label < num_classes:
        raise DataError(
            f"{shard}: record {key!r} has label {label}, outside 0..{num_classes - 1} for "
            f"{num_classes} classes; fix the label or the dataset's class list"
        )
    return label


def decode_members(
    members: dict[str, bytes], num_classes: int, *, shard: str, key: str
) -> tuple[int, np.ndarray]:
    """(label, image) of one record's safe members."""
    label = parse_label(members["cls"], num_classes, shard=shard, key=key)
    ext = "png" if "png" in members else next(e for e in members if e in IMAGE_EXTS)
    return label, decode_image(members[ext], shard=shard, key=key)


# --------------------------------------------------------------------------- images


def decode_image(data: bytes, *, shard: str, key: str) -> np.ndarray:
    """Decode image bytes to (H, W, C) uint8 with C = 1 (grey) or 3 (RGB).

    Raises:
        DataError: naming shard and key when the bytes are not a readable image.
    """
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as pil:
            if pil.width * pil.height > MAX_PIXELS:  # read from the header, before decoding
                raise DataError(
                    f"{shard}: record {key!r} claims {pil.width}x{pil.height} pixels, over the "
                    f"{MAX_PIXELS} limit; resize the source images (--image-size)"
                )
            if pil.mode != "L":
                pil = pil.convert("RGB")
            array = np.asarray(pil)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(
            f"{shard}: record {key!r} is not a readable image ({_without_repr(err)}); remove the record or "
            "re-make the shard from its source"
        ) from None
    return array[:, :, None] if array.ndim == 2 else array


def _without_repr(err: Exception) -> str:
    """PIL's message without the object reprs it embeds (``<_io.BytesIO object at 0x...>``)."""
    return re.sub(r"\s*<[^<>]* at 0x[0-9a-f]+>", "", str(err)).strip()
