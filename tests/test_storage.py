"""The storage seam: which locations are accepted, how they are joined, what a worker gets."""

import pickle

import pyarrow.fs as pafs
import pytest

from asd_ray import storage
from asd_ray.config import StorageConfig
from asd_ray.errors import DataError

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


@pytest.mark.parametrize(
    ("text", "scheme", "path"),
    [
        ("s3://bucket/train", "s3", "bucket/train"),
        ("s3://bucket/train/", "s3", "bucket/train"),
        ("gs://my.bucket-1/a/b", "gs", "my.bucket-1/a/b"),
        ("S3://bucket", "s3", "bucket"),
        ("relative/folder", "", "relative/folder"),
        ("/abs/folder", "", "/abs/folder"),
        ("run:1", "", "run:1"),  # a colon without // is a local name
    ],
)
def test_locations_that_are_accepted(text, scheme, path):
    where = storage.location(text)
    assert (where.scheme, where.path) == (scheme, path)
    assert storage.location(str(where)) == where  # a location prints as it parses


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pipe:curl http://x/a.tar", "a pipe: location is refused"),
        ("http://host/a.tar", "a http: location is refused"),
        ("hf://datasets/x", "a hf: location is refused"),
        ("fsspec+s3://bucket/x", "a fsspec+s3: location is refused"),
        ("file:///etc/passwd", "give the local path itself"),
        ("s3://bucket/x?endpoint_override=evil.example:80", "query string or fragment"),
        ("s3://bucket/x#frag", "query string or fragment"),
        ("s3://bucket/a/../b", "'..' segments"),
        ("s3://bucket/a//b", "empty"),
        ("s3://bucket/./b", "'.'"),
        ("s3://Bucket/x", "not a bucket name"),
        ("s3://ab/x", "not a bucket name"),
        ("s3:///x", "not a bucket name"),
        ("s3:/bucket/x", "did you mean s3://"),  # what pathlib makes of s3://bucket/x
    ],
)
def test_locations_that_are_refused_in_one_line(text, message):
    with pytest.raises(DataError, match="(?s).*") as caught:
        storage.location(text)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_credentials_in_a_uri_are_refused_without_echoing_them():
    with pytest.raises(DataError) as caught:
        storage.location(f"s3://AKIAEXAMPLE:{SECRET}@bucket/x")
    assert SECRET not in str(caught.value) and "credentials are never read from a URI" in str(caught.value)


@pytest.mark.parametrize("name", ["../x", "a/../b", "/etc/passwd", "", ".", "a//b", "x\0y"])
def test_a_child_never_leaves_its_prefix(name):
    for parent in (storage.location("s3://bucket/set"), storage.location("/data/set")):
        with pytest.raises(DataError, match="not a plain name"):
            parent / name


def test_children_parents_and_names():
    where = storage.location("gs://bucket/sets/train")
    shard = where / "train-000000.tar"
    assert str(shard) == "gs://bucket/sets/train/train-000000.tar"
    assert shard.name == "train-000000.tar" and shard.parent == where
    assert str(where / "splits/epoch=001/part-0.parquet").endswith(
        "sets/train/splits/epoch=001/part-0.parquet"
    )
    with pytest.raises(DataError, match="a bucket has no parent"):
        _ = storage.location("s3://bucket").parent


def test_an_object_location_is_never_used_as_a_local_path(tmp_path):
    with pytest.raises(TypeError, match="not a local path"):
        open(storage.location("s3://bucket/x"))  # noqa: SIM115 - the point is that it fails
    local = storage.location(tmp_path / "f")
    local.local.write_text("x")
    assert open(local).read() == "x"  # noqa: SIM115


def test_a_location_pickles_as_text_and_settings_never_as_keys(monkeypatch):
    """Ray ships locations to every worker: they carry the settings (no secrets), and each
    process builds its own file system from its environment."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    where = storage.location(
        "s3://bucket/x", StorageConfig(endpoint="http://127.0.0.1:9", region="eu-west-1")
    )
    assert isinstance(where.fs, pafs.S3FileSystem)  # built, and cached in this process
    data = pickle.dumps(where)
    assert SECRET.encode() not in data and b"S3FileSystem" not in data
    assert pickle.loads(data) == where
    assert SECRET.encode() not in pickle.dumps(where.fs)  # built from the environment: no keys inside


def test_the_endpoint_comes_from_the_setting_then_the_standard_variables(monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert storage.endpoint("s3", StorageConfig()) == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:2")
    assert storage.endpoint("s3", StorageConfig()) == "http://127.0.0.1:2"
    assert storage.endpoint("s3", StorageConfig(endpoint="http://127.0.0.1:3")) == "http://127.0.0.1:3"
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://127.0.0.1:4")
    assert storage.endpoint("gs", StorageConfig()) == "http://127.0.0.1:4"


def test_ray_train_gets_a_path_and_the_seams_file_system(tmp_path):
    assert storage.for_ray_train(storage.location(tmp_path)) == (str(tmp_path), None)
    where = storage.location("s3://bucket/runs/r1", StorageConfig(endpoint="http://127.0.0.1:9"))
    path, fs = storage.for_ray_train(where)
    assert path == "bucket/runs/r1" and isinstance(fs, pafs.S3FileSystem)
