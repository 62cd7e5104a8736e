"""Resuming a run, said once: what may change, what is restored, what is repaired.

A run resumes from two records. The run folder's metrics table commits each epoch
(:func:`asd_ray.run_folder.write_metrics`); Ray Train's checkpoints (``cluster.storage``
or RUN/train) hold the model and optimizer after each trained epoch. A driver or worker
may die between the two, so each side restores from what it can prove intact:

- **The command** (``asd-ray run --resume``) reads the run's own config back and applies
  only what the command changes (:func:`resumed_config`); the driver refuses any change
  but where the run runs and how long (:func:`check_resumable`).
- **The driver** sets aside a torn checkpoint index before Ray Train starts
  (:func:`set_aside_unreadable_snapshot`) and, once the workers say which epoch they
  restored, repairs a folder a kill left behind (:func:`repair_needed`).
- **Each worker** loads the newest checkpoint whose digest matches (:func:`restore`), and
  answers a task it already did (re-sent after a restart) from that checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from asd_ray import compute, storage
from asd_ray.config import RunConfig, StorageConfig, load_recorded_config, read_config_file
from asd_ray.errors import ConfigError, DataError
from asd_ray.model_card import CARD_FILE, read_run_card
from asd_ray.models.saved import load_weights_only, read_model_file
from asd_ray.run_folder import RESTORE, best_row, recorded_config
from asd_ray.storage import Location

CHECKPOINT_FILE = "state.pt"
CHECKPOINT_DIGEST = "state.sha256"  # a checkpoint whose state.pt does not match it is skipped
MAX_CHECKPOINT_BYTES = 64 * 1024**3  # a checkpoint holds the model and Adam's two moments
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's index of the checkpoints
_SNAPSHOT_BYTES = 256 * 1024**2  # the index lists every kept checkpoint's metrics


# --------------------------------------------------------------------- what may change


def resumed_config(
    out: str,
    settings: StorageConfig,
    *,
    preset: str | None,
    overrides: list[str],
    config_file: str | None,
) -> RunConfig:
    """The config of the run in ``out`` with what the command changes (``--set``,
    ``--config``, the cluster flags); the driver then refuses what a resume may not change.

    Raises:
        ConfigError: ``preset`` names another preset than the run's.
        DataError: the run's model comes from a factory the command does not restate (a
            run folder never chooses code to run).
    """
    saved = recorded_config(out, settings)
    recorded = load_recorded_config(saved)
    if preset is not None and preset != recorded.preset:
        raise ConfigError(
            f"--preset {preset}: the run in {out} was made with preset {recorded.preset}, "
            "and a resumed run keeps its settings; drop --preset"
        )
    config = dataclasses.replace(load_recorded_config(saved, overrides, config_file), storage=settings)
    restated = any(o.partition("=")[0].strip() == "model.factory" for o in overrides) or (
        config_file is not None and "factory" in (read_config_file(config_file).get("model") or {})
    )
    if recorded.model.factory is not None and not restated:
        raise DataError(
            f"{saved}: the run's model is built by the factory {recorded.model.factory!r}, and a run "
            "folder never chooses code to run: if you trust that code, resume with "
            f"--set model.factory={recorded.model.factory}"
        )
    return config


def check_resumable(saved: RunConfig, given: RunConfig, out: Path) -> None:
    """Refuse a resume that changes the run's algorithm or data settings: only
    ``cluster.*``, ``storage.*`` and ``epochs`` may differ (a preset is values, not a
    label; the lambda_u ramp and stage boundaries stay as configured, and are checked
    against the new length)."""
    refused = [key for key in _changed_keys(saved.to_dict(), given.to_dict()) if not _resumable(key)]
    if refused:
        raise DataError(
            f"--resume {out}: {refused[0]} differs from the run's config ({len(refused)} setting(s)); "
            "a resumed run keeps its algorithm and data settings (only cluster.*, storage.* and "
            "epochs may change): drop the flag, or start a new run with --out"
        )


def _changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two config dicts."""
    keys = []
    for key in old.keys() | new.keys():
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(prefix + key)
    return sorted(keys)


def _resumable(key: str) -> bool:
    return key.startswith(("cluster.", "storage.")) or key == "epochs"


# --------------------------------------------------------------------- the driver


def set_aside_unreadable_snapshot(train_dir: Location, progress: Callable[[str], None]) -> None:
    """Move Ray Train's checkpoint index aside when a crash left it torn (Ray Train would
    refuse to start); the workers then resume from the newest intact checkpoint folder."""
    path = train_dir / TRAIN_SNAPSHOT
    if not storage.exists(path):
        return
    try:
        json.loads(storage.read_bytes(path, limit=_SNAPSHOT_BYTES))
    except (DataError, ValueError, RecursionError):
        aside = train_dir / f"{path.name}.unreadable-{int(time.time())}"
        try:
            path.fs.move(path.fs_path, aside.fs_path)
        except OSError as err:
            raise storage.failure(path, err, "moving it aside") from None
        progress(f"asd-ray: {path} was unreadable (moved to {aside.name}); using the checkpoint folders")


