"""ASD's split on hand-worked examples, plus a golden split for a fixed seed (no Ray)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from asd_ray import tables
from asd_ray.config import SplitConfig
from asd_ray.errors import ConfigError, DataError
from asd_ray.split import (
    choice_num,
    clean_mask_stage1,
    clean_mask_stage2,
    clean_mask_stage3,
    make_split,
    split_summary,
    stage_of,
    suspicion,
    unlabeled_pool,
)

GOLDEN = Path(__file__).parent / "golden" / "split_golden.json"
# the paper's split (no stage-3 guard)
SMALL = SplitConfig(grow_every=5, grow_by=3, stage2_epoch=10, stage3_epoch=20, meta_loss_guard=0)

# Stage-1 example: 2 classes, seeds 2 (class 0) and 6 (class 1, with a high loss).
# class 0 candidates by (loss, id): 5 (.2), 9 (.3), 0 (.5), 4 (.5), 7 (.5)
# class 1 candidates by (loss, id): 3 (.4), 8 (.4), 1 (.9)
S1_LABELS = np.array([0, 1, 0, 1, 0, 0, 1, 0, 1, 0])
S1_LOSSES = np.array([0.5, 0.9, 0.1, 0.4, 0.5, 0.2, 5.0, 0.5, 0.4, 0.3], np.float32)
S1_SEEDS = np.array([2, 6])
S1_RANKS = [2, 2, -1, 0, 3, 0, -1, 4, 1, 1]


def scores_table(labels, losses, ids=None) -> pa.Table:
    ids = np.arange(len(labels)) if ids is None else ids
    return tables.from_pydict({"sample_id": ids, "label": labels, "loss": losses}, "scores")


def random_scores(n: int, classes: int, rng: np.random.Generator, *, decimals: int = 1):
    """Balanced labels and losses rounded to force many ties."""
    labels = np.arange(n) % classes
    return labels, np.round(rng.random(n), decimals).astype(np.float32)


def ids_of(mask: np.ndarray) -> list[int]:
    return np.flatnonzero(mask).tolist()


def clean_ids(split: pa.Table) -> list[int]:
    return [i for i, p in zip(split["sample_id"].to_pylist(), split["pool"].to_pylist()) if p == "clean"]


# --- schedule -------------------------------------------------------------------------


def test_stage_and_choice_schedule_with_defaults():
    config = SplitConfig()
    for epoch in range(121):
        assert choice_num(epoch, config) == 10 * (epoch // 5), epoch
        assert stage_of(epoch, config) == (1 if epoch < 60 else 2 if epoch < 90 else 3), epoch
    assert [choice_num(e, config) for e in range(16)] == [0] * 5 + [10] * 5 + [20] * 5 + [30]
    assert [stage_of(e, config) for e in (0, 59, 60, 89, 90, 120)] == [1, 1, 2, 2, 3, 3]


def test_schedule_with_other_settings_and_bad_epoch():
    assert [choice_num(e, SMALL) for e in (0, 4, 5, 9, 10, 14, 15)] == [0, 0, 3, 3, 6, 6, 9]
    with pytest.raises(ValueError, match="epoch -1 must be >= 0"):
        stage_of(-1, SMALL)
    with pytest.raises(ValueError, match="epoch -1 must be >= 0"):
        choice_num(-1, SMALL)


# --- stage 1 ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "choice, expected",
    [
        (0, [2, 6]),  # seeds only
        (1, [2, 3, 5, 6]),  # class 1: 3 beats 8 at equal loss .4 by id
        (3, [0, 1, 2, 3, 5, 6, 8, 9]),  # class 0: 0 beats 4 and 7 at equal loss .5 by id
        (4, [0, 1, 2, 3, 4, 5, 6, 8, 9]),  # class 1 has only 3 candidates: all taken
        (9, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
    ],
)
def test_stage1_hand_worked(choice, expected):
    is_seed = np.isin(np.arange(10), S1_SEEDS)
    clean, rank = clean_mask_stage1(S1_LABELS, S1_LOSSES, is_seed, 2, choice)
    assert ids_of(clean) == expected
    assert rank.dtype == np.int64 and rank.tolist() == S1_RANKS


def test_stage1_table():
    split = make_split(
        5, scores_table(S1_LABELS, S1_LOSSES), config=SMALL, num_classes=2, seed_ids=S1_SEEDS
    )  # choice 3
    assert split.schema.equals(tables.schema("splits"))
    assert clean_ids(split) == [0, 1, 2, 3, 5, 6, 8, 9]
    assert split["rank"].to_pylist() == S1_RANKS
    assert split["stage"].to_pylist() == [1] * 10
    assert split["is_seed"].to_pylist() == [i in (2, 6) for i in range(10)]
    for name in ("meta_loss", "loss_reduction", "is_poison", "original_label"):
        assert split[name].null_count == 10, name
    assert split_summary(split) == {
        "stage": 1,
        "clean_pool": 8,
        "polluted_pool": 2,
        "seeds": 2,
        "seeds_in_clean": 2,
        "clean_per_class": [4, 4],
    }


def test_stage1_needs_seeds_when_choice_is_zero():
    with pytest.raises(DataError, match="seeds are needed"):
        clean_mask_stage1(S1_LABELS, S1_LOSSES, np.zeros(10, bool), 2, 0)
    scores = scores_table(S1_LABELS, S1_LOSSES)
    with pytest.raises(DataError, match="seeds are needed"):
        make_split(0, scores, config=SMALL, num_classes=2, seed_ids=np.array([], np.int64))
    # Without seeds (they come from another dataset) stage 1 works once choice_num > 0.
    split = make_split(5, scores, config=SMALL, num_classes=2, seed_ids=np.array([]))
    assert clean_ids(split) == [1, 2, 3, 5, 8, 9]


# --- stages 2 and 3 ---------------------------------------------------------------------


def test_stage2_hand_worked():
    # order by (loss, id): 3 (.05), 1 (.1), 6 (.2), 0 (.3), 2 (.3), 4 (.3), 5 (2.0)
    losses = np.array([0.3, 0.1, 0.3, 0.05, 0.3, 2.0, 0.2], np.float32)
    clean, rank = clean_mask_stage2(losses, 0.6)  # floor(4.2) = 4: 0 wins the .3 tie
    assert ids_of(clean) == [0, 1, 3, 6]
    assert rank.tolist() == [3, 1, 4, 0, 5, 6, 2]
    assert ids_of(clean_mask_stage2(losses, 0.5)[0]) == [1, 3, 6]  # floor(3.5) = 3


def test_stage2_does_not_force_seeds():
    losses = np.array([0.3, 0.1, 0.3, 0.05, 0.3, 2.0, 0.2], np.float32)
    scores = scores_table(np.zeros(7, np.int32), losses)
    split = make_split(12, scores, config=SMALL, num_classes=1, seed_ids=np.array([5]))
    assert clean_ids(split) == [1, 3, 6]  # clean_ratio 0.5
    assert split["is_seed"].to_pylist()[5] and split["pool"].to_pylist()[5] == "polluted"
    assert split_summary(split)["seeds_in_clean"] == 0


# losses - meta = reduction:  [-.5, 0, 1, -.25, .5, -.5]; order 0, 5, 3, 1, 4, 2
S3_LOSSES = np.array([1.0, 0.5, 2.0, 0.25, 0.75, 3.0], np.float32)
S3_META = np.array([1.5, 0.5, 1.0, 0.5, 0.25, 3.5], np.float32)


@pytest.mark.parametrize("ratio, expected", [(0.5, [0, 3, 5]), (0.2, [0])])  # 0 beats 5 by id
def test_stage3_hand_worked(ratio, expected):
    clean, rank = clean_mask_stage3(S3_LOSSES, S3_META, ratio)
    assert ids_of(clean) == expected
    assert rank.tolist() == [0, 3, 5, 2, 4, 1]


def stage3_split(meta=S3_META, config=SMALL, **pinned) -> pa.Table:
    """Epoch 25's split of the stage-3 example (labels 0, 1, 0, 1, 0, 1; seed 2)."""
    labels = np.array([0, 1, 0, 1, 0, 1])
    return make_split(
        25,
        scores_table(labels, S3_LOSSES),
        config=config,
        num_classes=2,
        seed_ids=np.array([2]),
        meta_scores=scores_table(labels, meta),
        **pinned,
    )


