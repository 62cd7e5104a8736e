import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import ShortReads, local_records, make_shards, synthetic_arrays, write_tar
from PIL import Image

from asd_ray.data.records import expand_shard_paths, iter_records
from asd_ray.data.shard_layout import MANIFEST_FILE, sample_key
from asd_ray.data.shard_report import inspect_shard_set
from asd_ray.data.shard_writer import write_shards
from asd_ray.data.shards import ShardSet
from asd_ray.data.slices import assign_slices
from asd_ray.data.sources import from_arrays
from asd_ray.errors import DataError


@pytest.mark.parametrize("channels", [1, 3])
def test_arrays_to_shards_to_arrays_is_bit_identical(tmp_path, channels):
    images, labels = synthetic_arrays(150, 32, channels, classes=5)
    write_shards(from_arrays(images, labels), tmp_path / "s", samples_per_shard=40)
    shards = ShardSet(tmp_path / "s")
    assert [p.name for p in shards.paths] == [f"train-{i:06d}.tar" for i in range(4)]
    back_images, back_labels = shards.load_arrays()
    np.testing.assert_array_equal(back_images, images)
    np.testing.assert_array_equal(back_labels, labels)
    manifest = pq.read_table(tmp_path / "s" / MANIFEST_FILE).to_pydict()
    assert manifest["key"][:2] == [sample_key(0), sample_key(1)]
    assert manifest["shard"][40] == "train-000001.tar" and manifest["index_in_shard"][40] == 0
    # each record's offset is where tarfile finds its first member
    with tarfile.open(shards.paths[1].local) as tar:
        starts = [m.offset for m in tar.getmembers() if m.name.endswith(".cls") is False]
    assert manifest["offset"][40:80] == starts


def test_large_images_are_jpeg_and_png_below_65px(tmp_path):
    images, labels = synthetic_arrays(4, 96, 3, classes=2)
    write_shards(from_arrays(images, labels), tmp_path / "big")
    _, _, members = local_records(ShardSet(tmp_path / "big").paths[0])[0]
    assert set(members) == {"jpg", "cls"}
    assert Image.open(io.BytesIO(members["jpg"])).format == "JPEG"


def test_writing_is_deterministic(tmp_path):
    make_shards(tmp_path / "a")
    make_shards(tmp_path / "b")
    assert (tmp_path / "a/train-000000.tar").read_bytes() == (tmp_path / "b/train-000000.tar").read_bytes()


@pytest.mark.parametrize("workers", range(1, 8))
def test_worker_slices_cover_each_sample_once_and_balance(tmp_path, workers):
    shards = make_shards(tmp_path / "s", n=101, per_shard=17)
    parts = shards.worker_slices(workers)
    ids = [[s.sample_id for s in shards.iter_samples(p)] for p in parts]
    assert sorted(i for part in ids for i in part) == list(range(101))
    sizes = [len(part) for part in ids]
    assert max(sizes) - min(sizes) <= 1


def test_assign_slices_more_workers_than_shards():
    parts = assign_slices(["a", "b"], [3, 2], 7)
    assert sum(s.count for p in parts for s in p) == 5
    assert sorted(len(p) for p in parts) == [0, 0, 1, 1, 1, 1, 1]


def test_brace_patterns_and_refused_urls(tmp_path):
    shards = make_shards(tmp_path / "s", n=100, per_shard=30)
    pattern = str(tmp_path / "s/train-{000000..000003}.tar")
    assert expand_shard_paths(pattern) == shards.paths
    assert expand_shard_paths(tmp_path / "s") == shards.paths
    for refused in ("pipe:curl http://x/a.tar", "http://x/a.tar", "hf://x/a.tar", "fsspec+s3://b/a.tar"):
        with pytest.raises(DataError, match="s3://bucket/prefix and gs://bucket/prefix only"):
            expand_shard_paths(refused)
    with pytest.raises(DataError, match="does not exist"):
        expand_shard_paths(str(tmp_path / "s/train-{000000..000009}.tar"))


def test_inspect_reports_counts(train_set):
    report = inspect_shard_set(train_set.folder)
    assert report["samples"] == 200 and report["per_class"] == {f"c{i}": 50 for i in range(4)}
    assert report["image_sizes"] == {"32x32x3": 200}


# ---------------------------------------------------------------- bad input, one test each


def test_missing_shard_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist.*asd-ray shards make"):
        ShardSet(tmp_path / "nope")