def repair_needed(done: int, rows: list[dict[str, Any]], model_folder: Path) -> str | None:
    """What the run folder lacks once the workers restored epoch ``done``, given its
    metrics ``rows`` up to that epoch: ``"row"`` (the epoch was checkpointed but the driver
    stopped before recording it: evaluate it again), ``"model"`` (the model folder does
    not hold the last recorded epoch: save it again from the checkpoint), or None."""
    if done >= 0 and (not rows or rows[-1]["epoch"] < done):
        return "row"
    if rows and not model_holds(model_folder, rows):
        return "model"
    return None


def model_holds(folder: Path, rows: list[dict[str, Any]]) -> bool:
    """Whether the model folder holds the last recorded epoch: last.pt, card.json and, when
    that epoch is the best, best.pt (a driver of an older asd-ray killed between its
    writes left a metrics row whose model was not saved)."""
    last, best = rows[-1]["epoch"], best_row(rows)["epoch"]
    try:
        card = read_run_card(folder / CARD_FILE, fix=RESTORE)
        held = {kind: read_model_file(folder / f"{kind}.pt")[1]["epoch"] for kind in ("last", "best")}
    except (OSError, DataError):
        return False
    if (card["last"]["epoch"], card["best"]["epoch"], held["last"]) != (last, best, last):
        return False
    return best != last or held["best"] == last  # an earlier best.pt has no checkpoint to come from


# --------------------------------------------------------------------- the workers


@dataclasses.dataclass(frozen=True)
class Restored:
    """What a worker's checkpoint says was done (nothing: epoch -1, no pre-training)."""

    epoch: int = -1  # the last epoch in a checkpoint (-1: none, or the pre-training's)
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # its losses, for a re-sent task
    resumed_from: str | None = None  # which checkpoint was used, and which were skipped
    pretrained: bool = False  # the transfer pre-training is in a checkpoint

    def covers(self, epoch: int) -> bool:
        """Whether a task for ``epoch`` was done before (re-sent after a restart)."""
        return epoch <= self.epoch


def restore(
    checkpoints: Location, model: torch.nn.Module, optimizer: torch.optim.Optimizer, device: torch.device
) -> Restored:
    """Load the run's newest intact checkpoint into ``model`` and ``optimizer``, after a
    worker-group restart as on ``--resume``.

    Not ``ray.train.get_checkpoint()``: its controller registers a report up to one health
    check after the worker made it, so a worker killed in between restarted its group from
    scratch; and a torn index of Ray Train's would hide every checkpoint.
    """
    latest = newest_checkpoint(checkpoints)
    if latest is None:
        return Restored()
    state, resumed_from = newest_intact_state(latest, device)
    model.load_state_dict(state["model"])
    compute.load_adam_state(optimizer, state["optimizer"])
    # any checkpoint comes after the pre-training, if the run has one
    return Restored(int(state["epoch"]), state.get("metrics", {}), resumed_from, pretrained=True)


def newest_checkpoint(folder: Location) -> Location | None:
    """The newest ``checkpoint_*`` folder of a run's Ray Train storage (names sort by time),
    a local folder or an object prefix."""
    names = storage.list_names(folder, limit=storage.MAX_LISTING, folders=True)  # not Ray Train's index file
    found = [n for n in names if n.startswith("checkpoint_")]
    return folder / max(found) if found else None


def newest_intact_state(latest: Location, device: torch.device) -> tuple[dict, str]:
    """The newest checkpoint state, starting from ``latest``, whose ``state.pt`` matches its
    digest and loads (weights only); older checkpoints beside it are the fallback.

    Returns:
        the state and a line saying which checkpoint was used (and which were skipped).

    Raises:
        DataError: when no checkpoint of the run is intact.
    """
    names = storage.list_names(latest.parent, limit=storage.MAX_LISTING, folders=True)
    candidates = sorted((n for n in names if n.startswith("checkpoint_") and n <= latest.name), reverse=True)
    skipped = []
    for name in candidates:
        folder = latest.parent / name
        state_path, digest_path = folder / CHECKPOINT_FILE, folder / CHECKPOINT_DIGEST
        try:
            data = storage.read_bytes(state_path, limit=MAX_CHECKPOINT_BYTES)
            if storage.exists(digest_path):
                digest = storage.read_bytes(digest_path, limit=1024).decode(errors="replace").strip()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise DataError(f"{state_path}: digest mismatch")
            state = load_weights_only(data, state_path, fix="skipped", map_location=device)
        except (OSError, DataError):  # unreadable, digest mismatch, or not a checkpoint
            skipped.append(name)
            continue
        note = f"resumed from {name} (epoch {int(state['epoch'])})"
        return state, note + (f"; skipped unreadable {', '.join(skipped)}" if skipped else "")
    raise DataError(
        f"{latest.parent}: no intact checkpoint ({', '.join(skipped)} unreadable); start the run again"
    )


def checkpoint_state(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    epoch: int,
    seed: int,
    split: str | None,
    metrics: dict[str, float],
) -> dict[str, Any]:
    """What a checkpoint holds: the model, the optimizer, the epoch, the base seed, the digest
    of the pools trained on (:attr:`asd_ray.messages.Pools.digest`) and the epoch's losses,
    answered again for a task re-sent after a restart."""
    return {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "seed": seed,
        "split": split,
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
