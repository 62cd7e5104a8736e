"""Untrusted tables and run folders: rows are matched by id, never by position, and a table
that does not fit gives one DataError naming the file, never a different answer or a
traceback. Fuzzes ground-truth, split and metrics tables; checks the run folder's card,
inputs.json, config.yaml and audit folder, and the files the audit writes.
"""

import json
import os
import re
import shutil
import stat

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_shards, null_device, time_limit
from test_audit import _fake_run

from asd_ray import tables
from asd_ray.attacks.poison import read_ground_truth
from asd_ray.audit import history
from asd_ray.audit.report import report
from asd_ray.cli import main
from asd_ray.errors import DataError
from asd_ray.model_card import CARD_FILE, MODEL_DIR
from asd_ray.run_folder import INPUTS_FILE, METRICS_FILE, read_metric_rows, split_path
from asd_ray.split import split_summary

N = 60  # samples of _fake_run


def _set(table: pa.Table, name: str, values, type_=None) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, name, pa.array(values, type_ or table.schema.field(name).type))


def _ids(table: pa.Table, change) -> pa.Table:
    ids = table.column("sample_id").to_numpy().copy()
    change(ids)
    return _set(table, "sample_id", ids)


def _label(table: pa.Table, value: int) -> pa.Table:
    labels = table.column("label").to_numpy().copy()
    labels[3] = value
    return _set(table, "label", labels)


def _extra_rows(table: pa.Table) -> pa.Table:
    extra = table.slice(0, 5)
    return pa.concat_tables(
        [table, _set(extra, "sample_id", np.arange(5) + table.num_rows).cast(table.schema)]
    )


# Each hostile edit of a table that keeps its schema; the permutations must read the same.
PERMUTATIONS = {
    "reversed": lambda t: t.take(pa.array(np.arange(t.num_rows)[::-1])),
    "shuffled": lambda t: t.take(pa.array(np.random.default_rng(5).permutation(t.num_rows))),
    "rotated": lambda t: t.take(pa.array(np.roll(np.arange(t.num_rows), 1))),
}
DEFECTS = {
    "a row missing": lambda t: t.slice(1),
    "the last row missing": lambda t: t.slice(0, t.num_rows - 1),
    "an id repeated": lambda t: _ids(t, lambda ids: ids.__setitem__(5, 4)),
    "an id one past the end": lambda t: _ids(t, lambda ids: ids.__setitem__(5, len(ids))),
    "a negative id": lambda t: _ids(t, lambda ids: ids.__setitem__(0, -1)),
    "a huge id": lambda t: _ids(t, lambda ids: ids.__setitem__(5, 2**62)),
    "extra rows": _extra_rows,
    "empty": lambda t: t.slice(0, 0),
    "sample_id as int32": lambda t: _set(t, "sample_id", t.column("sample_id").to_numpy(), pa.int32()),
    "sample_id as float": lambda t: _set(t, "sample_id", t.column("sample_id").to_numpy(), pa.float64()),
    "sample_id missing": lambda t: t.drop_columns(["sample_id"]),
    "label missing": lambda t: t.drop_columns([t.column_names[1]]),
}


def _rewrite(path, edit) -> None:
    pq.write_table(edit(pq.read_table(path)), path)


# --- ground truth -----------------------------------------------------------------------------


@pytest.fixture
def truth_file(tmp_path):
    """A 40-sample shard set and its valid poison.parquet (samples 0..11 poisoned)."""
    shards = make_shards(tmp_path / "train", n=40, size=8, channels=1, classes=2, per_shard=16)
    poisoned = np.arange(40) < 12
    labels = shards.labels
    truth = tables.from_pydict(
        {
            "sample_id": np.arange(40),
            "is_poison": poisoned,
            "is_modified": poisoned,
            "original_label": labels,
            "label_after": np.where(poisoned, 1, labels),
            "attack": ["badnets"] * 40,
            "params": ["{}"] * 40,
        },
        "poison",
    )
    path = tables.write_parquet(truth, tmp_path / "poison.parquet", "poison")
    return shards, path


