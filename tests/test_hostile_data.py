"""Hostile inputs that once deleted a user's files, exhausted memory, split the commands'
views of one shard set or ended in a traceback: each now refuses with one line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_shards, refusal, write_tar

from asd_ray import storage
from asd_ray.cli import main
from asd_ray.data.shard_writer import write_shards
from asd_ray.data.shards import ShardSet
from asd_ray.data.sources import from_arrays
from asd_ray.errors import DataError


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of one ``asd-ray`` command."""
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err


def said(argv: list[str], capsys) -> str:
    """Exit code and stderr of one ``asd-ray`` command as one text (for ``backend.outcome``)."""
    return "%d %s" % run(argv, capsys)


def _small_source(classes: int = 2):
    rng = np.random.default_rng(0)
    return from_arrays(rng.integers(0, 256, (8, 8, 8, 1), np.uint8), np.arange(8) % classes)


# --------------------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("intruder", ["backup.tar", "notes.tar/", "train-000000.tar/"])
def test_overwrite_keeps_files_the_set_does_not_list(tmp_path, backend, intruder):
    out = tmp_path / "out"
    write_shards(_small_source(), out)
    if intruder.endswith("/"):
        if (out / intruder).exists():
            (out / intruder).unlink()
        (out / intruder).mkdir()
        (out / intruder / "notes.txt").write_text("mine")
    else:
        (out / intruder).write_text("mine")
    name = intruder.rstrip("/")
    overwrite = refusal(lambda where: write_shards(_small_source(), where, overwrite=True))

    def refusal_and_what_is_left(where: str) -> str:
        message = overwrite(where)
        return f"{message} | {name} is left: {storage.exists(storage.location(where) / name)}"

    assert backend.outcome(out, refusal_and_what_is_left) == (
        f"{out} holds {name!r}, which is not a file of its shard set; --overwrite replaces only a "
        f"shard set's own files: move it away or choose another --out | {name} is left: True"
    )


def test_overwrite_replaces_the_sets_own_files(tmp_path):
    out = tmp_path / "out"
    write_shards(_small_source(), out, name="old")
    write_shards(_small_source(), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "manifest.parquet", "train-000000.tar"]


# --------------------------------------------------------------------------- class lists and keys


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _foreign_shard(folder: Path, records: list[tuple[str, bytes]]) -> Path:
    """A foreign WebDataset shard of (name stem, cls) records, each with a tiny PNG."""
    folder.mkdir()
    write_tar(
        folder / "a.tar", [m for key, cls in records for m in ((f"{key}.png", _png()), (f"{key}.cls", cls))]
    )
    return folder


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        ([b"2147483647", b"0"], "label 2147483647 would make 2147483648 classes, over the limit of 22000"),
        ([b"100000", b"1", b"0"], "label 100000 would make 100001 classes"),
        ([b"5", b"1", b"0"], "no record has label 2, yet the largest label 5 makes 6 classes"),
        ([b"0", b"0"], "1 class(es) ['0']; a classifier needs at least 2"),
    ],
)
def test_import_refuses_class_counts_a_stray_label_makes(tmp_path, capsys, backend, labels, message):
    shard = _foreign_shard(tmp_path / "in", [(f"k{i}", cls) for i, cls in enumerate(labels)])
    import_into = ["shards", "import", "--out", str(tmp_path / "out"), "--in"]
    err = backend.outcome(shard, lambda where: said([*import_into, where], capsys))
    assert err.startswith("2 ") and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_arrays_source_refuses_a_huge_label_before_building_names():
    labels = np.array([0, 1, 2**40])
    with pytest.raises(DataError, match="over the limit of 22000"):
        from_arrays(np.zeros((3, 4, 4), np.uint8), labels)


def test_imagenet_21k_class_count_is_accepted_and_one_more_than_the_limit_refused():
    from asd_ray.data.sources.base import MAX_CLASSES, check_class_names

    names = [f"n{i:08d}" for i in range(21_841)]  # ImageNet-21k's WordNet ids
    check_class_names(names, "class list")
    source = from_arrays(np.zeros((21_841, 4, 4), np.uint8), np.arange(21_841))
    assert len(source.class_names) == 21_841
    with pytest.raises(DataError, match=f"{MAX_CLASSES + 1} classes, over the limit of {MAX_CLASSES}"):
        check_class_names([f"c{i}" for i in range(MAX_CLASSES + 1)], "class list")


