"""Objectives, SVI training, prediction and augmentation for DGC."""

from dgc_pyro.inference.device import resolve_device
from dgc_pyro.inference.engine import ENGINES, make_step
from dgc_pyro.inference.fit import History, fit
from dgc_pyro.inference.objectives import OBJECTIVES, get_objective
from dgc_pyro.inference.predict import (
    Prediction,
    class_log_weights,
    posterior_from_log_weights,
    predict,
    predict_proba,
)

__all__ = [
    "fit",
    "History",
    "ENGINES",
    "OBJECTIVES",
    "get_objective",
    "predict",
    "predict_proba",
    "Prediction",
    "class_log_weights",
    "posterior_from_log_weights",
    "resolve_device",
]
