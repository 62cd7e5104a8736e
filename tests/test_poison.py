import json
import math

import numpy as np
import pytest
from conftest import local_records, make_shards

from asd_ray import tables
from asd_ray.attacks.adaptive_blend import piece_index
from asd_ray.attacks.badnets import BADNETS_32PX_PATCH
from asd_ray.attacks.blend import blend_trigger
from asd_ray.attacks.poison import plan_poison, poison_shards, poison_test_shards
from asd_ray.attacks.sig import add_signal, sig_signal
from asd_ray.attacks.trigger import apply_trigger
from asd_ray.config import AttackConfig
from asd_ray.data.shard_layout import GROUND_TRUTH_FILE
from asd_ray.data.shards import ShardSet
from asd_ray.errors import DataError


def _binomial_interval(n: int, p: float, z: float = 4.0) -> tuple[float, float]:
    """Count bounds at z standard deviations (false alarm < 1e-4)."""
    sd = math.sqrt(n * p * (1 - p))
    return n * p - z * sd, n * p + z * sd


@pytest.mark.parametrize("rate", [0.01, 0.05, 0.2])
def test_observed_poison_rate_is_within_binomial_bounds(rate):
    labels = np.arange(20_000) % 10
    plan = plan_poison(labels, 10, AttackConfig("badnets", rate=rate, target=3, seed=7))
    eligible = int((labels != 3).sum())
    lo, hi = _binomial_interval(eligible, rate)
    assert lo <= plan.is_poison.sum() <= hi
    assert not plan.is_poison[labels == 3].any()
    assert (plan.label_after[plan.is_poison] == 3).all()
    np.testing.assert_array_equal(plan.label_after[~plan.is_poison], labels[~plan.is_poison])


def test_plan_is_seeded():
    labels = np.arange(1000) % 10
    a = plan_poison(labels, 10, AttackConfig("badnets", rate=0.1, seed=1))
    b = plan_poison(labels, 10, AttackConfig("badnets", rate=0.1, seed=1))
    c = plan_poison(labels, 10, AttackConfig("badnets", rate=0.1, seed=2))
    np.testing.assert_array_equal(a.is_poison, b.is_poison)
    assert (a.is_poison != c.is_poison).any()


def test_all2all_and_clean_label_plans():
    labels = np.arange(10_000) % 10
    plan = plan_poison(labels, 10, AttackConfig("all2all", rate=0.05))
    np.testing.assert_array_equal(plan.label_after[plan.is_poison], (labels[plan.is_poison] + 1) % 10)
    lo, hi = _binomial_interval(10_000, 0.05)
    assert lo <= plan.is_poison.sum() <= hi
    clean_label = plan_poison(labels, 10, AttackConfig("clean-label", rate=0.25, target=2))
    assert clean_label.is_poison.sum() == 250 and (labels[clean_label.is_poison] == 2).all()
    np.testing.assert_array_equal(clean_label.label_after, labels)


def test_wanet_noise_samples_keep_their_labels():
    labels = np.arange(10_000) % 10
    plan = plan_poison(labels, 10, AttackConfig("wanet", rate=0.1, target=0))
    assert not (plan.is_cover & plan.is_poison).any()
    lo, hi = _binomial_interval(int((~plan.is_poison).sum()), 0.2)
    assert lo <= plan.is_cover.sum() <= hi
    np.testing.assert_array_equal(plan.label_after[plan.is_cover], labels[plan.is_cover])


def test_recorded_parameters_keep_their_names_and_order():
    """Every ground-truth row and dataset.json records to_dict(); a new parameter may only come after."""
    recorded = list(AttackConfig("badnets").to_dict())
    assert recorded[:23] == [
        *("attack", "rate", "target", "seed", "trigger", "pattern_file", "location", "size", "alpha"),
        *("wanet_k", "wanet_s", "wanet_noise", "cross_ratio", "pgd_eps", "pgd_step", "pgd_steps"),
        *("sig_delta", "sig_frequency", "adaptive_grid", "adaptive_pieces", "adaptive_train_alpha"),
        *("adaptive_test_alpha", "conservatism_ratio"),
    ]


def test_target_outside_the_classes_is_a_clear_error():
    with pytest.raises(DataError, match="--target 12 is not a class.*10 classes"):
        plan_poison(np.arange(100) % 10, 10, AttackConfig("badnets", target=12))


