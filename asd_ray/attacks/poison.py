"""Turn clean shards into poisoned shards plus a ground-truth table.

Each attack module says whom its attack poisons and how it changes their images
(:class:`~asd_ray.attacks.base.Attack`); this module draws the plan (:func:`plan_poison`,
a pure function of the labels and the config), streams the shards, re-encodes only the
images it modifies (clean records keep their exact bytes) and writes ``poison.parquet``
(schemas/poison.json) beside the poisoned shards. It also builds the triggered test set
for ASR.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from asd_ray import progress, storage, tables
from asd_ray.attacks import ATTACKS
from asd_ray.attacks.base import Attack, PoisonPlan, Surrogate
from asd_ray.config import AttackConfig
from asd_ray.data.records import IMAGE_EXTS
from asd_ray.data.shard_layout import GROUND_TRUTH_FILE
from asd_ray.data.shard_writer import ShardWriter, encode_image, finish_shard_set, new_shard_set_dir
from asd_ray.data.shards import Sample, ShardSet
from asd_ray.errors import DataError
from asd_ray.storage import Location

_CHUNK = 256  # records decoded and transformed together


def plan_poison(labels: np.ndarray, num_classes: int, config: AttackConfig) -> PoisonPlan:
    """Draw the poisoned samples of an attack (seeded by ``config.seed``).

    The attack's labelling draws the poisoned samples and their labels (e.g. poison-label
    attacks each non-target sample with probability ``rate``, clean-label ones exactly
    ``round(rate * n_target)`` target-class samples), then its cover samples, if it has
    any, come from the same generator.

    Args:
        labels: (N,) int clean labels.
        num_classes: C; the target must be below it.
    """
    labels = np.asarray(labels, dtype=np.int64)
    attack = ATTACKS[config.attack]
    _check_target(attack, config, num_classes)
    rng = np.random.default_rng(config.seed)
    is_poison, label_after = attack.labelling.draw(labels, num_classes, config, rng)
    if attack.covers is None:
        is_cover = np.zeros(len(labels), bool)
    else:
        is_cover = attack.covers(labels, is_poison, config, rng)
    return PoisonPlan(is_poison, is_cover, label_after)


def _check_target(attack: Attack, config: AttackConfig, num_classes: int) -> None:
    if attack.labelling.uses_target and config.target >= num_classes:
        raise DataError(
            f"--target {config.target} is not a class of this dataset ({num_classes} classes: "
            f"0..{num_classes - 1}); pick another target"
        )


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
    attack = ATTACKS[config.attack]
    shape = clean.require_uniform_size(f"the {config.attack} attack")
    plan = plan_poison(clean.labels, clean.info.num_classes, config)
    modify = attack.modify(
        config, shape, plan, None if surrogate is None else Surrogate(surrogate, normalize)
    )
    params = {**config.to_dict(), "pgd": attack.uses_surrogate and surrogate is not None}
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
    attack = ATTACKS[config.attack]
    shape = clean_test.require_uniform_size(f"the {config.attack} test set")
    num_classes = clean_test.info.num_classes
    _check_target(attack, config, num_classes)
    labels = clean_test.labels
    keep, label_after = attack.labelling.test(labels, num_classes, config.target)
    if not keep.any():
        raise DataError(f"{clean_test.folder}: no test sample outside target class {config.target}")
    trigger = attack.trigger(config, shape)
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
