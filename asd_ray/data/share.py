"""A process's share of a shard set as one uint8 array: in memory, or in a local-disk cache.

Training workers and scoring actors decode their share once and then index it
for every batch. A share larger than the process's memory budget
(``cluster.memory_budget_gb``) is decoded once into a ``numpy.memmap`` file
instead; the operating system then keeps its hot pages in memory and reads the
rest from disk. The file is keyed by the shard set's fingerprint (manifest,
``dataset.json`` and every shard's size and ETag, or modification time for a local
file), so a changed
shard set is never served from a stale cache; a process restarted on the same
share (after a crash) reuses it, and :func:`remove_caches` deletes it when the
process shuts down.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

from asd_ray import storage
from asd_ray.data.shards import ShardSet
from asd_ray.data.slices import ShardSlice

_CACHE_PREFIX = "asd-ray-share-"
_COPY_ROWS = 4096  # rows a cached share is copied by: never the whole share in memory
_OWNED: set[Path] = set()  # cache files this process created or reused


def remove_caches() -> None:
    """Delete the disk caches of this process's shares (their memmaps stay readable until
    closed). Ray ends actors without running ``atexit``, so workers call this on shutdown."""
    while _OWNED:
        _remove(_OWNED.pop())


atexit.register(remove_caches)


def fingerprint(shards: ShardSet) -> str:
    """A hex digest that changes whenever the shard set's content may have changed: its
    identity and each shard's size and ETag (objects) or modification time (local files)."""
    digest = hashlib.sha256(shards.identity().encode())
    for path, version in zip(shards.paths, storage.versions(shards.paths)):  # as they are now
        digest.update(f"{path.name}:{version};".encode())
    return digest.hexdigest()


def load_share(
    shards: ShardSet,
    slices: list[ShardSlice] | None = None,
    *,
    keep: np.ndarray | None = None,
    budget_bytes: int | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode a share of ``shards``: the records of ``slices``, or the sample ids where
    ``keep`` ((N,) bool) is true, or everything.

    Args:
        budget_bytes: when the images need more, they go to a disk cache (memmap).
        cache_dir: where the cache file lives (default: the system's temp folder).

    Returns:
        images (n, H, W, C) uint8 (an ndarray or a copy-on-write memmap), sample ids
        (n,) int64 and labels (n,) int64.
    """
    if slices is not None and keep is not None:
        raise ValueError("load_share takes slices or keep, not both")
    h, w, c = shards.require_uniform_size("training and scoring")
    expected = shards.share_ids(slices, keep=keep)  # the ids the manifest promises, checked after reading
    shape = (len(expected), h, w, c)
    if budget_bytes is None or len(expected) * h * w * c <= budget_bytes:
        images = np.empty(shape, np.uint8)
        ids, labels = _decode_into(images, shards, slices, keep, expected)
        return images, ids, labels
    return _cached(shards, slices, keep, expected, shape, Path(cache_dir or tempfile.gettempdir()))


def _decode_into(
    images: np.ndarray, shards: ShardSet, slices, keep, expected: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    count = len(images)
    ids, labels = np.empty(count, np.int64), np.empty(count, np.int64)
    read = 0
    for read, sample in enumerate(shards.iter_samples(slices, keep=keep), start=1):
        images[read - 1], ids[read - 1], labels[read - 1] = sample.image, sample.sample_id, sample.label
    shards.check_read(ids[:read], expected, where=str(shards.folder))
    return ids, labels


def _cached(shards: ShardSet, slices, keep, expected: np.ndarray, shape: tuple[int, ...], cache_dir: Path):
    """Decode into memmap files named by the shard set's fingerprint and the share.

    A process restarted on the same share (a Ray worker-group restart) finds the
    complete files and skips decoding; a changed shard set has another name.
    """
    share = hashlib.sha256(repr(shape).encode())
    share.update(np.packbits(keep).tobytes() if keep is not None else repr(slices).encode())
    stem = f"{_CACHE_PREFIX}{fingerprint(shards)[:24]}-{share.hexdigest()[:16]}"
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths = [cache_dir / f"{stem}.{part}.npy" for part in ("ids", "labels", "images")]
    _OWNED.update(paths)
    if not all(p.exists() for p in paths):
        partial = [p.with_name(f".{p.name}.{os.getpid()}.partial.npy") for p in paths]
        try:
            images = np.lib.format.open_memmap(partial[2], mode="w+", dtype=np.uint8, shape=shape)
            ids, labels = _decode_into(images, shards, slices, keep, expected)
            images.flush()
            del images
            np.save(partial[0], ids)
            np.save(partial[1], labels)
            for done, path in zip(partial, paths):  # images last: its presence marks a complete cache
                os.replace(done, path)
        finally:
            _remove(*partial)
    ids, labels = (np.load(p, allow_pickle=False) for p in paths[:2])
    return np.load(paths[2], mmap_mode="c"), ids, labels  # copy-on-write: the file never changes


def _remove(*paths: Path) -> None:
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def append_rows(images: np.ndarray, extra: np.ndarray) -> np.ndarray:
    """``images`` followed by ``extra`` (a few rows): in memory, or a memmap that stays one
    (copy-on-write like :func:`load_share`'s: torch warns on a read-only array)."""
    if not len(extra):
        return images
    if not isinstance(images, np.memmap):
        return np.concatenate([images, extra])
    path = Path(images.filename).with_suffix(".more")
    _OWNED.add(path)  # before writing: remove_caches also removes a copy that failed half-way
    joined = np.memmap(path, np.uint8, mode="w+", shape=(len(images) + len(extra), *images.shape[1:]))
    for start in range(0, len(images), _COPY_ROWS):
        stop = min(start + _COPY_ROWS, len(images))  # the last chunk ends where the extra rows begin
        joined[start:stop] = images[start:stop]
    joined[len(images) :] = extra
    joined.flush()
    return np.memmap(path, np.uint8, mode="c", shape=joined.shape)  # the file never changes
