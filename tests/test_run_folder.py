"""The run folder's layout and records: metrics rows through their schema, the summary, the
best-model rule, the run log, inputs.json (hand-made rows, no Ray)."""

import dataclasses
import json
import math
import os
import re
import sys
import types

import pytest

from asd_ray import tables
from asd_ray.audit import history
from asd_ray.config import load_config
from asd_ray.errors import DataError
from asd_ray.inputs import RunInputs
from asd_ray.run_folder import (
    INPUTS_FILE,
    METRICS_FILE,
    METRICS_JSONL,
    PRETRAIN_FILE,
    EpochTimes,
    RunLog,
    best_row,
    metrics_row,
    open_to_append,
    progress_line,
    read_inputs,
    read_metric_rows,
    read_metrics,
    run_summary,
    split_path,
    tensorboard_writer,
    time_split,
    write_metrics,
    write_text,
)

TIMINGS = ("score_s", "virtual_s", "split_s", "train_s", "eval_s", "epoch_s", "fixed_s")


def _row(epoch: int, stage: int = 3, acc: float = 0.5, asr: float | None = 0.125, **changes) -> dict:
    """A metrics row as the driver writes it (every column of schemas/metrics.json)."""
    row = {
        "epoch": epoch,
        "stage": stage,
        "defense": "asd",
        "acc": acc,
        "asr": asr,
        "robust_acc": 0.75,
        "clean_pool": 120,
        "polluted_pool": 120,
        "poison_in_clean": 2,
        "poison_fraction_clean": 2 / 120,
        "flag_precision": 0.25,
        "flag_recall": 0.9,
        "flag_f1": 0.4,
        "flag_auroc": 0.95,
        "train_loss": 1.0,
        **dict(zip(TIMINGS, (1.0, 0.5, 0.25, 4.0, 0.5, 7.0, 0.75))),
    }
    return {**row, **changes}


def test_split_tables_live_in_a_hive_layout_by_epoch(tmp_path):
    assert split_path(tmp_path, 7) == tmp_path / "splits" / "epoch=007" / "part-0.parquet"
    assert split_path(tmp_path, 123).parent.name == "epoch=123"


# --- the best-model rule -----------------------------------------------------------------------


def test_best_is_the_highest_acc_of_the_latest_stage_ties_to_the_later_epoch():
    accs = [0.9, 0.95, 0.5, 0.6, 0.7, 0.7]  # stage 1's 0.95 is higher, but not of the latest stage
    rows = [_row(e, stage, acc) for e, (stage, acc) in enumerate(zip([1, 1, 2, 2, 3, 3], accs))]
    assert best_row(rows) is rows[5]  # the tie at 0.7 goes to epoch 5; the driver compares by identity
    assert best_row(rows[:5]) is rows[4]  # stage 3 reached at epoch 4: it alone counts
    assert best_row(rows[:4]) is rows[3]  # stopped in stage 2: 0.6 beats 0.5
    assert best_row(rows[:2]) is rows[1]
    no_defense = [_row(e, 0, acc) for e, acc in enumerate([0.5, 0.8, 0.8, 0.6])]
    assert best_row(no_defense) is no_defense[2]  # every epoch counts; the tie goes to epoch 2


# --- the summary -------------------------------------------------------------------------------


def test_time_split_averages_each_phase_skipping_recovered_rows():
    rows = [
        _row(0, **dict(zip(TIMINGS, (1.0, 0.0, 0.25, 4.0, 0.5, 6.0, 0.5)))),
        _row(1, **dict(zip(TIMINGS, (3.0, 1.0, 0.75, 6.0, 1.5, 13.0, 1.5)))),
        _row(2, **dict.fromkeys(TIMINGS, float("nan"))),  # checkpointed, not recorded: re-evaluated
    ]
    assert time_split(rows) == {
        "score": 2.0,
        "virtual": 0.5,
        "split": 0.5,
        "train": 5.0,
        "eval": 1.0,
        "epoch": 9.5,
        "fixed": 1.0,
        "overhead": 0.5,  # 9.5 - (2 + 0.5 + 0.5 + 5 + 1): what no phase accounts for
    }
    assert time_split([]) == {}