def test_duplicate_class_names_are_refused(tmp_path, capsys):
    shard = _foreign_shard(tmp_path / "in", [("a", b"0"), ("b", b"1")])
    (tmp_path / "classes.txt").write_text("cat\ncat\n")
    argv = ["shards", "import", "--in", str(shard), "--classes", str(tmp_path / "classes.txt")]
    code, err = run([*argv, "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "class name 'cat' is given twice" in err


def test_dataset_json_with_a_duplicate_class_name_is_refused(tmp_path, backend):
    out = tmp_path / "set"
    write_shards(_small_source(), out)
    meta = json.loads((out / "dataset.json").read_text())
    meta["class_names"] = ["cat", "cat"]
    (out / "dataset.json").write_text(json.dumps(meta))
    assert "class name 'cat' is given twice" in backend.outcome(out, refusal(ShardSet))


@pytest.mark.parametrize(
    ("key", "message"),
    [("a.b", "record keys may not contain dots"), ("", "member '.png' has an empty record key")],
)
def test_import_names_the_true_fault_of_a_bad_key(tmp_path, capsys, backend, key, message):
    shard = _foreign_shard(tmp_path / "in", [(key, b"0"), ("c", b"1")])
    import_into = ["shards", "import", "--out", str(tmp_path / "out"), "--in"]
    err = backend.outcome(shard, lambda where: said([*import_into, where], capsys))
    assert err.startswith("2 ") and message in err and "pickle" not in err


# --------------------------------------------------------------------------- sizes from metadata


def test_npy_header_claiming_more_than_the_file_is_refused_before_loading(tmp_path, capsys):
    images = tmp_path / "images.npy"
    with images.open("wb") as file:  # a 93 GiB header on a 1 KB file
        np.lib.format.write_array_header_1_0(
            file, {"descr": "|u1", "fortran_order": False, "shape": (100_000_000, 1000)}
        )
        file.write(bytes(1024))
    np.save(tmp_path / "labels.npy", np.arange(4) % 2)
    argv = ["shards", "make", "--source", "arrays", "--images", str(images)]
    code, err = run([*argv, "--labels", str(tmp_path / "labels.npy"), "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "the header claims a 100000000x1000 uint8 array (100000000000 bytes)" in err


def test_manifest_row_count_is_checked_from_metadata_before_reading(tmp_path, monkeypatch, backend):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "set"
    write_shards(_small_source(), out)
    manifest = pq.read_table(out / "manifest.parquet")
    pq.write_table(pa.concat_tables([manifest] * 50), out / "manifest.parquet")
    monkeypatch.setattr(pq, "read_table", lambda *a, **k: pytest.fail("the manifest was read"))
    assert "manifest.parquet: 400 rows where 8 are expected" in backend.outcome(out, refusal(ShardSet))


def test_dataset_json_counts_are_checked_against_the_shard_files(tmp_path, backend):
    out = tmp_path / "set"
    write_shards(_small_source(), out)
    meta = json.loads((out / "dataset.json").read_text())
    meta["num_samples"] = meta["shards"][0]["count"] = 200_000_000
    (out / "dataset.json").write_text(json.dumps(meta))
    assert "too small for the 200000000 records it is said to hold" in backend.outcome(out, refusal(ShardSet))
    meta["shards"][0]["count"] = 8
    (out / "dataset.json").write_text(json.dumps(meta))
    assert "counts add up to 8, num_samples is 200000000" in backend.outcome(out, refusal(ShardSet))


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("d-{000000..999999}{000..999}.tar", "names 1000000000 files, over the limit of 100000"),
        ("{" * 30 + "a" + "}" * 30 + ".tar", "nests braces deeper than 4 levels"),
        ("d-{0..1.tar", "unbalanced braces"),
    ],
)
def test_shard_patterns_are_sized_before_they_are_expanded(tmp_path, capsys, pattern, message):
    code, err = run(
        ["shards", "import", "--in", str(tmp_path / pattern), "--out", str(tmp_path / "o")], capsys
    )
    assert code == 2 and message in err


def test_pattern_count_follows_braceexpand():
    import braceexpand

    from asd_ray.data.records import _expansion_count

    for pattern in [
        "a",
        "{01..10..3}",
        "{20..0..7}",
        "{Z..b..2}{1,2}",
        "x{a,b,{c,d}}y",
        "{a,{b..d}{1,2}}",
        "{x}",
        "{a,}",
    ]:
        assert _expansion_count(pattern) == len(list(braceexpand.braceexpand(pattern))), pattern


# --------------------------------------------------------------------------- one verified reader


def _rewrite_shard(shard: Path, change) -> None:
    """Rewrite a shard's members through ``change([(name, data), ...]) -> [(name, data), ...]``."""
    import tarfile

    with tarfile.open(shard) as tar:
        members = [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]
    write_tar(shard, change(members))


def _swap_first_records(members):
    return members[2:4] + members[:2] + members[4:]


def _relabel_first(members):
    return [(n, b"1" if n == "000000000.cls" else d) for n, d in members]


def _corrupt_first_image(members):
    return [(n, d[:20] if n == "000000000.png" else d) for n, d in members]


def _append_record(members):
    return members + [("999999999.png", members[0][1]), ("999999999.cls", b"0")]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (_swap_first_records, "has key '000000001', the manifest expects '000000000'"),
        (
            _relabel_first,
            "record '000000000' (label 1, image (8, 8, 1)) disagrees with the manifest (label 0",
        ),
        (_corrupt_first_image, "record '000000000' is not a readable image"),
        (_append_record, "holds more than the 8 records dataset.json lists"),
    ],
)
def test_poison_reads_through_the_verified_reader(tmp_path, capsys, backend, change, message):
    clean = tmp_path / "clean"
    write_shards(_small_source(), clean)
    _rewrite_shard(clean / "train-000000.tar", change)
    poison = ["poison", "--attack", "badnets", "--rate", "0.5", "--out", str(tmp_path / "p"), "--in"]
    for command in (["shards", "inspect"], poison):
        err = backend.outcome(clean, lambda where, command=command: said([*command, where], capsys))
        assert err.startswith("2 ") and message in err, command
    assert not (tmp_path / "p").exists()


