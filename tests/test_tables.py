import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from asd_ray import tables
from asd_ray.errors import DataError

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
