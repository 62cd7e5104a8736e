"""A share in memory or in the disk cache of the memory budget: same content, never stale."""

import os

import numpy as np
import pytest

from asd_ray.data import share
from asd_ray.data.share import fingerprint, load_share


def test_a_share_over_budget_is_served_from_a_disk_cache_with_the_same_content(train_set, tmp_path) -> None:
    keep = np.arange(len(train_set)) % 2 == 1
    images, ids, labels = load_share(train_set, keep=keep)
    cached, cached_ids, cached_labels = load_share(
        train_set, keep=keep, budget_bytes=1000, cache_dir=tmp_path
    )
    assert not isinstance(images, np.memmap) and isinstance(cached, np.memmap)
    assert np.array_equal(cached, images) and np.array_equal(cached_ids, ids)
    assert np.array_equal(cached_labels, labels)
    assert len(list(tmp_path.glob("asd-ray-share-*.images.npy"))) == 1
    within, _, _ = load_share(train_set, keep=keep, budget_bytes=images.nbytes, cache_dir=tmp_path)
    assert not isinstance(within, np.memmap)


def test_the_cache_is_reused_for_the_same_shards_and_rebuilt_for_changed_ones(
    train_set, tmp_path, monkeypatch
):
    first, _, _ = load_share(train_set, budget_bytes=1000, cache_dir=tmp_path)
    decode = share._decode_into
    monkeypatch.setattr(share, "_decode_into", lambda *a: pytest.fail("decoded again"))
    again, _, _ = load_share(train_set, budget_bytes=1000, cache_dir=tmp_path)  # a restarted process
    assert np.array_equal(again, first)
    before = fingerprint(train_set)
    path = train_set.paths[0].local
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # the shard was rewritten
    assert fingerprint(train_set) != before
    monkeypatch.setattr(share, "_decode_into", decode)
    load_share(train_set, budget_bytes=1000, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("asd-ray-share-*.images.npy"))) == 2
    assert not list(tmp_path.glob(".*partial*"))


def _shares(train_set, size: int, tmp_path) -> tuple[tuple, tuple]:
    """The first ``size`` samples in memory and over a budget, the second from the disk cache."""
    keep = np.arange(len(train_set)) < size
    return load_share(train_set, keep=keep), load_share(
        train_set, keep=keep, budget_bytes=1, cache_dir=tmp_path
    )


@pytest.mark.parametrize("size", [3, 7, 8, 9, 19])  # under, around and past chunks of 8 rows
def test_trusted_copies_follow_a_cached_share_of_any_size(train_set, test_set, tmp_path, monkeypatch, size):
    monkeypatch.setattr(share, "_COPY_ROWS", 8)
    (images, ids, labels), (cached, cached_ids, cached_labels) = _shares(train_set, size, tmp_path)
    extra, _, _ = load_share(test_set, keep=np.arange(len(test_set)) % 16 == 3)  # 5 trusted copies
    expected = np.concatenate([images, extra])
    joined = share.append_rows(cached, extra)
    assert isinstance(joined, np.memmap) and joined.flags.writeable  # as load_share's memmap
    assert np.array_equal(cached_ids, ids) and np.array_equal(cached_labels, labels)
    assert joined.shape == expected.shape and np.array_equal(joined, expected)
    assert np.array_equal(share.append_rows(images, extra), expected)


def test_trusted_copies_follow_a_cached_share_that_is_not_a_whole_number_of_chunks(tmp_path) -> None:
    """The probe's case at the real chunk size: 4,000 MNIST-sized rows and 5 trusted copies."""
    rows = np.random.default_rng(0).integers(0, 256, size=(4000, 28, 28, 1), dtype=np.uint8)
    np.save(tmp_path / "share.images.npy", rows)
    extra = rows[:5] ^ 0xFF
    joined = share.append_rows(np.load(tmp_path / "share.images.npy", mmap_mode="c"), extra)
    assert np.array_equal(joined, np.concatenate([rows, extra]))


def test_the_joined_cache_is_removed_with_the_share_even_after_a_failed_copy(train_set, tmp_path) -> None:
    cache = tmp_path / "cache"
    _, (cached, _, _) = _shares(train_set, 9, cache)
    share.append_rows(cached, np.zeros((2, *cached.shape[1:]), np.uint8))
    assert len(list(cache.iterdir())) == 4  # ids, labels, images and the joined images
    share.remove_caches()
    assert not list(cache.iterdir())
    _, (cached, _, _) = _shares(train_set, 9, cache)
    with pytest.raises(ValueError):
        share.append_rows(cached, np.zeros((2, 4, 4, 3), np.uint8))  # rows of another size
    share.remove_caches()
    assert not list(cache.iterdir())
