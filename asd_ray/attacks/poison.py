"""Turn clean shards into poisoned shards plus a ground-truth table.

The per-attack modules hold pure image functions; this module decides *which*
samples are poisoned (:func:`plan_poison`, a pure function of the labels and the
config), streams the shards, re-encodes only the images it modifies (clean
records keep their exact bytes) and writes ``poison.parquet`` (schemas/poison.json)
beside the poisoned shards. It also builds the triggered test set for ASR.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from asd_ray import progress, storage, tables
from asd_ray.attacks.adaptive_blend import apply_pieces, draw_pieces, piece_index
from asd_ray.attacks.badnets import badnets_trigger, check_patch_size
from asd_ray.attacks.blend import blend_trigger
from asd_ray.attacks.clean_label import checkerboard_corners_trigger, pgd_perturb
from asd_ray.attacks.sig import add_signal, sig_signal
from asd_ray.attacks.trigger import Trigger, apply_trigger, load_pattern
from asd_ray.attacks.wanet import apply_wanet, wanet_grid
from asd_ray.config import AttackConfig
from asd_ray.data.records import IMAGE_EXTS
from asd_ray.data.shard_layout import GROUND_TRUTH_FILE
from asd_ray.data.shard_writer import ShardWriter, encode_image, finish_shard_set, new_shard_set_dir
from asd_ray.data.shards import Sample, ShardSet
from asd_ray.errors import DataError
from asd_ray.storage import Location

ImageTransform = Callable[[np.ndarray], np.ndarray]  # (n, H, W, C) uint8 -> same
Modify = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (sample ids, their images) -> modified images
_CHUNK = 256  # records decoded and transformed together


@dataclasses.dataclass(frozen=True)
class PoisonPlan:
    """Which samples an attack modifies, and their labels afterwards (all shape (N,))."""

    is_poison: np.ndarray  # bool: carries the backdoor trigger
    # bool: a cover sample, modified but keeping its label and teaching no backdoor (WaNet's
    # noise mode, adaptive blend's regularization samples); the ground truth marks it modified,
    # not poisoned
    is_cover: np.ndarray
    label_after: np.ndarray  # int64

    @property
    def is_modified(self) -> np.ndarray:
        return self.is_poison | self.is_cover


def plan_poison(labels: np.ndarray, num_classes: int, config: AttackConfig) -> PoisonPlan:
    """Draw the poisoned samples of an attack (seeded by ``config.seed``).

    Poison-label attacks poison each non-target sample (every sample for
    all2all) independently with probability ``rate``; clean-label and sig poison
    exactly ``round(rate * n_target)`` target-class samples and keep labels.
    Cover samples are drawn from the non-target samples left: WaNet's each with
    probability ``cross_ratio * rate``, adaptive blend's exactly
    ``round(conservatism_ratio * n_poisoned)``.

    Args:
        labels: (N,) int clean labels.
        num_classes: C; the target must be below it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    _check_target(config, num_classes)
    rng = np.random.default_rng(config.seed)
    n = len(labels)
    label_after = labels.copy()
    is_cover = np.zeros(n, bool)
    if config.attack in ("clean-label", "sig"):
        candidates = np.flatnonzero(labels == config.target)
        chosen = rng.choice(candidates, size=round(config.rate * len(candidates)), replace=False)
        is_poison = np.zeros(n, bool)
        is_poison[chosen] = True
    elif config.attack == "all2all":
        is_poison = rng.random(n) < config.rate
        label_after[is_poison] = (labels[is_poison] + 1) % num_classes
    else:
        is_poison = (labels != config.target) & (rng.random(n) < config.rate)
        label_after[is_poison] = config.target
        if config.attack == "wanet" and config.wanet_noise:
            is_cover = ~is_poison & (rng.random(n) < config.cross_ratio * config.rate)
        elif config.attack == "adaptive-blend":
            candidates = np.flatnonzero((labels != config.target) & ~is_poison)
            count = round(config.conservatism_ratio * int(is_poison.sum()))
            if count > len(candidates):
                raise DataError(
                    f"--conservatism-ratio {config.conservatism_ratio} asks for {count} cover samples "
                    f"but only {len(candidates)} non-target samples are left unpoisoned; lower it or --rate"
                )
            is_cover[rng.choice(candidates, size=count, replace=False)] = True
    return PoisonPlan(is_poison, is_cover, label_after)