@pytest.mark.parametrize("name", PERMUTATIONS)
def test_ground_truth_in_another_row_order_reads_the_same(truth_file, name):
    shards, path = truth_file
    original = read_ground_truth(path, shards)
    _rewrite(path, PERMUTATIONS[name])
    assert read_ground_truth(path, shards).equals(original)


@pytest.mark.parametrize("name", [*DEFECTS, "label_after missing", "is_poison as int8"])
def test_a_ground_truth_that_does_not_fit_is_one_data_error(truth_file, name):
    shards, path = truth_file
    edits = {
        **DEFECTS,
        "label_after missing": lambda t: t.drop_columns(["label_after"]),
        "is_poison as int8": lambda t: _set(t, "is_poison", t.column("is_poison").to_numpy(), pa.int8()),
    }
    _rewrite(path, edits[name])
    with pytest.raises(DataError, match=str(path)):
        read_ground_truth(path, shards)


def test_seeds_from_a_reversed_ground_truth_draw_no_poison(truth_file, tmp_path, capsys):
    shards, path = truth_file
    _rewrite(path, PERMUTATIONS["reversed"])
    out = tmp_path / "seeds.parquet"
    argv = ["seeds", "--in", str(shards.folder), "--out", str(out), "--ground-truth", str(path)]
    assert main([*argv, "--per-class", "10", "-q"]) == 0  # 10 of the 14 clean samples of each class
    assert not set(pq.read_table(out).column("sample_id").to_pylist()) & set(range(12))


# --- split tables and the audit ---------------------------------------------------------------


def _answers(run) -> dict:
    """Everything the audit says about a run, for comparing two run folders."""
    return {
        "flags": history.flag_history(run).to_pylist(),
        "flagged": history.flagged_samples(run).to_pylist(),
        "flagged 1": history.flagged_samples(run, 1, label=2).to_pylist(),
        "sample 7": history.sample_history(run, 7),
        "classes": history.per_class(run),
    }


@pytest.fixture(scope="module")
def fake_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fake") / "run"
    _fake_run(folder, with_truth=True)
    (folder / INPUTS_FILE).write_text(
        json.dumps({"train": str(folder / "moved"), "test": "t"})
    )  # no thumbnails
    return folder, _answers(folder)