def test_badnets_shards_are_pixel_exact_and_keep_clean_bytes(tmp_path, train_set):
    config = AttackConfig("badnets", rate=0.3, target=1, seed=3)
    summary = poison_shards(train_set, tmp_path / "bad", config)
    poisoned = ShardSet(tmp_path / "bad")
    truth = tables.read_parquet(tmp_path / "bad" / GROUND_TRUTH_FILE, "poison").to_pydict()
    clean_images, clean_labels = train_set.load_arrays()
    images, labels = poisoned.load_arrays()
    is_poison = np.array(truth["is_poison"])
    # the seeded draw: 39 of the 150 non-target samples at rate 0.3 (binomial mean 45, sd 5.6),
    # each relabelled in the shards themselves
    assert summary["poisoned"] == is_poison.sum() == (labels != clean_labels).sum() == 39
    expected = clean_images[is_poison].copy()
    expected[:, 4:6, 4:6, :] = BADNETS_32PX_PATCH
    np.testing.assert_array_equal(images[is_poison], expected)
    np.testing.assert_array_equal(images[~is_poison], clean_images[~is_poison])
    np.testing.assert_array_equal(labels, np.array(truth["label_after"]))
    np.testing.assert_array_equal(clean_labels, np.array(truth["original_label"]))
    assert json.loads(truth["params"][0])["target"] == 1
    clean_bytes = {k: m for _, k, m in local_records(train_set.paths[0])}
    for _, key, members in local_records(poisoned.paths[0]):
        if not is_poison[int(key)]:
            assert members["png"] == clean_bytes[key]["png"]


def test_poisoning_is_reproducible(tmp_path, train_set):
    config = AttackConfig("blend", rate=0.2, target=0, seed=5)
    poison_shards(train_set, tmp_path / "a", config)
    poison_shards(train_set, tmp_path / "b", config)
    for name in ("train-000000.tar", GROUND_TRUTH_FILE):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@pytest.mark.parametrize("attack", ["badnets", "blend", "wanet", "clean-label", "sig", "adaptive-blend"])
def test_asr_test_set_excludes_the_target_class(tmp_path, test_set, attack):
    config = AttackConfig(attack, rate=0.1, target=2)
    summary = poison_test_shards(test_set, tmp_path / "asr", config)
    asr = ShardSet(tmp_path / "asr")
    truth = tables.read_parquet(tmp_path / "asr" / GROUND_TRUTH_FILE, "poison").to_pydict()
    assert summary["test_samples"] == len(asr) == int((test_set.labels != 2).sum())
    assert (asr.labels == 2).all()
    assert 2 not in truth["original_label"] and all(truth["is_poison"])
    clean_images, _ = test_set.load_arrays()
    images, _ = asr.load_arrays()
    assert (images != clean_images[test_set.labels != 2]).any(axis=(1, 2, 3)).all()


def test_all2all_test_set_shifts_every_label(tmp_path, test_set):
    poison_test_shards(test_set, tmp_path / "asr", AttackConfig("all2all", rate=0.1))
    asr = ShardSet(tmp_path / "asr")
    np.testing.assert_array_equal(asr.labels, (test_set.labels + 1) % 4)


def test_mixed_sizes_or_existing_output_leave_nothing_behind(tmp_path, train_set):
    (tmp_path / "taken").mkdir()
    with pytest.raises(DataError, match="already exists"):
        poison_shards(train_set, tmp_path / "taken", AttackConfig("badnets"))
    with pytest.raises(DataError, match="not a class"):
        poison_shards(train_set, tmp_path / "new", AttackConfig("badnets", target=9))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken", "train"]


def test_large_images_get_a_32px_patch_upper_left(tmp_path):
    shards = make_shards(tmp_path / "big", n=12, size=96, classes=2)
    poison_test_shards(shards, tmp_path / "asr", AttackConfig("badnets", target=0))
    asr, clean = ShardSet(tmp_path / "asr"), shards.load_arrays()[0][shards.labels != 0]
    images = asr.load_arrays()[0]
    # JPEG is lossy: the patch region differs strongly, the far corner hardly
    assert np.abs(images[:, :32, :32].astype(int) - clean[:, :32, :32]).mean() > 20
    assert np.abs(images[:, 64:, 64:].astype(int) - clean[:, 64:, 64:]).mean() < 8


# ---- SIG and adaptive blend ------------------------------------------------------------


def _truth(folder) -> dict:
    return tables.read_parquet(folder / GROUND_TRUTH_FILE, "poison").to_pydict()


def test_sig_plan_poisons_exactly_rate_of_the_target_class_and_keeps_labels():
    labels = np.arange(1000) % 10
    plan = plan_poison(labels, 10, AttackConfig("sig", rate=0.33, target=4))
    assert plan.is_poison.sum() == 33 and (labels[plan.is_poison] == 4).all()  # round(0.33 * 100)
    assert not plan.is_cover.any()
    np.testing.assert_array_equal(plan.label_after, labels)


def test_sig_shards_add_the_signal_to_the_chosen_target_images_only(tmp_path, train_set):
    config = AttackConfig("sig", rate=0.3, target=1, seed=2)
    summary = poison_shards(train_set, tmp_path / "sig", config)
    truth = _truth(tmp_path / "sig")
    is_poison = np.array(truth["is_poison"])
    clean_images, clean_labels = train_set.load_arrays()
    images, labels = ShardSet(tmp_path / "sig").load_arrays()
    assert summary["poisoned"] == is_poison.sum() == 15 and summary["cover"] == 0  # round(0.3 * 50)
    assert (clean_labels[is_poison] == 1).all() and np.array_equal(labels, clean_labels)
    assert truth["is_modified"] == truth["is_poison"]
    expected = add_signal(clean_images[is_poison], sig_signal(32, 32, 3, delta=20, frequency=6))
    np.testing.assert_array_equal(images[is_poison], expected)
    np.testing.assert_array_equal(images[~is_poison], clean_images[~is_poison])