def test_stage3_table():
    split = stage3_split()
    assert clean_ids(split) == [0, 3, 5]
    assert split["stage"].to_pylist() == [3] * 6
    assert split["meta_loss"].to_pylist() == S3_META.tolist()
    assert split["loss_reduction"].to_pylist() == [-0.5, 0.0, 1.0, -0.25, 0.5, -0.5]
    assert split_summary(split)["clean_per_class"] == [1, 2]


@pytest.mark.parametrize(
    "guard, ranks",
    [
        (0.17, [0, 2, 4, 1, 3, 5]),  # 1 guarded: 5 (loss 3.0) ranks last
        (0.34, [0, 2, 5, 1, 3, 4]),  # 2 guarded: 5 and 2, by reduction among themselves
    ],
)
def test_stage3_guard_keeps_the_highest_losses_out_of_the_clean_pool(guard, ranks):
    """split.meta_loss_guard: sample 5 has the lowest reduction but the highest loss."""
    clean, rank = clean_mask_stage3(S3_LOSSES, S3_META, 0.5, guard)
    assert ids_of(clean) == [0, 1, 3]
    assert rank.tolist() == ranks


def test_stage3_guard_breaks_loss_ties_by_sample_id_and_keeps_the_pool_size():
    losses = np.ones(4, np.float32)
    clean, rank = clean_mask_stage3(losses, np.zeros(4, np.float32), 0.5, 0.25)
    assert ids_of(clean) == [0, 1] and rank.tolist() == [0, 1, 2, 3]  # 3 is the one guarded
    rng = np.random.default_rng(7)
    for _ in range(20):
        losses, meta = (np.round(rng.random(50), 1).astype(np.float32) for _ in range(2))
        clean, _ = clean_mask_stage3(losses, meta, 0.5, 0.3)
        highest = np.lexsort((np.arange(50), losses))[-15:]
        assert clean.sum() == 25 and not clean[highest].any()


