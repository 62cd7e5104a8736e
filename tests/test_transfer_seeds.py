"""Seeds from another dataset (the paper's transfer variant): scikit-learn's 8x8 digits,
upscaled to 28x28, as the only trusted data for a BadNets-poisoned MNIST subset, with
and without the transfer pre-training (10 MixMatch epochs on the seeds, then the head).

Slow (two full mnist-quick runs, about 8 minutes): ``python -m pytest -m slow -s tests/test_transfer_seeds.py``.
"""

import json

import numpy as np
import pytest
from PIL import Image

from asd_ray import tables
from asd_ray.config import load_config
from asd_ray.data.shard_writer import write_shards
from asd_ray.data.shards import ShardSet
from asd_ray.data.sources import from_arrays
from asd_ray.seeds import pick_seeds

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def _digits_28px() -> tuple[np.ndarray, np.ndarray]:
    datasets = pytest.importorskip("sklearn.datasets")
    digits = datasets.load_digits()
    small = (digits.images * (255 / 16)).clip(0, 255).astype(np.uint8)  # 8x8, values 0..16
    big = np.stack([np.asarray(Image.fromarray(image).resize((28, 28), Image.BILINEAR)) for image in small])
    return big[..., None], digits.target


@pytest.mark.parametrize("semi_epochs", [0, 10])
def test_sklearn_digits_as_seeds_defend_the_mnist_subset(ray_cluster, tmp_path, semi_epochs):
    import dataclasses

    from asd_ray.demo import prepare_mnist_badnets
    from asd_ray.driver import run

    inputs = prepare_mnist_badnets(tmp_path / "mnist")
    images, labels = _digits_28px()
    write_shards(from_arrays(images, labels, class_names=[str(c) for c in range(10)]), tmp_path / "digits")
    seeds = pick_seeds(ShardSet(tmp_path / "digits"), 10)
    tables.write_parquet(seeds, tmp_path / "digit_seeds.parquet", "seeds")
    inputs = dataclasses.replace(inputs, seeds=str(tmp_path / "digit_seeds.parquet"))
    # Without pre-training, foreign seeds want the noise overlay off (README, Seeds): measured,
    # ACC 89.5% with the default overlay, 97.4% without (the stage-3 guard on in both).
    overlay = [] if semi_epochs else ["mixmatch.noise_overlay=0"]
    config = load_config("mnist-quick", overrides=[f"transfer.semi_epochs={semi_epochs}", *overlay])
    summary = run(config, inputs, tmp_path / "run", progress=print)
    figures = ("acc", "asr", "robust_acc", "max_poison_fraction_clean", "wall_s", "pretrain")
    print(json.dumps({"semi_epochs": semi_epochs, **{k: summary.get(k) for k in figures}}))
    assert summary["seeds_added"] == 100 and summary["seeds_tampered"] == 0
    assert ("pretrain" in summary) == (semi_epochs > 0)
    assert summary["asr"] <= 0.05
    if semi_epochs:
        # The head fit's floor of 390 steps (mnist-quick) makes the pre-trained model read the
        # training set: ACC 95.7% (72.7% with one 33-step epoch). ASD's first stage-1 epochs,
        # trained on the foreign seeds alone, pull it back (61.7% after epoch 0); it ends at
        # 91.4%, below the run without pre-training (README, Seeds).
        assert summary["pretrain"]["acc"] >= 0.90 and summary["pretrain"]["head_steps"] == 390
        assert summary["acc"] >= 0.85
    else:
        assert summary["acc"] >= 0.90
