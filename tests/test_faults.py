"""Faults on a tiny run: a process killed mid-run, a torn checkpoint index, a full disk.

Each disturbed run must end with exactly the tables and metrics of an undisturbed
run of the same config: same split table every epoch, one metrics row per epoch.
"""

import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from conftest import FAULT_RUN, FINAL_RECORD, METRIC_KEYS, assert_processes_end, fault_config, run_outcome

from asd_ray import tables
from asd_ray.driver import run
from asd_ray.errors import StorageError
from asd_ray.model_card import CARD_FILE, MODEL_DIR
from asd_ray.models.saved import read_model_file
from asd_ray.reaper import _processes, ray_descendants
from asd_ray.resume import model_holds
from asd_ray.run_folder import METRICS_FILE, METRICS_JSONL, MODEL_FIGURES, RUN_LOG, TRAIN_DIR, split_path

pytestmark = pytest.mark.ray


def _assert_same_outcome(out: Path, reference: tuple[list, list]) -> None:
    splits, rows = run_outcome(out)
    assert [row["epoch"] for row in rows] == [0, 1, 2]  # none missing, none twice
    assert rows == reference[1]
    for epoch, (got, want) in enumerate(zip(splits, reference[0])):
        assert got.equals(want), f"epoch {epoch}: the split table differs from the undisturbed run's"


class _Background:
    """``run`` in a thread, so the test can disturb it meanwhile."""

    def __init__(self, *args, **kwargs):
        self.lines, self.error, self.summary = [], None, None
        self.thread = threading.Thread(target=self._target, args=args, kwargs=kwargs, daemon=True)
        self.thread.start()

    def _target(self, *args, **kwargs):
        try:
            self.summary = run(*args, progress=self.lines.append, **kwargs)
        except BaseException as err:  # re-raised in the test by join()
            self.error = err

    def wait_for(self, path: Path, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if not self.thread.is_alive():
                self.join()
                raise AssertionError(f"the run ended before {path} appeared")
            assert time.monotonic() < deadline, f"{path} did not appear in {timeout} s"
            time.sleep(0.02)

    def join(self) -> dict:
        self.thread.join(timeout=300)
        assert not self.thread.is_alive(), "the run did not finish"
        if self.error is not None:
            raise self.error
        return self.summary


def _alive_pids(class_name: str) -> list[int]:
    from ray.util.state import list_actors

    filters = [("class_name", "=", class_name), ("state", "=", "ALIVE")]
    actors = list_actors(address=_this_ray(), filters=filters, detail=True)
    return [actor.pid for actor in actors]


def _score_tasks() -> list:
    from ray.util.state import list_tasks

    filters = [("name", "=", "ScoringActor.score")]
    return list_tasks(address=_this_ray(), filters=filters, detail=True, limit=10_000)


def _this_ray() -> str:
    """The test's Ray by address: the state API would refuse to guess among several local
    clusters (e.g. a benchmark running beside the suite)."""
    import ray

    return ray.get_runtime_context().gcs_address


def test_killed_scoring_actors_and_training_workers_are_replaced_and_change_nothing(
    ray_cluster, poisoned_data, tmp_path, reference
):
    """One run, two faults: a scoring actor killed mid-pass (its call is retried on a
    restarted actor), then a training worker killed mid-epoch (a new worker group resumes
    from the checkpoint); the run ends with the undisturbed run's tables."""
    out = tmp_path / "run"
    background = _Background(fault_config(), poisoned_data, out)
    background.wait_for(split_path(out, 0))  # the scorers are up and idle while epoch 0 trains
    pids = _alive_pids("ScoringActor")
    assert len(pids) == 2
    finished = {task.task_id for task in _score_tasks() if task.state == "FINISHED"}
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)  # frozen: the next pass cannot finish
    try:
        deadline = time.monotonic() + 120
        while not [t for t in _score_tasks() if t.task_id not in finished and t.state != "FINISHED"]:
            assert time.monotonic() < deadline, "the next scoring pass was never sent"
            time.sleep(0.2)
        os.kill(pids[0], signal.SIGKILL)  # mid-pass: its call was sent and is not answered
    finally:
        for pid in pids[1:]:
            os.kill(pid, signal.SIGCONT)
    background.wait_for(split_path(out, 1))  # epoch 1's pools are written: its training starts
    workers = _alive_pids("RayTrainWorker")
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGKILL)
    background.join()
    retried = [t for t in _score_tasks() if t.task_id not in finished and t.attempt_number > 0]
    assert retried, "the killed actor's call was not retried"
    assert not set(workers) & set(_alive_pids("RayTrainWorker"))  # a new worker group finished it
    _assert_same_outcome(out, reference)
    log = (out / RUN_LOG).read_text(encoding="utf-8")
    assert re.search(
        r"placement on 1 node\(s\): \S+ \(node \w+\): worker 0, worker 1, scorer 0, scorer 1", log
    )
    # the actor killed is the state API's first, which may be either of the pool's two
    assert re.search(
        r"scoring actor [01] was lost during evaluation and restarted on .*the pass took", log
    ), log
    restart = re.search(
        r"training workers failed during epoch 1 training \(worker\(s\) [01](?:, [01])?: .+\); Ray Train restarted "
        r"them \(restart 1 of cluster.max_failures 1\): worker 0 on .*; recovered in (\d+\.\d)s .*"
        r"resumed from checkpoint_\S+ \(epoch 0\)",
        log,
    )
    assert restart and 0 < float(restart.group(1)) < 120, log


