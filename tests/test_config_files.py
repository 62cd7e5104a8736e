"""Config files are user input (one line on anything hostile), presets are values rather
than labels, and a resumed run takes a --config file as it takes --set."""

import os
from pathlib import Path

import pytest
import ray

from asd_ray.cli import main
from asd_ray.config import PRESETS, config_yaml, load_config, load_recorded_config
from asd_ray.errors import ConfigError


@pytest.fixture
def no_ray(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("ray.init was called")

    monkeypatch.setattr(ray, "init", refuse)


def _refused(argv, capsys) -> str:
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2 and not out and len(err.splitlines()) == 1, (code, out, err[:2000])
    return err


def _run(tmp_path, *flags) -> list[str]:
    return [
        "run",
        "--train",
        str(tmp_path / "t"),
        "--test",
        str(tmp_path / "t"),
        "--out",
        str(tmp_path / "run"),
        *flags,
    ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a:\n" + "".join(f"{'  ' * i}b:\n" for i in range(1, 600)), "nested deeper than 32 levels"),
        ("[" * 5000 + "]" * 5000, "nested deeper than 32 levels"),
        ('{"a": ' * 3000 + "1" + "}" * 3000, "nested deeper than 32 levels"),
        ("seed: " + "9" * 5000 + "\n", "a value of 5000 characters at line 1"),
        ('{"seed": ' + "9" * 5000 + "}", "a value of 5000 characters at line 1"),
        ("epochs: [1, *x]\n", "anchors and aliases (&, *) are not accepted at line 1"),
        ("- 1\n- 2\n", "holds a list, not a mapping of config sections"),
    ],
    ids=["block-nesting", "flow-nesting", "json-nesting", "5000-digits", "json-5000-digits", "alias", "list"],
)
def test_a_hostile_config_file_is_one_line(tmp_path, capsys, no_ray, text, message):
    """Deep nesting ended in RecursionError, 5,000 digits in ValueError tracebacks."""
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _refused(_run(tmp_path, "--config", str(path)), capsys)
    assert f"--config {path}: " in err and message in err and len(err) < 400, err[:500]
    assert not (tmp_path / "run").exists()


def test_a_config_file_that_is_no_regular_utf8_file_is_one_line(tmp_path, capsys, no_ray):
    """A FIFO would hang the read, a link to /dev/zero never end it."""
    fifo, link, latin = tmp_path / "fifo.yaml", tmp_path / "zero.yaml", tmp_path / "latin.yaml"
    os.mkfifo(fifo)
    link.symlink_to("/dev/zero")
    latin.write_bytes("seed: 1 # \xe9t\xe9\n".encode("latin-1"))
    for path, message in (
        (fifo, "not a regular file (a FIFO)"),
        (link, "not a regular file (a character device)"),
        (latin, "not UTF-8 text"),
        (tmp_path / "missing.yaml", "unreadable"),
        (tmp_path, "not a regular file (a folder)"),
    ):
        assert message in _refused(_run(tmp_path, "--config", str(path)), capsys)


def test_a_config_file_the_user_links_to_is_read(tmp_path):
    """The user's own file may be a link (a dotfiles folder); its target must be a regular file."""
    real = tmp_path / "real.yaml"
    real.write_text("seed: 5\n")
    (tmp_path / "link.yaml").symlink_to(real)
    assert load_config("mnist-quick", tmp_path / "link.yaml").seed == 5


@pytest.mark.parametrize("name", PRESETS)
def test_config_show_reads_back_as_the_same_config(name, tmp_path, capsys):
    """`config show > f.yaml; run --config f.yaml` runs the shown config, whatever the preset."""
    assert main(["config", "show", "--preset", name, "--set", "seed=3"]) == 0
    shown = capsys.readouterr().out
    path = tmp_path / "shown.yaml"
    path.write_text(shown)
    assert load_config(None, path) == load_config(name, overrides=["seed=3"])
    assert main(["config", "show", "--config", str(path)]) == 0
    assert capsys.readouterr().out == shown


