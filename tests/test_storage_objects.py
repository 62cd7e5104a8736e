"""The storage seam against real object-store servers on 127.0.0.1: moto's S3 (the client is
pyarrow's own S3 file system, the code that talks to AWS), the GCS emulator, and a proxy
that drops connections and answers 503."""

import os
import urllib.request

import pytest

from asd_ray import storage
from asd_ray.config import StorageConfig
from asd_ray.errors import DataError, StorageError

PAYLOAD = os.urandom(3 * storage.STREAM_BUFFER + 12345)  # four ranged GETs


def _settings(endpoint: str, **more) -> StorageConfig:
    return StorageConfig(endpoint=endpoint, **{"retries": 3, **more})


def _read_all(where: storage.Location, chunk: int = 65536) -> bytes:
    with storage.open_stream(where) as stream:
        parts = []
        while part := stream.read(chunk):
            parts.append(part)
    return b"".join(parts)


def _put(where: storage.Location, data: bytes, tmp_path) -> None:
    source = tmp_path / "upload.bin"
    source.write_bytes(data)
    storage.upload(source, where)


def test_upload_read_list_and_version_on_s3(s3_server, s3_bucket, tmp_path):
    root = storage.location(f"{s3_bucket}/sets/a", _settings(s3_server.endpoint))
    _put(root / "x.bin", PAYLOAD, tmp_path)
    assert _read_all(root / "x.bin") == PAYLOAD
    assert storage.list_names(root, limit=10) == ["x.bin"]  # the temporary key is gone
    version = storage.version(root / "x.bin")
    assert version.size == len(PAYLOAD) and version.tag.startswith("etag ")
    assert storage.read_bytes(root / "x.bin", limit=len(PAYLOAD)) == PAYLOAD
    with pytest.raises(DataError, match=r"s3://.*/x.bin: \d+ bytes, over the 1000-byte limit"):
        storage.read_bytes(root / "x.bin", limit=1000)
    with pytest.raises(DataError, match=r"holds 1 entries, more than the 0 expected"):
        storage.list_names(root, limit=0)


def test_the_same_on_gcs(gcs_server, gcs_bucket, tmp_path):
    root = storage.location(
        f"{gcs_bucket}/sets/a", _settings(f"http://{gcs_server.endpoint}", anonymous=True)
    )
    _put(root / "x.bin", PAYLOAD, tmp_path)
    assert _read_all(root / "x.bin") == PAYLOAD
    assert storage.list_names(root, limit=10) == ["x.bin"]
    assert storage.version(root / "x.bin").size == len(PAYLOAD)


def test_missing_objects_and_buckets_are_one_line(s3_server, s3_bucket):
    settings = _settings(s3_server.endpoint)
    for text in (f"{s3_bucket}/nope.bin", "s3://no-such-bucket-here/x.bin"):
        with pytest.raises(DataError, match=rf"^{text}: does not exist; check the location$"):
            storage.read_bytes(storage.location(text, settings), limit=10)
        with pytest.raises(DataError, match=rf"^{text}: does not exist \(opening it\)"):
            storage.open_stream(storage.location(text, settings)).__enter__()


def test_a_dropped_connection_mid_object_is_retried_counted_and_gives_the_same_bytes(
    s3_server, s3_bucket, fault_proxy, tmp_path
):
    direct = storage.location(f"{s3_bucket}/x.bin", _settings(s3_server.endpoint))
    _put(direct, PAYLOAD, tmp_path)
    through = storage.location(str(direct), _settings(fault_proxy.endpoint))
    storage.RetryCounter.take()
    fault_proxy.drop_get_body("x.bin", after_bytes=1_000_000, times=2)  # the first and second range
    assert _read_all(through) == PAYLOAD
    assert fault_proxy.injected("drop") == 2 and storage.RetryCounter.take() == 2


