import contextlib
import dataclasses
import os
import subprocess

import numpy as np
import pyarrow as pa
import pytest

from asd_ray import tables
from asd_ray.audit import history
from asd_ray.audit.report import report
from asd_ray.cli import main
from asd_ray.config import SplitConfig
from asd_ray.errors import ConfigError, DataError
from asd_ray.run_folder import METRICS_FILE, EpochTimes, metrics_row, split_path
from asd_ray.split import make_split, split_summary, suspicion


def _fake_run(folder, *, with_truth: bool):
    """Three epochs of real split tables over random scores, plus metrics rows."""
    rng = np.random.default_rng(0)
    n, classes = 60, 3
    labels = np.arange(n) % classes
    is_poison = np.zeros(n, bool)
    is_poison[:6] = True
    truth = tables.from_pydict(
        {
            "sample_id": np.arange(n),
            "is_poison": is_poison,
            "is_modified": is_poison,
            "original_label": labels,
            "label_after": labels,
            "attack": ["badnets"] * n,
            "params": ["{}"] * n,
        },
        "poison",
    )
    config = SplitConfig(stage2_epoch=1, stage3_epoch=2)
    rows = []
    for epoch in range(3):
        loss = rng.random(n).astype(np.float32)
        loss[is_poison] += 5  # poison is hard to fit: always flagged
        scores = pa.table(
            {
                "sample_id": pa.array(np.arange(n)),
                "label": pa.array(labels, pa.int32()),
                "loss": pa.array(loss),
            }
        )
        reduction = (rng.random(n) + 5 * is_poison).astype(np.float32)  # the virtual model learns poison fast
        meta = scores.set_column(2, "loss", pa.array(loss - reduction)) if epoch == 2 else None
        split = make_split(
            epoch,
            scores,
            config=config,
            num_classes=classes,
            seed_ids=np.array([10, 11, 12]),
            meta_scores=meta,
            ground_truth=truth if with_truth else None,
        )
        tables.write_parquet(split, split_path(folder, epoch), "splits")
        pools = split_summary(split)  # the audit checks each split table against its metrics row
        figures = {"epoch": epoch, "defense": "asd", "acc": 0.5 + 0.1 * epoch, "asr": 0.1, "robust_acc": 0.8}
        times = EpochTimes(
            score_s=0.1, virtual_s=0.0, split_s=0.0, train_s=1.0, eval_s=0.1, epoch_s=1.2, fixed_s=0.01
        )
        rows.append(metrics_row(figures, pools, {"train_loss": 1.0}, dataclasses.asdict(times)))
    metrics = tables.from_pydict({k: [r[k] for r in rows] for k in tables.schema("metrics").names}, "metrics")
    tables.write_parquet(metrics, folder / METRICS_FILE, "metrics")


def test_suspicion_is_the_place_in_the_splitting_order(tmp_path):
    _fake_run(tmp_path, with_truth=True)
    for epoch in range(3):
        split = tables.read_parquet(split_path(tmp_path, epoch), "splits")
        score = suspicion(split)
        polluted = np.array(split.column("pool").to_pylist()) == "polluted"
        labels = split.column("label").to_numpy()
        if epoch == 0:  # stage 1 forces the seeds in, unranked; each class's other 19 ranked apart
            assert (score[split.column("is_seed").to_numpy()] == 0).all()
            for c in range(3):
                np.testing.assert_allclose(np.sort(score[labels == c]), [0, *(np.arange(19) / 18)])
        else:  # stages 2 and 3 rank all 60 samples together: 0, 1/59, ..., 1, each once
            np.testing.assert_allclose(np.sort(score), np.arange(60) / 59)
        # every flagged sample is more suspicious than every kept one of its ranking group
        groups = labels if epoch == 0 else np.zeros(split.num_rows, int)
        kept = ~polluted & (split.column("rank").to_numpy() >= 0)
        for g in np.unique(groups):
            mine = groups == g
            if (mine & polluted).any() and (mine & kept).any():
                assert score[mine & polluted].min() > score[mine & kept].max()


