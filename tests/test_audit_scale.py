"""The audit at scale reads only what it needs: split tables in row groups, one epoch's
pools at a time, one row group for one sample; and answers as the whole-table reads did."""

import csv
import io
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_shards
from test_audit import _fake_run
from test_hostile_tables import N, _point

from asd_ray import tables
from asd_ray.audit import history
from asd_ray.cli import main
from asd_ray.cli.audit import MANIFEST_COLUMNS
from asd_ray.errors import DataError
from asd_ray.run_folder import split_path

GROUP = 16  # rows per row group in the runs here: 60 samples in 4 groups


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same fake run written in one row group per table and in groups of GROUP rows."""
    root = tmp_path_factory.mktemp("runs")
    _fake_run(root / "one", with_truth=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tables, "ROW_GROUP_ROWS", GROUP)
        _fake_run(root / "groups", with_truth=True)
    assert pq.read_metadata(split_path(root / "groups", 0)).num_row_groups == 4
    return root / "one", root / "groups"


def _answers(run) -> dict:
    return {
        "flags": history.flag_history(run).to_pylist(),
        "flagged": history.flagged_samples(run).to_pylist(),
        "flagged 1": history.flagged_samples(run, 1, label=2).to_pylist(),
        "samples": [history.sample_history(run, i) for i in (0, 7, GROUP, N - 1)],
        "classes": history.per_class(run),
    }


def test_row_groups_change_no_answer(runs):
    assert _answers(runs[1]) == _answers(runs[0])


def _count_reads(monkeypatch) -> list[tuple]:
    """Each read of a split table, as (file name, columns, row groups), from now on."""
    reads = []
    original = tables.ParquetReader.read

    def read(self, columns=None, row_groups=None):
        if self.name == "splits":
            reads.append((self.where.name, None if columns is None else tuple(columns), row_groups))
        return original(self, columns, row_groups)

    monkeypatch.setattr(tables.ParquetReader, "read", read)
    return reads


def test_audit_sample_reads_one_row_group_per_epoch(runs, monkeypatch):
    reads = _count_reads(monkeypatch)
    history.sample_history(runs[1], 37)  # in the third group
    whole_rows = [r for r in reads if r[1] is None]
    assert [r[2] for r in whole_rows] == [[2]] * 3  # samples 32..47 of each epoch's table
    narrow = [r for r in reads if r[1] is not None]
    assert len(narrow) == 3 and all(set(r[1]) == {"sample_id", *history.SUSPICION_COLUMNS} for r in narrow)


def test_flag_history_reads_the_pools_of_each_epoch_and_one_whole_table(runs, monkeypatch):
    reads = _count_reads(monkeypatch)
    history.flag_history(runs[1])
    assert [r[1] for r in reads] == [
        None,
        tuple(history._to_read(["pool"])),
        tuple(history._to_read(["pool"])),
    ]
    assert set(history._to_read(["pool"])) == set(history.CHECKED_COLUMNS)  # loss, rank, ... are not read


@pytest.mark.parametrize("seed", range(3))
def test_streamed_flag_counts_equal_the_epochs_by_samples_matrix(monkeypatch, seed):
    rng = np.random.default_rng(seed)
    flagged = rng.random((7, 1000)) < rng.random((1, 1000))  # (epochs, N), per-sample flag rates
    pools = {e: pa.table({"pool": np.where(row, "polluted", "clean")}) for e, row in enumerate(flagged)}
    monkeypatch.setattr(history, "read_split", lambda run, epoch, columns=None: pools[epoch])
    count, streak = history._flag_counts("run", list(range(7)))
    expected_streak = np.zeros(1000, np.int64)
    for row in flagged:  # the matrix computation the counters replace
        expected_streak = np.where(row, expected_streak + 1, 0)
    np.testing.assert_array_equal(count, flagged.sum(0))
    np.testing.assert_array_equal(streak, expected_streak)


def test_row_groups_whose_statistics_lie_never_give_another_samples_row(runs, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    expected = history.sample_history(runs[0], 37)
    # the statistics say sample 37 is in the first group, which holds samples 0..15
    monkeypatch.setattr(tables.ParquetReader, "row_groups_holding", lambda self, column, value: [0])
    with pytest.raises(DataError, match=f"{split_path(run, 0)}: no row of sample 37 where its row-group"):
        history.sample_history(run, 37)
    # ... or that every group may hold it, the wrong ones first: the right row is found
    monkeypatch.setattr(tables.ParquetReader, "row_groups_holding", lambda self, column, value: [3, 0, 1, 2])
    assert history.sample_history(run, 37) == expected


def test_tables_in_another_row_order_and_without_statistics_read_the_same(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    before = _answers(runs[0])
    for epoch in range(3):
        path = split_path(run, epoch)
        table = pq.read_table(path)
        reversed_rows = table.take(pa.array(np.arange(table.num_rows)[::-1]))
        pq.write_table(reversed_rows, path, row_group_size=GROUP, write_statistics=epoch != 1)
    assert _answers(run) == before


def test_a_defect_in_the_row_group_read_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    path = split_path(run, 2)
    table = pq.read_table(path)
    pools = table.column("pool").to_numpy(zero_copy_only=False).copy()
    pools[37] = "kept"
    table = table.set_column(table.schema.get_field_index("pool"), "pool", pa.array(pools))
    pq.write_table(table, path, row_group_size=GROUP)
    with pytest.raises(DataError, match=f"{path}: unknown pool value"):
        history.sample_history(run, 37)
    assert [e["epoch"] for e in history.sample_history(run, 3)] == [0, 1, 2]  # another group: not read


def _old_manifest(run, shards, threshold: float) -> bytes:
    """The CSV the per-row implementation wrote (Python's csv module, one row at a time)."""
    flags = history.flag_history(run).to_pylist()
    chosen = [r for r in flags if r["suspicion"] >= threshold and r["pinned"] != "trusted"]
    records = shards.manifest_rows(np.array([r["sample_id"] for r in chosen]), ["key", "shard"]).to_pylist()
    out = io.StringIO(newline="")
    writer = csv.writer(out)
    writer.writerow(MANIFEST_COLUMNS)
    for row, record in zip(chosen, records):
        writer.writerow(
            [
                row["sample_id"],
                record["key"],
                record["shard"],
                row["label"],
                f"{row['suspicion']:.6f}",
                row["last_pool"],
                row["pinned"],
                row["flagged_streak"],
                row["epochs_polluted"],
            ]
        )
    return out.getvalue().encode()


@pytest.mark.parametrize("threshold", [0.0, 0.5, 0.97, 1.0])
def test_audit_manifest_writes_what_the_per_row_writer_wrote(runs, tmp_path, capsys, threshold):
    run = tmp_path / "run"
    shutil.copytree(runs[1], run)
    trained = make_shards(tmp_path / "trained", n=N, size=8, channels=1, classes=3, per_shard=32)
    _point(run, trained, trained.folder)
    out = tmp_path / "m.csv"
    argv = ["audit", "manifest", str(run), "--threshold", str(threshold), "--out", str(out), "-q"]
    assert main(argv) == 0
    capsys.readouterr()
    assert out.read_bytes() == _old_manifest(run, trained, threshold)


def test_an_arrow_table_prints_as_its_rows_do_a_batch_at_a_time(capsys, monkeypatch):
    """`audit flagged` prints a whole polluted pool: formatted in batches, never one dict per row."""
    from asd_ray.cli import common

    table = pa.table(
        {
            "sample_id": pa.array(range(10), pa.int64()),
            "loss": pa.array([0.5, None, float("nan"), 1e-9, 123456.0, 2.0, 3.0, 4.0, 5.0, 6.0]),
            "pool": pa.array(["clean", "polluted\x1b[31m"] * 5),
        }
    )
    columns = ["sample_id", "loss", "pool"]
    monkeypatch.setattr(common, "_PRINTED_ROWS", 3)
    batches = []

    class Watched:
        def to_batches(self, max_chunksize):
            found = table.to_batches(max_chunksize=max_chunksize)
            batches.extend(b.num_rows for b in found)
            return found

    common.print_table(Watched(), columns, title="t")
    printed = capsys.readouterr().out
    assert printed == "t\n" + common.format_table(table.to_pylist(), columns) + "\n"
    assert max(batches) == 3 and sum(batches) == 2 * 10  # widths, then lines


@pytest.mark.parametrize(("command", "pool"), [("audit", "system"), ("report", "system"), ("run", None)])
def test_table_commands_give_freed_arrow_memory_back(command, pool):
    """A table command's peak is what it holds, not what it has dropped: Arrow allocates
    through malloc there (chosen before Arrow loads); a run's driver keeps Arrow's default."""
    import subprocess
    import sys

    code = (
        f"import sys; sys.argv = ['asd-ray', {command!r}]; import asd_ray.cli, pyarrow as pa; "
        "print(pa.default_memory_pool().backend_name)"
    )
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    backend = found.stdout.strip()
    assert backend == pool if pool else backend != "system"
