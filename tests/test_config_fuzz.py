"""Settings fuzz: every key of every config section, given hostile values with ``--set``
and in a ``--config`` file, is refused in one line naming it (exit 2) before any Ray
process starts and before anything is written. Keys are read from the dataclasses, so a
setting added later is fuzzed too."""

import dataclasses
import re
import typing

import pytest
import ray

from asd_ray import cli
from asd_ray.cli import main
from asd_ray.config import RunConfig, load_config


def _keys(cls: type = RunConfig, prefix: str = "") -> list[str]:
    """Every dotted key of ``cls``: sections and their settings."""
    hints = typing.get_type_hints(cls)
    keys = []
    for field in dataclasses.fields(cls):
        keys.append(prefix + field.name)
        if dataclasses.is_dataclass(hints[field.name]):
            keys += _keys(hints[field.name], f"{prefix}{field.name}.")
    return keys


KEYS = _keys()
PARSER = cli.build_parser()  # built once: building it is most of a refusal's time

# YAML texts: wrong types, NaN and infinities, huge, negative, empty and unicode values
HOSTILE = [
    "[1, 2]",  # a list
    "{a: 1}",  # a mapping
    "word",  # text where a number is wanted
    "true",  # a boolean where a number is wanted
    ".nan",
    ".inf",
    "-.inf",
    "1e300",  # a number where text is wanted, and huge
    "1" + "0" * 30,
    "9" * 4000,  # within the file limits: the config refuses it (and never prints it whole)
    "9" * 5000,  # over the files' 4,096-character value limit
    "-1",
    "-1e-9",
    "''",
    "null",
    "é",
    "\u202e",
    "\U0001f600",
]

_BOOLEAN = "a boolean setting"
_NONE = "null is this setting's documented default"
_FOLDER = "any folder name is a valid cache folder (made absolute against the current directory)"
_SHARED = "any folder name is a valid checkpoint folder (made absolute against the current directory)"
# The (key, value) pairs above that are valid settings, each with why.
VALID = {
    ("data.flip", "true"): _BOOLEAN,
    ("scoring.augment", "true"): _BOOLEAN,
    ("compute.channels_last", "true"): _BOOLEAN,
    ("compute.compile", "true"): _BOOLEAN,
    ("cluster.sync_batch_norm", "true"): _BOOLEAN,
    ("cluster.sync_batch_norm", "null"): _NONE + " (on when workers > 1 under batch_rule global)",
    ("model.factory", "null"): _NONE + " (a built-in model)",
    ("mixmatch.rampup_epochs", "null"): _NONE + " (the ramp spans the run)",
    ("cluster.memory_budget_gb", "null"): _NONE + " (no memory limit)",
    ("cluster.cache_dir", "null"): _NONE + " (the system's temp folder)",
    ("cluster.cache_dir", "word"): _FOLDER,
    ("cluster.cache_dir", "é"): _FOLDER,
    ("cluster.cache_dir", "\u202e"): _FOLDER,
    ("cluster.cache_dir", "\U0001f600"): _FOLDER,
    ("cluster.worker_resources", "{a: 1}"): "a custom resource named a, one per worker",
    ("cluster.scorer_resources", "{a: 1}"): "a custom resource named a, one per scoring actor",
    ("cluster.storage", "null"): _NONE + " (RUN/train)",
    ("cluster.storage", "word"): _SHARED,
    ("cluster.storage", "é"): _SHARED,
    ("cluster.storage", "\u202e"): _SHARED,
    ("cluster.storage", "\U0001f600"): _SHARED,
    ("storage.endpoint", "null"): _NONE + " (the standard variables, else the provider's)",
    ("storage.region", "null"): _NONE + " (AWS_REGION, else the SDK's default)",
    ("storage.region", "word"): "a lower-case name is a region's form; the provider refuses one it lacks",
    ("storage.anonymous", "true"): _BOOLEAN,
}


def test_every_key_is_fuzzed_and_every_listed_valid_pair_is_one():
    assert len(KEYS) > 60 and "cluster.cache_dir" in KEYS and "split" in KEYS
    assert {key for key, _ in VALID} <= set(KEYS) and {value for _, value in VALID} <= set(HOSTILE)
    for key, value in VALID:
        *sections, leaf = key.split(".")
        config = load_config("mnist-quick", overrides=[f"{key}={value}"])
        for section in sections:
            config = getattr(config, section)
        assert getattr(config, leaf) is not None or value == "null"


def _yaml_file(key: str, value: str) -> str:
    *sections, leaf = key.split(".")
    return "".join(f"{'  ' * depth}{name}:\n" for depth, name in enumerate(sections)) + (
        f"{'  ' * len(sections)}{leaf}: {value}\n"
    )


@pytest.mark.parametrize("key", KEYS)
def test_hostile_values_are_refused_in_one_line_before_ray(key, tmp_path, capsys, monkeypatch):
    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.setattr(cli, "build_parser", lambda: PARSER)
    out = tmp_path / "run"
    data = ["--train", str(tmp_path / "train"), "--test", str(tmp_path / "test")]
    data += ["--seeds", str(tmp_path / "seeds.parquet"), "--out", str(out), "--quiet"]
    config_file = tmp_path / "config.yaml"
    wrong = []
    named = re.compile(rf"(?<![\w.]){re.escape(key)}(?!\w)")
    for value in HOSTILE:
        if (key, value) in VALID:
            continue
        config_file.write_text(_yaml_file(key, value), encoding="utf-8")
        for how, flags in (
            ("--set", ["--set", f"{key}={value}"]),
            ("--config", ["--config", str(config_file)]),
        ):
            code = main(["run", *data, *flags])
            stdout, err = capsys.readouterr()
            if how == "--set":
                says_where = named.search(err)
            else:  # a value over the file limits is named by the file and its line
                says_where = f"--config {config_file}: " in err and (named.search(err) or " at line " in err)
            if code != 2 or len(err.splitlines()) != 1 or not says_where or stdout or out.exists():
                wrong.append(f"{how} {key}={value[:20]!r}: exit {code}, {err[:300]!r}")
            elif len(err.replace(str(config_file), "F")) > 400:  # the tmp path's length varies
                wrong.append(f"{how} {key}={value[:20]!r}: a line of {len(err)} characters")
    assert not wrong, "\n".join(wrong)