def _copy(fake_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(fake_run[0], run)
    return run


@pytest.mark.parametrize("name", PERMUTATIONS)
def test_split_tables_in_another_row_order_read_the_same(fake_run, tmp_path, name):
    run = _copy(fake_run, tmp_path)
    for epoch in range(3):
        _rewrite(split_path(run, epoch), PERMUTATIONS[name])
    assert _answers(run) == fake_run[1]


SPLIT_DEFECTS = {
    **DEFECTS,
    "label 2**31-1": lambda t: _label(t, 2**31 - 1),
    "label -1": lambda t: _label(t, -1),
    "pool missing": lambda t: t.drop_columns(["pool"]),
    "an unknown pool": lambda t: _set(t, "pool", ["kept"] + t.column("pool").to_pylist()[1:]),
    "a pool changed": lambda t: _set(t, "pool", ["clean"] * t.num_rows),
    "two stages": lambda t: _set(t, "stage", [9] + t.column("stage").to_pylist()[1:]),
    "ground truth on some rows": lambda t: _set(
        t, "is_poison", [None] + t.column("is_poison").to_pylist()[1:]
    ),
}


@pytest.mark.parametrize("epoch", [0, 2])
@pytest.mark.parametrize("name", SPLIT_DEFECTS)
def test_a_split_table_that_does_not_fit_is_one_data_error(fake_run, tmp_path, name, epoch):
    run = _copy(fake_run, tmp_path)
    path = split_path(run, epoch)
    _rewrite(path, SPLIT_DEFECTS[name])
    asks = [history.flag_history, history.flagged_samples, lambda r: history.sample_history(r, 7), report]
    for ask in asks + ([history.per_class] if epoch == 2 else []):  # per_class reads the last epoch
        with pytest.raises(DataError, match=str(path)):
            ask(run)
    assert not (run / "audit").exists()  # the failed report wrote nothing


def test_split_labels_are_bounded_by_the_cards_classes(fake_run, tmp_path):
    run = _copy(fake_run, tmp_path)
    _write_card(run, num_classes=3)
    _rewrite(split_path(run, 2), lambda t: _label(t, 3))  # a class the run does not have
    with pytest.raises(DataError, match=r"label 3, outside the run's classes 0..2"):
        history.per_class(run)


@pytest.mark.parametrize(
    "column, value, recorded",
    [("stage", 3, "stage 3, 3 clean and 57 polluted"), ("clean_pool", 4, "stage 1, 4 clean and 57 polluted")],
)
def test_a_split_table_must_match_its_epochs_metrics_row(fake_run, tmp_path, column, value, recorded):
    run = _copy(fake_run, tmp_path)

    def edit(t):
        values = t.column(column).to_numpy().copy()
        values[0] = value
        return _set(t, column, values)

    _rewrite(run / METRICS_FILE, edit)
    with pytest.raises(
        DataError, match=f"3 clean and 57 polluted samples, but {METRICS_FILE} records {recorded} in epoch 0"
    ):
        history.flag_history(run)


@pytest.mark.parametrize("name", PERMUTATIONS)
def test_metrics_in_another_row_order_read_the_same(fake_run, tmp_path, name):
    run = _copy(fake_run, tmp_path)
    before = history.read_metrics(run)
    _rewrite(run / METRICS_FILE, PERMUTATIONS[name])
    assert history.read_metrics(run).equals(before)
    assert read_metric_rows(run, 2) == before.to_pylist()  # what a resume starts from
    assert _answers(run) == fake_run[1]


# --- the run folder's card, inputs.json and audit folder -------------------------------------


def _write_card(run, *, num_classes: int = 3, identity: str = "0" * 64, **changes) -> None:
    figures = {"epoch": 2, "stage": 3, "acc": 0.7, "asr": 0.1, "robust_acc": 0.8}
    card = {
        "architecture": {"name": "small_cnn", "num_classes": num_classes, "in_channels": 1, "image_size": 8},
        "classes": [f"c{i}" for i in range(num_classes)],
        "input": {"height": 8, "width": 8, "channels": 1, "mean": [0.5], "std": [0.25]},
        "data": {"train": {"folder": "x", "identity_sha256": identity}},
        "last": figures,
        "best": figures,
        **changes,
    }
    (run / MODEL_DIR).mkdir(exist_ok=True)
    (run / MODEL_DIR / CARD_FILE).write_text(json.dumps({k: v for k, v in card.items() if v is not None}))


@pytest.mark.parametrize(
    "changes",
    [{"best": None}, {"best": {"stage": 3}}, {"classes": "abc"}, {"data": {}}, {"architecture": None}],
    ids=["no best", "best without epoch", "classes a string", "no training set", "no architecture"],
)
def test_a_card_without_what_the_audit_reads_is_one_data_error(fake_run, tmp_path, changes):
    run = _copy(fake_run, tmp_path)
    _write_card(run, **changes)
    for ask in (report, history.per_class):
        with pytest.raises(DataError, match=re.escape(f"{run / MODEL_DIR / CARD_FILE}: ")):
            ask(run)


@pytest.fixture(scope="module")
def two_sets(tmp_path_factory):
    """Two shard sets of the fake run's size, 60 samples each, other images in other shards."""
    root = tmp_path_factory.mktemp("sets")
    return [
        make_shards(root / name, n=N, size=8, channels=1, classes=3, per_shard=32, seed=seed, name=name)
        for seed, name in enumerate(("trained", "other"))
    ]


def _point(run, trained, folder) -> None:
    _write_card(run, identity=trained.identity())
    (run / INPUTS_FILE).write_text(json.dumps({"train": str(folder), "test": "t"}))


def test_report_and_manifest_refuse_another_shard_set_of_the_same_size(fake_run, two_sets, tmp_path, capsys):
    trained, other = two_sets
    run = _copy(fake_run, tmp_path)
    _point(run, trained, other.folder)
    with pytest.raises(DataError, match="is not the shard set the run trained on"):
        report(run)
    argv = ["audit", "manifest", str(run), "--threshold", "0.5", "--out", str(tmp_path / "m.csv")]
    assert main(argv) == 2 and "is not the shard set the run trained on" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()
    _point(run, trained, trained.folder)
    report(run)
    assert "most suspicious samples" in (run / "audit" / "report.html").read_text()


def test_split_tables_that_do_not_fit_the_training_set_are_refused(fake_run, tmp_path, capsys):
    run = _copy(fake_run, tmp_path)
    smaller = make_shards(tmp_path / "smaller", n=N - 5, size=8, channels=1, classes=3, per_shard=32)
    _point(run, smaller, smaller.folder)
    with pytest.raises(
        DataError, match=f"60 rows, 0 of them trusted seed copies, do not fit the {N - 5} samples"
    ):
        report(run)
    argv = ["audit", "manifest", str(run), "--threshold", "0.5", "--out", str(tmp_path / "m.csv")]
    assert main(argv) == 2 and "do not fit" in capsys.readouterr().err


@pytest.mark.parametrize("pool", ["clean", "polluted"])
def test_trusted_seed_copies_come_after_the_training_samples_as_clean_seeds(fake_run, tmp_path, pool):
    """A run whose seeds' trusted copies joined the training set: 57 shard samples, 3 copies."""
    run = _copy(fake_run, tmp_path)
    trained = make_shards(tmp_path / "set", n=N - 3, size=8, channels=1, classes=3, per_shard=32)
    _point(run, trained, trained.folder)

    def copies(t):
        last = np.arange(t.num_rows) >= N - 3
        t = _set(t, "pinned", np.where(last, "trusted", None))
        t = _set(t, "is_seed", t.column("is_seed").to_numpy() | last)
        return _set(t, "pool", np.where(last, pool, t.column("pool").to_numpy(zero_copy_only=False)))

    _rewrite(split_path(run, 2), copies)
    pools = split_summary(tables.read_parquet(split_path(run, 2), "splits"))

    def record(t):  # the metrics row of epoch 2 counts the pools as the run would
        for column in ("clean_pool", "polluted_pool"):
            t = _set(t, column, [*t[column][:2].to_pylist(), pools[column]])
        return t

    _rewrite(run / METRICS_FILE, record)
    if pool == "clean":
        report(run)
        assert "most suspicious samples" in (run / "audit" / "report.html").read_text()
    else:
        with pytest.raises(
            DataError, match=f"60 rows, 3 of them trusted seed copies, do not fit the {N - 3}"
        ):
            report(run)


def test_report_never_writes_through_a_linked_audit_folder(fake_run, tmp_path):
    run = _copy(fake_run, tmp_path)
    target = tmp_path / "elsewhere"
    target.mkdir()
    (run / "audit").symlink_to(target)
    with pytest.raises(DataError, match=f"{run / 'audit'} is a link or a file"):
        report(run)
    assert not list(target.iterdir())


def test_the_report_of_reordered_split_tables_is_the_same_page(fake_run, two_sets, tmp_path):
    run = _copy(fake_run, tmp_path)
    _point(run, two_sets[0], two_sets[0].folder)
    report(run)
    page = (run / "audit" / "report.html").read_text()
    assert "most suspicious samples" in page  # thumbnails, each titled with its sample's id and label
    for epoch in range(3):
        _rewrite(split_path(run, epoch), PERMUTATIONS["reversed"])
    report(run)
    assert (run / "audit" / "report.html").read_text() == page


def test_the_report_reads_only_the_records_it_shows(fake_run, two_sets, tmp_path, monkeypatch, shard_reads):
    """At 14 M samples, walking the training shards for 48 thumbnails read the dataset."""
    from asd_ray.audit import report as report_module
    from asd_ray.data import slices

    run = _copy(fake_run, tmp_path)
    _point(run, two_sets[0], two_sets[0].folder)
    monkeypatch.setattr(report_module, "THUMBNAILS", 2)
    monkeypatch.setattr(slices, "_READ_THROUGH", 0)  # one range per record: each one counted
    shard_reads.reset()
    report(run)
    page = (run / "audit" / "report.html").read_text()
    assert "The 2 most suspicious samples" in page and "The 2 hardest samples kept clean" in page
    assert len([r for r in shard_reads.ranges if r[0].endswith(".tar")]) == 4  # a range per thumbnail
    manifest = pq.read_table(two_sets[0].folder / "manifest.parquet")
    offsets, shard = manifest.column("offset").to_numpy(), manifest.column("shard").to_pylist()
    sizes = {p.name: p.local.stat().st_size for p in two_sets[0].paths}
    ends = [
        offsets[i + 1] if i + 1 < len(offsets) and shard[i + 1] == shard[i] else sizes[shard[i]]
        for i in range(len(offsets))
    ]
    largest = int(max(np.array(ends) - offsets))
    assert shard_reads.bytes <= 4 * largest


def test_most_suspicious_is_a_stable_sort_without_sorting_everything():
    from asd_ray.audit.report import _most_suspicious

    rng = np.random.default_rng(5)
    for _ in range(50):
        n = int(rng.integers(1, 300))
        score = rng.integers(0, 6, n) / 5  # many ties
        among = rng.random(n) < 0.6
        k = int(rng.integers(1, 40))
        order = np.argsort(-score, kind="stable")
        expected = order[among[order]][:k]
        assert _most_suspicious(score, among, k).tolist() == expected.tolist()


@pytest.mark.parametrize(
    "name, content, where",
    [
        (f"{MODEL_DIR}/{CARD_FILE}", "{oops", f"{MODEL_DIR}/{CARD_FILE}: not valid JSON"),
        (f"{MODEL_DIR}/{CARD_FILE}", "[]", f"{MODEL_DIR}/{CARD_FILE}: the model card is a list"),
        (INPUTS_FILE, "[1, 2]", f"{INPUTS_FILE}: not a run's inputs"),
        (INPUTS_FILE, '{"train": 7}', f"{INPUTS_FILE}: not a run's inputs"),
        ("audit", "a file", "audit is a link or a file"),
    ],
)
def test_damaged_run_folder_files_are_one_data_error_in_report(fake_run, tmp_path, name, content, where):
    run = _copy(fake_run, tmp_path)
    _point(run, make_shards(tmp_path / "set", n=N, size=8, channels=1, classes=3), tmp_path / "set")
    (run / name).write_text(content)
    with pytest.raises(DataError, match=f"{run}/{where}"):
        report(run)


def test_a_config_that_is_not_text_is_shown_escaped(fake_run, tmp_path):
    run = _copy(fake_run, tmp_path)
    (run / "config.yaml").write_bytes(b"\xff\xfe<script>")
    report(run)
    assert "\ufffd\ufffd&lt;script&gt;" in (run / "audit" / "report.html").read_text()


def test_a_split_table_without_its_metrics_row_is_one_data_error(fake_run, tmp_path):
    run = _copy(fake_run, tmp_path)
    _rewrite(run / METRICS_FILE, lambda t: t.slice(0, 2))
    with pytest.raises(DataError, match=f"{run / METRICS_FILE}: no row for epoch 2"):
        history.flag_history(run, epochs=[0, 1, 2])
    flags = history.flag_history(run)  # the complete epochs: 0 and 1, for every sample
    assert flags.num_rows == N and set(flags.column("epochs_seen").to_pylist()) == {2}
    assert set(flags.column("last_epoch").to_pylist()) == {1}


# --- run-folder records that are not regular files, or too deep; outputs that are not files ---


def _fifo(path) -> None:
    os.mkfifo(path)


def _link_to_zero(path) -> None:
    os.symlink("/dev/zero", path)


def _deep(path) -> None:
    path.write_text("[" * 100_000 + "]" * 100_000)


CARD = f"{MODEL_DIR}/{CARD_FILE}"
COMMANDS = {
    "summary": lambda run, tmp: ["audit", "summary", str(run)],
    "manifest": lambda run, tmp: [
        "audit",
        "manifest",
        str(run),
        "--threshold",
        "0.5",
        "--out",
        str(tmp / "m.csv"),
    ],
    "report": lambda run, tmp: ["report", str(run)],
}
READERS = {  # the commands that read each record of a run folder
    CARD: ("summary", "manifest", "report"),
    INPUTS_FILE: ("manifest", "report"),
    "config.yaml": ("report",),  # shown as text: its nesting is not parsed here
}


@pytest.mark.parametrize(
    ("name", "make", "message"),
    [
        (CARD, _fifo, "not a regular file (a FIFO)"),
        (CARD, _link_to_zero, "a symbolic link"),
        (CARD, _deep, "nested deeper than 32 levels"),
        (INPUTS_FILE, _fifo, "not a regular file (a FIFO)"),
        (INPUTS_FILE, _link_to_zero, "a symbolic link"),
        (INPUTS_FILE, _deep, "nested deeper than 32 levels"),
        ("config.yaml", _fifo, "not a regular file (a FIFO)"),
        ("config.yaml", _link_to_zero, "a symbolic link"),
    ],
    ids=lambda v: getattr(v, "__name__", v),
)
def test_run_folder_records_are_regular_files_under_limits(
    fake_run, two_sets, tmp_path, capsys, name, make, message
):
    """A FIFO hung audit summary, manifest and report; a link to /dev/zero read until memory ran
    out; deep nesting was a RecursionError traceback."""
    run = _copy(fake_run, tmp_path)
    _point(run, two_sets[0], two_sets[0].folder)
    (run / "config.yaml").write_text("epochs: 3\n")
    (run / name).unlink()
    make(run / name)
    for command in READERS[name]:
        with time_limit(30):
            code = main(COMMANDS[command](run, tmp_path))
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"asd-ray: error: {run / name}: {message}; "), (command, err)
        assert len(err.splitlines()) == 1
    assert not (run / "audit").exists() and not (tmp_path / "m.csv").exists()