def test_manifest_shapes_and_labels_must_agree_with_dataset_json(tmp_path, backend):
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    out = tmp_path / "set"
    write_shards(_small_source(), out)
    manifest = pq.read_table(out / "manifest.parquet")
    wide = manifest.set_column(
        manifest.schema.get_field_index("width"), "width", pc.add(manifest.column("width"), 56).cast("int32")
    )
    pq.write_table(wide, out / "manifest.parquet")
    refused = backend.outcome(out, refusal(ShardSet))
    assert "row 0 has width 64, dataset.json says every image is 8x8x1" in refused
    relabelled = manifest.set_column(
        manifest.schema.get_field_index("label"),
        "label",
        pc.add(manifest.column("label"), 5).cast(manifest.schema.field("label").type),
    )
    pq.write_table(relabelled, out / "manifest.parquet")
    refused = backend.outcome(out, refusal(ShardSet))
    assert "row 0 has label 5, outside the 2 classes of dataset.json" in refused


def test_trusted_seeds_are_compared_by_identity_not_by_path_spelling(tmp_path):
    import pyarrow as pa

    from asd_ray import tables
    from asd_ray.attacks.poison import poison_shards
    from asd_ray.config import AttackConfig
    from asd_ray.seeds import pick_seeds, plan_seeds

    clean = make_shards(tmp_path / "clean", n=60, size=8, channels=1, classes=3, per_shard=30)
    poison_shards(clean, tmp_path / "train", AttackConfig("badnets", rate=0.5, target=0))
    train = ShardSet(tmp_path / "train")
    (tmp_path / "link-to-clean").symlink_to(tmp_path / "clean")
    (tmp_path / "link-to-train").symlink_to(tmp_path / "train")

    def respelled(table: pa.Table, folder: str) -> pa.Table:
        return table.set_column(3, "dataset", pa.array([folder] * table.num_rows))

    trusted = pick_seeds(clean, 5, seed=1)
    expected = plan_seeds(train, trusted, 5, where="seeds")
    # the seeds the attack modified, by its ground truth: badnets at 50% touches 4 of the 15
    truth = tables.read_parquet(tmp_path / "train" / "poison.parquet", "poison")
    modified = truth.column("is_modified").to_numpy(zero_copy_only=False)
    ids = trusted.column("sample_id").to_numpy()
    assert expected.tampered.tolist() == sorted(ids[modified[ids]]) == [2, 13, 43, 44]
    for spelling in (f"{tmp_path}/link-to-clean", f"{tmp_path}/train/../clean", f"{tmp_path}/clean/"):
        plan = plan_seeds(train, respelled(trusted, spelling), 5, where="seeds")
        assert plan.tampered.tolist() == expected.tampered.tolist(), spelling
    own = pick_seeds(train, 5, seed=1)
    plan = plan_seeds(train, respelled(own, f"{tmp_path}/link-to-train"), 5, where="seeds")
    assert plan.num_extras == 0 and plan.in_place.size == own.num_rows


