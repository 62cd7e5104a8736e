"""What a user takes home from a run, end to end on a tiny run: the model files and card,
``load_model`` and ``evaluate``, the audit commands, the HTML report (rendered in
headless Chromium), the metrics a field reader expects, and stdout carrying JSON only.
"""

import csv
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_RUN, auroc_by_pairs, figures_of
from PIL import Image

import asd_ray
from asd_ray import tables
from asd_ray.cli import main
from asd_ray.data.shards import ShardSet
from asd_ray.models import ModelSpec
from asd_ray.run_folder import METRICS_FILE, split_path
from asd_ray.split import suspicion

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def finished_run(ray_cluster, poisoned_data, tmp_path_factory):
    """A tiny ASD run through the Python API (with the epoch callback and TensorBoard)."""
    out = tmp_path_factory.mktemp("outputs") / "run"
    rows = []
    config = asd_ray.load_config("mnist-quick", overrides=TINY_RUN)
    summary = asd_ray.run(
        config, poisoned_data, out, progress=lambda _: None, on_epoch=rows.append, tensorboard=True
    )
    return out, summary, rows


def _cli(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_run_hands_over_a_model_a_card_a_log_and_full_metrics(finished_run, poisoned_data):
    out, summary, rows = finished_run
    assert [r["epoch"] for r in rows] == [0, 1, 2]  # on_epoch saw every epoch
    metrics = tables.read_parquet(out / METRICS_FILE, "metrics").to_pylist()
    for row in metrics:  # how well each epoch's polluted pool finds the poison, counted here
        split = tables.read_parquet(split_path(out, row["epoch"]), "splits")
        flagged = np.array(split.column("pool").to_pylist()) == "polluted"
        poisoned = split.column("is_poison").to_numpy(zero_copy_only=False)
        precision = (flagged & poisoned).sum() / flagged.sum()
        recall = (flagged & poisoned).sum() / poisoned.sum()
        assert (row["flag_precision"], row["flag_recall"]) == pytest.approx((precision, recall), abs=1e-12)
        assert row["flag_f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-12)
        assert row["flag_auroc"] == pytest.approx(auroc_by_pairs(suspicion(split), poisoned), abs=1e-12)
    # each epoch's ACC, ASR and robust accuracy are its model's, for the epochs whose model is
    # kept: the last two checkpoints (epochs 1 and 2)
    kept = {}
    for checkpoint in (c for c in (out / "train").glob("checkpoint_*") if c.is_dir()):
        state = torch.load(checkpoint / "state.pt", weights_only=True)
        model = ModelSpec("small_cnn", 4, 1, 16).build()
        model.load_state_dict(state["model"])
        kept[state["epoch"]] = figures_of(model, poisoned_data)
    assert sorted(kept) == [1, 2]
    for epoch, figures in kept.items():
        assert {k: metrics[epoch][k] for k in figures} == pytest.approx(figures, abs=1e-12), epoch
    assert summary["robust_acc"] == metrics[-1]["robust_acc"]
    assert summary["asr_worst"] == max(r["asr"] for r in metrics)
    card = json.loads((out / "model" / "card.json").read_text())
    assert card["last"]["epoch"] == 2 and card["best"]["epoch"] == summary["best_epoch"]
    assert card["architecture"]["name"] == "small_cnn" and card["classes"] == ["c0", "c1", "c2", "c3"]
    assert card["input"]["mean"] == [0.1307] and "test set" in card["selection"]
    assert card["data"]["train"]["identity_sha256"] == ShardSet(poisoned_data.train).identity()
    state = torch.load(out / "model" / "last.pt", weights_only=True)
    assert state["card"]["epoch"] == 2 and "head.weight" in state["state_dict"]
    log = (out / "run.log").read_text().splitlines()
    assert sum(bool(re.match(r"\S+ epoch +\d+/3 ", line)) for line in log) == 3
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))


def test_load_model_and_evaluate_reproduce_the_runs_figures(finished_run, poisoned_data, capsys):
    out, summary, _ = finished_run
    metrics = {r["epoch"]: r for r in tables.read_parquet(out / METRICS_FILE, "metrics").to_pylist()}
    test, poison_test = ShardSet(poisoned_data.test), ShardSet(poisoned_data.poison_test)
    for kind, epoch in (("last", 2), ("best", summary["best_epoch"])):
        model = asd_ray.load_model(out, kind)
        assert not model.training and model.card["epoch"] == epoch
        figures = asd_ray.evaluate_model(model, test, poison_test)
        for key in ("acc", "asr", "robust_acc"):
            assert figures[key] == pytest.approx(metrics[epoch][key], abs=1e-9), (kind, key)
    code, stdout, _ = _cli(
        [
            "evaluate",
            "--model",
            str(out / "model" / "last.pt"),
            "--test",
            poisoned_data.test,
            "--poison-test",
            poisoned_data.poison_test,
            "--quiet",
        ],
        capsys,
    )
    result = json.loads(stdout)
    assert code == 0 and len(stdout.splitlines()) == 1
    assert result["acc"] == pytest.approx(summary["acc"]) and result["asr"] == pytest.approx(summary["asr"])


