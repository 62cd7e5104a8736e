"""The commands other than ``run`` at ``s3://`` URIs, against a local S3 server (moto): shard
sets and seed tables written to a bucket, seed lists and ground truth read from it, and a run
folder in a bucket read by ``audit``, ``report``, ``evaluate`` and ``load_model`` exactly as
its local copy is. Nothing is left in the bucket by a command that fails.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from conftest import make_shards
from test_audit import _fake_run
from test_hostile_models import _card, _weights

from asd_ray import storage, tables
from asd_ray.cli import main
from asd_ray.data.shards import ShardSet
from asd_ray.errors import StorageError
from asd_ray.model_card import write_card
from asd_ray.models.saved import load_model, save_model
from asd_ray.run_folder import CONFIG_FILE, INPUTS_FILE

BUCKET = "asd-ray-test"


@pytest.fixture(scope="module")
def bucket():
    """``s3://asd-ray-test`` on a moto server of this module's own, reached through the
    standard variables (the commands build their file systems from them)."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    with pytest.MonkeyPatch.context() as patch:
        for name, value in {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        }.items():
            patch.setenv(name, value)
        boto3.client("s3", endpoint_url=f"http://{host}:{port}").create_bucket(Bucket=BUCKET)
        yield f"s3://{BUCKET}"
    server.stop()


def _objects(uri: str) -> list[str]:
    """Every object key under ``uri`` (recursively), relative to it."""
    where = storage.location(uri)
    import pyarrow.fs as pafs

    found = where.fs.get_file_info(pafs.FileSelector(where.fs_path, recursive=True, allow_not_found=True))
    return sorted(f.path[len(where.fs_path) + 1 :] for f in found if f.type == pafs.FileType.File)


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    folder = tmp_path_factory.mktemp("arrays")
    rng = np.random.default_rng(0)
    np.save(folder / "x.npy", rng.integers(0, 256, (60, 8, 8, 1), dtype=np.uint8))
    np.save(folder / "y.npy", np.arange(60) % 3)
    return folder


def _make(arrays, out: str, *extra: str) -> list[str]:
    return [
        "shards",
        "make",
        "--source",
        "arrays",
        "--images",
        str(arrays / "x.npy"),
        "--labels",
        str(arrays / "y.npy"),
        "--out",
        out,
        "--samples-per-shard",
        "25",
        "-q",
        *extra,
    ]