def _check_target(config: AttackConfig, num_classes: int) -> None:
    if config.attack != "all2all" and config.target >= num_classes:
        raise DataError(
            f"--target {config.target} is not a class of this dataset ({num_classes} classes: "
            f"0..{num_classes - 1}); pick another target"
        )


def build_trigger(config: AttackConfig, shape: tuple[int, int, int]) -> ImageTransform:
    """The attack's trigger as a batch transform for images of ``shape`` (H, W, C).

    Adaptive blend's is the test-time trigger, the full pattern at the test alpha; its
    training images get pieces of it (:func:`poison_shards`).
    """
    height, width, channels = shape
    kind = config.trigger_kind
    if kind == "sig":
        signal = sig_signal(height, width, channels, delta=config.sig_delta, frequency=config.sig_frequency)
        return lambda images: add_signal(images, signal)
    if kind == "wanet":
        if height != width:
            raise DataError(
                f"WaNet needs square images, these are {height}x{width}; re-make the shards with --image-size"
            )
        grid = wanet_grid(height, k=config.wanet_k, s=config.wanet_s, seed=config.seed)
        return lambda images: apply_wanet(images, grid)
    if kind == "checkerboard":
        trigger = checkerboard_corners_trigger(height, width, channels)
    elif kind in ("blend", "adaptive-blend"):
        alpha = config.alpha if kind == "blend" else config.adaptive_test_alpha
        trigger = _blend(config, shape, alpha)
    else:
        pattern = None
        if config.size is not None:
            check_patch_size(config.size, height, width)
        if config.pattern_file:
            side = config.size or (2 if max(height, width) <= 64 else 32)
            pattern = load_pattern(config.pattern_file, side, side, channels)
        trigger = badnets_trigger(
            height,
            width,
            channels,
            pattern=pattern,
            location=config.location,
            size=config.size,
            seed=config.seed,
        )
    return lambda images: apply_trigger(images, trigger)


def _blend(config: AttackConfig, shape: tuple[int, int, int], alpha: float) -> Trigger:
    """The Blend trigger of ``config`` (its pattern file or seeded noise) at ``alpha``."""
    height, width, channels = shape
    pattern = load_pattern(config.pattern_file, height, width, channels) if config.pattern_file else None
    return blend_trigger(height, width, channels, alpha=alpha, pattern=pattern, seed=config.seed)


def poison_shards(
    clean: str | Path | Location | ShardSet,
    out: str | Path | Location,
    config: AttackConfig,
    *,
    surrogate: torch.nn.Module | None = None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
    overwrite: bool = False,
) -> dict:
    """Write the poisoned training set of ``config`` to ``out`` (atomically).

    Args:
        clean: the clean shard folder.
        out: the poisoned shard folder: a local path or an object-store URI.
        surrogate: clean-label only: a model to PGD-perturb the poisoned
            target-class images against their true label (else trigger only).
        normalize: (mean, std) the surrogate expects on [0, 1] inputs.

    Returns:
        A JSON-able summary (counts, paths).
    """
    clean = clean if isinstance(clean, ShardSet) else ShardSet(clean)
    shape = clean.require_uniform_size(f"the {config.attack} attack")
    plan = plan_poison(clean.labels, clean.info.num_classes, config)
    if config.attack == "adaptive-blend":
        modify = _partial_blend(config, shape, plan)
    else:
        modify = _stamp(config, shape, plan, surrogate, normalize)
    params = {**config.to_dict(), "pgd": config.attack == "clean-label" and surrogate is not None}
    with new_shard_set_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, clean.info.name, int(clean.info.shards[0]["count"]), clean.info.num_classes)
        bar = progress.counter(total=len(clean), desc=f"poison {config.attack}")
        sources = _sources(clean)
        for ids, records in _chunks(clean):
            chunk_sources = list(islice(sources, len(ids)))
            _write_chunk(
                writer, ids, records, chunk_sources, plan.is_modified[ids], plan.label_after[ids], modify
            )
            bar.update(len(ids))
        bar.close()
        manifest, counts = writer.close()
        attack = {"params": params, "clean": str(clean.folder), "clean_identity": clean.identity()}
        finish_shard_set(
            tmp,
            manifest,
            counts,
            class_names=clean.info.class_names,
            source=f"poisoned:{clean.info.source}",
            attack=attack,
        )
        truth = _ground_truth(
            np.arange(len(clean)), plan.is_poison, plan.is_modified, clean.labels, plan.label_after, params
        )
        tables.write_parquet(truth, tmp / GROUND_TRUTH_FILE, "poison")
    return {
        "command": "poison",
        "attack": config.attack,
        "out": str(storage.absolute(storage.location(out))),
        "samples": len(clean),
        "poisoned": int(plan.is_poison.sum()),
        "cover": int(plan.is_cover.sum()),
        "rate_observed": float(plan.is_poison.mean()),
        "target": config.target,
        "ground_truth": str(storage.absolute(storage.location(out)) / GROUND_TRUTH_FILE),
    }


