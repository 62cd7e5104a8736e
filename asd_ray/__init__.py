"""asd-ray: ASD backdoor defense (CVPR 2023) as a Ray + WebDataset pipeline.

Data flows shards -> scores -> split tables -> training -> evaluation/audit;
the module names follow that order (see README). The Python API::

    import asd_ray
    config = asd_ray.load_config("mnist-quick", overrides=["epochs=20"])
    summary = asd_ray.run(config, asd_ray.RunInputs(train=..., test=..., seeds=...), "runs/x")
    model = asd_ray.load_model("runs/x")  # best.pt, in eval mode

The names load on first use, so ``import asd_ray.steps`` (pure torch) needs no Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from asd_ray.errors import DataError, StorageError

__version__ = "0.1.0"

_LAZY = {
    "run": "asd_ray.driver",
    "RunInputs": "asd_ray.inputs",
    "load_config": "asd_ray.config",
    "load_model": "asd_ray.models.saved",
    "evaluate_model": "asd_ray.evaluate",
}
__all__ = ["DataError", "StorageError", "__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'asd_ray' has no attribute {name!r}")
