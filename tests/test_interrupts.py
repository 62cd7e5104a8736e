"""Ctrl-C and SIGTERM at each moment of a command: one line, status 130 / 143, no temporary
file left, no Ray process outliving the driver, and a run that continues (as the line says) to
the tables of an undisturbed run.

Each interrupted ``asd-ray run`` is a subprocess on the tiny data that starts a local Ray of its
own (10-40 s) beside the session's, on which the run then continues; the undisturbed run is the
session's (conftest). By default: SIGTERM during training with its resume, and SIGINT during Ray's start-up
without the re-run; the rest of the matrix, each with its re-run or resume, runs with
``-m slow``.
"""

import dataclasses
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import FAULT_RUN, METRIC_KEYS, assert_processes_end, fault_config, run_outcome

from asd_ray import tables
from asd_ray.driver import run
from asd_ray.reaper import _processes, ray_descendants
from asd_ray.run_folder import METRICS_FILE, split_path

# A command that interrupts itself at a named moment. SIGINT goes to the whole process group,
# as a terminal's Ctrl-C does; SIGTERM to the driver alone, as `timeout` and `kill` send it.
_SELF_INTERRUPTING = """
import contextlib, os, signal, sys
from asd_ray import tables
from asd_ray.cli import main

moment, signum, argv = sys.argv[1], getattr(signal, sys.argv[2]), sys.argv[3:]

def interrupt():
    if signum == signal.SIGINT:
        os.killpg(os.getpgrp(), signum)
    else:
        os.kill(os.getpid(), signum)

def interrupting(real, first):
    def wrapper(*args, **kwargs):
        if first:
            interrupt()
        result = real(*args, **kwargs)
        interrupt()
        return result
    return wrapper

if moment == "start-up":  # Ray's GCS and raylet run, ray.init has not returned
    import ray._private.services as services
    services.start_raylet = interrupting(services.start_raylet, first=False)
elif moment == "scoring":  # the scoring actors are up, the first pass starts
    from asd_ray.scoring_pool import ScoringPool
    ScoringPool.run_many = interrupting(ScoringPool.run_many, first=True)
elif moment.startswith("write:"):  # the file is written under its temporary name, not yet renamed
    real_atomic_file = tables.atomic_file

    @contextlib.contextmanager
    def atomic_file(path, **options):
        with real_atomic_file(path, **options) as tmp:
            yield tmp
            if moment.removeprefix("write:") in str(path):
                interrupt()

    tables.atomic_file = atomic_file
sys.exit(main(argv))
"""

MOMENTS = {  # moment -> how the command is interrupted there
    "start-up": "start-up",
    "scoring": "scoring",
    "split-table write": "write:splits/epoch=001",
    "training": None,  # epoch 1 trains: the test sends the signal
    "model write": "write:model/last.pt",
}


@dataclasses.dataclass
class Interrupted:
    status: int
    stdout: str
    stderr: str