def _stamp(
    config: AttackConfig,
    shape: tuple[int, int, int],
    plan: PoisonPlan,
    surrogate: torch.nn.Module | None,
    normalize: tuple[tuple[float, ...], tuple[float, ...]] | None,
) -> Modify:
    """The trigger on poisoned samples (clean-label: after PGD, given a surrogate); WaNet's
    cover samples get the warp with per-image noise instead."""
    trigger = build_trigger(config, shape)
    noise_rng = np.random.default_rng([config.seed, 1])
    if plan.is_cover.any():
        noise_grid = wanet_grid(shape[0], k=config.wanet_k, s=config.wanet_s, seed=config.seed)

    def modify(ids: np.ndarray, images: np.ndarray) -> np.ndarray:
        noise = plan.is_cover[ids]
        out_images = images.copy()
        if noise.any():
            out_images[noise] = apply_wanet(images[noise], noise_grid, noise_rng=noise_rng)
        poison = ~noise
        if poison.any():
            batch = images[poison]
            if config.attack == "clean-label" and surrogate is not None:
                mean, std = normalize or (None, None)
                batch = pgd_perturb(
                    surrogate,
                    batch,
                    plan.label_after[ids[poison]],
                    eps=config.pgd_eps,
                    step=config.pgd_step,
                    steps=config.pgd_steps,
                    mean=mean,
                    std=std,
                    seed=config.seed * 1_000_003 + int(ids[0]),  # independent starts per chunk
                )
            out_images[poison] = trigger(batch)
        return out_images

    return modify


def _partial_blend(config: AttackConfig, shape: tuple[int, int, int], plan: PoisonPlan) -> Modify:
    """Adaptive blend at training: poisoned and cover samples alike get their own pieces of
    the pattern at the training alpha. The pieces are drawn once for the whole set, in
    sample-id order, so a sample's pieces do not depend on how the shards are chunked."""
    trigger = _blend(config, shape, config.adaptive_train_alpha)
    cells = piece_index(shape[0], shape[1], config.adaptive_grid)
    modified = plan.is_modified
    kept = draw_pieces(
        np.random.default_rng([config.seed, 2]),
        int(modified.sum()),
        grid=config.adaptive_grid,
        pieces=config.adaptive_pieces,
    )
    row = np.cumsum(modified) - 1  # a modified sample's row of kept

    def modify(ids: np.ndarray, images: np.ndarray) -> np.ndarray:
        return apply_pieces(images, trigger, kept[row[ids]], cells)

    return modify