def test_run_summary_by_hand(tmp_path):
    config = load_config("mnist-quick")
    asrs = [0.9, 0.95, 0.3, 0.2, 0.1, 0.05]
    fractions = [0.0, 0.1, 0.05, None, 0.02, 0.0]
    rows = [
        _row(e, stage, acc, asr, poison_fraction_clean=f)
        for e, (stage, acc, asr, f) in enumerate(
            zip([1, 1, 2, 2, 3, 3], [0.9, 0.95, 0.5, 0.6, 0.7, 0.7], asrs, fractions)
        )
    ]
    summary = run_summary(config, rows, "fp32", 12.34, tmp_path)
    assert summary == {
        "defense": "asd",
        "acc": 0.7,
        "asr": 0.05,
        "robust_acc": 0.75,
        "asr_worst": 0.95,
        "asr_worst_epoch": 1,
        "max_poison_fraction_clean": 0.1,
        "epochs": 6,
        "best_epoch": 5,
        "model": str(tmp_path / "model"),
        "precision": "fp32",
        "train_startup_s": 12.3,
        "mean_epoch_s": time_split(rows),
        "run_dir": str(tmp_path),
    }
    (tmp_path / PRETRAIN_FILE).write_text(json.dumps({"acc": 0.9, "head_steps": 390}) + "\n")
    assert run_summary(config, rows, "fp32", 1.0, tmp_path)["pretrain"] == {"acc": 0.9, "head_steps": 390}
    (tmp_path / PRETRAIN_FILE).unlink()
    os.symlink("/dev/zero", tmp_path / PRETRAIN_FILE)  # a run folder handed over: read until memory ran out
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / PRETRAIN_FILE}: a symbolic link; restore")):
        run_summary(config, rows, "fp32", 1.0, tmp_path)


def test_run_summary_of_a_run_without_epochs_or_a_triggered_set(tmp_path):
    config = load_config("mnist-quick")
    empty = run_summary(config, [], "bf16", 0.0, tmp_path)
    assert (empty["acc"], empty["asr"], empty["asr_worst"], empty["best_epoch"]) == (None, None, None, None)
    assert empty["epochs"] == 0 and empty["mean_epoch_s"] == {}
    rows = [_row(0, asr=None, robust_acc=None, poison_fraction_clean=None)]
    summary = run_summary(config, rows, "bf16", 0.0, tmp_path)
    assert (summary["asr"], summary["asr_worst"], summary["asr_worst_epoch"]) == (None, None, None)
    assert summary["max_poison_fraction_clean"] is None and summary["best_epoch"] == 0


# --- metrics rows through their schema --------------------------------------------------------


def test_metrics_rows_round_trip_through_the_schema_and_json_lines(tmp_path):
    rows = [
        _row(0, 1, 0.25, None, robust_acc=None, poison_in_clean=None, poison_fraction_clean=None),
        _row(1, 2, flag_precision=None, flag_f1=None),
        _row(2),
    ]
    write_metrics(tmp_path, rows)
    assert read_metric_rows(tmp_path, 2) == rows
    table = read_metrics(tmp_path)
    assert (
        str(table.schema.field("epoch").type) == "int32" and str(table.schema.field("acc").type) == "double"
    )
    lines = (tmp_path / METRICS_JSONL).read_text().splitlines()
    assert [json.loads(line) for line in lines] == rows


def test_metrics_are_read_in_epoch_order_up_to_the_epoch_done(tmp_path):
    assert read_metric_rows(tmp_path, 3) == []  # a new run: no metrics yet
    rows = [_row(2, acc=0.2), _row(0, acc=0.0), _row(1, acc=0.1)]  # as a hand-edited file could hold them
    write_metrics(tmp_path, rows)
    assert read_metrics(tmp_path).column("epoch").to_pylist() == [0, 1, 2]
    assert [r["acc"] for r in read_metric_rows(tmp_path, 1)] == [0.0, 0.1]  # a resume after epoch 1
    assert read_metric_rows(tmp_path, -1) == []  # a resume before epoch 0