def test_stage3_table_with_the_guard_counts_only_ranked_samples():
    """The guard is a share of the ranked samples: a trusted copy is clean and never guarded."""
    meta = S3_META.copy()
    meta[2] = 2.5  # reduction -0.5: without the guard, 2 would join 0 in the clean pool
    config = dataclasses.replace(SMALL, meta_loss_guard=0.2)
    # 5 has the highest loss of all: guarding it would guard no ranked sample
    split = stage3_split(meta, config, trusted_ids=np.array([5]))
    # ranked: 0..4, one guarded (2, loss 2.0); the two lowest reductions of the rest: 0 and 3
    assert clean_ids(split) == [0, 3, 5]
    assert split["rank"].to_pylist() == [0, 2, 4, 1, 3, -1]


def test_a_guard_that_leaves_too_few_samples_is_refused():
    with pytest.raises(
        ConfigError, match="split.meta_clean_ratio 0.6 \\+ split.meta_loss_guard 0.5 is over 1"
    ):
        SplitConfig(meta_clean_ratio=0.6, meta_loss_guard=0.5)


def test_ratio_that_keeps_nothing():
    with pytest.raises(DataError, match="ratio 0.1 of 6 samples keeps none"):
        clean_mask_stage2(S3_LOSSES, 0.1)


# --- invariances ------------------------------------------------------------------------


@pytest.mark.parametrize("epoch", [0, 7, 12, 25])
def test_row_order_and_chunking_do_not_matter(epoch):
    rng = np.random.default_rng(1)
    labels, losses = random_scores(50, 3, rng)
    meta = np.round(rng.random(50), 1).astype(np.float32)
    seeds = np.array([0, 1, 2, 3, 4, 5])
    meta_scores = scores_table(labels, meta) if stage_of(epoch, SMALL) == 3 else None
    reference = make_split(
        epoch,
        scores_table(labels, losses),
        config=SMALL,
        num_classes=3,
        seed_ids=seeds,
        meta_scores=meta_scores,
    )
    # Three "actors", each returning a shuffled slice, concatenated in a random order.
    perm = rng.permutation(50)
    shuffled = scores_table(labels[perm], losses[perm], perm)
    chunks = pa.concat_tables([shuffled.slice(30), shuffled.slice(0, 12), shuffled.slice(12, 18)])
    meta_perm = rng.permutation(50)
    shuffled_meta = (
        None if meta_scores is None else scores_table(labels[meta_perm], meta[meta_perm], meta_perm)
    )
    split = make_split(
        epoch, chunks, config=SMALL, num_classes=3, seed_ids=seeds[::-1], meta_scores=shuffled_meta
    )
    assert split.equals(reference)