def test_audit_commands_read_the_run(finished_run, poisoned_data, tmp_path, capsys):
    out, _, _ = finished_run
    code, stdout, _ = _cli(["audit", "summary", str(out)], capsys)
    assert code == 0 and "flag_auroc" in stdout and "per class" in stdout
    code, stdout, _ = _cli(["audit", "summary", str(out), "--json"], capsys)
    assert [e["epoch"] for e in json.loads(stdout)["epochs"]] == [0, 1, 2]
    code, stdout, _ = _cli(["audit", "flagged", str(out), "--top", "5", "--json"], capsys)
    flagged = json.loads(stdout)["samples"]
    assert len(flagged) == 5 and flagged[0]["suspicion"] >= flagged[-1]["suspicion"]
    code, stdout, _ = _cli(["audit", "flagged", str(out), "--epoch", "1", "--class", "2"], capsys)
    assert code == 0 and "epoch 1" in stdout
    code, stdout, _ = _cli(["audit", "sample", str(out), str(flagged[0]["sample_id"]), "--json"], capsys)
    assert [e["epoch"] for e in json.loads(stdout)["epochs"]] == [0, 1, 2]
    for fmt in ("parquet", "csv"):
        target = tmp_path / f"flags.{fmt}"
        code, stdout, _ = _cli(
            ["audit", "export", str(out), "--format", fmt, "--out", str(target), "-q"], capsys
        )
        assert code == 0 and json.loads(stdout)["rows"] == 240 and target.stat().st_size > 0
    target = tmp_path / "review.csv"
    code, stdout, _ = _cli(
        ["audit", "manifest", str(out), "--threshold", "0.9", "--out", str(target), "-q"], capsys
    )
    with open(target) as f:
        listed = list(csv.DictReader(f))
    train = ShardSet(poisoned_data.train)
    keys = train.manifest_rows(np.arange(len(train)), ["key"]).column("key").to_pylist()
    assert listed and len(listed) == json.loads(stdout)["samples"]
    assert all(keys[int(row["sample_id"])] == row["key"] and float(row["suspicion"]) >= 0.9 for row in listed)


def test_config_show_prints_yaml_that_loads_back(capsys):
    code, stdout, _ = _cli(["config", "show", "--preset", "mnist-quick", "--set", "epochs=30"], capsys)
    loaded = yaml.safe_load(stdout)
    assert code == 0 and loaded["epochs"] == 30 and loaded["preset"] == "mnist-quick"


@pytest.fixture(scope="module")
def chromium():
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.skip("no chromium: the README's test command installs Debian's chromium package")
    return path


def _screenshot(chromium: str, page, png) -> np.ndarray:
    subprocess.run(
        [
            chromium,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--window-size=1200,7000",
            f"--screenshot={png}",
            page.as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    with Image.open(png) as image:
        return np.asarray(image.convert("RGB")).astype(int)


def _pixels(shot: np.ndarray, colour: str, tolerance: int = 12) -> int:
    rgb = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    return int((np.abs(shot - rgb).max(-1) <= tolerance).sum())


def test_the_report_renders_plots_and_thumbnails_in_a_browser(finished_run, chromium, tmp_path, capsys):
    from asd_ray.audit.report import FLAGGED_FRAME, KEPT_FRAME

    out, _, _ = finished_run
    code, stdout, _ = _cli(["report", str(out), "-q"], capsys)
    page = out / "audit" / "report.html"
    assert code == 0 and json.loads(stdout)["report"] == str(page)
    shot = _screenshot(chromium, page, tmp_path / "report.png")
    acc_line = _pixels(shot, "#1f77b4")
    assert acc_line > 500, "the metrics plot did not render"
    assert _pixels(shot, FLAGGED_FRAME) > 2000 and _pixels(shot, KEPT_FRAME) > 2000, "no thumbnails"
    # The same page without its images shows none of those colours: the check can fail.
    stripped = tmp_path / "stripped.html"
    stripped.write_text(page.read_text().replace("data:image/png;base64,", "data:,"))
    bare = _screenshot(chromium, stripped, tmp_path / "bare.png")
    assert _pixels(bare, "#1f77b4") < 50 and _pixels(bare, FLAGGED_FRAME) == 0
