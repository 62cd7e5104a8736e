"""What a shard set folder holds, and its description ``dataset.json``, parsed and checked.

A shard set is a folder::

    DIR/dataset.json        class names, counts, image size (see ShardSetInfo)
    DIR/manifest.parquet    one row per sample (schemas/manifest.json)
    DIR/NAME-000000.tar     WebDataset records: KEY.png|KEY.jpg + KEY.cls
    DIR/poison.parquet      ground truth, only in sets made by ``asd-ray poison``

The writer (:mod:`asd_ray.data.shard_writer`), the manifest's checks
(:mod:`asd_ray.data.manifest`) and the reader (:mod:`asd_ray.data.shards`) share these
names and limits, so that a set one writes is one the others accept.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from asd_ray import storage
from asd_ray.data.records import MAX_PIXELS
from asd_ray.data.sources.base import check_class_names
from asd_ray.errors import DataError
from asd_ray.files import parse_json
from asd_ray.storage import Location

DATASET_FILE = "dataset.json"
MANIFEST_FILE = "manifest.parquet"
GROUND_TRUTH_FILE = "poison.parquet"
FORMAT_VERSION = 1
JPEG_MAX_SIDE = 65_535  # the JPEG format's largest side
MIN_RECORD_BYTES = 4 * 512  # a tar record: two members, each a 512-byte header and >= one data block
MAX_DATASET_JSON_BYTES = 64 * 1024**2  # 100,000 shards are about 6 MB
REMAKE = "re-make the shard set with `asd-ray shards make`"
_SHARD_FILE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*\.tar")


def sample_key(sample_id: int) -> str:
    """The record key of ``sample_id``: zero-padded, no dots (WebDataset splits on dots)."""
    return f"{sample_id:09d}"


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

    @property
    def uniform_shape(self) -> tuple[int, int, int] | None:
        """(H, W, C) of every image, or None when sizes (or channels) are mixed."""
        if self.image_size is None or self.channels is None:
            return None
        return (*self.image_size, self.channels)


def read_dataset_info(path: Path | Location) -> ShardSetInfo:
    """Parse and check ``dataset.json``: every field of the right type, shard files inside the folder.

    Raises:
        DataError: naming the file, the field and the fix.
    """
    where = storage.location(path)
    return parse_dataset_info(storage.read_bytes(where, limit=MAX_DATASET_JSON_BYTES, fix=REMAKE), where)


def parse_dataset_info(data: bytes, where: Location) -> ShardSetInfo:
    """:func:`read_dataset_info` of bytes already read from ``where``."""

    def bad(why: str) -> DataError:
        return DataError(f"{where}: {why}; {REMAKE}")

    raw = parse_json(data, what=str(where), fix=REMAKE)
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
            and image_fits(*raw["image_size"])
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


def image_fits(height: int, width: int) -> bool:
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
