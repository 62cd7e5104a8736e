"""The trained classifier a run hands over: ``RUN/model/{last,best}.pt`` and ``card.json``.

Each ``.pt`` file holds plain tensors plus its model card (architecture, classes,
input size and normalisation, the data it was trained on, its epoch and test
figures), so ``torch.load(..., weights_only=True)`` reads it and one file is
enough to rebuild the model. ``card.json`` beside them describes both, for
people and for registries.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch

from asd_ray import tables
from asd_ray.errors import DataError
from asd_ray.models.registry import ModelSpec, Weights

MODEL_DIR = "model"
CARD_FILE = "card.json"
FORMAT = "asd-ray-model/1"
KINDS = ("best", "last")


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


def write_card(folder: Path, card: dict[str, Any]) -> Path:
    path = folder / CARD_FILE
    with tables.atomic_file(path) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return path


def model_file(source: str | Path, kind: str = "best") -> Path:
    """The ``.pt`` file ``source`` names: a file, a run folder, or its ``model/`` folder."""
    if kind not in KINDS:
        raise DataError(f"model kind {kind!r}: choose one of {', '.join(KINDS)}")
    source = Path(source)
    for candidate in (source, source / f"{kind}.pt", source / MODEL_DIR / f"{kind}.pt"):
        if candidate.is_file():
            return candidate
    raise DataError(
        f"{source}: no model here (expected a .pt file, or a run folder with {MODEL_DIR}/{kind}.pt); "
        "pass the folder of a run made by asd-ray 0.1 or later"
    )


def read_model_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and card of a model file, loaded as weights only (never unpickled code)."""
    data = path.read_bytes()
    buffer = io.BytesIO(data)
    try:
        saved = torch.load(buffer, weights_only=True, map_location="cpu")
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise DataError(
            f"{path}: not a readable asd-ray model ({type(err).__name__}); re-export it"
        ) from None
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise DataError(f"{path}: not an asd-ray model file (format {FORMAT} expected)")
    card = dict(saved["card"], file=str(path), sha256=hashlib.sha256(data).hexdigest())
    return saved["state_dict"], card


def load_model(source: str | Path, kind: str = "best") -> torch.nn.Module:
    """The trained classifier of a run, in eval mode on the CPU, with its card as ``.card``.

    Args:
        source: a run folder, its ``model/`` folder, or a ``.pt`` file.
        kind: ``best`` or ``last`` when ``source`` is a folder.

    Inputs are ``(B, C, H, W)`` float tensors normalised as ``model.card["input"]`` says:
    ``(pixels / 255 - mean) / std``.
    """
    state, card = read_model_file(model_file(source, kind))
    spec = ModelSpec(**card["architecture"])
    model = spec.build()
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise DataError(f"{card['file']}: weights do not fit {spec} ({str(err).splitlines()[0]})") from None
    model.card = card
    return model.train(False)