def test_report_never_copies_a_linked_config_into_the_page(fake_run, tmp_path, capsys):
    """report followed a config.yaml link and copied its target (a private key) into report.html."""
    run = _copy(fake_run, tmp_path)
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY----- not for mail")
    (run / "config.yaml").symlink_to(secret)
    code = main(["report", str(run), "-q"])
    assert code == 2 and f"{run / 'config.yaml'}: a symbolic link" in capsys.readouterr().err
    written = [
        p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p != secret
    ]
    assert not any(b"PRIVATE KEY" in data for data in written)
    (run / "config.yaml").unlink()
    (run / "config.yaml").write_text("epochs: 3\n")
    assert main(["report", str(run), "-q"]) == 0
    assert "epochs: 3" in (run / "audit" / "report.html").read_text()  # the run's own config is shown


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_fifo, "is a FIFO; name a file to write"),
        (lambda p: os.symlink(p.parent / "elsewhere", p), "is a symbolic link; name a file to write"),
        (null_device, "is a character device; name a file to write"),
        (lambda p: p.write_text("mine"), "already exists; choose another --out or pass --overwrite"),
    ],
    ids=["fifo", "link", "device", "file"],
)
@pytest.mark.parametrize(
    "command",
    [
        ["audit", "export", "--format", "csv"],
        ["audit", "export"],
        ["audit", "manifest", "--threshold", "0.5"],
    ],
    ids=["export csv", "export parquet", "manifest"],
)
def test_audit_outputs_replace_only_regular_files(
    fake_run, two_sets, tmp_path, capsys, command, make, message
):
    """export and manifest replaced a FIFO, a link or a device node with a regular file."""
    run = _copy(fake_run, tmp_path)
    _point(run, two_sets[0], two_sets[0].folder)
    out = tmp_path / "out"
    make(out)
    before = os.lstat(out)
    with time_limit(30):
        code = main([*command[:2], str(run), *command[2:], "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"asd-ray: error: {out} {message}") and len(err.splitlines()) == 1
    after = os.lstat(out)
    assert (after.st_mode, after.st_ino, after.st_size) == (before.st_mode, before.st_ino, before.st_size)
    assert not (tmp_path / "elsewhere").exists()
    if stat.S_ISREG(before.st_mode):  # a file is replaced with --overwrite
        assert main([*command[:2], str(run), *command[2:], "--out", str(out), "--overwrite", "-q"]) == 0
        assert out.stat().st_size > 0 and out.read_bytes() != b"mine"
