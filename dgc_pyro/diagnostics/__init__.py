"""Diagnostics for fitted DGC models: calibration (and post-hoc temperature scaling, :mod:`dgc_pyro.calibration`),
the reject option, importance-sampling reliability (PSIS k-hat) and an ArviZ ``DataTree`` view with posterior predictive checks and approximate LOO.

See ``docs/diagnostics.md`` for how to read them.
"""

from dgc_pyro.calibration import apply_temperature, temperature_scale
from dgc_pyro.diagnostics.datatree import LOO_METHODS, compare_models, loo, ppc_class_frequencies, to_datatree
from dgc_pyro.diagnostics.importance import MIN_DRAWS, good_k, importance_diagnostics, pareto_khat
from dgc_pyro.diagnostics.plots import (
    plot_coverage_accuracy,
    plot_khat,
    plot_ppc_class_frequencies,
    plot_reliability,
    save_augmentation_grid,
    save_image_grid,
)
from dgc_pyro.diagnostics.uncertainty import (
    UNCERTAINTY_SCORES,
    calibration,
    coverage_accuracy_curve,
    reject,
    reliability,
    uncertainty_score,
)

__all__ = [
    "LOO_METHODS",
    "MIN_DRAWS",
    "UNCERTAINTY_SCORES",
    "apply_temperature",
    "calibration",
    "compare_models",
    "coverage_accuracy_curve",
    "good_k",
    "importance_diagnostics",
    "loo",
    "pareto_khat",
    "plot_coverage_accuracy",
    "plot_khat",
    "plot_ppc_class_frequencies",
    "plot_reliability",
    "ppc_class_frequencies",
    "reject",
    "reliability",
    "save_augmentation_grid",
    "save_image_grid",
    "temperature_scale",
    "to_datatree",
    "uncertainty_score",
]