def test_flag_history_flagged_and_sample(tmp_path):
    _fake_run(tmp_path, with_truth=True)
    flags = history.flag_history(tmp_path).to_pydict()
    assert all(flags["epochs_polluted"][i] >= 2 for i in range(6))  # stage 2 and 3 flagged the poison
    assert all(flags["flagged_streak"][i] >= 2 for i in range(6))
    assert set(flags["epochs_seen"]) == {3} and set(flags["last_epoch"]) == {2}
    top = history.flagged_samples(tmp_path, "last", top=6).to_pylist()
    assert {row["sample_id"] for row in top} == set(range(6))  # the poison is the most suspicious
    assert [row["suspicion"] for row in top] == sorted((row["suspicion"] for row in top), reverse=True)
    only = history.flagged_samples(tmp_path, 1, label=2).to_pylist()
    assert only and {row["label"] for row in only} == {2} and {row["epoch"] for row in only} == {1}
    sample = history.sample_history(tmp_path, 0)
    assert [row["epoch"] for row in sample] == [0, 1, 2] and sample[-1]["pool"] == "polluted"
    with pytest.raises(DataError, match="complete epochs are 0..2"):
        history.flagged_samples(tmp_path, 7)


def test_an_epoch_counts_only_once_its_metrics_row_is_written(tmp_path):
    _fake_run(tmp_path, with_truth=False)
    metrics = tables.read_parquet(tmp_path / METRICS_FILE, "metrics")
    tables.write_parquet(metrics.slice(0, 2), tmp_path / METRICS_FILE, "metrics")  # epoch 2 still running
    assert history.complete_epochs(tmp_path) == [0, 1]
    assert set(history.flag_history(tmp_path).column("last_epoch").to_pylist()) == {1}


def test_report_is_one_html_file_with_images_and_flags(tmp_path):
    _fake_run(tmp_path, with_truth=True)
    summary = report(tmp_path)
    page = (tmp_path / "audit" / "report.html").read_text()
    assert summary["report"].endswith("report.html")
    assert page.count("data:image/png;base64,") >= 2  # curves and histograms (no shards: no thumbnails)
    assert "Losses per stage" in page and "no thumbnails" in page
    assert tables.read_parquet(tmp_path / "audit" / "flags.parquet", "flags").num_rows == 60
    with pytest.raises(DataError, match="no such run folder"):
        report(tmp_path / "missing")


@pytest.mark.parametrize("label", [3, -1, 10**30])
def test_flagged_refuses_a_class_outside_the_run(tmp_path, capsys, label):
    """It printed an empty table and exited 0."""
    from asd_ray.cli import main

    _fake_run(tmp_path, with_truth=False)
    code = main(["audit", "flagged", str(tmp_path), "--class", str(label)])
    out, err = capsys.readouterr()
    assert code == 2 and not out, out
    assert err.splitlines() == [
        f"asd-ray: error: --class {label}: the run's classes are 0..2; choose one of them"
    ]


@contextlib.contextmanager
def _read_only(folder):
    """``folder`` as a user without write access sees it: a read-only bind mount for root
    (whom permission bits do not stop), the permission bits for anyone else."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in (folder, *folder.rglob("*"))}
        for p in modes:
            p.chmod(modes[p] & ~0o222)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    try:
        subprocess.run(["mount", "--bind", folder, folder], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as err:
        pytest.skip(f"a read-only bind mount is not permitted here ({err})")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", folder], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["umount", folder], check=True)


def test_a_read_only_run_is_audited_and_reported_elsewhere(tmp_path, capsys):
    """A run the user may not write (a read-only share): report failed with an OSError traceback."""
    run = tmp_path / "run"
    _fake_run(run, with_truth=True)
    files = sorted(p.relative_to(run) for p in run.rglob("*"))
    with _read_only(run):
        with pytest.raises(OSError):  # the folder really is read-only
            (run / "probe").touch()
        for argv in (
            ["audit", "summary", str(run)],
            ["audit", "flagged", str(run)],
            ["audit", "sample", str(run), "3"],
        ):
            assert main(argv) == 0, argv
        export = ["audit", "export", str(run), "--out", str(tmp_path / "flags.parquet"), "-q"]
        assert main(export) == 0
        capsys.readouterr()
        assert main(["report", str(run), "-q"]) == 2
        assert capsys.readouterr().err == (
            f"asd-ray: error: cannot write the report in {run / 'audit'} (no write access to {run}); "
            "pass --out FOLDER to write it elsewhere\n"
        )
        assert main(["report", str(run), "--out", str(tmp_path / "report"), "-q"]) == 0
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == files
    assert tables.read_parquet(tmp_path / "report" / "flags.parquet", "flags").num_rows == 60
    assert "Losses per stage" in (tmp_path / "report" / "report.html").read_text()


def test_report_out_must_be_a_folder_it_can_write(tmp_path):
    run = tmp_path / "run"
    _fake_run(run, with_truth=False)
    (tmp_path / "a-file").write_text("mine")
    with pytest.raises(ConfigError, match=r"a-file is a file\); choose another --out$"):
        report(run, tmp_path / "a-file" / "report")
    assert (tmp_path / "a-file").read_text() == "mine" and not (run / "audit").exists()