# --------------------------------------------------------------------------- one line, not a traceback


def _arrays_argv(tmp_path: Path, out: str) -> list[str]:
    np.save(tmp_path / "x.npy", np.zeros((4, 8, 8, 1), np.uint8))
    np.save(tmp_path / "y.npy", np.arange(4) % 2)
    return ["shards", "make", "--source", "arrays", "--images", str(tmp_path / "x.npy")] + [
        "--labels",
        str(tmp_path / "y.npy"),
        "--out",
        out,
    ]


@pytest.mark.parametrize(
    ("out", "message"),
    [
        ("{tmp}/a-file/set", "a-file is a file, not a folder"),
        ("{tmp}/a-file/deeper/set", "a-file is a file, not a folder"),
        ("/proc/asd-ray-set", "cannot create files in /proc"),
    ],
)
def test_unwritable_output_paths_are_one_line(tmp_path, capsys, out, message):
    (tmp_path / "a-file").write_text("mine")
    code, err = run(_arrays_argv(tmp_path, out.format(tmp=tmp_path)), capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert (tmp_path / "a-file").read_text() == "mine"


def test_seeds_output_under_a_file_or_onto_a_folder_is_one_line(tmp_path, capsys):
    make_shards(tmp_path / "set", n=16, size=8, classes=2, per_shard=16)
    (tmp_path / "a-file").write_text("mine")
    (tmp_path / "a-folder").mkdir()
    seeds = ["seeds", "--in", str(tmp_path / "set"), "--per-class", "2", "--overwrite", "--out"]
    code, err = run([*seeds, str(tmp_path / "a-file" / "s.parquet")], capsys)
    assert code == 2 and "a-file is a file, not a folder" in err
    code, err = run([*seeds, str(tmp_path / "a-folder")], capsys)
    assert code == 2 and "a-folder is a folder; name a file to write" in err


def test_images_a_shard_set_cannot_hold_are_refused_when_written(tmp_path):
    for shape in [(2, 1, 70_000, 1), (2, 4097, 4097, 1)]:  # too wide for JPEG; over MAX_PIXELS
        source = from_arrays(np.zeros(shape, np.uint8), np.array([0, 1]))
        with pytest.raises(
            DataError, match=f"arrays:0: image is {shape[1]}x{shape[2]}, over the 16777216-pixel"
        ):
            write_shards(source, tmp_path / "out")
        assert not (tmp_path / "out").exists()


def test_missing_seed_list_is_one_line(tmp_path, capsys):
    make_shards(tmp_path / "set", n=16, size=8, classes=2, per_shard=16)
    argv = ["seeds", "--in", str(tmp_path / "set"), "--out", str(tmp_path / "s.parquet")]
    code, err = run([*argv, "--from-list", str(tmp_path / "absent.txt")], capsys)
    assert code == 2 and "--from-list" in err and "No such file or directory" in err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--pattern-file", "{tmp}/x.npy"], "not a readable image (UnidentifiedImageError)"),
        (["--size", "9"], "--size 9: the badnets patch side must be 1..8 on these 8x8 images"),
        (["--size", "4000", "--pattern-file", "{tmp}/x.npy"], "--size 4000: the badnets patch side"),
    ],
)
def test_trigger_flags_the_image_cannot_take_are_one_line(tmp_path, capsys, flags, message):
    make_shards(tmp_path / "set", n=16, size=8, classes=2, per_shard=16)
    (tmp_path / "x.npy").write_bytes(b"\x93NUMPY not an image")
    argv = ["poison", "--attack", "badnets", "--rate", "0.5", "--in", str(tmp_path / "set")]
    flags = [f.format(tmp=tmp_path) for f in flags]
    code, err = run([*argv, *flags, "--out", str(tmp_path / "p")], capsys)
    assert code == 2 and message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- found in review