def test_a_preset_is_values_not_a_label(tmp_path, capsys):
    """--set preset=cifar10 relabelled mnist-quick's settings in the model card."""
    err = _refused(["config", "show", "--preset", "mnist-quick", "--set", "preset=cifar10"], capsys)
    assert "preset cannot be overridden" in err and "--preset" in err
    path = tmp_path / "gtsrb.yaml"
    path.write_text("preset: gtsrb\nseed: 4\n")
    config = load_config(None, path)  # the file's preset is the base
    assert (config.preset, config.epochs, config.data.flip, config.seed) == ("gtsrb", 100, False, 4)
    err = _refused(["config", "show", "--preset", "cifar10", "--config", str(path)], capsys)
    assert f"--config {path}: preset gtsrb differs from --preset cifar10" in err
    path.write_text("preset: [gtsrb]\n")
    assert "preset ['gtsrb'] is unknown" in _refused(["config", "show", "--config", str(path)], capsys)


def test_overrides_read_exponents_as_numbers():
    """YAML 1.1 reads 1e-3 as text, so --set mixmatch.lr=1e-3 was refused as not a number."""
    config = load_config("mnist-quick", overrides=["mixmatch.lr=1e-3", "virtual.lr=2E-2"])
    assert (config.mixmatch.lr, config.virtual.lr) == (0.001, 0.02)


def test_a_relative_cache_dir_is_made_absolute_where_the_config_is_built(tmp_path, monkeypatch):
    """Every process (driver, scorers, training workers) resolved it in its own directory."""
    monkeypatch.chdir(tmp_path)
    config = load_config("mnist-quick", overrides=["cluster.cache_dir=caches/x"])
    assert config.cluster.cache_dir == str(tmp_path / "caches" / "x")
    path = tmp_path / "c.yaml"
    path.write_text("cluster:\n  cache_dir: ../y\n")
    assert load_config(None, path).cluster.cache_dir == str(tmp_path / ".." / "y")
    assert load_config(overrides=["cluster.cache_dir=/abs"]).cluster.cache_dir == "/abs"


def _recorded_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(config_yaml(load_config("mnist-quick", overrides=["seed=5"])))
    (run / "inputs.json").write_text('{"train": "t", "test": "t"}')
    return run


def test_resume_applies_a_config_file_like_set(tmp_path, capsys, no_ray):
    """run --resume --config FILE ignored the file; the same change by --set was refused."""
    run = _recorded_run(tmp_path)
    change = tmp_path / "change.yaml"
    change.write_text("split:\n  clean_ratio: 0.3\n")
    for flags in (["--config", str(change)], ["--set", "split.clean_ratio=0.3"]):
        err = _refused(["run", "--resume", "--out", str(run), *flags], capsys)
        assert "split.clean_ratio differs from the run's config" in err
    change.write_text("cluster:\n  workers: 1\nepochs: 20\n")  # what a resumed run may change
    config = load_recorded_config(run / "config.yaml", ["cluster.scorers=3"], change)
    assert (config.cluster.workers, config.cluster.scorers, config.epochs, config.seed) == (1, 3, 20, 5)
    shown = tmp_path / "shown.yaml"
    shown.write_text(config_yaml(load_config("cifar10")))
    err = _refused(["run", "--resume", "--out", str(run), "--config", str(shown)], capsys)
    assert "preset cifar10 differs from the run's preset mnist-quick" in err
    err = _refused(["run", "--resume", "--out", str(run), "--preset", "gtsrb"], capsys)
    assert "the run in" in err and "was made with preset mnist-quick" in err


def test_a_tampered_record_names_the_run_file(tmp_path):
    run = _recorded_run(tmp_path)
    (run / "config.yaml").write_text("seed: -4\n")
    with pytest.raises(Exception, match="seed = -4 is out of range.*restore the run's own file") as caught:
        load_recorded_config(run / "config.yaml")
    assert not isinstance(caught.value, ConfigError)  # a DataError: the run folder is at fault
