"""Objectives, SVI training, prediction and augmentation for DGC."""

from dgc_pyro.config import TrainConfig
from dgc_pyro.inference.augment import AugmentationWarning, augment, synthetic_counts
from dgc_pyro.inference.density import OODDetector, fit_ood_threshold
from dgc_pyro.device import resolve_device
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
    "fit",
    "TrainConfig",
    "History",
    "ENGINES",
    "make_step",
    "OBJECTIVES",
    "get_objective",
    "iwae_loss",
    "SwagCollector",
    "SwagHead",
    "predict",
    "predict_proba",
    "Prediction",
    "class_log_weights",
    "fit_ood_threshold",
    "OODDetector",
    "posterior_from_log_weights",
    "posterior_predictive",
    "posterior_log_densities",
    "resolve_device",
    "augment",
    "synthetic_counts",
    "AugmentationWarning",
]
