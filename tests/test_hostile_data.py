"""Hostile inputs that once deleted a user's files, exhausted memory, split the commands'
views of one shard set or ended in a traceback: each now refuses with one line."""

from __future__ import annotations

import numpy as np
import pytest

from asd_ray.cli import main
from asd_ray.data.shards import write_shards
from asd_ray.data.sources import from_arrays
from asd_ray.errors import DataError


def run(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and stderr of one ``asd-ray`` command."""
    code = main([*argv, "--quiet"])
    return code, capsys.readouterr().err


def _small_source(classes: int = 2):
    rng = np.random.default_rng(0)
    return from_arrays(rng.integers(0, 256, (8, 8, 8, 1), np.uint8), np.arange(8) % classes)


# --------------------------------------------------------------------------- --overwrite


@pytest.mark.parametrize("intruder", ["backup.tar", "notes.tar/", "train-000000.tar/"])
def test_overwrite_keeps_files_the_set_does_not_list(tmp_path, intruder):
    out = tmp_path / "out"
    write_shards(_small_source(), out)
    if intruder.endswith("/"):
        if (out / intruder).exists():
            (out / intruder).unlink()
        (out / intruder).mkdir()
        (out / intruder / "notes.txt").write_text("mine")
    else:
        (out / intruder).write_text("mine")
    with pytest.raises(
        DataError, match=f"holds {intruder.rstrip('/')!r}, which is not a file of its shard set"
    ):
        write_shards(_small_source(), out, overwrite=True)
    assert (out / intruder.rstrip("/")).exists()


def test_overwrite_replaces_the_sets_own_files(tmp_path):
    out = tmp_path / "out"
    write_shards(_small_source(), out, name="old")
    write_shards(_small_source(), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["dataset.json", "manifest.parquet", "train-000000.tar"]
