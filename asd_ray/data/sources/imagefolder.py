"""An image folder (one sub-folder per class), e.g. the ImageNet-30 and VGGFace2-30 subsets."""

from __future__ import annotations

import io
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
    _decode_rgb,
    _read,
    _Records,
    _resize_shorter_center_crop,
)
from asd_ray.errors import DataError
from asd_ray.files import read_text

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".webp"}


_PIL_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".webp": "WEBP"}


_JPEG_MAGIC = b"\xff\xd8\xff"


def _read_class_list(path: Path) -> list[str]:
    names = []
    text = read_text(
        path,
        what=f"class_list {path}",
        fix="pass a text file with one class folder per line",
        follow_links=True,
    )
    for line_no, line in enumerate(text.splitlines(), start=1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        _check_plain_name(name, f"{path}:{line_no}")
        if name in names:
            raise DataError(f"{path}:{line_no}: class {name!r} is listed twice; remove the duplicate")
        names.append(name)
    if not names:
        raise DataError(f"class_list {str(path)!r} names no classes; add one class folder name per line")
    return names


def from_imagefolder(
    root: str | Path,
    *,
    class_list: str | Path | None = None,
    max_per_class: int | None = None,
    image_size: int | None = None,
) -> Source:
    """Read ``root/<class>/*.{jpg,jpeg,png,ppm,webp}`` (e.g. an ImageNet subset).

    JPEGs are stored verbatim where possible so shards carry no re-encoding loss:
    with ``image_size=None`` every RGB JPEG is passed through; with ``image_size=S``
    only RGB JPEGs already exactly S x S are. Everything else is decoded to RGB and,
    when ``image_size`` is set, resized (shorter side to round(S*256/224), bilinear)
    and centre-cropped to S x S, as in DBD. A non-RGB (grey/CMYK) JPEG is decoded to
    RGB pixels instead of passed through, so every record decodes to 3 channels.

    Args:
        root: folder of class folders (hidden folders and other file types ignored).
        class_list: text file, one class folder name per line (blank lines and
            ``#`` comments ignored); fixes the classes and their order. Default:
            every class folder, sorted by name.
        max_per_class: keep the first K files (sorted by name) of each class.
        image_size: output side S, or None to keep original sizes.

    Returns:
        Source named "imagefolder"; record ``source`` is the path relative to root.
        Files are checked and decoded lazily on iteration.
    """
    _check_positive("max_per_class", max_per_class)
    _check_positive("image_size", image_size)
    root = Path(root)
    _check_dir(root, "image folder root")
    if class_list is not None:
        names = _read_class_list(Path(class_list))
        for name in names:
            if not (root / name).is_dir():
                raise DataError(
                    f"class {name!r} from {str(class_list)!r} has no folder {str(root / name)!r}; fix the list"
                )
    else:
        names = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not names:
            raise DataError(f"no class folders in {str(root)!r}; expected root/<class_name>/<image files>")
    items: list[tuple[Path, int]] = []
    for label, name in enumerate(names):
        files = sorted(
            (p for p in (root / name).iterdir() if p.suffix.lower() in _IMAGE_EXTS and p.is_file()),
            key=lambda p: p.name,
        )
        if not files:
            raise DataError(
                f"class folder {str(root / name)!r} has no {sorted(_IMAGE_EXTS)} files; add images or drop the class"
            )
        items.extend((p, label) for p in files[:max_per_class])
    return Source(
        "imagefolder",
        names,
        _Records(partial(_iter_imagefolder, root, items, image_size), len(items)),
        len(items),
    )


def _iter_imagefolder(
    root: Path, items: list[tuple[Path, int]], image_size: int | None
) -> Iterator[SourceRecord]:
    for path, label in items:
        source = path.relative_to(root).as_posix()
        data = _read(path)
        fmt = _PIL_FORMATS[path.suffix.lower()]
        if fmt == "JPEG":
            if not data.startswith(_JPEG_MAGIC):
                raise DataError(
                    f"{path}: not a JPEG (missing FF D8 FF magic); fix the extension or replace the file"
                )
            if _jpeg_passthrough(data, path, image_size):
                yield SourceRecord(label=label, source=source, encoded=data, ext="jpg")
                continue
        img = _decode_rgb(data, path, [fmt])
        if image_size is not None and not (fmt == "JPEG" and img.size == (image_size, image_size)):
            img = _resize_shorter_center_crop(img, image_size)
        yield SourceRecord(label=label, source=source, image=np.asarray(img))


def _jpeg_passthrough(data: bytes, path: Path, image_size: int | None) -> bool:
    """True if ``data`` is a decodable RGB JPEG of the wanted size, to be stored verbatim."""
    try:
        with Image.open(io.BytesIO(data), formats=["JPEG"]) as img:
            if img.mode != "RGB" or (image_size is not None and img.size != (image_size, image_size)):
                return False
            # Verbatim bytes are never decoded here otherwise: decode the whole stream at
            # 1/8 scale (cheap) so a truncated or corrupt file fails now, not in training.
            img.draft("RGB", (1, 1))
            img.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: cannot decode as JPEG ({e}); remove or replace the file") from e
    return True