def _edit_dataset_json(folder: Path, change) -> None:
    path = folder / "dataset.json"
    info = json.loads(path.read_text())
    change(info)
    path.write_text(json.dumps(info))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda i: i.update(image_size=[10**6, 10**6]), id="image size over the pixel limit"),
        pytest.param(lambda i: i.update(image_size=[1, 70_000]), id="a side over JPEG's limit"),
        pytest.param(lambda i: i.update(attack={"clean": 5}), id="attack clean not a path"),
        pytest.param(lambda i: i.update(attack={"params": "x"}), id="attack params not a mapping"),
    ],
)
def test_dataset_json_cannot_size_buffers_or_name_paths_of_another_type(tmp_path, backend, change):
    out = tmp_path / "set"
    write_shards(_small_source(), out)
    _edit_dataset_json(out, change)
    refused = backend.outcome(out, refusal(ShardSet))
    assert re.search("dataset.json: field '(image_size|attack)' has a wrong type or value", refused)


def test_a_mixed_size_manifest_cannot_claim_a_huge_image(tmp_path, backend):
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path / "set"
    write_shards(_small_source(), out)
    _edit_dataset_json(out, lambda i: i.update(image_size=None))
    manifest = pq.read_table(out / "manifest.parquet")
    heights = pa.array([10**5] + manifest.column("height").to_pylist()[1:], pa.int32())
    pq.write_table(
        manifest.set_column(manifest.schema.get_field_index("height"), "height", heights),
        out / "manifest.parquet",
    )
    refused = backend.outcome(out, refusal(ShardSet))
    assert "row 0 claims a 100000x8x1 image, which no shard set holds" in refused


def test_a_table_with_a_column_twice_is_one_line(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from asd_ray import tables

    seeds = tables.from_pydict(
        {"sample_id": [0], "key": ["k"], "label": [0], "dataset": ["d"], "method": ["m"]}, "seeds"
    )
    doubled = pa.Table.from_arrays(
        [*seeds.columns, seeds.column(0)], names=[*seeds.column_names, "sample_id"]
    )
    pq.write_table(doubled, tmp_path / "seeds.parquet")
    with pytest.raises(DataError, match="seeds.parquet: column 'sample_id' appears 2 times") as refused:
        tables.read_parquet(tmp_path / "seeds.parquet", "seeds")
    assert "\n" not in str(refused.value)


def test_a_parent_that_is_not_the_training_sets_size_is_refused(tmp_path, backend):
    from asd_ray.attacks.poison import poison_shards
    from asd_ray.config import AttackConfig
    from asd_ray.seeds import pick_seeds, plan_seeds

    clean = make_shards(tmp_path / "clean", n=60, size=8, channels=1, classes=3, per_shard=30)
    bigger = make_shards(tmp_path / "bigger", n=90, size=8, channels=1, classes=3, per_shard=30)
    poison_shards(clean, tmp_path / "train", AttackConfig("badnets", rate=0.5, target=0))
    _edit_dataset_json(tmp_path / "train", lambda i: i["attack"].update(clean_identity=bigger.identity()))
    seeds = pick_seeds(bigger, 5, seed=1)
    refused = backend.outcome(
        tmp_path / "train", refusal(lambda where: plan_seeds(ShardSet(where), seeds, 5, where="seeds"))
    )
    assert "named as the training set's clean parent but holds 90 samples" in refused


def test_one_training_sample_cannot_be_a_seed_twice_under_two_spellings(tmp_path):
    import pyarrow as pa

    from asd_ray.attacks.poison import poison_shards
    from asd_ray.config import AttackConfig
    from asd_ray.seeds import pick_seeds, plan_seeds

    clean = make_shards(tmp_path / "clean", n=60, size=8, channels=1, classes=3, per_shard=30)
    poison_shards(clean, tmp_path / "train", AttackConfig("badnets", rate=0.05, target=0))
    train = ShardSet(tmp_path / "train")
    own = pick_seeds(train, 5, seed=1)
    from_parent = own.set_column(3, "dataset", pa.array([str(clean.folder)] * own.num_rows)).cast(own.schema)
    with pytest.raises(DataError, match="is listed as a seed more than once"):
        plan_seeds(train, pa.concat_tables([own, from_parent]), 5, where="seeds")


@pytest.mark.parametrize(
    ("labels", "message"),
    [
        (np.array([0, 1, -1, 1]), "negative label -1"),
        (np.array([0, 1, 2**64 - 1, 1], np.uint64), f"label {2**64 - 1} would make"),
        (np.array([0, 1, 2**63, 1], np.uint64), f"label {2**63} would make"),
    ],
)
def test_labels_that_wrap_or_are_negative_are_refused(labels, message):
    rng = np.random.default_rng(0)
    with pytest.raises(DataError, match=message):
        from_arrays(rng.integers(0, 256, (4, 8, 8, 1), np.uint8), labels)