def test_shards_make_writes_a_shard_set_into_a_bucket(bucket, arrays, tmp_path, capsys):
    uri = f"{bucket}/sets/train"
    code, out, err = _cli(_make(arrays, uri), capsys)
    assert code == 0, err
    assert json.loads(out)["out"] == uri
    names = ["dataset.json", "manifest.parquet", "train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert _objects(uri) == names
    assert _cli(_make(arrays, str(tmp_path / "train")), capsys)[0] == 0
    remote, local = ShardSet(uri), ShardSet(tmp_path / "train")
    assert remote.identity() == local.identity() and len(remote) == 60
    code, out, err = _cli(_make(arrays, uri), capsys)
    assert (code, out) == (2, "")
    assert err == f"asd-ray: error: {uri} already exists; choose another --out or pass --overwrite\n"


@pytest.mark.parametrize("fails_in", ["writing", "publishing"])
def test_a_shards_make_that_fails_leaves_no_object(bucket, arrays, monkeypatch, capsys, fails_in):
    """A failure while the shards are written, or after some of them were published: no object
    is left under --out (a half-published prefix blocked the next make, even with --overwrite)."""
    from asd_ray.data.shard_writer import ShardWriter

    calls = []

    def failing(original):
        def call(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise StorageError(f"{args[-1]}: writing it failed (connection reset); check the network")
            return original(*args, **kwargs)

        return call

    if fails_in == "writing":
        monkeypatch.setattr(ShardWriter, "_next_shard", failing(ShardWriter._next_shard))
    else:
        monkeypatch.setattr(storage, "upload", failing(storage.upload))
    uri = f"{bucket}/failed/{fails_in}"
    code, _, err = _cli(_make(arrays, uri), capsys)
    assert code == 1 and len(err.splitlines()) == 1 and "failed (connection reset)" in err, err
    assert _objects(uri) == []
    monkeypatch.undo()
    assert _cli(_make(arrays, uri), capsys)[0] == 0  # the next try starts afresh


@pytest.fixture(scope="module")
def train_uri(bucket, arrays, tmp_path_factory):
    """The training set of the tests below, local and in the bucket (the same bytes)."""
    local = tmp_path_factory.mktemp("train") / "train"
    assert main(_make(arrays, str(local))) == 0
    storage.publish_folder(local, storage.location(f"{bucket}/seeds-in/train"), last=("dataset.json",))
    return local, f"{bucket}/seeds-in/train"


def test_seeds_read_a_list_and_write_a_table_in_a_bucket(bucket, train_uri, tmp_path, capsys):
    local, uri = train_uri
    listing = tmp_path / "list.txt"
    listing.write_text("# my seeds\n000000003\n7\n\n000000011 # a key\n")
    storage.upload(listing, storage.location(f"{bucket}/lists/seeds.txt"))
    out_uri = f"{bucket}/seeds/mine.parquet"
    argv = ["seeds", "--in", uri, "--from-list", f"{bucket}/lists/seeds.txt", "--out", out_uri, "-q"]
    code, out, err = _cli(argv, capsys)
    assert code == 0, err
    assert json.loads(out) | {"in": None} == {
        "command": "seeds",
        "in": None,
        "out": out_uri,
        "seeds": 3,
        "classes": 3,
        "method": "user-list",
    }
    table = tables.read_parquet(out_uri, "seeds")
    assert table.column("sample_id").to_pylist() == [3, 7, 11]
    drawn = f"{bucket}/seeds/drawn.parquet"
    assert _cli(["seeds", "--in", uri, "--out", drawn, "--per-class", "4", "-q"], capsys)[0] == 0
    assert (
        _cli(["seeds", "--in", str(local), "--out", str(tmp_path / "d.parquet"), "--per-class", "4"], capsys)[
            0
        ]
        == 0
    )
    remote, here = tables.read_parquet(drawn, "seeds"), tables.read_parquet(tmp_path / "d.parquet", "seeds")
    assert remote.drop(["dataset"]).equals(here.drop(["dataset"]))
    assert set(remote.column("dataset").to_pylist()) == {uri}
    code, out, err = _cli(["seeds", "--in", uri, "--out", drawn, "--per-class", "4"], capsys)
    assert (
        code == 2
        and err == f"asd-ray: error: {drawn} already exists; choose another --out or pass --overwrite\n"
    )


def test_seeds_ground_truth_and_list_objects_are_checked(bucket, train_uri, tmp_path, capsys):
    local, uri = train_uri
    poisoned = tmp_path / "poisoned"
    argv = [
        "poison",
        "--attack",
        "badnets",
        "--rate",
        "0.2",
        "--in",
        str(local),
        "--out",
        str(poisoned),
        "-q",
    ]
    assert _cli(argv, capsys)[0] == 0
    truth_uri = f"{bucket}/truth/poison.parquet"
    storage.upload(poisoned / "poison.parquet", storage.location(truth_uri))
    out = tmp_path / "oracle.parquet"
    argv = [
        "seeds",
        "--in",
        str(poisoned),
        "--ground-truth",
        truth_uri,
        "--out",
        str(out),
        "--per-class",
        "3",
    ]
    assert _cli(argv, capsys)[0] == 0
    truth = tables.read_parquet(poisoned / "poison.parquet", "poison").column("is_modified").to_numpy()
    assert not truth[tables.read_parquet(out, "seeds").column("sample_id").to_numpy()].any()
    missing = f"{bucket}/lists/missing.txt"
    code, _, err = _cli(
        ["seeds", "--in", uri, "--from-list", missing, "--out", str(tmp_path / "m.parquet")], capsys
    )
    assert code == 2 and err == (
        f"asd-ray: error: --from-list {missing}: does not exist; "
        "pass a text file of keys or sample ids, one per line\n"
    )
    storage.upload(poisoned / "poison.parquet", storage.location(f"{bucket}/lists/binary.txt"))
    code, _, err = _cli(
        [
            "seeds",
            "--in",
            uri,
            "--from-list",
            f"{bucket}/lists/binary.txt",
            "--out",
            str(tmp_path / "b.parquet"),
        ],
        capsys,
    )
    assert code == 2 and err.startswith(
        f"asd-ray: error: --from-list {bucket}/lists/binary.txt: not UTF-8 text"
    )
    assert not (tmp_path / "m.parquet").exists() and not (tmp_path / "b.parquet").exists()


def test_poison_writes_both_sets_into_a_bucket(bucket, train_uri, tmp_path, capsys):
    local, _ = train_uri
    out, test_out = f"{bucket}/poisoned/train", f"{bucket}/poisoned/test"
    argv = ["poison", "--attack", "badnets", "--rate", "0.2", "--in", str(local), "--out", out]
    code, stdout, err = _cli([*argv, "--test-in", str(local), "--test-out", test_out, "-q"], capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert (summary["out"], summary["ground_truth"], summary["test_out"]) == (
        out,
        f"{out}/poison.parquet",
        test_out,
    )
    assert "poison.parquet" in _objects(out) and "dataset.json" in _objects(out)
    assert ShardSet(out).info.attack["clean"] == str(local)
    assert tables.read_parquet(f"{out}/poison.parquet", "poison").num_rows == 60
    code, _, err = _cli([*argv, "--test-in", str(local), "--test-out", out], capsys)
    assert (
        code == 2
        and err == f"asd-ray: error: --out and --test-out are the same folder {out}; give each its own\n"
    )


@pytest.fixture(scope="module")
def runs(bucket, tmp_path_factory):
    """A finished run folder (three epochs of real split tables, a model and its card, its
    records), locally and copied into the bucket, with its training and test shards local."""
    root = tmp_path_factory.mktemp("run")
    train = make_shards(root / "train", n=60, size=8, channels=1, classes=3, per_shard=25)
    make_shards(root / "test", n=24, size=8, channels=1, classes=3, name="test", seed=1)
    run = root / "run"
    _fake_run(run, with_truth=True)
    card = _card(num_classes=3) | {"classes": ["c0", "c1", "c2"]}
    torch.manual_seed(0)
    weights = _weights(card)
    for kind in ("best", "last"):
        save_model(run / "model", kind, weights, card | {"kind": kind, "epoch": 2})
    run_card = card | {
        "best": {"epoch": 2},
        "last": {"epoch": 2},
        "data": {"train": {"identity_sha256": train.identity()}},
    }
    write_card(run / "model", run_card)
    (run / INPUTS_FILE).write_text(json.dumps({"train": str(root / "train"), "test": str(root / "test")}))
    (run / CONFIG_FILE).write_text("preset: mnist-quick\nepochs: 3\n")
    uri = f"{bucket}/runs/run"
    storage.publish_folder(run, storage.location(uri))
    return run, uri, root / "test"


@pytest.mark.parametrize(
    "command",
    [["audit", "summary", "--json"], ["audit", "flagged", "--json"], ["audit", "sample", "--json", "4"]],
    ids=lambda c: " ".join(c[:2]),
)
def test_audit_reads_a_run_in_a_bucket_as_its_local_copy(runs, command, capsys):
    run, uri, _ = runs
    code, here, err = _cli([*command[:2], str(run), *command[2:]], capsys)
    assert code == 0, err
    code, there, err = _cli([*command[:2], uri, *command[2:]], capsys)
    assert code == 0, err
    assert json.loads(there) == json.loads(here.replace(str(run), uri))
    code, out, err = _cli([*command[:2], f"s3://{BUCKET}/runs/none", *command[2:]], capsys)
    assert (
        (code, out) == (2, "")
        and err
        == f"asd-ray: error: s3://{BUCKET}/runs/none: no such run folder; pass the --out of `asd-ray run`\n"
    )


def test_audit_exports_and_manifests_into_a_bucket(runs, tmp_path, capsys):
    run, uri, _ = runs
    for command, name, extra in (
        ("export", "flags.parquet", []),
        ("manifest", "drop.csv", ["--threshold", "0.5"]),
    ):
        out_uri = f"s3://{BUCKET}/exports/{name}"
        code, out, err = _cli(["audit", command, uri, "--out", out_uri, "-q", *extra], capsys)
        assert code == 0, err
        assert json.loads(out)["out"] == out_uri
        assert _cli(["audit", command, str(run), "--out", str(tmp_path / name), "-q", *extra], capsys)[0] == 0
        assert storage.read_bytes(storage.location(out_uri), limit=10**7) == (tmp_path / name).read_bytes()
        code, _, err = _cli(["audit", command, uri, "--out", out_uri, "--overwrite", "-q", *extra], capsys)
        assert code == 0, err


def test_report_of_a_run_in_a_bucket_is_its_local_copys_report(runs, tmp_path, capsys):
    run, uri, _ = runs
    copy = tmp_path / "run"  # a copy of the local run, so the module's run keeps no audit/
    shutil.copytree(run, copy)
    assert _cli(["report", str(copy), "-q"], capsys)[0] == 0
    code, out, err = _cli(["report", uri, "-q"], capsys)
    assert code == 0, err
    assert json.loads(out) == {
        "command": "report",
        "run": uri,
        "epochs": 3,
        "flags": f"{uri}/audit/flags.parquet",
        "report": f"{uri}/audit/report.html",
    }
    page = storage.read_bytes(storage.location(f"{uri}/audit/report.html"), limit=10**8).decode()
    local_page = (copy / "audit" / "report.html").read_text()
    assert page == local_page.replace(str(copy), uri)
    assert "The 24 most suspicious samples" in page  # thumbnails from the local training shards
    elsewhere = f"s3://{BUCKET}/reports/r1"
    code, out, err = _cli(["report", uri, "--out", elsewhere, "-q"], capsys)
    assert code == 0, err
    assert _objects(elsewhere) == ["flags.parquet", "report.html"]
    assert storage.read_bytes(storage.location(f"{elsewhere}/report.html"), limit=10**8).decode() == page
    code, _, err = _cli(["report", uri, "--out", f"{uri}/audit/report.html", "-q"], capsys)
    assert code == 2 and "is an object, not a prefix" in err


def test_evaluate_and_load_model_read_a_model_in_a_bucket(runs, capsys):
    run, uri, test = runs
    code, here, err = _cli(["evaluate", "--model", str(run), "--test", str(test), "-q"], capsys)
    assert code == 0, err
    code, there, err = _cli(["evaluate", "--model", uri, "--test", str(test), "-q"], capsys)
    assert code == 0, err
    assert json.loads(there) == json.loads(here) | {"model": f"{uri}/model/best.pt"}
    for source in (uri, f"{uri}/model", f"{uri}/model/last.pt"):
        kind = "last" if source.endswith("last.pt") else "best"
        remote, local = load_model(source, kind), load_model(run, kind)
        assert remote.card == local.card | {"file": f"{uri}/model/{kind}.pt"}
        assert all(
            torch.equal(a, b) for a, b in zip(remote.state_dict().values(), local.state_dict().values())
        )
    code, out, err = _cli(["evaluate", "--model", f"{uri}/nothing", "--test", str(test)], capsys)
    assert (code, out) == (2, "") and err.startswith(f"asd-ray: error: {uri}/nothing: no model here")