def test_a_busy_server_is_retried_and_a_lasting_failure_is_one_line(
    s3_server, s3_bucket, fault_proxy, tmp_path
):
    direct = storage.location(f"{s3_bucket}/x.bin", _settings(s3_server.endpoint))
    _put(direct, PAYLOAD, tmp_path)
    through = storage.location(str(direct), _settings(fault_proxy.endpoint, retries=2))
    storage.RetryCounter.take()
    fault_proxy.slow_down(times=2, methods=("HEAD", "GET"))
    assert _read_all(through) == PAYLOAD and storage.RetryCounter.take() == 2
    fault_proxy.reset()
    fault_proxy.drop_get_body("x.bin", after_bytes=1000, times=10)
    with pytest.raises(
        StorageError, match=rf"^{direct}: reading at byte 0 failed \(.*\); check storage.endpoint"
    ):
        _read_all(through)


def test_an_object_changed_since_it_was_listed_is_refused(s3_server, s3_bucket, tmp_path):
    where = storage.location(f"{s3_bucket}/x.bin", _settings(s3_server.endpoint))
    _put(where, b"first", tmp_path)
    seen = storage.version(where)
    _put(where, b"other", tmp_path)  # same size, new content
    with pytest.raises(DataError, match="changed since the shard set was opened .* restore it or re-make"):
        storage.open_stream(where, expected=seen).__enter__()


def test_access_denied_is_one_line_naming_the_credentials(s3_server, s3_bucket, tmp_path):
    where = storage.location(f"{s3_bucket}/x.bin", _settings(s3_server.endpoint))
    _put(where, b"data", tmp_path)
    _moto_auth(s3_server, "0")  # from now on moto checks keys: ours are unknown to it
    try:
        with pytest.raises(DataError, match=r"access denied .* check the credentials \(AWS_\* variables"):
            storage.read_bytes(where, limit=100)
        with pytest.raises(DataError, match="access denied"):
            _put(storage.location(f"{s3_bucket}/y.bin", where.settings), b"data", tmp_path)
    finally:
        _moto_auth(s3_server, "inf")
    assert not storage.exists(storage.location(f"{s3_bucket}/y.bin", where.settings))


def _moto_auth(server, budget: str) -> None:
    request = urllib.request.Request(
        f"{server.endpoint}/moto-api/reset-auth", data=budget.encode(), headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(request, timeout=10).read()


def test_a_prefix_holding_objects_its_set_does_not_declare_is_refused(s3_server, s3_bucket, tmp_path):
    from conftest import make_shards

    from asd_ray.data.shards import ShardSet

    local = make_shards(tmp_path / "set", n=40, per_shard=20)
    where = storage.location(f"{s3_bucket}/set", _settings(s3_server.endpoint))
    storage.publish_folder(local.folder.local, where, last=("dataset.json",))
    assert ShardSet(where).identity() == local.identity()  # the same set, however it is spelled
    _put(where / "train-000099.tar", (local.folder.local / "train-000000.tar").read_bytes(), tmp_path)
    with pytest.raises(
        DataError,
        match=r"holds 1 object\(s\) that dataset.json does not declare \(first: 'train-000099.tar'\)",
    ):
        ShardSet(where)


def test_the_data_commands_write_and_read_a_shard_set_on_gcs(
    gcs_server, gcs_bucket, tmp_path, monkeypatch, capsys
):
    """Through Google's own variable for an emulator, as a user of one would."""
    import json

    import numpy as np

    from asd_ray.cli import main

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://{gcs_server.endpoint}")
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x.npy", rng.integers(0, 256, (30, 8, 8, 3), dtype=np.uint8))
    np.save(tmp_path / "y.npy", np.arange(30) % 3)
    out = f"{gcs_bucket}/set"
    assert main(["shards", "make", "--source", "arrays", "--images", str(tmp_path / "x.npy"), "--labels",
                 str(tmp_path / "y.npy"), "--samples-per-shard", "10", "--out", out, "-q"]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["shards", "inspect", out, "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["samples"] == 30 and report["shards"] == 3 and report["folder"] == out