_DRIVER = """
import json, sys
from asd_ray.config import load_config
from asd_ray.driver import run
from asd_ray.resume import model_holds
from asd_ray.inputs import RunInputs
inputs, overrides, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
run(load_config("mnist-quick", overrides=overrides), RunInputs(**inputs), out)
"""


@pytest.mark.slow  # the default suite stops a driver mid-epoch with SIGTERM (test_interrupts.py)
def test_a_killed_driver_leaves_no_ray_behind_and_resumes_to_the_same_tables(
    ray_cluster, poisoned_data, tmp_path, reference
):
    """The driver starts its own local Ray (as `asd-ray run` does), is SIGKILLed while
    epoch 1 trains, and `--resume` (here on the test's Ray) finishes the run."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [json.dumps(dataclasses.asdict(poisoned_data)), json.dumps(FAULT_RUN), str(out)]
    driver = subprocess.Popen([sys.executable, "-c", _DRIVER, *args], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not split_path(out, 1).exists():
            assert driver.poll() is None, "the driver ended early"
            assert time.monotonic() < deadline, "epoch 1 never started"
            time.sleep(0.02)
        started = ray_descendants(driver.pid, _processes())
        assert started, "the driver started no Ray processes of its own"
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=10)
    finally:
        driver.kill()
    assert_processes_end(started)
    assert not split_path(out, 2).exists()
    lines = []
    summary = run(fault_config(), poisoned_data, out, resume=True, progress=lines.append)
    assert summary["epochs"] == 3 and "resuming after epoch 0" in lines[0]
    _assert_same_outcome(out, reference)


@pytest.mark.parametrize(
    "killed_before",
    [pytest.param(name, marks=pytest.mark.slow) for name in FINAL_RECORD],
)  # a resume each (about 20 s); the default suite checks the resume-time test of the model folder
def test_a_driver_killed_while_recording_the_final_epoch_resumes_to_that_epochs_model(
    ray_cluster, poisoned_data, undisturbed, reference, killed_before, tmp_path
):
    """Killed before any one file of the final epoch's record, `--resume` ends with that
    epoch's metrics row and model files (last.pt, best.pt, card.json), the undisturbed
    run's, never those of the epoch before."""
    folder = tmp_path / "run"
    shutil.copytree(undisturbed[1] / killed_before, folder)
    lines = []
    summary = run(fault_config(), poisoned_data, folder, resume=True, progress=lines.append)
    assert summary["epochs"] == 3
    assert any("epoch 2 was checkpointed but not recorded; re-evaluated it" in line for line in lines)
    _assert_final_record(folder, undisturbed[0], reference)


@pytest.mark.slow  # a resume (about 20 s) of what only an older asd-ray leaves
def test_a_recorded_epoch_whose_model_was_not_saved_is_saved_again_on_resume(
    ray_cluster, poisoned_data, undisturbed, reference, tmp_path
):
    """The final epoch's metrics row recorded, its model files not (an asd-ray that wrote
    the row first, killed in between): the resume saves them from the checkpoint."""
    out, killed = undisturbed
    folder = tmp_path / "run"
    shutil.copytree(killed / "last.pt", folder)  # the model files of epoch 1
    for name in (METRICS_FILE, METRICS_JSONL):
        shutil.copy2(out / name, folder / name)
    lines = []
    run(fault_config(), poisoned_data, folder, resume=True, progress=lines.append)
    assert any("did not hold epoch 2, the last recorded one; saved it again" in line for line in lines)
    assert not any("re-evaluated" in line for line in lines)
    _assert_final_record(folder, out, reference)


