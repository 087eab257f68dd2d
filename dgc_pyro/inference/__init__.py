"""Objectives, SVI training, prediction and augmentation for DGC."""

from dgc_pyro.config import TrainConfig
from dgc_pyro.device import resolve_device
from dgc_pyro.inference.augment import AugmentationWarning, augment, synthetic_counts
from dgc_pyro.inference.density import OODDetector, fit_ood_threshold
from dgc_pyro.inference.engine import ENGINES, make_step
from dgc_pyro.inference.fit import History, fit
from dgc_pyro.inference.objectives import OBJECTIVES, get_objective, iwae_loss
from dgc_pyro.inference.posterior import posterior_log_densities, posterior_predictive
from dgc_pyro.inference.predict import (
    Prediction,
    class_log_weights,
    posterior_from_log_weights,
    predict,
    predict_proba,
)
from dgc_pyro.inference.swag import SwagCollector, SwagHead

__all__ = [
    "ENGINES",
    "OBJECTIVES",
    "AugmentationWarning",
    "History",
    "OODDetector",
    "Prediction",
    "SwagCollector",
    "SwagHead",
    "TrainConfig",
    "augment",
    "class_log_weights",
    "fit",
    "fit_ood_threshold",
    "get_objective",
    "iwae_loss",
    "make_step",
    "posterior_from_log_weights",
    "posterior_log_densities",
    "posterior_predictive",
    "predict",
    "predict_proba",
    "resolve_device",
    "synthetic_counts",
]
