import numpy as np
import pytest
from conftest import make_shards

from asd_ray import tables
from asd_ray.data.shards import ShardSet
from asd_ray.errors import DataError
from asd_ray.seeds import foreign_seed_warning, pick_seeds, seeds_from_list


def test_picks_w_per_class_reproducibly(train_set):
    table = pick_seeds(train_set, 10, seed=4)
    labels = np.array(table.column("label"))
    assert table.num_rows == 40 and np.bincount(labels).tolist() == [10] * 4
    ids = np.array(table.column("sample_id"))
    np.testing.assert_array_equal(train_set.labels[ids], labels)
    assert pick_seeds(train_set, 10, seed=4).equals(table)
    assert not pick_seeds(train_set, 10, seed=5).equals(table)
    assert set(table.column("dataset").to_pylist()) == {str(train_set.folder)}


def test_excluded_samples_are_never_drawn(train_set):
    exclude = np.zeros(len(train_set), bool)
    exclude[::3] = True
    table = pick_seeds(train_set, 10, exclude=exclude, method="ground-truth-clean")
    assert not exclude[np.array(table.column("sample_id"))].any()
    assert table.column("method")[0].as_py() == "ground-truth-clean"


def test_too_few_samples_in_a_class(tmp_path):
    shards = make_shards(tmp_path / "s", n=30, classes=4)  # 7 or 8 per class
    with pytest.raises(DataError, match="class 2 \\('c2'\\).*only 7 usable.*lower --per-class"):
        pick_seeds(shards, 8)


def test_user_list_by_key_or_id(train_set):
    table = seeds_from_list(train_set, ["000000005", "7"])
    assert table.column("sample_id").to_pylist() == [5, 7]
    with pytest.raises(DataError, match="neither a key nor a sample id"):
        seeds_from_list(train_set, ["nope"])


def test_plan_seeds_tells_tampered_seeds_by_label_and_by_pixels(tmp_path):
    from asd_ray.attacks.poison import poison_shards
    from asd_ray.config import AttackConfig
    from asd_ray.seeds import plan_seeds

    clean = make_shards(tmp_path / "clean", n=60, size=16, channels=1, classes=3, per_shard=30)
    seeds = pick_seeds(clean, 5, seed=1)
    for attack, rate in (("badnets", 0.3), ("clean-label", 1.0)):  # relabels / keeps labels, alters pixels
        out = tmp_path / attack
        poison_shards(clean, out, AttackConfig(attack, rate=rate, target=0))
        train = ShardSet(out)
        modified = (
            tables.read_parquet(out / "poison.parquet", "poison")
            .column("is_modified")
            .to_numpy(zero_copy_only=False)
        )
        plan = plan_seeds(train, seeds, 5, where="seeds")
        ids = seeds.column("sample_id").to_numpy()
        assert plan.tampered.tolist() == sorted(ids[modified[ids]].tolist()), attack
        assert plan.in_place.tolist() == sorted(ids[~modified[ids]].tolist())
        assert plan.num_extras == plan.tampered.size
        assert plan.num_foreign == 0 and foreign_seed_warning(plan, 0.2, 0) is None  # trusted copies


def test_seeds_from_another_dataset_are_all_added(tmp_path):
    from asd_ray.seeds import plan_seeds

    train = make_shards(tmp_path / "train", n=60, size=16, channels=1, classes=3, per_shard=30)
    other = make_shards(tmp_path / "other", n=30, size=16, channels=1, classes=3, per_shard=30, seed=5)
    plan = plan_seeds(train, pick_seeds(other, 4), 4, where="seeds")
    assert plan.in_place.size == 0 and plan.tampered.size == 0 and plan.num_extras == plan.num_foreign == 12
    small = make_shards(tmp_path / "small", n=30, size=8, channels=1, classes=3, per_shard=30)
    with pytest.raises(DataError, match="same --image-size"):
        plan_seeds(train, pick_seeds(small, 4), 4, where="seeds")


def test_seeds_from_another_dataset_under_the_noise_overlay_get_a_warning(tmp_path):
    """Foreign seeds without pre-training: the run advises turning the overlay off, and only then."""
    from asd_ray.seeds import plan_seeds

    train = make_shards(tmp_path / "train", n=60, size=16, channels=1, classes=3, per_shard=30)
    other = make_shards(tmp_path / "other", n=30, size=16, channels=1, classes=3, per_shard=30, seed=5)
    foreign = plan_seeds(train, pick_seeds(other, 4), 4, where="seeds")
    own = plan_seeds(train, pick_seeds(train, 4), 4, where="seeds")
    warning = foreign_seed_warning(foreign, 0.2, 0)
    assert "12 seed(s) come from another dataset" in warning
    assert "--set mixmatch.noise_overlay=0" in warning
    assert foreign_seed_warning(foreign, 0.0, 0) is None  # the overlay is off
    assert foreign_seed_warning(foreign, 0.2, 10) is None  # transfer pre-training runs first
    assert foreign_seed_warning(own, 0.2, 0) is None and foreign_seed_warning(None, 0.2, 0) is None
