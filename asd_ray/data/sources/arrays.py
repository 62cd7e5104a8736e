"""Numpy arrays already in memory (``.npy`` files from the CLI)."""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path

import numpy as np

from asd_ray.data.sources.base import (
    Source,
    SourceRecord,
    _Records,
    inferred_class_names,
)
from asd_ray.errors import DataError


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
        class_names: index = label; default "0".."K-1" with K = max label + 1 (every
            label 0..K-1 present).

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
        names = inferred_class_names(labels, "labels")
    else:
        names = [str(c) for c in class_names]
        if labels.max() >= len(names):
            raise DataError(
                f"label {int(labels.max())} at index {int(labels.argmax())} is out of range for "
                f"{len(names)} class_names; pass a longer class_names or fix the labels"
            )
    return Source("arrays", names, _Records(partial(_iter_arrays, "arrays", images, labels), n), n)


_NPY_HEADER_READERS = {
    (1, 0): np.lib.format.read_array_header_1_0,
    (2, 0): np.lib.format.read_array_header_2_0,
}


def read_npy(path: str | Path) -> np.ndarray:
    """An ``.npy`` file as a read-only memory map, after its header is checked against the file.

    The header alone says how many bytes the array needs; a header that claims more (or
    fewer) than the file holds, or an object array (which needs pickle), is refused
    before anything is read or allocated.
    """
    path = Path(path)

    def bad(why: str) -> DataError:
        return DataError(f"{path}: {why}; save a plain numeric array with numpy.save")

    try:
        with path.open("rb") as file:
            read_header = _NPY_HEADER_READERS.get(np.lib.format.read_magic(file))
            if read_header is None:
                raise bad("an .npy format other than 1.0 or 2.0")
            shape, _, dtype = read_header(file)
            offset = file.tell()
    except (OSError, ValueError) as err:  # ValueError: not an .npy header
        if isinstance(err, DataError):
            raise
        raise bad(f"not a readable .npy file ({err})") from None
    if dtype.hasobject:
        raise bad("an object array needs pickle, which asd-ray refuses on untrusted data")
    claimed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if claimed != path.stat().st_size - offset:
        raise bad(
            f"the header claims a {'x'.join(map(str, shape))} {dtype} array ({claimed} bytes), the file "
            f"holds {path.stat().st_size - offset}"
        )
    return np.load(path, mmap_mode="r", allow_pickle=False)


_RELEASE_EVERY = 4096  # records between two releases of a memory map's pages


def _iter_arrays(prefix: str, images: np.ndarray, labels: np.ndarray) -> Iterator[SourceRecord]:
    mapped = _mapping(images)
    for i in range(images.shape[0]):
        if mapped is not None and i and i % _RELEASE_EVERY == 0:
            # The pages read so far count in this process's resident set until released: without
            # this, streaming an .npy of N images (``shards make``) holds all N of them. The map
            # is read-only and file-backed, so a page still in use is read again from the file.
            mapped.madvise(mmap.MADV_DONTNEED)
        yield SourceRecord(label=int(labels[i]), source=f"{prefix}:{i}", image=images[i])


def _mapping(array: np.ndarray) -> mmap.mmap | None:
    """The memory map ``array`` is a view of (``read_npy``'s), or None."""
    base = array
    while isinstance(base, np.ndarray):
        base = base.base
    return base if isinstance(base, mmap.mmap) else None
