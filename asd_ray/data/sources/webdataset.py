"""Foreign WebDataset shards (``KEY.jpg|png|... + KEY.cls``), brought in through the safe reader.

Other tools' shards are read with asd-ray's strict tar walk: only image members,
``cls`` and ``json`` are accepted (never pickle, ``.pth`` or ``.npy``), every
image is decoded once to prove it is one, and JPEG bytes are kept as they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

from asd_ray import storage
from asd_ray.data.records import IMAGE_EXTS, decode_members, expand_shard_paths, iter_records, parse_label
from asd_ray.data.sources.base import Source, SourceRecord, _Records, inferred_class_names
from asd_ray.errors import DataError

_NO_LIMIT = 2**31  # labels are range-checked against the class count once it is known


def from_webdataset(spec: str | Path | Sequence[str | Path], class_names: list[str] | None = None) -> Source:
    """Records of WebDataset tar shards, in shard and record order.

    Args:
        spec: a folder of ``*.tar``, a file, a brace pattern (``data-{000..009}.tar``) or a list.
        class_names: index = label; default ``"0".."C-1"`` with C = largest label + 1
            (every label 0..C-1 present).
    """
    paths = expand_shard_paths(spec)
    labels = [
        parse_label(members["cls"], _NO_LIMIT, shard=path.name, key=key)
        for path in paths
        for _, key, members, _ in _shard_records(path)
    ]
    if not labels:
        raise DataError(f"{spec}: the shards hold no records")
    names = list(class_names) if class_names else inferred_class_names(labels, str(spec))
    num_classes = len(names)
    if max(labels) >= num_classes:
        raise DataError(
            f"{spec}: a record has label {max(labels)}, but only {num_classes} class names were given"
        )
    return Source(
        "webdataset", names, _Records(partial(_iter_webdataset, paths, num_classes), len(labels)), len(labels)
    )


def _iter_webdataset(paths: list[storage.Location], num_classes: int) -> Iterator[SourceRecord]:
    for path in paths:
        for _, key, members, _ in _shard_records(path):
            label, image = decode_members(members, num_classes, shard=path.name, key=key)
            ext = next(e for e in members if e in IMAGE_EXTS)
            provenance = f"{path.name}:{key}"
            if ext in ("jpg", "jpeg"):  # decoded once above to prove it; stored as it came
                yield SourceRecord(label, provenance, encoded=bytes(members[ext]), ext="jpg")
            else:
                yield SourceRecord(label, provenance, image=image)


def _shard_records(path: storage.Location) -> Iterator[tuple[int, str, dict[str, bytes], int]]:
    """The records of one shard, read as a stream."""
    with storage.open_stream(path) as stream:
        yield from iter_records(stream, str(path))