def test_empty_shard_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no files"):
        ShardSet(tmp_path / "empty")


def test_missing_shard_file(train_set):
    train_set.paths[1].local.unlink()
    with pytest.raises(DataError, match="train-000001.tar is missing"):
        ShardSet(train_set.folder)


def test_truncated_tar(train_set):
    path = train_set.paths[0].local
    path.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(DataError, match="train-000000.tar: truncated tar"):
        list(train_set.iter_samples())


def test_empty_shard_file(train_set):
    train_set.paths[0].local.write_bytes(b"")
    with pytest.raises(DataError, match="shard is empty"):
        list(train_set.iter_samples())


def test_record_without_cls(tmp_path, open_shard):
    write_tar(
        tmp_path / "x.tar", [("000000000.png", _png()), ("000000001.png", _png()), ("000000001.cls", b"0")]
    )
    with pytest.raises(DataError, match="x.tar: record '000000000' has no 'cls'"):
        read_all(open_shard, tmp_path / "x.tar")


def test_non_image_bytes(train_set):
    members = [(f"{sample_key(i)}.png", _png()) for i in range(1)] + [("000000000.cls", b"0")]
    members[0] = ("000000000.png", b"this is not an image")
    write_tar(train_set.paths[0].local, members)
    with pytest.raises(DataError, match="record '000000000' is not a readable image"):
        list(train_set.iter_samples())


@pytest.mark.parametrize("label", [b"4", b"-1", b"seven"])
def test_label_out_of_range_or_negative_on_read(train_set, label):
    write_tar(train_set.paths[0].local, [("000000000.png", _png()), ("000000000.cls", label)])
    with pytest.raises(DataError, match="record '000000000' has (label|cls)"):
        list(train_set.iter_samples())


@pytest.mark.parametrize("bad", [-1, 4])
def test_label_out_of_range_or_negative_on_write(tmp_path, bad):
    images, labels = synthetic_arrays(8, 8, 3, classes=4)
    labels[3] = bad
    with pytest.raises(DataError, match="label"):
        write_shards(from_arrays(images, labels, class_names=list("abcd")), tmp_path / "o")
    assert list(tmp_path.iterdir()) == []  # no half-written folder


def test_mixed_image_sizes_where_one_size_is_required(tmp_path):
    from asd_ray.data.sources import Source, SourceRecord

    records = [
        SourceRecord(label=0, source="a", image=np.zeros((8, 8, 3), np.uint8)),
        SourceRecord(label=1, source="b", image=np.zeros((8, 9, 3), np.uint8)),
    ]
    write_shards(Source("arrays", ["a", "b"], records, 2), tmp_path / "mixed")
    shards = ShardSet(tmp_path / "mixed")
    assert shards.info.image_size is None
    with pytest.raises(DataError, match="record '000000001' is 8x9x3.*--image-size"):
        shards.load_arrays()


def test_duplicate_keys(tmp_path, open_shard):
    write_tar(
        tmp_path / "d.tar",
        [
            ("000000000.png", _png()),
            ("000000000.cls", b"0"),
            ("000000001.png", _png()),
            ("000000001.cls", b"0"),
            ("000000000.png", _png()),
            ("000000000.cls", b"1"),
        ],
    )
    with pytest.raises(DataError, match="duplicate key '000000000'"):
        read_all(open_shard, tmp_path / "d.tar")


@pytest.mark.parametrize("ext", ["pyd", "pickle", "pth", "npy"])
def test_pickle_member_is_refused_before_decoding(tmp_path, open_shard, ext):
    import pickle

    class Boom:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    write_tar(
        tmp_path / "p.tar",
        [("000000000.png", _png()), ("000000000.cls", b"0"), (f"000000000.{ext}", pickle.dumps(Boom()))],
    )
    with pytest.raises(DataError, match=f"p.tar: record '000000000' has a '{ext}' member"):
        read_all(open_shard, tmp_path / "p.tar")
    assert not (tmp_path / "pwned").exists()


def test_a_slice_reads_the_records_of_the_whole_shard(tmp_path, open_shard):
    path = make_shards(tmp_path / "s", n=20, per_shard=20).paths[0].local
    whole = read_all(open_shard, path)
    assert [index for index, _, _, _ in whole] == list(range(20))
    for start, stop in [(0, 5), (3, None), (7, 12), (19, 20), (20, None)]:
        assert read_all(open_shard, path, start=start, stop=stop) == whole[start:stop]


