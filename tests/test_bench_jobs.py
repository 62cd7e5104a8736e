"""The benchmark jobs run (reduced) in the suite, so they cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_smoke_runs_on_cpu_and_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "bench_gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["job"] == "bench_gpu" and result["smoke"] is True
    for size in ("32px", "224px"):
        figures = result[size]
        assert figures["train_img_s"] > 0 and figures["score_img_s"] > 0 and figures["virtual_step_s"] > 0
        assert 0 < figures["data_wait_share"] < 1
        assert figures["projection_s"] > 0
        assert figures["ops_per_step"] > 100 and figures["optimizer_ops"] > 0  # ResNet-18 and Adam
    assert "| 32px |" in done.stderr and "| 224px |" in done.stderr


def test_bench_driver_runs_small_and_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "bench_driver.py"), "--samples", "20000", "--classes", "10"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(result["split_s"]) == {"stage1", "stage2", "stage3"} and result["flag_rows"] == 20000
    assert result["peak_memory_gb"] > 0 and result["audit_s"] > 0


@pytest.mark.slow  # two Ray Train runs (about a minute): run with -m slow
def test_bench_defense_smoke_writes_its_tables(tmp_path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "jobs" / "bench_defense.py"),
            "--smoke",
            "--attacks",
            "badnets",
            "--defenses",
            "none",
            "asd",
            "--seeds",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["job"] == "bench_defense" and result["cells"] == 2
    rows = {row["defense"]: row for row in result["rows"]}
    assert rows["asd"]["seeds_tampered"] >= 0 and 0 <= rows["asd"]["acc"] <= 1
    assert rows["none"]["asr_last"] > 0.5  # the smoke schedule already learns the backdoor without ASD
    table = (tmp_path / "results.md").read_text()
    assert "| badnets | none | 1 |" in table and "| badnets | asd | 1 |" in table
    assert (tmp_path / "results.parquet").stat().st_size > 0
