"""Classifiers for ASD: a backbone to a pooled feature vector plus one linear head.

ASD's stage 3 trains a copy of the model (the virtual model) updating only its
last layers; :meth:`Classifier.meta_parameters` names them per architecture.
"""

from asd_ray.model_card import MODEL_NAMES
from asd_ray.models.registry import (
    Classifier,
    ModelSpec,
    Weights,
    build_model,
    load_numpy_weights,
    to_numpy_weights,
)

__all__ = [
    "MODEL_NAMES",
    "Classifier",
    "ModelSpec",
    "Weights",
    "build_model",
    "load_numpy_weights",
    "to_numpy_weights",
]