def test_a_skipped_prefix_is_still_checked(tmp_path, open_shard):
    """Records before ``start`` are dropped, not trusted: their headers' checksums and their
    member types are checked as when they are read."""
    path = make_shards(tmp_path / "s", n=20, per_shard=20).paths[0].local
    data = bytearray(path.read_bytes())
    data[101] ^= 1  # the first header's mode field, its checksum left as it was
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="train-000000.tar: tar header at byte 0 fails its checksum"):
        read_all(open_shard, path, start=10)
    records = [(f"{i:09d}.{ext}", data) for i in range(4) for ext, data in (("png", _png()), ("cls", b"0"))]
    write_tar(tmp_path / "p.tar", [*records[:2], ("000000000.pth", b"\x80"), *records[2:]])
    with pytest.raises(DataError, match="record '000000000' has a 'pth' member"):
        read_all(open_shard, tmp_path / "p.tar", start=2)


def test_a_stream_is_read_only_as_far_as_the_records_asked_for(tmp_path):
    path = make_shards(tmp_path / "s", n=200, per_shard=200).paths[0].local
    stream = ShortReads(path.read_bytes())
    assert [key for _, key, _, _ in iter_records(stream, "s3://bucket/s/train-000000.tar", stop=1)] == [
        "000000000"
    ]
    assert 0 < stream.consumed < len(path.read_bytes()) // 2


def test_changed_shard_disagrees_with_manifest(train_set):
    write_tar(train_set.paths[0].local, [("000000007.png", _png()), ("000000007.cls", b"0")])
    with pytest.raises(DataError, match="the manifest expects '000000000'"):
        list(train_set.iter_samples())


def read_all(open_shard, path, **window) -> list:
    with open_shard(path) as stream:
        return list(iter_records(stream, str(path), **window))


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_the_manifest_is_streamed_in_row_groups_and_reads_back_whole(tmp_path, monkeypatch):
    """A writer holds one row group of the manifest at a time (its memory does not grow with
    the set); the set reads back as if written at once."""
    import pyarrow.parquet as pq

    from asd_ray.data import shard_writer

    monkeypatch.setattr(shard_writer, "MANIFEST_ROW_GROUP", 64)
    rng = np.random.default_rng(3)
    images, labels = rng.integers(0, 256, (300, 8, 8, 3), dtype=np.uint8), rng.integers(0, 4, 300)
    info = write_shards(from_arrays(images, labels), tmp_path / "set", samples_per_shard=100)
    manifest = tmp_path / "set" / MANIFEST_FILE
    assert pq.ParquetFile(manifest).metadata.num_row_groups == 5  # 4 x 64 + 44
    assert info.num_samples == 300 and info.image_size == [8, 8] and info.channels == 3
    shards = ShardSet(tmp_path / "set")
    assert shards.manifest_rows(np.arange(300), ["key"]).column("sample_id").to_pylist() == list(range(300))
    loaded, read_labels = shards.load_arrays()
    assert np.array_equal(loaded, images) and np.array_equal(read_labels, labels)