def test_metrics_with_a_repeated_epoch_are_refused(tmp_path):
    write_metrics(tmp_path, [_row(0), _row(1), _row(1, acc=0.9)])
    message = f"{tmp_path / METRICS_FILE}: epoch 1 appears more than once"
    for read in (read_metrics, history.read_metrics, lambda run: read_metric_rows(run, 2)):
        with pytest.raises(DataError, match=message):
            read(tmp_path)


def test_a_row_the_schema_refuses_is_not_written(tmp_path):
    with pytest.raises(DataError, match="acc"):
        write_metrics(tmp_path, [_row(0, acc=None)])  # ACC is always measured
    assert not (tmp_path / METRICS_FILE).exists() and not (tmp_path / METRICS_JSONL).exists()


def test_a_recovered_rows_unknown_timings_are_null_in_the_json_lines(tmp_path):
    """A row re-evaluated from a checkpoint has NaN loss and timings: the Parquet keeps NaN,
    metrics.jsonl must stay JSON (NaN is not), so it writes null."""
    recovered = _row(0, train_loss=float("nan"), **dict.fromkeys(TIMINGS, float("nan")))
    write_metrics(tmp_path, [recovered, _row(1)])
    assert all(math.isnan(read_metric_rows(tmp_path, 1)[0][k]) for k in ("train_loss", *TIMINGS))

    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    first, second = [
        json.loads(line, parse_constant=refuse)
        for line in (tmp_path / METRICS_JSONL).read_text().splitlines()
    ]
    assert first == {**recovered, "train_loss": None, **dict.fromkeys(TIMINGS)}
    assert second == _row(1)


# --- inputs.json -------------------------------------------------------------------------------


def test_inputs_json_round_trips_what_the_driver_writes(tmp_path):
    inputs = RunInputs(train="/data/train", test="/data/test", seeds="/data/seeds.parquet")
    write_text(tmp_path / INPUTS_FILE, json.dumps(dataclasses.asdict(inputs), indent=2) + "\n")
    assert RunInputs(**read_inputs(tmp_path)) == inputs
    assert read_inputs(tmp_path)["poison_test"] is None


def test_a_missing_inputs_json_asks_whether_the_folder_is_a_run(tmp_path):
    with pytest.raises(
        DataError,
        match=re.escape(f"{tmp_path / INPUTS_FILE}: missing or unreadable; is {tmp_path} a run folder?"),
    ):
        read_inputs(tmp_path)


@pytest.mark.parametrize(
    "text",
    [
        '{"train": "t", "test": "t", "code": "x"}',
        '{"train": "t"}',
        '{"train": "t", "test": 5}',
        "[]",
        "{oops",
        '{"train": "t", "test": "t", "seeds": ',  # cut off mid-write
        '{"train": ' * 100_000 + '"t"' + "}" * 100_000,  # a RecursionError traceback in the parser
    ],
    ids=[
        "an unknown field",
        "no test",
        "a path that is not text",
        "not a mapping",
        "not JSON",
        "truncated",
        "deeply nested",
    ],
)
def test_inputs_json_that_a_run_did_not_write_is_one_data_error(tmp_path, text):
    (tmp_path / INPUTS_FILE).write_text(text)
    with pytest.raises(DataError, match=re.escape(str(tmp_path / INPUTS_FILE))) as refused:
        read_inputs(tmp_path)
    assert "\n" not in str(refused.value)


# --- the run log and other records -------------------------------------------------------------


def test_the_run_log_time_stamps_every_line_and_appends_across_resumes(tmp_path):
    shown = []
    for line in ("epoch 1/2", "epoch 2/2"):  # one driver each, as a resume does
        log = RunLog(tmp_path / "run.log", shown.append)
        log(line)
        log.close()
    assert shown == ["epoch 1/2", "epoch 2/2"]
    logged = (tmp_path / "run.log").read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in logged] == shown
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", line.split(" ", 1)[0]) for line in logged)


