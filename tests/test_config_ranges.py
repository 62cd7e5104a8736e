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
    ],
)
def test_out_of_range_settings_name_their_key(override: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_config("mnist-quick", overrides=[override])


def test_every_preset_is_in_range() -> None:
    from asd_ray.config import PRESETS

    for name in PRESETS:
        load_config(name)