def _assert_final_record(folder: Path, undisturbed: Path, reference: tuple[list, list]) -> None:
    """``folder`` ends as the undisturbed run did: every metrics row and the final epoch's
    model files, weights and card alike."""
    figures = [k for k in METRIC_KEYS if k != "train_loss"]  # a re-evaluated row's loss is unknown
    rows = tables.read_parquet(folder / METRICS_FILE, "metrics").to_pylist()
    assert [{k: r[k] for k in figures} for r in rows] == [{k: r[k] for k in figures} for r in reference[1]]
    assert len((folder / METRICS_JSONL).read_text().splitlines()) == 3
    for kind in ("last", "best"):
        state, card = read_model_file(folder / MODEL_DIR / f"{kind}.pt")
        want_state, want_card = read_model_file(undisturbed / MODEL_DIR / f"{kind}.pt")
        assert card["epoch"] == want_card["epoch"] == 2
        assert {k: card[k] for k in MODEL_FIGURES} == {k: want_card[k] for k in MODEL_FIGURES}
        assert state.keys() == want_state.keys() and all(torch.equal(state[k], want_state[k]) for k in state)
    card = json.loads((folder / MODEL_DIR / CARD_FILE).read_text())
    assert card == json.loads((undisturbed / MODEL_DIR / CARD_FILE).read_text())


def test_the_model_folder_is_checked_against_the_last_recorded_epoch(undisturbed, tmp_path):
    """What a driver killed part-way through a record leaves: last.pt, card.json, and
    best.pt when the last epoch is the best, must hold the last recorded epoch."""
    out, killed = undisturbed
    rows = tables.read_parquet(out / METRICS_FILE, "metrics").to_pylist()
    assert model_holds(out / MODEL_DIR, rows)
    for before, holds in {
        "last.pt": False,
        "best.pt": False,
        "card.json": False,
        "metrics.jsonl": True,
    }.items():
        assert model_holds(killed / before / MODEL_DIR, rows) == holds, before
    assert model_holds(killed / "last.pt" / MODEL_DIR, rows[:2])  # epoch 1's files, epoch 1 the last
    assert not model_holds(out / MODEL_DIR, rows[:2])  # files of a later epoch than recorded
    shutil.copytree(killed / "last.pt" / MODEL_DIR, tmp_path / MODEL_DIR)
    (tmp_path / MODEL_DIR / "best.pt").unlink()
    assert not model_holds(tmp_path / MODEL_DIR, rows[:2])


@pytest.mark.slow  # two drivers side by side, each with a local Ray of its own: a few minutes on 2 cores
def test_two_runs_on_one_machine_each_finish_with_the_tables_they_have_alone(
    ray_cluster, poisoned_data, tmp_path, reference
):
    """Two drivers into different folders at once, each starting its own local Ray (as
    `asd-ray run` does) beside the session's: both finish with the undisturbed run's
    tables, and no worker looks for "the" local cluster among several."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    args = [json.dumps(dataclasses.asdict(poisoned_data)), json.dumps(FAULT_RUN)]
    drivers = {}
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.err", "w") as err:
            drivers[name] = subprocess.Popen(
                [sys.executable, "-c", _DRIVER, *args, str(tmp_path / name)],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
    try:
        for name, driver in drivers.items():
            driver.wait(timeout=900)
            err = (tmp_path / f"{name}.err").read_text()
            assert driver.returncode == 0, err[-3000:]
            assert "Found multiple active Ray instances" not in err
            _assert_same_outcome(tmp_path / name, reference)
    finally:
        for driver in drivers.values():
            driver.kill()


@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs (needs root and mount permission, else the test is skipped)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_full_disk_is_one_clear_error_and_a_torn_resume_restarts_from_the_newest_intact_checkpoint(
    ray_cluster, poisoned_data, small_disk, reference
):
    """The disk fills during epoch 2: one clear error, nothing half-written. A crash mid-write
    can also tear Ray Train's checkpoint index and our newest state.pt: once space is freed,
    the resume sets the index aside, skips epoch 1's checkpoint and re-runs epoch 1 from
    epoch 0's, to the undisturbed run's tables."""
    out = small_disk / "run"
    run(fault_config(), poisoned_data, out, stop_after_epoch=1, progress=lambda _: None)
    ballast = small_disk / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 20))
                f.flush()
        except OSError:
            pass  # the disk is full
    with pytest.raises(StorageError, match="no space left on device.*asd-ray run --resume") as failure:
        run(fault_config(), poisoned_data, out, resume=True, progress=lambda _: None)
    assert len(str(failure.value).splitlines()) == 1
    assert tables.read_parquet(split_path(out, 1), "splits").num_rows == 240  # epoch 1 intact
    assert tables.read_parquet(out / METRICS_FILE, "metrics").column("epoch").to_pylist() == [0, 1]
    assert not list(out.rglob("*.tmp"))  # nothing half-written
    ballast.unlink()
    index = out / TRAIN_DIR / "checkpoint_manager_snapshot.json"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])  # a write cut short
    latest = max(c for c in (out / TRAIN_DIR).glob("checkpoint_*") if c.is_dir())
    state = latest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    lines = []
    summary = run(fault_config(), poisoned_data, out, resume=True, progress=lines.append)
    assert any("was unreadable" in line for line in lines)
    assert any(f"skipped unreadable {latest.name}" in line and "(epoch 0)" in line for line in lines)
    assert summary["epochs"] == 3
    _assert_same_outcome(out, reference)