def test_ground_truth_is_joined_and_never_changes_the_pools():
    rng = np.random.default_rng(2)
    labels, losses = random_scores(30, 3, rng)
    is_poison = rng.random(30) < 0.2
    original = np.where(is_poison, (labels + 1) % 3, labels)
    truth = tables.from_pydict(
        {
            "sample_id": np.arange(30)[::-1],  # any row order
            "is_poison": is_poison[::-1],
            "is_modified": is_poison[::-1],
            "original_label": original[::-1],
            "label_after": labels[::-1],
            "attack": ["badnets"] * 30,
            "params": ["{}"] * 30,
        },
        "poison",
    )
    args = {"config": SMALL, "num_classes": 3, "seed_ids": np.array([0, 1, 2])}
    for epoch in (5, 12):
        plain = make_split(epoch, scores_table(labels, losses), **args)
        joined = make_split(epoch, scores_table(labels, losses), ground_truth=truth, **args)
        reporting = ["is_poison", "original_label"]
        assert joined.drop_columns(reporting).equals(plain.drop_columns(reporting))
        assert joined["is_poison"].to_pylist() == is_poison.tolist()
        assert joined["original_label"].to_pylist() == original.tolist()
        summary = split_summary(joined)
        in_clean = int((is_poison & (joined["pool"].to_numpy(zero_copy_only=False) == "clean")).sum())
        assert summary["poison_in_clean"] == in_clean
        assert summary["poison_fraction_clean"] == in_clean / summary["clean_pool"]
        assert "poison_in_clean" not in split_summary(plain)
    with pytest.raises(DataError, match="ground_truth: sample id 28 is outside 0..27"):
        make_split(12, scores_table(labels[:28], losses[:28]), ground_truth=truth, **args)


# --- errors -----------------------------------------------------------------------------


def _split(scores, epoch=12, **kwargs):
    kwargs = {"config": SMALL, "num_classes": 2, "seed_ids": np.array([0]), **kwargs}
    return make_split(epoch, scores, **kwargs)


def test_bad_scores_are_refused():
    labels, losses = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    with pytest.raises(DataError, match="scores: sample id 2 is missing"):
        _split(scores_table(labels, losses, np.array([0, 1, 3, 4])))
    with pytest.raises(DataError, match="scores: sample id 1 appears more than once"):
        _split(scores_table(labels, losses, np.array([0, 1, 1, 2])))
    with pytest.raises(DataError, match="scores: sample id -1 is outside"):
        _split(scores_table(labels, losses, np.array([-1, 0, 1, 2])))
    with pytest.raises(DataError, match="scores: sample id 2 has loss nan"):
        _split(scores_table(labels, np.array([0.1, 0.2, np.nan, 0.4], np.float32)))
    with pytest.raises(DataError, match="scores: sample id 3 has loss inf"):
        _split(scores_table(labels, np.array([0.1, 0.2, 0.3, np.inf], np.float32)))
    with pytest.raises(DataError, match="scores: sample id 1 has label 2, outside 0..1"):
        _split(scores_table(np.array([0, 2, 0, 1]), losses))
    with pytest.raises(DataError, match="scores: sample id 0 has label -1"):
        _split(scores_table(np.array([-1, 1, 0, 1]), losses))
    with pytest.raises(DataError, match="the table is empty"):
        _split(scores_table(np.array([], np.int32), np.array([], np.float32)))


def test_meta_scores_only_in_stage3():
    labels, losses = np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    scores = scores_table(labels, losses)
    for epoch, stage in ((5, 1), (12, 2)):
        with pytest.raises(ValueError, match=f"meta_scores given at epoch {epoch} \\(stage {stage}\\)"):
            _split(scores, epoch, meta_scores=scores)
    with pytest.raises(ValueError, match="epoch 20 is in stage 3.*pass meta_scores"):
        _split(scores, 20)
    with pytest.raises(DataError, match="meta_scores: sample id 3 is missing"):
        _split(scores, 20, meta_scores=scores.slice(0, 3))
    with pytest.raises(DataError, match="meta_scores: sample id 1 has label 0, scores has 1"):
        _split(scores, 20, meta_scores=scores_table(np.array([0, 0, 0, 1]), losses))
    with pytest.raises(DataError, match="meta_scores: sample id 0 has loss nan"):
        _split(scores, 20, meta_scores=scores_table(labels, np.array([np.nan, 0, 0, 0], np.float32)))


def test_bad_seed_ids():
    scores = scores_table(np.array([0, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.4], np.float32))
    with pytest.raises(DataError, match="seed id 4 is outside the training set's ids 0..3"):
        _split(scores, 5, seed_ids=np.array([0, 4]))
    with pytest.raises(DataError, match="seed id -2 is outside"):
        _split(scores, 5, seed_ids=np.array([-2]))
    with pytest.raises(ValueError, match="seed_ids has shape \\(2,\\) and dtype float64"):
        _split(scores, 5, seed_ids=np.array([0.0, 1.0]))


