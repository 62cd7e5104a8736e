"""Every setting is range-checked where the config is built, with its key named."""

import pytest

from asd_ray.config import load_config


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=-1", "seed = -1 is out of range"),
        ("mixmatch.lr=-1", "mixmatch.lr = -1.0 is out of range"),
        ("mixmatch.temperature=0", "mixmatch.temperature = 0.0 is out of range"),
        ("scoring.batch_size=0", "scoring.batch_size = 0 is out of range"),
        ("cluster.threads_per_process=0", "cluster.threads_per_process = 0 is out of range"),
        ("data.crop_padding=-5", "data.crop_padding = -5 is out of range"),
        ("virtual.epochs=-1", "virtual.epochs = -1.0 is out of range"),
        ("mixmatch.lambda_u=.nan", "mixmatch.lambda_u = nan is out of range"),
        ("mixmatch.lambda_u=nan", "mixmatch.lambda_u must be a number, got 'nan'"),
        ("cluster.cpus_per_scorer=-1", "cluster.cpus_per_scorer = -1.0 is out of range"),
        ("cluster.memory_budget_gb=0", "cluster.memory_budget_gb = 0.0 is out of range"),
        ("mixmatch.lr=true", "mixmatch.lr must be a number"),
        ("cluster.worker_resources={CPU: 1}", "cluster.worker_resources = {'CPU': 1.0} is out of range"),
        ("cluster.scorer_resources={host: 0}", "cluster.scorer_resources = {'host': 0.0} is out of range"),
        ("cluster.scorer_resources={'a b': 1}", "cluster.scorer_resources = {'a b': 1.0} is out of range"),
        ("cluster.worker_resources=[1]", "cluster.worker_resources must be a mapping of names to amounts"),
        ("cluster.worker_resources={host: x}", "cluster.worker_resources.host must be a number"),
    ],
)
def test_out_of_range_settings_name_their_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config("mnist-quick", overrides=[override])


def test_custom_resources_are_a_mapping_of_names_to_amounts() -> None:
    config = load_config(
        "mnist-quick", overrides=["cluster.worker_resources={trainer: 1, 'node:10.0.0.2': 0.01}"]
    )
    assert config.cluster.worker_resources == {"trainer": 1.0, "node:10.0.0.2": 0.01}
    assert config.cluster.scorer_resources == {}


def test_every_preset_is_in_range() -> None:
    from asd_ray.config import PRESETS

    for name in PRESETS:
        load_config(name)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--attack", "wanet", "--wanet-s", "nan"], "--wanet-s = nan is out of range"),
        (["--attack", "wanet", "--wanet-s", "inf"], "--wanet-s = inf is out of range"),
        (["--attack", "wanet", "--wanet-k", "1"], "--wanet-k = 1 is out of range"),
        (["--attack", "wanet", "--cross-ratio", "nan"], "--cross-ratio = nan is out of range"),
        (["--attack", "badnets", "--size", "1000000000"], "--size = 1000000000 is out of range"),
        (["--attack", "badnets", "--rate", "nan"], "--rate = nan is out of range"),
        (["--attack", "blend", "--alpha=-0.5"], "--alpha = -0.5 is out of range"),
        (["--attack", "badnets", "--seed=-3"], "--seed = -3 is out of range"),
        (["--attack", "sig", "--sig-delta", "0"], "--sig-delta = 0.0 is out of range"),
        (["--attack", "sig", "--sig-delta", "256"], "--sig-delta = 256.0 is out of range"),
        (["--attack", "sig", "--sig-frequency", "nan"], "--sig-frequency = nan is out of range"),
        (
            ["--attack", "sig", "--sig-frequency", "4"],
            "--sig-frequency 4.0 must be in (0, 4) on images 8 px wide",
        ),
        (["--attack", "adaptive-blend", "--adaptive-grid", "1"], "--adaptive-grid = 1 is out of range"),
        (
            ["--attack", "adaptive-blend", "--adaptive-grid", "9"],
            "--adaptive-grid 9 is larger than these 8x8",
        ),
        (["--attack", "adaptive-blend", "--adaptive-pieces", "0"], "--adaptive-pieces = 0 is out of range"),
        (
            ["--attack", "adaptive-blend", "--adaptive-pieces", "17"],
            "--adaptive-pieces 17 is more than the 16 pieces of a 4x4 --adaptive-grid",
        ),
        (
            ["--attack", "adaptive-blend", "--adaptive-train-alpha", "1.5"],
            "--adaptive-train-alpha = 1.5 is out of range",
        ),
        (
            ["--attack", "adaptive-blend", "--adaptive-test-alpha", "0"],
            "--adaptive-test-alpha = 0.0 is out of range",
        ),
        (
            ["--attack", "adaptive-blend", "--conservatism-ratio=-1"],
            "--conservatism-ratio = -1.0 is out of range",
        ),
        (
            ["--attack", "adaptive-blend", "--rate", "0.6", "--conservatism-ratio", "1"],
            "--rate 0.6 with --conservatism-ratio 1.0 would modify more than every sample",
        ),
    ],
)
def test_every_attack_parameter_has_a_range_named_by_its_flag(tmp_path, capsys, flags, message) -> None:
    """Before its range, ``--wanet-s nan`` exited 0 and wrote black images."""
    from conftest import make_shards

    from asd_ray.cli import main

    make_shards(tmp_path / "clean", n=24, classes=4, size=8, channels=1)
    rate = [] if "--rate" in flags else ["--rate", "0.1"]
    argv = ["poison", "--in", str(tmp_path / "clean"), "--out", str(tmp_path / "out"), "--quiet"]
    code = main([*argv, *rate, *flags])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("field", "value"), [("pgd_steps", 0), ("pgd_eps", float("nan")), ("pgd_step", 2.0), ("wanet_k", 65)]
)
def test_attack_parameters_without_a_flag_have_ranges_too(field, value) -> None:
    from asd_ray.config import AttackConfig
    from asd_ray.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--{field.replace('_', '-')} = {value} is out of range"):
        AttackConfig("clean-label", **{field: value})
