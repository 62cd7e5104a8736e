import numpy as np
import pytest
from conftest import make_shards

from asd_ray.errors import DataError
from asd_ray.seeds import pick_seeds, seeds_from_list


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
