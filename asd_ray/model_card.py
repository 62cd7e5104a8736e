"""The model card: what a trained classifier is, as plain data (``RUN/model/card.json``,
and the card inside each ``.pt`` file, :mod:`asd_ray.models.saved`).

Torch-free, so the commands that only read a run's tables (``asd-ray audit``,
``report``) read its card without loading torch (:mod:`asd_ray.models` loads it).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from asd_ray import files, tables
from asd_ray.data.records import MAX_PIXELS
from asd_ray.data.shard_layout import JPEG_MAX_SIDE
from asd_ray.data.sources.base import MAX_CLASSES
from asd_ray.errors import DataError
from asd_ray.storage import Location

MODEL_NAMES: tuple[str, ...] = ("resnet18", "vgg11", "mobilenet_v2", "densenet121", "small_cnn")
CUSTOM = "custom"  # a model built by the factory a user names (model.factory)
MODEL_DIR = "model"
CARD_FILE = "card.json"
KINDS = ("best", "last")
MAX_EPOCH = 10**6


def write_card(folder: Path, card: dict[str, Any]) -> Path:
    path = folder / CARD_FILE
    with tables.atomic_file(path) as tmp:
        tmp.write_text(json.dumps(card, indent=2) + "\n")
    return path


def check_file_card(card: Any, where: Path | Location) -> dict[str, Any]:
    """The card of a model file: a description (:func:`check_card`) of one epoch's model of
    one of the :data:`KINDS`, else a one-line :class:`DataError` naming ``where``."""
    fix = "re-export the model"
    check_card(card, where, fix=fix)
    try:
        _whole(card, "epoch", 0, MAX_EPOCH)
        if _field(card, "kind", str) not in KINDS:
            raise _CardProblem(f"kind {card['kind']!r} is not one of {', '.join(KINDS)}")
    except _CardProblem as problem:
        raise DataError(f"{where}: {problem}; {fix}") from None
    return card


def check_card(card: Any, where: Path | Location, *, fix: str) -> dict[str, Any]:
    """``card`` if it has every field a model is rebuilt and evaluated from, with its types
    and ranges, else a one-line :class:`DataError` naming ``where``, the field and ``fix``.

    A card is data: it may name a built-in architecture and record a custom
    factory's name, but nothing in it is ever imported or called.
    """
    try:
        _check_description(card)
    except _CardProblem as problem:
        raise DataError(f"{where}: {problem}; {fix}") from None
    return card


def read_run_card(path: Path | Location, *, fix: str) -> dict[str, Any]:
    """``RUN/model/card.json``: a model card (as :func:`check_card` checks it) that also
    records the best and last epochs and the training set's identity."""
    card = files.read_json(path, fix=fix)  # a regular file, never through a link, size and depth capped
    check_card(card, path, fix=fix)
    try:
        for kind in KINDS:
            _whole(_field(card, kind, dict), "epoch", 0, MAX_EPOCH, f"{kind}.")
        train = _field(_field(card, "data", dict), "train", dict, "data.")
        _field(train, "identity_sha256", str, "data.train.")
    except _CardProblem as problem:
        raise DataError(f"{path}: {problem}; {fix}") from None
    return card


class _CardProblem(Exception):
    """What is wrong with a card, without where it came from or how to fix it."""


def _check_description(card: Any) -> None:
    if not isinstance(card, dict):
        raise _CardProblem(f"the model card is a {type(card).__name__}, not a mapping")
    arch = _field(card, "architecture", dict)
    name = _field(arch, "name", str, "architecture.")
    if name not in (*MODEL_NAMES, CUSTOM):
        raise _CardProblem(
            f"architecture.name {name!r} is unknown; known: {', '.join((*MODEL_NAMES, CUSTOM))}"
        )
    num_classes = _whole(arch, "num_classes", 2, MAX_CLASSES, "architecture.")
    in_channels = _whole(arch, "in_channels", 1, 3, "architecture.")
    image_size = _whole(arch, "image_size", 1, JPEG_MAX_SIDE, "architecture.")
    if (name == CUSTOM) != isinstance(arch.get("factory"), str):
        raise _CardProblem("architecture.factory must be a name exactly when architecture.name is custom")
    layers = arch.get("meta_layers", [])
    if not isinstance(layers, (list, tuple)) or not all(isinstance(x, str) for x in layers):
        raise _CardProblem("architecture.meta_layers must be a list of module names")
    classes = _field(card, "classes", list)
    if len(classes) != num_classes or not all(isinstance(c, str) for c in classes):
        raise _CardProblem(f"classes must be {num_classes} names (architecture.num_classes)")
    shape = _field(card, "input", dict)
    channels = _whole(shape, "channels", 1, 3, "input.")
    height = _whole(shape, "height", 1, JPEG_MAX_SIDE, "input.")
    width = _whole(shape, "width", 1, JPEG_MAX_SIDE, "input.")
    if height * width > MAX_PIXELS:
        raise _CardProblem(f"input.height x input.width is over the {MAX_PIXELS}-pixel image limit")
    if (in_channels, image_size) != (channels, max(height, width)):
        raise _CardProblem(
            f"architecture takes {in_channels} channel(s) at {image_size} px, input says {channels} at "
            f"{height}x{width}"
        )
    for stat in ("mean", "std"):
        values = _field(shape, stat, list, "input.")
        if len(values) != channels or not all(_finite_number(v) for v in values):
            raise _CardProblem(f"input.{stat} must be {channels} finite numbers (one per channel)")
    if not all(v > 0 for v in shape["std"]):
        raise _CardProblem("input.std must be > 0 in every channel")


def _field(mapping: dict, key: str, kind: type, prefix: str = "") -> Any:
    value = mapping.get(key)
    if not isinstance(value, kind) or isinstance(value, bool) != (kind is bool):
        got = "missing" if key not in mapping else f"a {type(value).__name__}"
        raise _CardProblem(f"model card field {prefix}{key} is {got}, not a {kind.__name__}")
    return value


def _whole(mapping: dict, key: str, low: int, high: int, prefix: str = "") -> int:
    value = _field(mapping, key, int, prefix)
    if not low <= value <= high:
        raise _CardProblem(f"model card field {prefix}{key} = {value} is outside {low}..{high}")
    return value


def _finite_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
