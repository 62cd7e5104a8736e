"""CIFAR-10 in its python-pickle or binary layout, read through a restricted unpickler."""

from __future__ import annotations

import codecs
import pickle
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from asd_ray.data.sources.arrays import _iter_arrays
from asd_ray.data.sources.base import (
    Source,
    SourceRecord,
    _check_dir,
    _check_split,
    _Records,
)
from asd_ray.errors import DataError

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
