"""Every path argument of every command takes a local path or an ``s3://`` / ``gs://`` URI;
any other location is refused in one line (exit 2) before anything runs.

``pathlib`` reads ``s3://bucket/x`` as ``s3:/bucket/x``, so ``shards make --out s3://bucket/x``
once wrote a local folder ``./s3:/bucket/x`` and exited 0. The arguments are found in the parser
itself, so a path flag added later is covered (or named here as not a path).
"""

import argparse

import pytest

from asd_ray.cli import build_parser, main
from asd_ray.cli.common import local_place, place

# Text arguments that are not paths: a shard-file prefix, an epoch, a config override, code.
NOT_PATHS = {
    ("shards", "make", "--name"),
    ("shards", "import", "--name"),
    ("run", "--set"),
    ("config", "show", "--set"),
    ("evaluate", "--factory"),
    ("audit", "flagged", "--epoch"),
}
# Files read from this machine's disk only: raw source data and memory-mapped arrays, the
# trigger image, and config files (read before any storage setting is known).
LOCAL_ONLY = {
    ("shards", "make", "--root"),
    ("shards", "make", "--images"),
    ("shards", "make", "--labels"),
    ("shards", "make", "--class-list"),
    ("poison", "--pattern-file"),
    ("run", "--config"),
    ("config", "show", "--config"),
}
# Locations no argument takes, and what the one line says (never the secret of the last).
REFUSED = {
    "pipe:cat /etc/passwd": "a pipe: location is refused",
    "http://example.com/train": "a http: location is refused",
    "hf://datasets/user/set": "a hf: location is refused",
    "fsspec+s3://bucket/x": "a fsspec+s3: location is refused",
    "file:///data/train": "file:///data/train: give the local path itself, not a file:// URI",
    "s3://bucket/x?endpoint_override=evil.example": "a query string or fragment in a data URI is refused",
    "s3://AKIAEXAMPLE:s3cr3tKey@bucket/x": "credentials are never read from a URI",
}


def _commands(parser: argparse.ArgumentParser, words: tuple[str, ...] = ()):
    """(command words, parser) of every command that runs, e.g. (("audit", "export"), ...)."""
    groups = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not groups:
        yield words, parser
    for group in groups:
        for name, sub in group.choices.items():
            yield from _commands(sub, (*words, name))


def _text_arguments():
    """(command words, argument, its type) of every argument that takes free text."""
    for words, parser in _commands(build_parser()):
        for action in parser._actions:
            if (
                action.nargs == 0
                or action.choices is not None
                or action.type not in (None, str, place, local_place)
            ):
                continue  # a switch, a choice or a number
            yield words, action.option_strings[-1] if action.option_strings else action.dest, action.type


def test_every_text_argument_is_a_place_or_named_as_not_a_path():
    unnamed = [
        (*words, name)
        for words, name, kind in _text_arguments()
        if kind not in (place, local_place) and (*words, name) not in NOT_PATHS
    ]
    assert unnamed == [], "give these type=place (or local_place), or add them to NOT_PATHS"
    paths = {(*words, name): kind for words, name, kind in _text_arguments() if kind in (place, local_place)}
    assert {p for p, kind in paths.items() if kind is local_place} == LOCAL_ONLY
    assert paths[("shards", "make", "--out")] is place and paths[("report", "run")] is place
    assert len(paths) >= 30


PATH_ARGUMENTS = [
    (words, name, kind) for words, name, kind in _text_arguments() if kind in (place, local_place)
]


@pytest.mark.parametrize(
    ("words", "name", "kind"), PATH_ARGUMENTS, ids=[" ".join((*w, n)) for w, n, _ in PATH_ARGUMENTS]
)
def test_a_refused_location_is_one_line_and_exit_2(words, name, kind, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    refused = dict(REFUSED)
    if kind is local_place:
        refused["s3://bucket/x"] = "s3://bucket/x: this argument takes a local path only"
    for value, says in refused.items():
        with pytest.raises(SystemExit) as exit_info:
            main([*words, *([name, value] if name.startswith("-") else [value])])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and len(err.splitlines()) == 1, (value, err)
        assert f"argument {name}: " in err and says in err, (value, err)
        assert "s3cr3tKey" not in err and "AKIAEXAMPLE" not in err
    assert not list(tmp_path.iterdir())  # nothing written, not even ./s3:


def test_plain_paths_and_bucket_uris_pass():
    for value in ("/data/s3:bucket", "runs/a:b", "C:/data", "./s3/bucket", "{000..009}.tar"):
        assert place(value) == value and local_place(value) == value
    for value in ("s3://bucket/prefix", "gs://bucket/prefix/run", "S3://bucket/x"):
        assert place(value) == value


def test_the_python_api_takes_object_uris_and_refuses_other_schemes(tmp_path, monkeypatch):
    """`driver.run` and `RunInputs` (jobs, notebooks, RUN/inputs.json) name locations without the parser."""
    from asd_ray.config import load_config
    from asd_ray.driver import run
    from asd_ray.errors import ConfigError
    from asd_ray.inputs import RunInputs

    monkeypatch.chdir(tmp_path)
    assert RunInputs(train="s3://bkt/train", test="gs://bkt/test").absolute().test == "gs://bkt/test"
    with pytest.raises(ConfigError, match="^poison-test http://...: .* a http: location is refused"):
        RunInputs(train="/data/train", test="/data/test", poison_test="http://b/t")
    inputs = RunInputs(train=str(tmp_path / "train"), test=str(tmp_path / "test"))
    with pytest.raises(ConfigError, match="^out pipe:...: .* a pipe: location is refused"):
        run(load_config("mnist-quick"), inputs, "pipe:cat")
    assert not list(tmp_path.iterdir())  # nothing written for a refused location
