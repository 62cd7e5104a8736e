"""Fuzz over a shard set's manifest: a tampered manifest is refused with one line
(when the set is opened, or at the latest when its records are read), never taken
silently and never a traceback.
"""

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_shards, refusal

from asd_ray.data.shard_layout import MANIFEST_FILE
from asd_ray.data.shard_report import inspect_shard_set
from asd_ray.data.shards import ShardSet


@pytest.fixture(scope="module")
def clean(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("manifest_fuzz") / "set"
    make_shards(folder, n=40, classes=4, size=8, channels=1, per_shard=16)
    return folder


def _column(table: pa.Table, name: str, values) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(
        index, table.schema.field(index), pa.array(values, table.schema.field(index).type)
    )


def _set(name: str, change):
    """A tampering that replaces column ``name`` with ``change(old values)``."""
    return lambda t: _column(t, name, change(t.column(name).to_numpy(zero_copy_only=False)))


def _first(value):
    """A change of the first row's value only."""
    return lambda values: np.r_[[value], values[1:]]


def _swap_first_two(values):
    values = values.copy()
    values[[0, 1]] = values[[1, 0]]
    return values


TAMPERINGS = {
    "rows reversed": lambda t: t.take(np.arange(t.num_rows)[::-1]),
    "rows shuffled": lambda t: t.take(np.random.default_rng(0).permutation(t.num_rows)),
    "a row missing": lambda t: t.slice(1),
    "a row repeated": lambda t: t.take(np.r_[np.arange(t.num_rows), [3]]),
    "an id repeated": _set("sample_id", lambda v: np.r_[v[:-1], [0]]),
    "ids shifted": _set("sample_id", lambda v: v + 1),
    "a negative id": _set("sample_id", _first(-1)),
    "two keys swapped": _set("key", _swap_first_two),
    "a label changed": _set("label", lambda v: np.r_[[(v[0] + 1) % 4], v[1:]]),
    "a label out of range": _set("label", _first(4)),
    "a label of 2**31-1": _set("label", _first(2**31 - 1)),
    "a negative label": _set("label", _first(-1)),
    "one height changed": _set("height", _first(9)),
    "every height changed": _set("height", lambda v: np.full(len(v), 16)),
    "every channel count changed": _set("channels", lambda v: np.full(len(v), 3)),
    "a shard outside the folder": _set("shard", _first("../x.tar")),
    "an index in shard changed": _set("index_in_shard", _first(5)),
    "sample_id as text": lambda t: t.set_column(
        0, "sample_id", pa.array([str(i) for i in range(t.num_rows)])
    ),
    "a column missing": lambda t: t.drop_columns(["label"]),
    "empty": lambda t: t.slice(0, 0),
}


def _open_and_read(where: str) -> None:
    ShardSet(where)
    inspect_shard_set(where)


@pytest.mark.parametrize("case", TAMPERINGS)
def test_a_tampered_manifest_is_refused_in_one_line(clean, tmp_path, backend, case):
    folder = Path(shutil.copytree(clean, tmp_path / "fuzzed"))
    original = pq.read_table(folder / MANIFEST_FILE)
    pq.write_table(TAMPERINGS[case](original), folder / MANIFEST_FILE)
    message = backend.outcome(folder, refusal(_open_and_read))
    # names the manifest, or the shard whose record disagrees with it
    assert str(folder) in message or "train-000000.tar" in message, case
