"""The start of a run: the run folder's lock, its checks and first records, before Ray starts.

Most of these stop the driver where Ray would start (``cluster.connect`` replaced), so they
need no Ray; the last one starts a local Ray of the driver's own beside the session's.
"""

import dataclasses
import errno
import json
import os
import re
import subprocess
import sys
import threading

import pytest
from conftest import TINY_RUN

from asd_ray import cluster, driver
from asd_ray.cli import main
from asd_ray.config import load_config
from asd_ray.errors import ConfigError, DataError, StorageError


class _Stopped(Exception):
    """Where a test ends a run that got as far as it had to."""


def _config(*overrides: str):
    return load_config("mnist-quick", overrides=[*TINY_RUN, *overrides])


@pytest.fixture
def no_ray(monkeypatch):
    """A run that reaches Ray's start fails the test."""

    def start(config):
        raise AssertionError("Ray started")

    monkeypatch.setattr(cluster, "connect", start)


def test_a_second_driver_is_refused_while_the_first_starts_ray(poisoned_data, tmp_path, monkeypatch):
    """Two drivers on one new folder (the race of a run started twice): the first holds the
    folder from before its checks through Ray's start (30-60 s on a real machine); the
    second is refused at once, before a Ray of its own starts, and writes nothing."""
    entered, release, starts, first = threading.Event(), threading.Event(), [], {}

    def slow_start(config):
        starts.append(config)
        if len(starts) > 1:
            raise AssertionError("a second driver started Ray for a folder another driver holds")
        entered.set()
        release.wait(60)
        raise _Stopped

    def first_run():
        try:
            driver.run(_config(), poisoned_data, out)
        except BaseException as err:  # examined below
            first["error"] = err

    monkeypatch.setattr(cluster, "connect", slow_start)
    out = tmp_path / "run"
    thread = threading.Thread(target=first_run, daemon=True)
    thread.start()
    assert entered.wait(60), "the first driver never reached Ray's start"
    try:
        with pytest.raises(
            DataError,
            match=re.escape(f"run folder {out} is being written by the asd-ray driver pid {os.getpid()} "),
        ):
            driver.run(_config(), poisoned_data, out)
        assert [p.name for p in out.iterdir()] == [".lock"]  # the first driver's lock, nothing else
    finally:
        release.set()
        thread.join(60)
    assert isinstance(first.get("error"), _Stopped)
    assert not out.exists()  # the first stopped before its first record: what it made is gone