def poison_test_shards(
    clean_test: str | Path | Location | ShardSet,
    out: str | Path | Location,
    config: AttackConfig,
    *,
    overwrite: bool = False,
) -> dict:
    """Write the ASR test set: every non-target test sample, triggered, labelled as the target.

    all2all triggers every test sample and labels it (y + 1) mod C. Clean-label
    adds the trigger only (no perturbation), as at attack time; adaptive blend
    the full pattern at the test alpha. Samples get new
    dense ids; the manifest's ``source`` names the clean test id.
    """
    clean_test = clean_test if isinstance(clean_test, ShardSet) else ShardSet(clean_test)
    shape = clean_test.require_uniform_size(f"the {config.attack} test set")
    num_classes = clean_test.info.num_classes
    _check_target(config, num_classes)
    labels = clean_test.labels
    if config.attack == "all2all":
        keep = np.ones(len(labels), bool)
        label_after = (labels + 1) % num_classes
    else:
        keep = labels != config.target
        label_after = np.full(len(labels), config.target, np.int64)
    if not keep.any():
        raise DataError(f"{clean_test.folder}: no test sample outside target class {config.target}")
    trigger = build_trigger(config, shape)
    new_id = np.cumsum(keep) - 1
    params = {**config.to_dict(), "pgd": False}
    with new_shard_set_dir(out, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, clean_test.info.name, int(clean_test.info.shards[0]["count"]), num_classes)
        bar = progress.counter(total=len(clean_test), desc="poison test set")
        for ids, records in _chunks(clean_test):
            bar.update(len(ids))
            ids, records = ids[keep[ids]], [r for r, k in zip(records, keep[ids]) if k]
            if len(ids):
                images = trigger(np.stack([sample.image for sample, _ in records]))
                for i, sample_id in enumerate(ids):
                    data, ext = encode_image(images[i])
                    writer.add(
                        int(new_id[sample_id]),
                        data,
                        ext,
                        int(label_after[sample_id]),
                        images[i].shape,
                        f"test-sample:{sample_id}",
                    )
        bar.close()
        manifest, counts = writer.close()
        finish_shard_set(
            tmp,
            manifest,
            counts,
            class_names=clean_test.info.class_names,
            source=f"poisoned-test:{clean_test.info.source}",
            attack={"params": params, "clean": str(clean_test.folder)},
        )
        m = int(keep.sum())
        truth = _ground_truth(
            np.arange(m), np.ones(m, bool), np.ones(m, bool), labels[keep], label_after[keep], params
        )
        tables.write_parquet(truth, tmp / GROUND_TRUTH_FILE, "poison")
    return {"test_out": str(storage.absolute(storage.location(out))), "test_samples": m}


def read_ground_truth(path: str | Path | Location, shards: ShardSet) -> pa.Table:
    """The validated ``poison.parquet`` of ``shards``, row i being sample i.

    Rows are matched to samples by ``sample_id``, so a file re-saved in another
    row order gives the same answers.

    Raises:
        DataError: if it belongs to a shard set of another size, or an id is
            missing, repeated or outside the set.
    """
    truth = tables.read_parquet(path, "poison", rows=len(shards))
    return tables.by_sample_id(
        truth, where=str(path), fix=f"pass the poison.parquet of {shards.folder}", n=len(shards)
    )


def original_labels(poison_test: ShardSet) -> np.ndarray | None:
    """The clean labels of a triggered test set, by sample id, from the ``poison.parquet``
    :func:`poison_test_shards` writes beside it; None when there is none (robust accuracy
    then cannot be computed)."""
    path = poison_test.folder / GROUND_TRUTH_FILE
    if not storage.is_file(path):
        return None
    return read_ground_truth(path, poison_test).column("original_label").to_numpy()


def _chunks(shards: ShardSet) -> Iterator[tuple[np.ndarray, list[tuple[Sample, dict[str, bytes]]]]]:
    """Yield (sample ids, [(sample, members as stored)]) in sample-id order, _CHUNK at a time,
    through the verified reader: a set `shards inspect` refuses is never poisoned."""
    records = []
    for record in shards.iter_checked():
        records.append(record)
        if len(records) == _CHUNK:
            yield np.array([sample.sample_id for sample, _ in records]), records
            records = []
    if records:
        yield np.array([sample.sample_id for sample, _ in records]), records


def _sources(shards: ShardSet) -> Iterator[str]:
    """Each sample's ``source`` in sample-id order, streamed from the manifest a row group
    at a time (the records keep their provenance)."""
    for batch in shards.manifest_batches(["source"]):
        yield from batch.column("source").to_pylist()


def _write_chunk(writer, ids, records, sources, modified, labels, modify) -> None:
    new_images = {}
    if modified.any():
        idx = np.flatnonzero(modified)
        images = modify(ids[idx], np.stack([records[i][0].image for i in idx]))
        new_images = dict(zip(idx.tolist(), images))
    for i, (sample, members) in enumerate(records):
        if i in new_images:
            data, ext = encode_image(new_images[i])
            shape = new_images[i].shape
        else:  # unchanged records keep their exact bytes
            ext = next(e for e in members if e in IMAGE_EXTS)
            data, shape = members[ext], sample.image.shape
        writer.add(int(sample.sample_id), data, ext, int(labels[i]), shape, sources[i])


def _ground_truth(ids, is_poison, is_modified, original, after, params) -> pa.Table:
    n = len(ids)
    return tables.from_pydict(
        {
            "sample_id": ids,
            "is_poison": is_poison,
            "is_modified": is_modified,
            "original_label": original,
            "label_after": after,
            "attack": [params["attack"]] * n,
            "params": [json.dumps(params, sort_keys=True)] * n,
        },
        "poison",
    )
