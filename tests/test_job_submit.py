"""`ray job submit` of a job against a head started with `ray start --head`, as users do."""

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a whole cluster per test: run with -m slow
REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if temp_dir.encode() in (proc / "cmdline").read_bytes():
                    os.kill(int(proc.name), sig)
            except (OSError, ProcessLookupError):
                pass
        time.sleep(2)


@pytest.fixture
def ray_head(own_ray):
    temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}
    subprocess.run(
        [
            "ray",
            "start",
            "--head",
            "--port",
            str(_free_port()),
            "--dashboard-host",
            "127.0.0.1",
            "--dashboard-port",
            "8265",
            "--num-cpus",
            "4",
            "--object-store-memory",
            str(200 * 1024**2),
            "--temp-dir",
            temp_dir,
            "--disable-usage-stats",
        ],
        check=True,
        capture_output=True,
        env=env,
        timeout=120,
    )
    try:
        yield env
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_a_job(ray_head, poisoned_data, tmp_path):
    out = tmp_path / "run"  # absolute: the job runs in an unpacked copy of the working dir
    sets = [
        "model.name=small_cnn",
        "data.mean=[0.5]",
        "data.std=[0.25]",
        "epochs=2",
        "split.stage2_epoch=1",
        "split.stage3_epoch=2",
        "mixmatch.iterations=2",
    ]
    command = [
        "ray",
        "job",
        "submit",
        "--address",
        "http://127.0.0.1:8265",
        "--working-dir",
        str(REPO),
        "--",
        "python",
        "jobs/gtsrb_asd.py",
        "--train",
        poisoned_data.train,
        "--test",
        poisoned_data.test,
        "--poison-test",
        poisoned_data.poison_test,
        "--seeds",
        poisoned_data.seeds,
        "--out",
        str(out),
        *[arg for s in sets for arg in ("--set", s)],
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=ray_head, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = next(json.loads(line) for line in reversed(result.stdout.splitlines()) if line.startswith("{"))
    assert summary["epochs"] == 2 and summary["defense"] == "asd" and summary["run_dir"] == str(out)
    assert (out / "metrics.parquet").is_file() and (out / "splits" / "epoch=001").is_dir()
