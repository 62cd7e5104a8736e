import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import null_device

from asd_ray import tables
from asd_ray.errors import ConfigError, DataError

SEED_ROW = {"sample_id": [3], "key": ["000000003"], "label": [1], "dataset": ["/d"], "method": ["random"]}


@pytest.mark.parametrize("name", tables.TABLE_NAMES)
def test_every_schema_builds_and_carries_its_version(name):
    schema = tables.schema(name)
    doc = tables.schema_document(name)
    assert schema.names == [f["name"] for f in doc["fields"]]
    assert schema.metadata[b"asd_ray.schema_version"] == str(doc["version"]).encode()
    assert all(f["description"] for f in doc["fields"])


def test_validation_rejects_wrong_column_type(tmp_path):
    good = tables.from_pydict(SEED_ROW, "seeds")
    bad = good.set_column(2, "label", pa.array(["1"]))
    with pytest.raises(DataError, match="column 'label' has type string.*int32"):
        tables.validate(bad, "seeds")
    with pytest.raises(DataError, match="label"):
        tables.write_parquet(bad, tmp_path / "s.parquet", "seeds")
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_validation_rejects_missing_column_and_nulls():
    good = tables.from_pydict(SEED_ROW, "seeds")
    with pytest.raises(DataError, match="missing: \\['method'\\]"):
        tables.validate(good.drop(["method"]), "seeds")
    nulls = good.set_column(1, pa.field("key", pa.string()), pa.array([None], pa.string()))
    with pytest.raises(DataError, match="null"):
        tables.validate(nulls, "seeds")


def test_read_refuses_a_foreign_file_and_another_version(tmp_path):
    pq.write_table(pa.table({"x": [1]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match="columns do not match"):
        tables.read_parquet(tmp_path / "x.parquet", "seeds")
    table = tables.from_pydict(SEED_ROW, "seeds")
    table = table.replace_schema_metadata({"asd_ray.schema_version": "99"})
    pq.write_table(table, tmp_path / "v.parquet")
    with pytest.raises(DataError, match="v99"):
        tables.read_parquet(tmp_path / "v.parquet", "seeds")


def test_round_trip_keeps_types(tmp_path):
    path = tables.write_parquet(tables.from_pydict(SEED_ROW, "seeds"), tmp_path / "s.parquet", "seeds")
    assert tables.read_parquet(path, "seeds").to_pydict() == SEED_ROW


def test_shard_record_layout_lists_only_safe_members():
    doc = tables.schema_document("shard_record")
    assert "pyd" not in doc["readable_members"] and "cls" in doc["readable_members"]
    json.dumps(doc)


@pytest.mark.parametrize(
    ("make", "kind"),
    [
        (lambda p: os.mkfifo(p), "a FIFO"),
        (lambda p: os.symlink(p.parent / "elsewhere", p), "a symbolic link"),
        (lambda p: os.symlink("/dev/null", p), "a symbolic link"),
        (null_device, "a character device"),
        (lambda p: p.mkdir(), "a folder"),
    ],
    ids=["fifo", "link", "link to /dev/null", "device", "folder"],
)
def test_only_an_absent_or_regular_file_is_written(tmp_path, make, kind):
    """A rename replaced a FIFO, link or device node with a regular file (--out /dev/full 'succeeded')."""
    path = tmp_path / "out"
    make(path)
    before = os.lstat(path)
    with pytest.raises(ConfigError, match=f"^{path} is {kind}; name a file to write"):
        tables.write_parquet(tables.from_pydict(SEED_ROW, "seeds"), path, "seeds")
    after = os.lstat(path)
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)  # the same node, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary file left
    assert not (tmp_path / "elsewhere").exists()  # nothing written through the link


def test_an_existing_file_is_replaced_only_when_allowed(tmp_path):
    path = tmp_path / "s.parquet"
    path.write_text("mine")
    with pytest.raises(DataError, match=f"^{path} already exists; choose another --out or pass --overwrite"):
        tables.write_parquet(tables.from_pydict(SEED_ROW, "seeds"), path, "seeds", overwrite=False)
    assert path.read_text() == "mine"
    tables.write_parquet(tables.from_pydict(SEED_ROW, "seeds"), path, "seeds", overwrite=True)
    assert tables.read_parquet(path, "seeds").to_pydict() == SEED_ROW


def test_a_link_made_while_the_file_is_written_is_not_replaced(tmp_path):
    path = tmp_path / "out.csv"
    with pytest.raises(ConfigError, match="is a symbolic link"), tables.atomic_file(path) as tmp:
        tmp.write_text("rows")
        path.symlink_to(tmp_path / "elsewhere")
    assert path.is_symlink() and not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.csv"]


@pytest.mark.parametrize(
    "make", [lambda p: p.symlink_to(p.parent / "real"), lambda p: p.write_text("x")], ids=["link", "file"]
)
def test_a_folder_output_is_never_a_link_or_a_file(tmp_path, make):
    (tmp_path / "real").mkdir()
    path = tmp_path / "set"
    make(path)
    with (
        pytest.raises(ConfigError, match="; name a folder to write"),
        tables.atomic_dir(path, overwrite=True),
    ):
        pass
    assert os.path.lexists(path) and not list((tmp_path / "real").iterdir())


def _seeds(n: int) -> pa.Table:
    ids = list(range(n))
    columns = {"sample_id": ids, "key": [f"{i:09d}" for i in ids], "label": [i % 3 for i in ids]}
    return tables.from_pydict({**columns, "dataset": ["/d"] * n, "method": ["random"] * n}, "seeds")


def test_tables_are_written_in_bounded_row_groups_found_by_their_statistics(tmp_path, monkeypatch):
    monkeypatch.setattr(tables, "ROW_GROUP_ROWS", 10)
    path = tables.write_parquet(_seeds(35), tmp_path / "s.parquet", "seeds")
    with tables.ParquetReader(path, "seeds") as reader:
        assert [reader.metadata.row_group(g).num_rows for g in range(4)] == [10, 10, 10, 5]
        assert reader.row_groups_holding("sample_id", 23) == [2]
        part = reader.read(["sample_id", "label"], row_groups=[2])
    assert part.column_names == ["sample_id", "label"] and part.column("sample_id").to_pylist() == list(
        range(20, 30)
    )
    assert tables.read_parquet(path, "seeds").equals(_seeds(35))


def test_a_projected_read_checks_the_footer_and_the_columns_it_reads(tmp_path):
    table = _seeds(4)
    nulls = table.set_column(1, pa.field("key", pa.string()), pa.array([None] * 4, pa.string()))
    pq.write_table(nulls, tmp_path / "n.parquet")
    with tables.ParquetReader(tmp_path / "n.parquet", "seeds") as reader:
        assert reader.read(["sample_id"]).num_rows == 4  # the nulls are elsewhere
        with pytest.raises(DataError, match="column 'key' holds 4 null"):
            reader.read(["key"])
    pq.write_table(table.set_column(4, "method", pa.array([1, 2, 3, 4])), tmp_path / "t.parquet")
    with pytest.raises(DataError, match="column 'method' has type int64"):  # from the footer, unread
        tables.ParquetReader(tmp_path / "t.parquet", "seeds")
    with pytest.raises(DataError, match="4 rows where 5 are expected"):
        tables.ParquetReader(tmp_path / "n.parquet", "seeds", rows=5)
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="junk.parquet: not a readable Parquet file"):
        tables.ParquetReader(tmp_path / "junk.parquet", "seeds")
