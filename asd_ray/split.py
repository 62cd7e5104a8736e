"""ASD's adaptive split of the poisoned training set into a clean and a polluted pool.

Gao, Bai, Gu, Yang and Xia, "Backdoor Defense via Adaptively Splitting Poisoned
Dataset", CVPR 2023, with the details the paper leaves open taken from the authors'
code. Everything here is a pure function of scores, epoch and config: the driver
scores, calls :func:`make_split` and writes the table, then reads from it the pools
it sends the training workers (:func:`pool_masks`: ``pool`` by ``sample_id``, and
``loss`` for the holdout) and the run log's counts (:func:`split_summary`); the workers
read no split table.

Position ``i`` of every array is sample id ``i``. Every ordering sorts by
``(value, sample_id)``, so a split never depends on row order or on how many
actors produced the scores.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd_ray import tables
from asd_ray.config import SplitConfig
from asd_ray.errors import DataError
from asd_ray.evaluate import detection

_GROUND_TRUTH_COLUMNS = ("sample_id", "is_poison", "original_label")

# The values of a split table's ``pool`` column (schemas/splits.json).
CLEAN = "clean"  # labeled: trained on with its given label
POLLUTED = "polluted"  # flagged: its label is not trusted (unlabeled, or held out)


def in_pool(split: pa.Table, pool: str) -> np.ndarray:
    """(rows,) bool in the table's row order: which rows of ``split`` are in ``pool``."""
    return pc.equal(split.column("pool"), pool).to_numpy(zero_copy_only=False)


def unlabeled_pool(split: pa.Table, holdout_ratio: float) -> np.ndarray:
    """(N,) bool by sample id: the polluted pool that MixMatch trains on as unlabeled data,
    without its ``floor(holdout_ratio * N)`` highest-loss samples (ties by sample id).

    A sample whose given label the current model finds least believable is the most
    suspicious, and its guessed label can still carry a trigger: blended images share
    one pattern, form one tight cluster in the unlabeled pool, and MixMatch's sharpened
    guesses settle on one class for the whole cluster, so the trigger keeps deciding the
    prediction although the backdoor to the target is gone. Held-out samples stay in the
    polluted pool (they are flagged); they only take no part in training.
    """
    split = tables.by_sample_id(split, where="split table", fix="pass one epoch's split table")
    polluted = in_pool(split, POLLUTED)
    n = len(polluted)
    held = int(holdout_ratio * n)
    if held == 0:
        return polluted
    losses = split.column("loss").to_numpy()
    candidates = np.flatnonzero(polluted)
    order = candidates[np.lexsort((candidates, -losses[candidates]))]  # highest loss first
    if held >= len(order):
        raise DataError(
            f"split.holdout_ratio {holdout_ratio} holds out {held} samples, and the polluted pool has "
            f"only {len(order)}: MixMatch would have no unlabeled data; lower split.holdout_ratio"
        )
    unlabeled = polluted.copy()
    unlabeled[order[:held]] = False
    return unlabeled


def stage_of(epoch: int, config: SplitConfig) -> int:
    """ASD stage (1, 2 or 3) of ``epoch``, counted from 0."""
    if epoch < 0:
        raise ValueError(f"epoch {epoch} must be >= 0 (epochs are counted from 0)")
    if epoch < config.stage2_epoch:
        return 1
    return 2 if epoch < config.stage3_epoch else 3


def choice_num(epoch: int, config: SplitConfig) -> int:
    """Per-class non-seed samples in stage 1's clean pool at ``epoch``.

    Starts at 0 and grows by ``grow_by`` at every epoch e > 0 with
    e % grow_every == 0 (defaults: epochs 0-4 -> 0, 5-9 -> 10, 10-14 -> 20).
    """
    if epoch < 0:
        raise ValueError(f"epoch {epoch} must be >= 0 (epochs are counted from 0)")
    return epoch // config.grow_every * config.grow_by


