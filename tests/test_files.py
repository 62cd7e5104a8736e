"""The one reader of small user-handed text files: regular files only, capped, limited nesting."""

import os

import pytest

from asd_ray.errors import ConfigError, DataError
from asd_ray.files import MAX_DEPTH, parse_json, parse_yaml, read_json, read_regular_file, read_text


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: os.mkfifo(p), "not a regular file (a FIFO)"),
        (lambda p: os.symlink("/dev/zero", p), "a symbolic link"),
        (lambda p: os.mkdir(p), "not a regular file (a folder)"),
        (lambda p: None, "unreadable (No such file or directory)"),
        (lambda p: p.write_bytes(b"x" * 101), "larger than the 100-byte limit"),
    ],
)
def test_only_a_regular_file_under_the_cap_is_read(tmp_path, make, message) -> None:
    """A FIFO used to hang a reader, a link to /dev/zero to read until memory ran out."""
    path = tmp_path / "file"
    make(path)
    with pytest.raises(
        DataError, match=f"^{path}: .*{message}.*; fix it$".replace("(", r"\(").replace(")", r"\)")
    ):
        read_regular_file(path, what=str(path), fix="fix it", limit=100)


def test_a_link_to_a_readable_secret_is_not_followed(tmp_path) -> None:
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE")
    (tmp_path / "config.yaml").symlink_to(secret)
    with pytest.raises(DataError, match="a symbolic link"):
        read_text(tmp_path / "config.yaml", fix="restore it")


def test_the_error_type_is_the_callers(tmp_path) -> None:
    with pytest.raises(ConfigError, match="^--config x: unreadable"):
        read_regular_file(tmp_path / "x", what="--config x", fix="check the path", error=ConfigError)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:\n" + "".join(" " * i + "b:\n" for i in range(1, 3000)), "nested deeper than 32 levels"),
        ("[" * 5000 + "]" * 5000, "nested deeper than 32 levels"),
        ("{a: " * 5000 + "1" + "}" * 5000, "nested deeper than 32 levels"),
        ("seed: " + "9" * 5000, "a value of 5000 characters at line 1"),
        ("a: &x [1]\nb: *x", "anchors and aliases"),
        ("a: [1, 2", "not valid YAML at line 1"),
    ],
)
def test_yaml_limits_are_checked_before_anything_is_built(text, message) -> None:
    """Each of these was a RecursionError, ValueError or MemoryError traceback."""
    with pytest.raises(DataError, match=message):
        parse_yaml(text, what="f", fix="fix it")


def test_yaml_reads_exponents_as_numbers_and_keeps_plain_values() -> None:
    values = parse_yaml(
        "lr: 1e-3\nb: 2.5E+2\nn: 7\nflag: false\nname: x1e3\ndeep: "
        + "[" * (MAX_DEPTH - 1)
        + "]" * (MAX_DEPTH - 1),
        what="f",
        fix="-",
    )
    assert values["lr"] == 0.001 and values["b"] == 250.0 and values["n"] == 7 and values["flag"] is False
    assert values["name"] == "x1e3"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, "nested deeper than 32 levels"),
        ('{"a": ' + "9" * 5000 + "}", "a number over 4096 characters"),
        ("{", "not valid JSON"),
    ],
)
def test_json_limits_are_checked_before_parsing(text, message) -> None:
    with pytest.raises(DataError, match=message):
        parse_json(text, what="f", fix="fix it")


def test_json_brackets_inside_strings_do_not_count(tmp_path) -> None:
    path = tmp_path / "inputs.json"
    path.write_text('{"train": "' + "[" * 100 + '\\"", "n": [1]}')
    assert read_json(path, fix="-")["n"] == [1]
