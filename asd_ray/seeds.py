"""The trusted seed set: w clean samples per class that start ASD's stage 1.

Seeds must come from a source the defender trusts: a clean shard set (the same
data before it reached the untrusted pipeline, or another dataset: the paper's
transfer variant), or a user's own list. Benchmarks may instead exclude the
ground-truth poison of the attacked set, which assumes an oracle; the table's
``method`` column records which was used.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from asd_ray import files, storage, tables
from asd_ray.data.shard_layout import sample_key
from asd_ray.data.shards import ShardSet
from asd_ray.errors import ConfigError, DataError, StorageError
from asd_ray.storage import Location


def pick_seeds(
    shards: ShardSet,
    per_class: int = 10,
    *,
    seed: int = 0,
    exclude: np.ndarray | None = None,
    method: str = "random",
) -> pa.Table:
    """Draw ``per_class`` samples of every class uniformly at random.

    Args:
        shards: the trusted shard set the seeds are read from.
        per_class: w, samples per class.
        seed: seed of the draw (the same seed gives the same table).
        exclude: (N,) bool, samples that may not be drawn (e.g. ground-truth poison).
        method: recorded in the table.

    Returns:
        A seeds table (schemas/seeds.json), sorted by sample_id.

    Raises:
        DataError: if a class has fewer than ``per_class`` candidates.
    """
    if per_class < 1:
        raise ConfigError(f"--per-class {per_class} must be >= 1")
    labels = shards.labels
    allowed = np.ones(len(labels), bool) if exclude is None else ~np.asarray(exclude, bool)
    rng = np.random.default_rng(seed)
    chosen = []
    for cls, name in enumerate(shards.info.class_names):
        candidates = np.flatnonzero((labels == cls) & allowed)
        if len(candidates) < per_class:
            raise DataError(
                f"class {cls} ({name!r}) of {shards.folder} has only {len(candidates)} usable "
                f"samples, {per_class} seeds were asked for; lower --per-class or add clean "
                "samples of that class"
            )
        chosen.append(rng.choice(candidates, size=per_class, replace=False))
    return _seed_table(shards, np.sort(np.concatenate(chosen)), method)


def seeds_from_list(shards: ShardSet, keys: Sequence[str]) -> pa.Table:
    """A seed table from the user's own list of record keys (or sample ids) in ``shards``."""
    ids = []
    for key in keys:
        key = key.strip()  # a record's key is its sample id, zero-padded (sample_key)
        if key.isascii() and key.isdigit() and len(key) <= 18 and int(key) < len(shards):
            ids.append(int(key))
        else:
            raise DataError(f"seed {key!r} is neither a key nor a sample id of {shards.folder}")
    if len(set(ids)) != len(ids):
        raise DataError("the seed list names a sample twice; list each seed once")
    return _seed_table(shards, np.sort(np.array(ids, np.int64)), "user-list")


def read_seed_list(path: str | Path | Location) -> list[str]:
    """Keys or sample ids, one per line; blank lines and ``#`` comments are skipped. The
    file is local or an object (a :class:`~asd_ray.storage.Location`), capped alike."""
    fix = "pass a text file of keys or sample ids, one per line"
    lines = files.read_text(path, what=f"--from-list {path}", fix=fix, follow_links=True).splitlines()
    return [line.split("#")[0].strip() for line in lines if line.split("#")[0].strip()]


def _seed_table(shards: ShardSet, ids: np.ndarray, method: str) -> pa.Table:
    n = len(ids)
    return tables.from_pydict(
        {
            "sample_id": ids,
            "key": [sample_key(int(i)) for i in ids],
            "label": shards.labels[ids],
            "dataset": [str(shards.folder)] * n,
            "method": [method] * n,
        },
        "seeds",
    )


@dataclasses.dataclass(frozen=True)
class SeedPlan:
    """How a run uses its seeds table.

    A seed whose trusted copy is the training set's own sample is used in place.
    A seed whose trusted copy differs from the training copy (label or pixels) is
    evidence: the trusted copy joins the training set as an extra labeled sample
    and the training copy is pinned to the polluted pool. Seeds from another
    dataset join as extra samples too (the paper's transfer variant).
    """

    in_place: np.ndarray  # (S1,) training-set ids of seeds used as they are
    tampered: np.ndarray  # (S2,) training-set ids whose trusted copy differs
    extras: list[tuple[str, np.ndarray, np.ndarray]]  # (folder, ids in it, trusted labels), to add

    @property
    def num_extras(self) -> int:
        return sum(len(ids) for _, ids, _ in self.extras)

    @property
    def num_foreign(self) -> int:
        """Seeds from another dataset: the extras that are not a tampered sample's trusted copy."""
        return self.num_extras - self.tampered.size


def foreign_seed_warning(plan: SeedPlan | None, noise_overlay: float, semi_epochs: int) -> str | None:
    """The advice a run prints when seeds from another dataset meet the noise overlay.

    Such seeds can look unlike the training set; without transfer pre-training the
    overlay's noise on top of them slowed stage 1 and the run never caught up (measured
    on the MNIST subset with scikit-learn's digits as seeds: the README's *Seeds*).
    """
    if plan is None or not plan.num_foreign or noise_overlay <= 0 or semi_epochs > 0:
        return None
    return (
        f"asd-ray: warning: {plan.num_foreign} seed(s) come from another dataset and "
        f"mixmatch.noise_overlay is {noise_overlay:g} without transfer pre-training; this cost ACC "
        "on the MNIST benchmark (README, Seeds); add --set mixmatch.noise_overlay=0"
    )