def clean_mask_stage1(
    labels: np.ndarray,
    losses: np.ndarray,
    is_seed: np.ndarray,
    num_classes: int,
    choice: int,
    *,
    pinned_clean: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1: the seeds plus the ``choice`` lowest-loss non-seed samples of every class.

    A class with fewer than ``choice`` non-seed samples contributes all of them.

    Args:
        labels: (N,) int, stored label of each sample, in 0..num_classes-1.
        losses: (N,) float, finite SCE loss of the current model.
        is_seed: (N,) bool, the trusted seeds; always clean, never ranked.
        num_classes: C.
        choice: per-class candidates to take (:func:`choice_num`).
        pinned_clean: samples held clean outside these arrays (seeds' trusted copies).

    Returns:
        clean: (N,) bool, the clean pool D_C.
        rank: (N,) int64, 0-based position of a non-seed sample in its class's
        (loss, sample_id) order; -1 for seeds.

    Raises:
        DataError: on a non-finite loss, a label outside 0..C-1, or an empty pool
            (choice 0 and no seeds).
    """
    n = _check_losses(losses, "losses").size
    labels = _check_array(labels, "labels", n, "iu")
    is_seed = _check_array(is_seed, "is_seed", n, "b")
    if choice < 0:
        raise ValueError(f"choice {choice} must be >= 0")
    _check_labels(labels, num_classes, "labels")
    if choice == 0 and not is_seed.any() and not pinned_clean:
        raise DataError(
            "stage 1 with choice 0 and no seeds gives an empty clean pool; seeds are needed: "
            "pass the trusted seed ids (see asd_ray.seeds)"
        )
    candidates = np.flatnonzero(~is_seed)
    # lexsort: last key is primary -> (label, loss, sample_id).
    order = candidates[np.lexsort((candidates, losses[candidates], labels[candidates]))]
    counts = np.bincount(labels[candidates], minlength=num_classes)
    class_start = np.cumsum(counts) - counts
    rank = np.full(n, -1, np.int64)
    rank[order] = np.arange(order.size) - class_start[labels[order]]
    clean = is_seed | ((rank >= 0) & (rank < choice))
    return clean, rank


def clean_mask_stage2(losses: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Stage 2: the floor(ratio * N) lowest-loss samples, class-agnostic.

    Seeds are not forced in: from stage 2 on they are ordinary samples.

    Args:
        losses: (N,) float, finite SCE loss of the current model.
        ratio: alpha, fraction of samples in the clean pool, in (0, 1).

    Returns:
        clean: (N,) bool, the clean pool D_C.
        rank: (N,) int64, 0-based global position in (loss, sample_id) order.

    Raises:
        DataError: on a non-finite loss, or if floor(ratio * N) is 0 (empty pool).
    """
    _check_losses(losses, "losses")
    return _lowest(losses, ratio)


def clean_mask_stage3(
    losses: np.ndarray, meta_losses: np.ndarray, ratio: float, guard: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 3: the floor(ratio * N) samples with the lowest loss - meta_loss, leaving out
    the floor(guard * N) highest-loss samples (ties by sample id).

    The virtual model's epoch on the whole set learns the backdoor fast, so a
    poisoned sample's loss drops a lot while a clean hard sample's drops little:
    the lowest reductions are clean. A poisoned sample whose trigger the virtual model
    cannot pick up in one epoch drops little too, yet the current model still finds its
    label among the least believable of the set: the guard keeps such samples polluted
    (0: the paper's meta-split).
    The reduction is computed in the inputs' dtype, so ranking float32 losses
    reproduces the float32 ``loss_reduction`` column of the split table exactly.

    Args:
        losses: (N,) float, SCE loss of the current model.
        meta_losses: (N,) float, SCE loss of the virtual model.
        ratio: gamma, fraction of samples in the clean pool, in (0, 1).
        guard: fraction of samples, the highest-loss ones, kept out of the clean pool;
            ``ratio + guard`` at most 1.

    Returns:
        clean: (N,) bool, the clean pool D_C.
        rank: (N,) int64, 0-based global position in (guarded, reduction, sample_id)
            order: the guarded samples rank last.

    Raises:
        DataError: on a non-finite loss, or if floor(ratio * N) is 0 (empty pool).
    """
    n = _check_losses(losses, "losses").size
    _check_losses(meta_losses, "meta_losses", n)
    reduction = losses - meta_losses
    guarded = int(guard * n)
    if guarded == 0:
        return _lowest(reduction, ratio)
    if int(ratio * n) + guarded > n:
        raise ValueError(f"ratio {ratio} + guard {guard} leaves too few samples to fill the clean pool")
    positions = np.arange(n)
    is_guarded = np.zeros(n, bool)
    is_guarded[np.lexsort((positions, losses))[n - guarded :]] = True  # highest (loss, sample_id)
    return _lowest_ranked(np.lexsort((positions, reduction, is_guarded)), ratio)


def make_split(
    epoch: int,
    scores: pa.Table,
    *,
    config: SplitConfig,
    num_classes: int,
    seed_ids: np.ndarray,
    meta_scores: pa.Table | None = None,
    ground_truth: pa.Table | None = None,
    trusted_ids: np.ndarray | None = None,
    tampered_ids: np.ndarray | None = None,
) -> pa.Table:
    """The split table of ``epoch``: one row per sample, sorted by sample_id.

    Args:
        epoch: epoch counted from 0; picks the stage and stage 1's choice_num.
        scores: scores table (schemas/scores.json) of the current model, holding
            exactly the sample ids 0..N-1, in any row order and chunking.
        config: split settings.
        num_classes: C.
        seed_ids: (S,) int, trusted seed sample ids in 0..N-1; may be empty when
            the seeds come from another dataset.
        meta_scores: the virtual model's scores (same ids and labels); required in
            stage 3, refused before.
        ground_truth: a table with at least sample_id, is_poison, original_label
            (schemas/poison.json) over the same ids; for reporting only, it never
            changes the pools.
        trusted_ids: the seeds' trusted copies added to the training set: always
            clean (they are the evidence) and seeds in stage 1.
        tampered_ids: training samples whose trusted copy shows they were altered:
            always polluted. Both kinds are left out of the ranking (``rank`` -1,
            ``pinned`` names why).

    Returns:
        The validated splits table (schemas/splits.json).

    Raises:
        ValueError: if ``meta_scores`` is passed outside stage 3 or missing in it.
        DataError: on missing/duplicate ids, a non-finite loss, a label outside
            0..C-1, a seed id outside 0..N-1, or an empty stage-1 pool.
    """
    stage = stage_of(epoch, config)
    _check_meta_scores_given(epoch, stage, config, meta_scores is not None)
    ids, labels, losses = _read_scores(scores, "scores")
    n = ids.size
    _check_labels(labels, num_classes, "scores")
    is_seed = _seed_mask(seed_ids, n)
    trusted, tampered = _pinned_masks(trusted_ids, tampered_ids, n)
    free = ~(trusted | tampered)  # ranked as the stage says; the others are pinned

    meta_losses = _meta_losses(meta_scores, labels) if stage == 3 else None
    reduction = None if meta_losses is None else losses - meta_losses
    clean, rank = trusted.copy(), np.full(n, -1, np.int64)
    if stage == 1:
        choice, pinned = choice_num(epoch, config), int(trusted.sum())
        clean[free], rank[free] = clean_mask_stage1(
            labels[free], losses[free], is_seed[free], num_classes, choice, pinned_clean=pinned
        )
    elif stage == 2:
        clean[free], rank[free] = clean_mask_stage2(losses[free], config.clean_ratio)
    else:
        clean[free], rank[free] = clean_mask_stage3(
            losses[free], meta_losses[free], config.meta_clean_ratio, config.meta_loss_guard
        )

    is_poison, original_label = _read_ground_truth(ground_truth, n)
    nulls = pa.nulls(n, pa.float32())
    return tables.from_pydict(
        {
            "sample_id": ids,
            "label": labels,
            "stage": np.full(n, stage, np.int32),
            "loss": losses,
            "meta_loss": nulls if meta_losses is None else meta_losses,
            "loss_reduction": nulls if reduction is None else reduction,
            "rank": rank,
            "pool": np.where(clean, CLEAN, POLLUTED),
            "is_seed": is_seed | trusted,
            "pinned": pa.array(
                np.where(trusted, "trusted", np.where(tampered, "tampered", None)), pa.string()
            ),
            "is_poison": is_poison,
            "original_label": original_label,
        },
        "splits",
    )


def _pinned_masks(
    trusted_ids: np.ndarray | None, tampered_ids: np.ndarray | None, n: int
) -> tuple[np.ndarray, np.ndarray]:
    """(trusted, tampered), each (n,) bool; an id cannot be both."""
    none = np.empty(0, np.int64)
    trusted = _seed_mask(none if trusted_ids is None else trusted_ids, n)
    tampered = _seed_mask(none if tampered_ids is None else tampered_ids, n)
    if (trusted & tampered).any():
        raise ValueError("a sample id is both trusted and tampered")
    return trusted, tampered


def _check_meta_scores_given(epoch: int, stage: int, config: SplitConfig, given: bool) -> None:
    """Stage 3 needs the virtual model's scores; earlier stages must not get them."""
    if stage == 3 and not given:
        raise ValueError(
            f"epoch {epoch} is in stage 3 (epoch >= stage3_epoch {config.stage3_epoch}); "
            "pass meta_scores, the virtual model's scores"
        )
    if stage != 3 and given:
        raise ValueError(
            f"meta_scores given at epoch {epoch} (stage {stage}); they are only used from "
            f"stage3_epoch {config.stage3_epoch} on; pass meta_scores=None"
        )


def _meta_losses(meta_scores: pa.Table, labels: np.ndarray) -> np.ndarray:
    """(N,) the virtual model's losses by sample id, its labels checked against the scores'."""
    _, meta_labels, meta_losses = _read_scores(meta_scores, "meta_scores", labels.size)
    mismatch = np.flatnonzero(meta_labels != labels)
    if mismatch.size:
        i = mismatch[0]
        raise DataError(
            f"meta_scores: sample id {i} has label {meta_labels[i]}, scores has {labels[i]}; "
            "score both passes on the same training set"
        )
    return meta_losses


def suspicion(split: pa.Table) -> np.ndarray:
    """Every sample's suspicion score in one epoch: its place in the splitting order.

    ``rank / (n - 1)`` over the samples ranked together (each class's non-seed
    samples in stage 1; all samples in stages 2 and 3): 0 for the sample the split
    trusts most (lowest loss, or lowest loss reduction in stage 3, where the samples
    ``split.meta_loss_guard`` keeps out rank last), 1 for the one it trusts least;
    stage 1's seeds and the seeds' trusted copies score 0, training samples their
    trusted copy shows tampered score 1. The polluted pool is always the
    most suspicious part of each group, so the score ranks flagged samples and
    compares epochs and stages on one scale.

    Returns:
        (N,) float64 in [0, 1], by position in ``split`` (sorted by sample_id).
    """
    rank = split.column("rank").to_numpy()
    ranked = rank >= 0
    score = np.zeros(len(rank), np.float64)
    tampered = pc.fill_null(pc.equal(split.column("pinned"), "tampered"), False)
    score[tampered.to_numpy(zero_copy_only=False)] = 1.0  # proven altered
    if split.column("stage")[0].as_py() == 1:
        labels = split.column("label").to_numpy()
        sizes = np.bincount(labels[ranked], minlength=int(labels.max()) + 1)
        score[ranked] = rank[ranked] / np.maximum(sizes[labels[ranked]] - 1, 1)
    else:
        score[ranked] = rank[ranked] / max(int(ranked.sum()) - 1, 1)
    return score


def check_split(split: pa.Table, *, where: str, fix: str) -> int:
    """Check what the schema cannot say about one epoch's split table; return its stage.

    Raises:
        DataError: naming ``where`` and ``fix``: the table is empty, mixes stages,
            holds an unknown pool value, or has ground truth for only some rows.
    """
    if split.num_rows == 0:
        raise DataError(f"{where}: the table is empty; {fix}")
    stages = pc.unique(split.column("stage")).to_pylist()
    if len(stages) != 1:
        raise DataError(f"{where}: rows of stages {sorted(stages)} in one epoch's table; {fix}")
    pools = set(pc.unique(split.column("pool")).to_pylist()) - {CLEAN, POLLUTED}
    if pools:
        raise DataError(
            f"{where}: unknown pool value(s) {sorted(pools)}, not {CLEAN!r} or {POLLUTED!r}; {fix}"
        )
    missing = split.column("is_poison").null_count
    if missing not in (0, split.num_rows):
        raise DataError(
            f"{where}: is_poison is null in {missing} of {split.num_rows} rows; ground truth must "
            f"cover every sample or none; {fix}"
        )
    return stages[0]


def split_summary(split: pa.Table) -> dict[str, Any]:
    """Counts of one split table, keyed like the metrics table (schemas/metrics.json).

    Returns:
        ``stage``, ``clean_pool``, ``polluted_pool``, ``seeds``, ``seeds_in_clean``,
        ``clean_per_class`` (list indexed by label, up to the largest label present)
        and, when the table carries ground truth, ``poison_in_clean``,
        ``poison_fraction_clean`` (poison_in_clean / clean_pool) and the polluted
        pool's detection figures ``flag_<name>`` of :func:`asd_ray.evaluate.detection`.

    Raises:
        DataError: if the table is empty, mixes stages, holds an unknown pool
            value, or has ground truth for only some rows.
    """
    split = tables.validate(split, "splits", where="split")
    stage = check_split(split, where="split", fix="summarise one whole table made by make_split")
    clean = in_pool(split, CLEAN)
    is_seed = split.column("is_seed").to_numpy()
    labels = split.column("label").to_numpy()
    summary: dict[str, Any] = {
        "stage": stage,
        "clean_pool": int(clean.sum()),
        "polluted_pool": int((~clean).sum()),
        "seeds": int(is_seed.sum()),
        "seeds_in_clean": int((is_seed & clean).sum()),
        "clean_per_class": np.bincount(labels[clean], minlength=labels.max() + 1).tolist(),
    }
    poison = split.column("is_poison")
    if poison.null_count:
        return summary
    poisoned = poison.to_numpy(zero_copy_only=False)
    in_clean = int((poisoned & clean).sum())
    summary["poison_in_clean"] = in_clean
    summary["poison_fraction_clean"] = in_clean / summary["clean_pool"] if summary["clean_pool"] else 0.0
    figures = detection(~clean, poisoned, suspicion(split))
    summary |= {f"flag_{name}": value for name, value in figures.items()}
    return summary


def _lowest(values: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the floor(ratio * N) lowest (value, position) pairs and every position's rank."""
    return _lowest_ranked(np.argsort(values, kind="stable"), ratio)  # stable: ties by sample_id


def _lowest_ranked(order: np.ndarray, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask of the first floor(ratio * N) positions of ``order`` and every position's rank."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio {ratio} must be in (0, 1)")
    n = order.size
    keep = int(ratio * n)
    if keep == 0:
        raise DataError(
            f"ratio {ratio} of {n} samples keeps none in the clean pool; raise the ratio or "
            "split a larger training set"
        )
    rank = np.empty(n, np.int64)
    rank[order] = np.arange(n)
    return rank < keep, rank


def _check_array(array: np.ndarray, name: str, n: int, kinds: str) -> np.ndarray:
    """``array`` as an (n,) numpy array of one of the dtype ``kinds``."""
    array = np.asarray(array)
    if array.shape != (n,) or array.dtype.kind not in kinds:
        raise ValueError(
            f"{name} has shape {array.shape} and dtype {array.dtype}; expected ({n},) of dtype "
            f"kind {'/'.join(kinds)} (one value per sample, in sample_id order)"
        )
    return array


def _check_losses(losses: np.ndarray, name: str, n: int | None = None) -> np.ndarray:
    """``losses`` as a 1-D float array of finite values (length ``n`` when given)."""
    losses = _check_array(losses, name, np.asarray(losses).size if n is None else n, "f")
    bad = np.flatnonzero(~np.isfinite(losses))
    if bad.size:
        raise DataError(
            f"{name}: sample id {bad[0]} has loss {losses[bad[0]]}; a non-finite loss means "
            "the model diverged: fix training, then re-score"
        )
    return losses


def _check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
    """Every label must be a class index in 0..num_classes-1."""
    if num_classes < 1:
        raise ValueError(f"num_classes {num_classes} must be >= 1")
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if bad.size:
        raise DataError(
            f"{where}: sample id {bad[0]} has label {labels[bad[0]]}, outside "
            f"0..{num_classes - 1}; check that num_classes ({num_classes}) matches the dataset"
        )


def _read_scores(
    table: pa.Table, where: str, n: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, losses) of a scores table, sorted by sample_id and checked.

    The ids must be exactly 0..n-1, each once (n = largest id + 1 when not given).
    """
    table = tables.validate(table, "scores", where=where)
    ids = table.column("sample_id").to_numpy()
    order = tables.id_order(ids, where=where, fix="score every training sample exactly once", n=n)
    labels = table.column("label").to_numpy()[order]
    losses = _check_losses(table.column("loss").to_numpy()[order], where)
    return ids[order], labels, losses


def _seed_mask(seed_ids: np.ndarray, n: int) -> np.ndarray:
    """(n,) bool mask of the seed ids."""
    seed_ids = np.asarray(seed_ids)
    if seed_ids.ndim != 1 or (seed_ids.size and seed_ids.dtype.kind not in "iu"):
        raise ValueError(
            f"seed_ids has shape {seed_ids.shape} and dtype {seed_ids.dtype}; pass a 1-D array "
            "of integer sample ids (e.g. the seeds table's sample_id column)"
        )
    out = seed_ids[(seed_ids < 0) | (seed_ids >= n)]
    if out.size:
        raise DataError(
            f"seed id {out[0]} is outside the training set's ids 0..{n - 1}; pass only seeds "
            "drawn from this training set (an empty array when they come from another dataset)"
        )
    is_seed = np.zeros(n, bool)
    is_seed[seed_ids.astype(np.int64)] = True
    return is_seed


def _read_ground_truth(ground_truth: pa.Table | None, n: int) -> tuple[Any, Any]:
    """(is_poison, original_label), each (n,), of a ground-truth table, in sample_id order;
    null columns without one."""
    if ground_truth is None:
        return pa.nulls(n, pa.bool_()), pa.nulls(n, pa.int32())
    missing = [c for c in _GROUND_TRUTH_COLUMNS if c not in ground_truth.column_names]
    if missing:
        raise DataError(
            f"ground_truth: column(s) {missing} missing; pass the attack's poison table (schemas/poison.json)"
        )
    poison_schema = tables.schema("poison")
    for name in _GROUND_TRUTH_COLUMNS:
        column, expected = ground_truth.column(name), poison_schema.field(name).type
        if column.type != expected or column.null_count:
            raise DataError(
                f"ground_truth: column {name!r} has type {column.type} and {column.null_count} "
                f"null(s); it must be {expected} without nulls (see schemas/poison.json)"
            )
    ids = ground_truth.column("sample_id").to_numpy()
    order = tables.id_order(
        ids, where="ground_truth", fix="it must cover the same sample ids as the scores", n=n
    )
    return (
        ground_truth.column("is_poison").to_numpy()[order],
        ground_truth.column("original_label").to_numpy()[order],
    )


def pool_masks(
    split: pa.Table, total: int, holdout_ratio: float, *, where: str = "split"
) -> tuple[np.ndarray, np.ndarray]:
    """(clean, unlabeled), each (N,) bool by sample id: a split table's clean pool, and the
    polluted pool MixMatch trains on (:func:`unlabeled_pool`).

    Raises:
        DataError: the table (``where``: its file) does not cover ids 0..total-1 once each.
    """
    split = tables.by_sample_id(split, where=where, fix="re-create the run's split table", n=total)
    clean = in_pool(split, CLEAN)
    return clean, unlabeled_pool(split, holdout_ratio)
