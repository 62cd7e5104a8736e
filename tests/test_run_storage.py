"""A run folder at a URI: staged on the driver's disk, published in commit order, resumed anywhere."""

import os

import pytest

from asd_ray import storage
from asd_ray.config import StorageConfig
from asd_ray.errors import DataError
from asd_ray.run_storage import StagedRun


@pytest.fixture
def target(s3_server, s3_bucket):
    return storage.location(f"{s3_bucket}/runs/r1", StorageConfig(endpoint=s3_server.endpoint))


def _write(staged: StagedRun, name: str, text: str) -> None:
    path = staged.staging / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_publish_sends_what_changed_records_first_and_the_commit_last(target, tmp_path, monkeypatch):
    staged = StagedRun.open(target, resume=False, cache_dir=str(tmp_path))
    for name in (
        "summary.json",
        "metrics.parquet",
        "metrics.jsonl",
        "model/best.pt",
        "splits/epoch=000/part-0.parquet",
    ):
        _write(staged, name, name)
    _write(staged, ".lock", "")  # this node's lock, and an atomic write's temporary: never sent
    _write(staged, "model/.best.pt.x.tmp", "half")
    sent = []
    upload = storage.upload
    monkeypatch.setattr(
        storage, "upload", lambda source, where: (sent.append(str(where)), upload(source, where))
    )
    staged.publish()
    order = [name.rsplit("/runs/r1/", 1)[-1] for name in sent]
    assert order == [
        "model/best.pt",
        "splits/epoch=000/part-0.parquet",
        "metrics.jsonl",
        "metrics.parquet",
        "summary.json",
    ]
    sent.clear()
    _write(staged, "metrics.jsonl", "metrics.jsonl and a row more")
    staged.publish()
    assert [name.rsplit("/", 1)[-1] for name in sent] == ["metrics.jsonl"]  # only what changed
    assert storage.read_bytes(target / "metrics.jsonl", limit=100) == b"metrics.jsonl and a row more"
    staged.close()
    assert not staged.staging.exists()


def test_a_new_run_needs_an_empty_prefix_and_a_resume_downloads_the_run(target, tmp_path):
    staged = StagedRun.open(target, resume=False, cache_dir=str(tmp_path))
    _write(staged, "config.yaml", "epochs: 3\n")
    _write(staged, "splits/epoch=000/part-0.parquet", "table")
    staged.publish()
    staged.close()
    with pytest.raises(DataError, match=rf"^run folder {target} is not empty; pass --resume"):
        StagedRun.open(target, resume=False, cache_dir=str(tmp_path))
    assert os.listdir(tmp_path) == []  # a refused start leaves no staging folder
    again = StagedRun.open(target, resume=True, cache_dir=str(tmp_path))
    assert (again.staging / "splits/epoch=000/part-0.parquet").read_text() == "table"
    before = len(os.listdir(tmp_path))
    again.publish()  # nothing changed: nothing is sent again
    again.close()
    assert before == 1 and os.listdir(tmp_path) == []
    with pytest.raises(DataError, match="no config.yaml there"):
        StagedRun.open(
            storage.location(f"{target}-other", target.settings), resume=True, cache_dir=str(tmp_path)
        )


def test_a_new_run_refuses_a_prefix_holding_only_old_checkpoints_and_ignores_a_killed_upload(
    target, tmp_path
):
    _object(target / "train/checkpoint_2026-01-01_00-00-00/state.pt", tmp_path)
    with pytest.raises(DataError, match="is not empty"):  # it would resume from them, silently
        StagedRun.open(target, resume=False, cache_dir=str(tmp_path / "cache"))
    other = storage.location(f"{target}-2", target.settings)
    _object(other / ".partial-0123abcd-metrics.parquet", tmp_path)  # what a SIGKILLed upload leaves
    StagedRun.open(other, resume=False, cache_dir=str(tmp_path / "cache")).close()
    assert storage.list_names(other, limit=10) == []


def _object(where, tmp_path) -> None:
    source = tmp_path / "object"
    source.write_bytes(b"x")
    where.fs.create_dir(where.parent.fs_path)
    with where.fs.open_output_stream(where.fs_path) as out:  # straight to its name, as a crash leaves it
        out.write(source.read_bytes())
