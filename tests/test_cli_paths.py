"""Every path argument of every command is a local path: a URI is refused in one line.

``pathlib`` reads ``s3://bucket/x`` as ``s3:/bucket/x``, so ``shards make --out s3://bucket/x``
wrote a local folder ``./s3:/bucket/x`` and exited 0. The arguments are found in the parser
itself, so a path flag added later is covered (or named here as not a path).
"""

import argparse

import pytest

from asd_ray.cli import build_parser, main
from asd_ray.cli.common import local_path

# Text arguments that are not paths: a shard-file prefix, an epoch, a config override, code.
NOT_PATHS = {
    ("shards", "make", "--name"),
    ("shards", "import", "--name"),
    ("run", "--set"),
    ("config", "show", "--set"),
    ("evaluate", "--factory"),
    ("audit", "flagged", "--epoch"),
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
    """(command words, argument, takes a path) of every argument that takes free text."""
    for words, parser in _commands(build_parser()):
        for action in parser._actions:
            if action.nargs == 0 or action.choices is not None or action.type not in (None, str, local_path):
                continue  # a switch, a choice or a number
            name = action.option_strings[-1] if action.option_strings else action.dest
            yield words, name, action.type is local_path


def test_every_text_argument_is_a_path_or_named_as_not_one():
    unnamed = [
        (*words, name)
        for words, name, is_path in _text_arguments()
        if not is_path and (*words, name) not in NOT_PATHS
    ]
    assert unnamed == [], "give these type=local_path, or add them to NOT_PATHS"
    paths = {(*words, name) for words, name, is_path in _text_arguments() if is_path}
    assert ("shards", "make", "--out") in paths and ("report", "run") in paths and len(paths) >= 30


PATH_ARGUMENTS = [(words, name) for words, name, is_path in _text_arguments() if is_path]


@pytest.mark.parametrize(
    ("words", "name"), PATH_ARGUMENTS, ids=[" ".join((*w, n)) for w, n in PATH_ARGUMENTS]
)
def test_a_uri_for_any_path_argument_is_one_line_and_exit_2(words, name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    value = [name, "s3://bucket/x"] if name.startswith("-") else ["s3://bucket/x"]
    with pytest.raises(SystemExit) as exit_info:
        main([*words, *value])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1
    assert f"argument {name}: s3://bucket/x: object storage is not supported yet; give a local path" in err
    assert not list(tmp_path.iterdir())  # nothing written, not even ./s3:


def test_a_file_uri_asks_for_the_path_itself_and_plain_paths_pass(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["shards", "inspect", "file:///data/train"])
    assert exit_info.value.code == 2
    assert "file:///data/train: give the local path itself, not a file:// URI" in capsys.readouterr().err
    for value in ("/data/s3:bucket", "runs/a:b", "C:/data", "./s3/bucket", "{000..009}.tar"):
        assert local_path(value) == value


def test_the_python_api_refuses_a_uri_too(tmp_path, monkeypatch):
    """`driver.run` and `RunInputs` (jobs, notebooks, RUN/inputs.json) name paths without the parser."""
    from asd_ray.config import load_config
    from asd_ray.driver import run
    from asd_ray.errors import ConfigError
    from asd_ray.inputs import RunInputs

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="^poison-test gs://b/t: object storage is not supported yet"):
        RunInputs(train="/data/train", test="/data/test", poison_test="gs://b/t")
    inputs = RunInputs(train=str(tmp_path / "train"), test=str(tmp_path / "test"))
    with pytest.raises(ConfigError, match="^out s3://b/run: object storage is not supported yet"):
        run(load_config("mnist-quick"), inputs, "s3://b/run")
    assert not list(tmp_path.iterdir())  # no ./s3: folder