def test_a_share_reads_only_the_byte_ranges_of_its_records(tmp_path, monkeypatch, shard_reads):
    from asd_ray.data import slices

    shards = make_shards(tmp_path / "s", n=240, per_shard=60)
    everything = {s.sample_id: s.image for s in shards.iter_samples()}
    offsets = pq.read_table(tmp_path / "s" / MANIFEST_FILE).column("offset").to_numpy()
    sizes = [p.local.stat().st_size for p in shards.paths]
    keep = np.arange(240) % 4 == 1  # a training worker's share: every W-th sample
    monkeypatch.setattr(slices, "_READ_THROUGH", 0)  # each kept record a range of its own
    shard_reads.reset()
    got = list(shards.iter_samples(keep=keep))
    assert [s.sample_id for s in got] == np.flatnonzero(keep).tolist()
    assert all(np.array_equal(s.image, everything[s.sample_id]) for s in got)
    ends = np.array([offsets[i + 1] if (i + 1) % 60 else sizes[i // 60] for i in range(240)])
    assert shard_reads.bytes == int((ends - offsets)[keep].sum()) < sum(sizes) // 3
    assert len(shard_reads.ranges) == keep.sum()


def test_close_records_are_read_as_one_range(tmp_path, monkeypatch):
    from asd_ray.data import slices

    shards = make_shards(tmp_path / "s", n=120, per_shard=60)
    runs = shards._places.kept_runs(np.arange(120) % 4 == 1)
    assert [(r.path.name, r.start, r.stop) for r in runs] == [
        ("train-000000.tar", 1, 58),
        ("train-000001.tar", 1, 58),
    ]
    monkeypatch.setattr(slices, "_READ_THROUGH", 0)
    assert len(shards._places.kept_runs(np.arange(120) % 4 == 1)) == 30


def test_a_record_placed_at_a_false_offset_is_refused(tmp_path):
    shards = make_shards(tmp_path / "s", n=20, per_shard=20)
    manifest = pq.read_table(tmp_path / "s" / MANIFEST_FILE)
    offsets = manifest.column("offset").to_numpy().copy()
    true_place = int(offsets[1])
    offsets[1] += 512  # the first data block of record 1's image: where a reader of it alone starts
    column = manifest.schema.get_field_index("offset")
    pq.write_table(manifest.set_column(column, "offset", pa.array(offsets)), tmp_path / "s" / MANIFEST_FILE)
    shards = ShardSet(tmp_path / "s")
    with pytest.raises(
        DataError, match=f"record '000000001' lies at byte {true_place}, the manifest places it"
    ):
        list(shards.iter_samples())  # a whole pass (every scoring pass) walks the tar from byte 0
    with pytest.raises(DataError, match="no ustar tar header"):
        list(shards.iter_samples(keep=np.arange(20) == 1))


@pytest.mark.parametrize(
    ("row", "offset", "message"),
    [
        (0, 512, "row 0 places its record at byte 512, but it is its shard's first record"),
        (3, 2048 * 2 + 1, "row 4 places its record at byte .*, but it is too close to the record before it"),
        (19, 10**9, "row 19 places its record at byte 1000000000, but it is too close to its shard's end"),
    ],
)
def test_manifest_offsets_a_writer_cannot_leave_are_refused_on_open(tmp_path, row, offset, message):
    make_shards(tmp_path / "s", n=20, per_shard=20)
    manifest = pq.read_table(tmp_path / "s" / MANIFEST_FILE)
    offsets = manifest.column("offset").to_numpy().copy()
    offsets[row] = offset if row != 3 else offsets[4] - 1
    column = manifest.schema.get_field_index("offset")
    pq.write_table(manifest.set_column(column, "offset", pa.array(offsets)), tmp_path / "s" / MANIFEST_FILE)
    with pytest.raises(DataError, match=message):
        ShardSet(tmp_path / "s")


def test_an_open_shard_set_holds_a_few_bytes_per_sample(tmp_path):
    """ImageNet-21k's 14 M samples are opened by the driver, every scorer and every worker."""
    import gc
    import tracemalloc

    n = 20_000
    images = np.zeros((n, 4, 4, 1), np.uint8)
    write_shards(from_arrays(images, np.arange(n) % 7), tmp_path / "s", samples_per_shard=2_000)
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()
        shards = ShardSet(tmp_path / "s")
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes() - before
    finally:
        tracemalloc.stop()
    assert len(shards) == n and held / n <= 16, f"{held / n:.1f} bytes per sample"


def test_an_end_of_archive_hidden_inside_a_range_is_refused(tmp_path):
    """tarfile and GNU tar stop at the first all-zero block: records after it are not in
    the archive for them, so no range of records may read past one."""
    from asd_ray.data.slices import ShardSlice

    shards = make_shards(tmp_path / "s", n=4, per_shard=4)
    path = shards.paths[0].local
    manifest = pq.read_table(tmp_path / "s" / MANIFEST_FILE)
    offsets = manifest.column("offset").to_numpy().copy()
    data = path.read_bytes()
    path.write_bytes(data[: offsets[1]] + bytes(512) + data[offsets[1] :])
    offsets[1:] += 512
    column = manifest.schema.get_field_index("offset")
    pq.write_table(manifest.set_column(column, "offset", pa.array(offsets)), tmp_path / "s" / MANIFEST_FILE)
    shards = ShardSet(tmp_path / "s")
    with pytest.raises(
        DataError, match=f"the archive ends .* at byte {offsets[1] - 512}, inside the records"
    ):
        list(shards.iter_samples([ShardSlice(shards.paths[0], 0, 1), ShardSlice(shards.paths[0], 1, 4)]))
    with pytest.raises(DataError, match="read 1 records where the manifest lists 4"):
        list(shards.iter_samples())  # one reader of the whole shard stops where tar does