def test_bad_arrays_to_the_pure_functions():
    with pytest.raises(ValueError, match="labels has shape \\(3,\\).*expected \\(10,\\)"):
        clean_mask_stage1(S1_LABELS[:3], S1_LOSSES, np.zeros(10, bool), 2, 1)
    with pytest.raises(DataError, match="labels: sample id 1 has label 1, outside 0..0"):
        clean_mask_stage1(S1_LABELS, S1_LOSSES, np.zeros(10, bool), 1, 1)
    with pytest.raises(ValueError, match="ratio 1.0 must be in \\(0, 1\\)"):
        clean_mask_stage2(S3_LOSSES, 1.0)
    with pytest.raises(ValueError, match="meta_losses has shape \\(5,\\)"):
        clean_mask_stage3(S3_LOSSES, S3_META[:5], 0.5)


# --- golden -----------------------------------------------------------------------------


def golden_splits() -> dict[str, list[int]]:
    """Clean ids at epochs 7 (stage 1, choice 3), 12 (stage 2) and 25 (stage 3)."""
    rng = np.random.default_rng(0)
    labels = np.arange(60) % 3
    losses = rng.random(60).astype(np.float32)
    meta = rng.random(60).astype(np.float32)
    seeds = np.sort(
        np.concatenate([rng.choice(np.flatnonzero(labels == c), 2, replace=False) for c in range(3)])
    )
    out = {}
    for epoch in (7, 12, 25):
        meta_scores = scores_table(labels, meta) if epoch >= SMALL.stage3_epoch else None
        split = make_split(
            epoch,
            scores_table(labels, losses),
            config=SMALL,
            num_classes=3,
            seed_ids=seeds,
            meta_scores=meta_scores,
        )
        out[str(epoch)] = clean_ids(split)
    return out


def test_golden_split():
    golden = json.loads(GOLDEN.read_text())
    assert golden["clean_ids"] == golden_splits()
    assert [len(golden["clean_ids"][e]) for e in ("7", "12", "25")] == [6 + 9, 30, 30]


def test_trusted_copies_stay_clean_and_tampered_samples_polluted_in_every_stage():
    rng = np.random.default_rng(4)
    labels, losses = random_scores(36, 3, rng)
    losses[[3, 4]] = 0.0  # the tampered copies look perfectly clean: pinned anyway
    trusted = np.array([33, 34, 35])  # the seeds' trusted copies, after the training ids
    meta = scores_table(labels, losses - rng.random(36).astype(np.float32))
    for epoch in (0, 5, 12, 20):
        split = make_split(
            epoch,
            scores_table(labels, losses),
            config=SMALL,
            num_classes=3,
            seed_ids=trusted,  # every seed came from its trusted copy: choice 0 at epoch 0 still works
            meta_scores=meta if epoch >= SMALL.stage3_epoch else None,
            trusted_ids=trusted,
            tampered_ids=np.array([3, 4]),
        ).to_pylist()
        assert [r["pinned"] for r in split[33:]] == ["trusted"] * 3
        assert all(r["pool"] == "clean" and r["rank"] == -1 and r["is_seed"] for r in split[33:])
        assert all(split[i]["pool"] == "polluted" and split[i]["pinned"] == "tampered" for i in (3, 4))
        ranked = [r["rank"] for r in split if r["pinned"] is None and r["rank"] >= 0]
        if epoch >= SMALL.stage2_epoch:  # the pinned samples are out of the global ranking
            assert sorted(ranked) == list(range(31))
        score = suspicion(tables.from_pydict({k: [r[k] for r in split] for k in split[0]}, "splits"))
        assert score[3] == score[4] == 1.0 and (score[33:] == 0).all()


# --- the unlabeled pool (not in the paper: split.holdout_ratio) -------------------------------


def test_the_highest_loss_polluted_samples_are_held_out_of_the_unlabeled_pool():
    # stage 2 at 0.5 of 8: clean = the 4 lowest losses {1, 3, 6, 7}; polluted {0, 2, 4, 5}
    losses = np.array([0.3, 0.1, 0.9, 0.05, 0.9, 2.0, 0.2, 0.25], np.float32)
    order = np.array([5, 2, 7, 0, 4, 1, 3, 6])  # row order must not matter: rows are matched by id
    split = _split(scores_table(np.zeros(8, int)[order], losses[order], ids=order), epoch=12)
    assert sorted(clean_ids(split)) == [1, 3, 6, 7]
    assert ids_of(unlabeled_pool(split, 0.0)) == [0, 2, 4, 5]  # the paper: the whole polluted pool
    assert ids_of(unlabeled_pool(split, 0.125)) == [0, 2, 4]  # floor(1.0): 5 (loss 2.0) held out
    assert ids_of(unlabeled_pool(split, 0.25)) == [0, 4]  # then the 0.9 tie: 2 before 4 by id
    with pytest.raises(DataError, match="lower split.holdout_ratio"):
        unlabeled_pool(split, 0.5)  # all 4 polluted samples held out: nothing left unlabeled