def plan_seeds(train: ShardSet, seeds: pa.Table, per_class: int, *, where: str) -> SeedPlan:
    """Check a seeds table against the training set and decide how each seed is used.

    Raises:
        DataError: a seed listed twice, an id or label outside its set, a seed set of
            another image size, or fewer than ``per_class`` seeds in a class.
    """
    from asd_ray.data.share import load_share

    train_identity, parent_identity = train.identity(), _parent_identity(train)
    in_place, tampered, extras = [], [], []
    # Shard sets are told apart by identity, never by how their folder is spelled (a trailing
    # slash, "..", a symlink or a copy): one set named two ways is one group.
    # A location a table names is opened with the training set's storage settings.
    opened = {
        folder: ShardSet(storage.location(folder, train.folder.settings))
        for folder in sorted(set(seeds.column("dataset").to_pylist()))
    }
    groups: dict[str, list[str]] = {}
    for folder, shards in opened.items():
        groups.setdefault(shards.identity(), []).append(folder)
    for identity, spellings in groups.items():
        folder, source = spellings[0], opened[spellings[0]]
        rows = seeds.filter(pc.is_in(seeds.column("dataset"), value_set=pa.array(spellings)))
        ids, labels = rows.column("sample_id").to_numpy(), rows.column("label").to_numpy()
        unique, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            repeated = unique[counts > 1]
            raise DataError(
                f"{where}: seed sample id {repeated[0]} is listed {counts.max()} times ({len(repeated)} "
                "id(s) repeated); every seed must be a distinct sample: draw the seeds again"
            )
        if (labels < 0).any() or (labels >= train.info.num_classes).any():
            raise DataError(
                f"{where}: a seed label is outside 0..{train.info.num_classes - 1} of the training set"
            )
        if identity == train_identity:  # the user vouches for these training samples
            _check_ids(ids, len(train), where, "the training set")
            in_place.append(ids)
            continue
        _check_ids(ids, len(source), where, folder)
        if source.require_uniform_size("seeds") != train.require_uniform_size("training"):
            raise DataError(
                f"{where}: seeds from {folder} are {source.require_uniform_size('seeds')} images, the training "
                f"set's are {train.require_uniform_size('training')}; make both with the same --image-size"
            )
        if identity != parent_identity:
            extras.append((folder, ids, labels))
            continue
        if len(source) != len(train):  # a parent holds the training set's samples, id for id
            raise DataError(
                f"{where}: {folder} is named as the training set's clean parent but holds {len(source)} "
                f"samples, the training set {len(train)}; draw the seeds from the set `asd-ray poison` read"
            )
        keep = np.zeros(len(train), bool)
        keep[ids] = True
        trusted, order, _ = load_share(source, keep=keep)  # ascending ids
        training, _, _ = load_share(train, keep=keep)
        trusted_labels = labels[np.argsort(ids)]
        changed = (trusted != training).reshape(len(order), -1).any(1) | (
            train.labels[order] != trusted_labels
        )
        in_place.append(order[~changed])
        tampered.append(order[changed])
        if changed.any():
            extras.append((folder, order[changed], trusted_labels[changed]))
    plan = SeedPlan(_concat(in_place), _concat(tampered), extras)
    used = np.concatenate([plan.in_place, plan.tampered])
    unique, counts = np.unique(used, return_counts=True)
    if (counts > 1).any():  # one training sample listed under two spellings of its folder
        raise DataError(
            f"{where}: training sample {unique[counts > 1][0]} is listed as a seed more than once "
            "(from the training set and from its clean parent); every seed must be a distinct sample"
        )
    counts = np.bincount(seeds.column("label").to_numpy(), minlength=train.info.num_classes)
    short = np.flatnonzero(counts < per_class)
    if short.size:
        c = short[0]
        raise DataError(
            f"{where}: class {c} ({train.info.class_names[c]!r}) has {counts[c]} seed(s), the "
            f"config needs split.seeds_per_class = {per_class}; pick more seeds (`asd-ray seeds "
            "--per-class`) or lower split.seeds_per_class"
        )
    return plan


def _parent_identity(train: ShardSet) -> str | None:
    """The identity of the clean set ``train`` was poisoned from: recorded by ``asd-ray
    poison``, else (a set poisoned before it was recorded) that of the folder it names."""
    attack = train.info.attack or {}
    if "clean_identity" in attack:
        return attack["clean_identity"]
    try:
        return (
            ShardSet(storage.location(attack["clean"], train.folder.settings)).identity()
            if "clean" in attack
            else None
        )
    except (DataError, StorageError):  # moved, removed or unreachable since: no seed can be its copy
        return None


def _check_ids(ids: np.ndarray, n: int, where: str, what: str) -> None:
    if len(ids) and (ids.max() >= n or ids.min() < 0):
        raise DataError(f"{where}: seed sample id {ids.max()} is outside {what} (ids 0..{n - 1})")


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.empty(0, np.int64)