@pytest.fixture
def read_only(tmp_path):
    """A read-only tmpfs holding a started run's records in ``old`` (needs root and mount
    permission, else the test is skipped)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True
    )
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_read_only_folder_is_one_line_before_ray_starts(poisoned_data, read_only, no_ray, capsys):
    from asd_ray.config import config_yaml

    old = read_only / "old"
    old.mkdir()
    (old / "config.yaml").write_text(config_yaml(_config()))
    (old / "inputs.json").write_text(json.dumps({"train": poisoned_data.train, "test": poisoned_data.test}))
    (old / ".lock").write_text("")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    data = ["--train", poisoned_data.train, "--test", poisoned_data.test, "--seeds", poisoned_data.seeds]
    for argv in (["--resume", "--out", str(old)], [*data, "--out", str(read_only / "new")]):
        assert main(["run", "--preset", "mnist-quick", *argv, "--quiet"]) == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1
        assert "cannot write there (Read-only file system); choose another --out or make it writable" in err


def test_a_start_cut_short_is_no_dead_end(poisoned_data, tmp_path, monkeypatch, capsys):
    """A full disk between inputs.json and config.yaml is one line saying to start again,
    with nothing kept; a kill there leaves inputs.json and a temporary file, which
    `--resume` refuses saying to start a new run, and a new run takes the folder over."""
    monkeypatch.setattr(cluster, "connect", lambda config: None)  # the test's process has no Ray
    monkeypatch.setattr(cluster, "check_resources", lambda config: None)

    def full(config):
        raise OSError(errno.ENOSPC, "No space left on device")

    out = tmp_path / "run"
    with monkeypatch.context() as disk:
        disk.setattr(driver, "config_yaml", full)
        with pytest.raises(StorageError) as failure:
            driver.run(_config(), poisoned_data, out)
    assert str(failure.value) == (
        f"{out}: no space left on device before the run's first record; "
        "free space, then start it again with the same command"
    )
    assert not out.exists()

    out.mkdir()  # what a kill between the two records leaves
    (out / ".lock").write_text("the asd-ray driver pid 1 on elsewhere since then\n")
    (out / "inputs.json").write_text(json.dumps({"train": poisoned_data.train, "test": poisoned_data.test}))
    (out / ".config.yaml.k1ll3d_x.tmp").write_text("seed: 0\nepo")
    assert main(["run", "--resume", "--out", str(out), "--quiet"]) == 2
    assert f"--resume {out}: no config.yaml there; start a new run with --out" in capsys.readouterr().err

    def stop(*args, **kwargs):
        raise _Stopped

    monkeypatch.setattr(driver, "_Session", stop)  # the new run got going: enough
    with pytest.raises(_Stopped):
        driver.run(_config(), poisoned_data, out)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "config.yaml", "inputs.json", "run.log"]
    assert json.loads((out / "inputs.json").read_text()) == dataclasses.asdict(poisoned_data.absolute())


def test_a_cache_dir_that_cannot_take_files_is_one_line_before_ray_starts(poisoned_data, tmp_path, no_ray):
    """Under /proc, or under a file: refused in the driver, not found by the workers once Ray
    started; a folder that can be made passes, and what the check made is removed again."""
    (tmp_path / "a-file").write_text("")
    for cache_dir in ("/proc/asd-ray-cache", tmp_path / "a-file" / "cache"):
        with pytest.raises(ConfigError) as failure:
            driver.run(_config(f"cluster.cache_dir={cache_dir}"), poisoned_data, tmp_path / "run")
        assert str(failure.value).startswith(f"cluster.cache_dir {cache_dir}: cannot create files there (")
        assert len(str(failure.value).splitlines()) == 1
        assert not (tmp_path / "run").exists()
    with pytest.raises(AssertionError, match="Ray started"):
        driver.run(
            _config(f"cluster.cache_dir={tmp_path / 'new' / 'cache'}"), poisoned_data, tmp_path / "run"
        )
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


_ASK_THE_STATE_API = """
import json, os, ray
from asd_ray.config import load_config
from asd_ray.cluster import connect

assert connect(load_config("mnist-quick", overrides=["cluster.workers=1", "cluster.scorers=1"])) == "local"
try:
    @ray.remote(num_cpus=0)
    def ask():
        from ray.util.state import list_nodes  # no address: as Ray Train's placement-group cleaner asks

        return os.environ.get("RAY_ADDRESS"), len(list_nodes())

    @ray.remote(num_cpus=0, runtime_env={"env_vars": {"ASD_RAY_TEST": "1"}})
    class Controller:  # as Ray Train's: env vars of its own, and its children ask the state API
        def ask(self):
            return ray.get(ask.remote())

    answers = [ray.get(ask.remote()), ray.get(Controller.remote().ask.remote())]
    print(json.dumps({"own": ray.get_runtime_context().gcs_address, "answers": answers}))
finally:
    ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow  # a local Ray of its own beside the session's (~20 s), as the two-runs test
def test_the_processes_of_a_local_ray_address_their_own_cluster(ray_cluster):
    """With another local Ray running (the session's), the workers of the Ray a driver
    starts ask the state API of their own cluster, never "Found multiple active Ray instances"."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-c", _ASK_THE_STATE_API], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.splitlines()[-1])
    assert found["own"] != ray_cluster.get_runtime_context().gcs_address
    assert found["answers"] == [[found["own"], 1]] * 2