def _interrupt(
    argv: list[str], moment: str, signame: str, tmp_path: Path, out: Path | None = None, cluster: str = ""
):
    """Run ``asd-ray ARGV`` interrupted at ``moment``, on a local Ray of its own or joining
    ``cluster`` (an address); check that no Ray process it started outlives it."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | (
        {"RAY_ADDRESS": cluster} if cluster else {}
    )
    how = MOMENTS.get(moment, moment)
    stdout, stderr = tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "w") as out_file, open(stderr, "w") as err_file:
        command = subprocess.Popen(
            [sys.executable, "-c", _SELF_INTERRUPTING, how or "none", signame, *argv],
            env=env,
            stdout=out_file,
            stderr=err_file,
            start_new_session=True,  # its own process group, as a shell's foreground job
        )
    started: dict[int, int] = {}
    deadline = time.monotonic() + 240
    try:
        while command.poll() is None:
            started.update(ray_descendants(command.pid, _processes()))
            if how is None and split_path(out, 1).exists():
                command.send_signal(getattr(signal, signame))
                how = "sent"
            assert time.monotonic() < deadline, f"the command did not end after {signame} at {moment}"
            time.sleep(0.05)
    finally:
        command.kill()
    assert_processes_end(started)
    return Interrupted(command.returncode, stdout.read_text(), stderr.read_text())


def _assert_one_line(result: Interrupted, signame: str) -> str:
    """Status 128 + the signal, no traceback, no JSON result, one asd-ray line; that line."""
    assert result.status == 128 + getattr(signal, signame), result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stdout == ""
    ours = [line for line in result.stderr.splitlines() if "asd-ray" in line]
    assert len(ours) == 1 and ours[0].startswith(f"asd-ray: interrupted ({signame})"), result.stderr
    return ours[0]


def _run_argv(inputs, out: Path) -> list[str]:
    flags = [("--train", inputs.train), ("--test", inputs.test), ("--poison-test", inputs.poison_test)]
    flags += [("--seeds", inputs.seeds), ("--ground-truth", inputs.ground_truth), ("--out", str(out))]
    overrides = [arg for override in FAULT_RUN for arg in ("--set", override)]
    return ["run", "--preset", "mnist-quick", *[a for flag in flags for a in flag], *overrides, "--quiet"]


# In the default suite: SIGTERM in training with its resume (a scheduler's kill, the usual case),
# and SIGINT during start-up without the re-run; with -m slow: every other moment and signal.
_DEFAULT = {("training", "SIGTERM"): True, ("start-up", "SIGINT"): False}


@pytest.mark.ray
@pytest.mark.parametrize(
    ("moment", "signame", "continued"),
    [
        pytest.param(m, s, True, marks=pytest.mark.slow)
        for m in MOMENTS
        for s in ("SIGINT", "SIGTERM")
        if (m, s) not in _DEFAULT or not _DEFAULT[(m, s)]
    ]
    + [(m, s, continued) for (m, s), continued in _DEFAULT.items()],
)
def test_an_interrupted_run_says_what_it_kept_and_continues_to_the_undisturbed_tables(
    ray_cluster, poisoned_data, tmp_path, reference, moment, signame, continued
):
    out = tmp_path / "run"
    line = _assert_one_line(
        _interrupt(_run_argv(poisoned_data, out), moment, signame, tmp_path, out), signame
    )
    assert not list(out.rglob("*.tmp")), "a temporary file was left behind"
    if moment == "start-up":
        assert line.endswith("nothing was kept; start it again with the same command")
        if continued:
            run(fault_config(), poisoned_data, out, progress=lambda _: None)
    else:
        assert line.endswith(f"continue with asd-ray run --resume {out}")
        if "keeps epoch 0" in line:  # what the folder keeps is the undisturbed run's
            assert tables.read_parquet(split_path(out, 0), "splits").equals(reference[0][0])
            assert run_outcome_rows(out)[0] == reference[1][0]
        else:
            assert moment != "training", line  # epoch 1 trains: epoch 0 is kept
        if continued:
            run(fault_config(), poisoned_data, out, resume=True, progress=lambda _: None)
    if continued:
        _assert_same_outcome(out, reference)


@pytest.mark.slow
def test_sigterm_stops_a_run_that_joined_a_cluster_in_one_line(ray_cluster, poisoned_data, tmp_path):
    """`ray.init(address=...)` installs Ray's SIGTERM handlers too (sys.exit(15), then an abort)."""
    out = tmp_path / "run"
    address = ray_cluster.get_runtime_context().gcs_address
    result = _interrupt(_run_argv(poisoned_data, out), "training", "SIGTERM", tmp_path, out, cluster=address)
    assert _assert_one_line(result, "SIGTERM").endswith(f"continue with asd-ray run --resume {out}")


def run_outcome_rows(out: Path) -> list[dict]:
    """The timing-free metrics rows a run folder keeps."""
    rows = tables.read_parquet(out / METRICS_FILE, "metrics").to_pylist()
    return [{k: row[k] for k in METRIC_KEYS} for row in rows]


def _assert_same_outcome(out: Path, reference: tuple[list, list]) -> None:
    """The undisturbed run's split tables and figures. An epoch that the workers checkpointed
    while the driver stopped is re-evaluated on resume, its training loss unknown (NaN)."""
    splits, rows = run_outcome(out)
    assert [row["epoch"] for row in rows] == [0, 1, 2]
    for got, want in zip(rows, reference[1]):
        assert {**got, "train_loss": None} == {**want, "train_loss": None}
        assert got["train_loss"] == want["train_loss"] or math.isnan(got["train_loss"])
    for epoch, (got, want) in enumerate(zip(splits, reference[0])):
        assert got.equals(want), f"epoch {epoch}: the split table differs from the undisturbed run's"


@pytest.mark.parametrize("command", ["report", "audit export"])
def test_sigterm_while_a_file_is_written_leaves_no_temporary_file(tmp_path, undisturbed, command):
    run_folder = undisturbed[0]
    if command == "report":
        written = run_folder / "audit" / "report.html"
        argv = ["report", str(run_folder)]
    else:
        written = tmp_path / "flags.parquet"
        argv = ["audit", "export", str(run_folder), "--out", str(written)]
    result = _interrupt(argv, f"write:{written}", "SIGTERM", tmp_path)
    assert _assert_one_line(result, "SIGTERM").endswith("nothing half-written is left: run the command again")
    assert not written.exists()
    assert not list(run_folder.rglob("*.tmp")) and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize("json_flag", [[], ["--json"]], ids=["table", "json"])
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(undisturbed, json_flag):
    """`asd-ray audit summary RUN | head -1`, with the reader gone before the first write."""
    command = subprocess.Popen(
        [sys.executable, "-m", "asd_ray", "audit", "summary", str(undisturbed[0]), *json_flag],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    command.stdout.close()
    _, stderr = command.communicate(timeout=60)
    assert (command.returncode, stderr) == (128 + signal.SIGPIPE, b"")