def test_sig_test_set_carries_the_signal_on_non_target_images(tmp_path, test_set):
    config = AttackConfig("sig", rate=0.1, target=2, sig_delta=30, sig_frequency=4)
    poison_test_shards(test_set, tmp_path / "asr", config)
    images, labels = ShardSet(tmp_path / "asr").load_arrays()
    clean_images, _ = test_set.load_arrays()
    expected = add_signal(clean_images[test_set.labels != 2], sig_signal(32, 32, 3, delta=30, frequency=4))
    np.testing.assert_array_equal(images, expected)
    assert (labels == 2).all()


def test_adaptive_blend_plan_draws_poison_and_as_many_covers_that_keep_their_labels():
    labels = np.arange(10_000) % 10
    plan = plan_poison(labels, 10, AttackConfig("adaptive-blend", rate=0.05, target=3, seed=4))
    lo, hi = _binomial_interval(9000, 0.05)
    assert lo <= plan.is_poison.sum() <= hi and (plan.label_after[plan.is_poison] == 3).all()
    assert plan.is_cover.sum() == plan.is_poison.sum() and not (plan.is_cover & plan.is_poison).any()
    assert not plan.is_cover[labels == 3].any()
    np.testing.assert_array_equal(plan.label_after[~plan.is_poison], labels[~plan.is_poison])
    half = plan_poison(
        labels, 10, AttackConfig("adaptive-blend", rate=0.05, target=3, conservatism_ratio=0.5)
    )
    assert half.is_cover.sum() == round(0.5 * half.is_poison.sum())
    none = plan_poison(labels, 10, AttackConfig("adaptive-blend", rate=0.05, target=3, conservatism_ratio=0))
    assert not none.is_cover.any()


def test_adaptive_blend_without_enough_samples_for_its_covers_is_a_clear_error():
    # 8 samples, 6 outside target 0, seed 2 poisons 4 of them: 4 covers, 2 candidates left
    with pytest.raises(DataError, match="--conservatism-ratio 1.0 asks for 4 cover samples but only 2"):
        plan_poison(np.arange(8) % 4, 4, AttackConfig("adaptive-blend", rate=0.5, seed=2))


def test_adaptive_blend_shards_carry_the_configured_pieces_at_the_training_alpha(tmp_path, train_set):
    config = AttackConfig("adaptive-blend", rate=0.2, target=0, seed=1, adaptive_pieces=5)
    summary = poison_shards(train_set, tmp_path / "ab", config)
    truth = _truth(tmp_path / "ab")
    is_poison, is_modified = np.array(truth["is_poison"]), np.array(truth["is_modified"])
    is_cover = is_modified & ~is_poison
    clean_images, clean_labels = train_set.load_arrays()
    images, labels = ShardSet(tmp_path / "ab").load_arrays()
    # the seeded draw: 22 of the 150 non-target samples at rate 0.2 (binomial mean 30, sd 4.9),
    # relabelled in the shards, and as many covers (conservatism ratio 1)
    assert summary["poisoned"] == is_poison.sum() == (labels != clean_labels).sum() == 22
    assert summary["cover"] == is_cover.sum() == 22
    assert (labels[is_poison] == 0).all() and (clean_labels[is_poison | is_cover] != 0).all()
    np.testing.assert_array_equal(labels[~is_poison], clean_labels[~is_poison])  # covers keep theirs
    np.testing.assert_array_equal(np.array(truth["label_after"]), labels)
    np.testing.assert_array_equal(images[~is_modified], clean_images[~is_modified])
    # Each modified image, poisoned or cover, is the full pattern at alpha 0.15 on exactly 5
    # of its 16 8x8 pieces and the clean image on the others.
    blended = apply_trigger(clean_images, blend_trigger(32, 32, 3, alpha=0.15, seed=1))
    cells = piece_index(32, 32, 4)
    pieces_of = []
    for i in np.flatnonzero(is_modified):
        kept = [c for c in range(16) if (images[i][cells == c] != clean_images[i][cells == c]).any()]
        inside = np.isin(cells, kept)
        np.testing.assert_array_equal(images[i][inside], blended[i][inside])
        pieces_of.append(tuple(kept))
        assert len(kept) == 5, (i, kept)
    assert len(set(pieces_of)) > len(pieces_of) // 2  # drawn per image


def test_adaptive_blend_test_set_is_the_full_pattern_at_the_test_alpha(tmp_path, test_set):
    config = AttackConfig("adaptive-blend", rate=0.1, target=2, seed=3, adaptive_test_alpha=0.3)
    poison_test_shards(test_set, tmp_path / "asr", config)
    images, labels = ShardSet(tmp_path / "asr").load_arrays()
    clean_images, _ = test_set.load_arrays()
    expected = apply_trigger(clean_images[test_set.labels != 2], blend_trigger(32, 32, 3, alpha=0.3, seed=3))
    np.testing.assert_array_equal(images, expected)
    assert (labels == 2).all()
