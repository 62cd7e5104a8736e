"""The commands that only read tables or settings (``--version``, ``config show``, ``audit``,
``report``) load neither torch, torchvision nor Ray: they start in a fraction of torch's
import time (jobs/bench_startup.py measures how long)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_shards
from test_audit import _fake_run

from asd_ray.model_card import MODEL_DIR, write_card
from asd_ray.run_folder import INPUTS_FILE

HEAVY = ("torch", "torchvision", "ray")
# The console script's way in (prepare_command reads sys.argv as the CLI module loads); what
# was loaded is printed even when the command fails, so a failure shows it too.
_WRAPPER = """
import json, sys
sys.argv = ["asd-ray", *sys.argv[1:]]
try:
    from asd_ray.cli import main
    code = main()
finally:
    print(json.dumps(sorted(m for m in {heavy!r} if m in sys.modules)), file=sys.stderr)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished run folder as the audit reads it: three epochs of split tables and metrics,
    its model card and the training shards it names."""
    root = tmp_path_factory.mktemp("startup")
    train = make_shards(root / "train", n=60, size=8, channels=1, classes=3, per_shard=25)
    run = root / "run"
    _fake_run(run, with_truth=True)
    architecture = {"name": "small_cnn", "num_classes": 3, "in_channels": 1, "image_size": 8, "factory": None}
    card = {
        "architecture": architecture | {"meta_layers": []},
        "classes": ["c0", "c1", "c2"],
        "input": {"height": 8, "width": 8, "channels": 1, "mean": [0.5], "std": [0.25]},
        "best": {"epoch": 2},
        "last": {"epoch": 2},
        "data": {"train": {"identity_sha256": train.identity()}},
    }
    (run / MODEL_DIR).mkdir()
    write_card(run / MODEL_DIR, card)
    (run / INPUTS_FILE).write_text(json.dumps({"train": str(root / "train"), "test": str(root / "train")}))
    return run


COMMANDS = {
    "--version": ["--version"],
    "config show": ["config", "show"],
    "config show --preset": ["config", "show", "--preset", "cifar10"],
    "audit summary": ["audit", "summary", "{run}"],
    "audit summary --json": ["audit", "summary", "{run}", "--json"],
    "audit flagged": ["audit", "flagged", "{run}", "--top", "5"],
    "audit sample": ["audit", "sample", "{run}", "3"],
    "audit export": ["audit", "export", "{run}", "--out", "{out}/flags.parquet"],
    "audit export csv": ["audit", "export", "{run}", "--format", "csv", "--out", "{out}/flags.csv"],
    "audit manifest": ["audit", "manifest", "{run}", "--threshold", "0.5", "--out", "{out}/drop.csv"],
    "report": ["report", "{run}", "--out", "{out}/report"],
}


@pytest.mark.parametrize("name", COMMANDS)
def test_a_table_command_loads_neither_torch_nor_ray(name, run, tmp_path):
    argv = [a.format(run=run, out=tmp_path) for a in COMMANDS[name]]
    done = subprocess.run(
        [sys.executable, "-c", _WRAPPER.format(heavy=HEAVY), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout  # the command did its work: a version, YAML, a table or JSON
    assert json.loads(done.stderr.strip().splitlines()[-1]) == []