def test_records_are_appended_and_never_written_through_a_link(tmp_path):
    with open_to_append(tmp_path / "log") as f:
        f.write("one\n")
    with open_to_append(tmp_path / "log", readable=True) as f:
        f.write("two\n")
        f.seek(0)
        assert f.read() == "one\ntwo\n"
    target = tmp_path / "elsewhere.txt"
    (tmp_path / "run.log").symlink_to(target)
    with pytest.raises(DataError, match="is a symbolic link"):
        open_to_append(tmp_path / "run.log")
    assert not target.exists()


def test_write_text_replaces_the_file_whole(tmp_path):
    write_text(tmp_path / "summary.json", "old\n")
    write_text(tmp_path / "summary.json", "new\n")
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary left beside it
    assert (tmp_path / "summary.json").read_text() == "new\n"


def test_progress_line_by_hand():
    row = _row(1, poison_in_clean=2)
    assert progress_line(row, 3) == (
        "epoch   2/3 stage 3 | acc  50.0% asr  12.5% robust  75.0% | clean 120 (poisoned 2) polluted 120 | "
        "loss 1.000 | score 1.0s virtual 0.5s split 0.25s train 4.0s eval 0.5s total 7.0s (fixed 0.75s)"
    )
    bare = _row(9, acc=0.875, asr=None, robust_acc=None, poison_in_clean=None)  # no triggered set, no truth
    assert progress_line(bare, 10).startswith("epoch  10/10 stage 3 | acc  87.5% | clean 120 polluted 120 |")


class _Recorder:
    """Stands in for tensorboardX's SummaryWriter: records what the callback hands it."""

    def __init__(self, logdir: str):
        self.logdir, self.scalars, self.flushes = logdir, {}, 0
        _Recorder.last = self

    def add_scalar(self, tag, value, step):
        self.scalars[(tag, step)] = value

    def flush(self):
        self.flushes += 1


def test_tensorboard_gets_each_rows_numbers_at_its_epoch(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", types.SimpleNamespace(SummaryWriter=_Recorder))
    write = tensorboard_writer(tmp_path)
    write(_row(4, acc=0.5, asr=None, train_loss=float("nan")))
    writer = _Recorder.last
    assert writer.logdir == str(tmp_path / "tensorboard") and writer.flushes == 1
    # every number but the epoch (the step) and NaN; no text, no None
    expected = {k for k in _row(4) if k not in ("epoch", "defense", "asr", "train_loss")}
    assert set(writer.scalars) == {(k, 4) for k in expected}
    assert writer.scalars[("acc", 4)] == 0.5 and writer.scalars[("clean_pool", 4)] == 120


def test_tensorboard_without_its_package_is_one_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # as if it were not installed
    with pytest.raises(DataError, match="pip install tensorboardX"):
        tensorboard_writer(tmp_path)
    assert not (tmp_path / "tensorboard").exists()


def test_a_metrics_row_takes_the_schemas_columns_from_its_parts():
    times = EpochTimes(0.1, 0.0, 0.01, 1.0, 0.2, 1.4, 0.05)
    head = {"epoch": 2, "stage": 3, "defense": "asd", "acc": 0.9, "train_loss": 0.7}
    pools = {"stage": 3, "clean_pool": 6, "polluted_pool": 4, "seeds": 2, "clean_per_class": [3, 3]}
    row = metrics_row(head, pools, dataclasses.asdict(times))
    assert list(row) == tables.schema("metrics").names  # the schema's columns, in its order
    assert row["polluted_pool"] == 4 and row["fixed_s"] == 0.05 and row["asr"] is None  # nullable: absent
    assert "seeds" not in row  # a split summary's extra counts stay out
    with pytest.raises(ValueError, match="disagree on \\['stage'\\]"):
        metrics_row(head, {**pools, "stage": 2}, dataclasses.asdict(times))
    with pytest.raises(ValueError, match="without \\['train_loss'\\]"):
        metrics_row({k: v for k, v in head.items() if k != "train_loss"}, pools, dataclasses.asdict(times))
