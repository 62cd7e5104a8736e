"""GTSRB: per-class training folders with CSV annotations, and the test folder's CSV."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

from asd_ray.data.sources.base import (
    Source,
    SourceRecord,
    _check_dir,
    _check_plain_name,
    _check_positive,
    _check_split,
    _decode_rgb,
    _read,
    _Records,
)
from asd_ray.errors import DataError

_GTSRB_CLASSES = 43


_GTSRB_COLUMNS = ("Filename", "ClassId")


def _read_gtsrb_csv(path: Path, num_classes: int) -> list[tuple[str, int]]:
    """Rows of a GTSRB ground-truth CSV as (filename, class id), in file order."""
    if not path.is_file():
        raise DataError(
            f"missing GTSRB annotation file {str(path)!r}; extract the official archive (with its GT-*.csv)"
        )
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter=";")
        missing = [c for c in _GTSRB_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}: missing column(s) {missing}; the test labels come from GTSRB_Final_Test_GT.zip "
                "(GT-final_test.csv with ClassId)"
            )
        rows = []
        for line, row in enumerate(reader, start=2):
            name, raw_id = row["Filename"], row["ClassId"]
            _check_plain_name(name or "", f"{path}:{line}")
            try:
                class_id = int(raw_id)
            except (TypeError, ValueError):
                raise DataError(f"{path}:{line}: ClassId {raw_id!r} is not an int; fix the row") from None
            if not 0 <= class_id < num_classes:
                raise DataError(
                    f"{path}:{line}: ClassId {class_id} is out of range 0..{num_classes - 1}; fix the row"
                )
            rows.append((name, class_id))
    if not rows:
        raise DataError(f"{path}: no rows; re-extract the GTSRB archive")
    return rows


def _gtsrb_train(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    images_dir = root / "Final_Training" / "Images"
    if not images_dir.is_dir():
        images_dir = root
    names = sorted(p.name for p in images_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not names:
        raise DataError(
            f"no class folders in {str(images_dir)!r}; pass the GTSRB root (with Final_Training/Images)"
        )
    # Labels are ClassIds, so class_names[i] must be folder i: require 00000..K-1 without gaps.
    for i, name in enumerate(names):
        if name != f"{i:05d}":
            raise DataError(
                f"{images_dir}: class folder {name!r} found where {i:05d} was expected; GTSRB train folders "
                f"must be 00000..{_GTSRB_CLASSES - 1:05d} (a prefix, no gaps) and nothing else"
            )
    if len(names) > _GTSRB_CLASSES:
        raise DataError(
            f"{images_dir}: {len(names)} class folders, GTSRB has {_GTSRB_CLASSES}; remove the extra ones"
        )
    items = []
    for label, name in enumerate(names):
        csv_path = images_dir / name / f"GT-{name}.csv"
        for filename, class_id in _read_gtsrb_csv(csv_path, _GTSRB_CLASSES):
            if class_id != label:
                raise DataError(
                    f"{csv_path}: {filename} has ClassId {class_id} but sits in folder {name}; fix the CSV"
                )
            items.append((images_dir / name / filename, class_id))
    return names, items


def _gtsrb_test(root: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    images_dir = next((d for d in (root / "Final_Test" / "Images", root / "Images") if d.is_dir()), root)
    candidates = [
        root / "GT-final_test.csv",
        root / "Final_Test" / "GT-final_test.csv",
        images_dir / "GT-final_test.csv",
    ]
    csv_path = next((p for p in candidates if p.is_file()), None)
    if csv_path is None:
        raise DataError(
            f"missing GT-final_test.csv (looked in {[str(p.parent) for p in candidates]}); "
            "extract GTSRB_Final_Test_GT.zip into the GTSRB root"
        )
    items = [(images_dir / f, c) for f, c in _read_gtsrb_csv(csv_path, _GTSRB_CLASSES)]
    return [f"{i:05d}" for i in range(_GTSRB_CLASSES)], items


def from_gtsrb(root: str | Path, split: str = "train", *, image_size: int | None = 32) -> Source:
    """Read GTSRB (German traffic signs) from the official Final_Training / Final_Test layout.

    Args:
        root: GTSRB root (holding ``Final_Training/Images`` or ``Final_Test/Images``);
            for "train" it may also be the ``Images`` folder itself.
        split: "train" or "test".
        image_size: squash-resize (bilinear) to image_size x image_size, as the
            ASD/DBD GTSRB setups do; None keeps the original, varying sizes.

    Returns:
        Source named "gtsrb" with images (H, W, 3) uint8, label = ClassId and
        class names "00000".. (train: the class folders present; test: all 43).
        Images decode lazily on iteration.
    """
    _check_split(split, ["train", "test"])
    _check_positive("image_size", image_size)
    root = Path(root)
    _check_dir(root, "GTSRB root")
    names, items = _gtsrb_train(root) if split == "train" else _gtsrb_test(root)
    for path, _ in items:
        if not path.is_file():
            raise DataError(f"missing GTSRB image {str(path)!r} listed in the CSV; re-extract the archive")
    return Source(
        "gtsrb",
        names,
        _Records(partial(_iter_gtsrb, root, items, image_size), len(items)),
        len(items),
    )


def _iter_gtsrb(root: Path, items: list[tuple[Path, int]], image_size: int | None) -> Iterator[SourceRecord]:
    for path, label in items:
        img = _decode_rgb(_read(path), path, ["PPM"])
        if image_size is not None:
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        yield SourceRecord(label=label, source=path.relative_to(root).as_posix(), image=np.asarray(img))
