"""The trained classifier a run hands over: ``RUN/model/{last,best}.pt``.

Each ``.pt`` file holds plain tensors plus its model card (architecture, classes,
input size and normalisation, the data it was trained on, its epoch and test
figures), so ``torch.load(..., weights_only=True)`` reads it and one file is
enough to rebuild the model. ``card.json`` beside them describes both, for
people and for registries. A run folder or model file may be local or at an
object-store URI (:mod:`asd_ray.storage`); either is read with the same caps.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch

from asd_ray import files, storage, tables
from asd_ray.errors import ConfigError, DataError
from asd_ray.model_card import KINDS, MODEL_DIR, check_file_card
from asd_ray.models.registry import ModelSpec, Weights
from asd_ray.storage import Location

FORMAT = "asd-ray-model/1"
# torch.load(weights_only=True) could run code from a crafted file before torch 2.6
# (CVE-2025-32434, GHSA-53q9-r3pm-6pq6).
SAFE_TORCH = (2, 6)
MAX_MODEL_BYTES = 2**31  # DenseNet-121 at 1,000 classes is ~32 MB; a larger file is not ours


def save_model(folder: Path, kind: str, weights: Weights, card: dict[str, Any]) -> Path:
    """Write ``folder/{kind}.pt`` atomically: the weights as tensors and the card."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: torch.from_numpy(v.copy()) for k, v in weights.items()}
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "state_dict": state, "card": card}, buffer)
    path = folder / f"{kind}.pt"
    with tables.atomic_file(path) as tmp:
        tmp.write_bytes(buffer.getvalue())
    return path


def model_file(source: str | Path | Location, kind: str = "best") -> Location:
    """The ``.pt`` file ``source`` names: a file, a run folder, or its ``model/`` folder
    (each local or at an object-store URI)."""
    if kind not in KINDS:
        raise DataError(f"model kind {kind!r}: choose one of {', '.join(KINDS)}")
    source = storage.location(source)
    for candidate in (source, source / f"{kind}.pt", source / MODEL_DIR / f"{kind}.pt"):
        if storage.is_file(candidate):
            return candidate
    raise DataError(
        f"{source}: no model here (expected a .pt file, or a run folder with {MODEL_DIR}/{kind}.pt); "
        "pass the folder of a run made by asd-ray 0.1 or later"
    )


def load_weights_only(data: bytes, where: Path | Location, *, fix: str, map_location: Any = "cpu") -> Any:
    """``torch.load`` of untrusted bytes: plain containers and tensors only, on a torch
    whose weights-only loading no crafted file can make run code.

    Raises:
        ConfigError: this torch is older than :data:`SAFE_TORCH`.
        DataError: the bytes are not a readable weights-only file (any failure on a
            crafted file is a data problem, not a bug).
    """
    if _torch_version() < SAFE_TORCH:
        raise ConfigError(
            f"{where}: torch {torch.__version__} can run code while loading a file even with "
            f"weights_only=True; install torch >= {'.'.join(map(str, SAFE_TORCH))}"
        )
    buffer = io.BytesIO(data)
    try:
        return torch.load(buffer, weights_only=True, map_location=map_location)
    except Exception as err:  # noqa: BLE001 (whatever a crafted file makes the unpickler raise)
        raise DataError(f"{where}: not a readable file of asd-ray ({type(err).__name__}); {fix}") from None


def read_model_file(path: Path | Location) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and checked card of a model file (local or an object), loaded as
    weights only (never unpickled code), with the file's location and sha256 added to the card."""
    data = files.read_file(  # a FIFO or /dev/zero would block or never end
        path,
        what=str(path),
        fix="this is not a classifier asd-ray wrote",
        limit=MAX_MODEL_BYTES,
        follow_links=True,  # a link to a model file is read as that file: it is parsed, never shown
    )
    saved = load_weights_only(data, path, fix="re-export it")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise DataError(f"{path}: not an asd-ray model file (format {FORMAT} expected)")
    state = saved.get("state_dict")
    if (
        not isinstance(state, dict)
        or not state
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items())
    ):
        raise DataError(f"{path}: state_dict must map parameter names to tensors; re-export the model")
    card = check_file_card(saved.get("card"), path)
    return state, dict(card, file=str(path), sha256=hashlib.sha256(data).hexdigest())


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def load_model(
    source: str | Path | Location, kind: str = "best", *, factory: str | None = None
) -> torch.nn.Module:
    """The trained classifier of a run, in eval mode on the CPU, with its card as ``.card``.

    A model file never chooses code to run: a built-in architecture is rebuilt from
    the card's name, and a custom one only from the factory *you* name here; the
    card's recorded factory is compared with yours, never imported.

    Args:
        source: a run folder, its ``model/`` folder, or a ``.pt`` file; a local path or
            an ``s3://`` / ``gs://`` URI.
        kind: ``best`` or ``last`` when ``source`` is a folder.
        factory: for a model trained with ``model.name=custom``, the
            ``package.module:function`` that builds it (code you trust).

    Inputs are ``(B, C, H, W)`` float tensors normalised as ``model.card["input"]`` says:
    ``(pixels / 255 - mean) / std``.

    Raises:
        DataError: the file is not a readable asd-ray model, its card is malformed, or
            ``factory`` is missing, unneeded, or not the one the card records.
    """
    state, card = read_model_file(model_file(source, kind))
    arch = card["architecture"]
    recorded = arch.get("factory")
    if recorded is None and factory is not None:
        raise DataError(f"{card['file']}: a built-in {arch['name']} model needs no factory; drop --factory")
    if recorded is not None and factory is None:
        raise DataError(
            f"{card['file']}: trained with a custom architecture whose card names the factory "
            f"{recorded!r}; a model file never chooses code to run: if you trust that code, pass "
            f"--factory {recorded} (load_model(..., factory=...))"
        )
    if recorded is not None and factory != recorded:
        raise DataError(
            f"{card['file']}: --factory {factory!r} is not the factory this model was trained with "
            f"({recorded!r}); pass the model's own factory"
        )
    spec = ModelSpec(
        arch["name"],
        arch["num_classes"],
        arch["in_channels"],
        arch["image_size"],
        factory,
        tuple(arch.get("meta_layers", ())),
    )
    try:
        model = spec.build()
    except ConfigError as err:
        if factory is not None:
            raise  # the user's --factory, not the file
        raise DataError(
            f"{card['file']}: the card's architecture cannot be built ({err}); re-export the model"
        ) from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DataError(f"{card['file']}: weights do not fit {spec} ({str(err).splitlines()[0]})") from None
    model.card = card
    return model.train(False)
