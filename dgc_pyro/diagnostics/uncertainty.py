"""Calibration, uncertainty scores, the reject option and accuracy-coverage curves.

Every function takes either a class-probability matrix ``proba`` ``(N, C)`` (numpy, torch or list)
or a :class:`~dgc_pyro.inference.Prediction`. The calibration numbers come from
:mod:`dgc_pyro.metrics`; this module only gathers and extends them.

Uncertainty scores (larger = less certain), all in nats or probability units:

- ``"entropy"``: total predictive entropy H[p(y | x)], in [0, log C];
- ``"least_confidence"``: 1 - max_c p(y = c | x), in [0, 1 - 1/C];
- ``"mutual_information"``: epistemic part of the entropy (a :class:`Prediction` only);
- ``"expected_entropy"``: aleatoric part of the entropy (a :class:`Prediction` only).

The reject option rejects an example when its score is *strictly greater* than the threshold and
accepts it otherwise (so threshold ``inf`` accepts everything and a negative threshold rejects
everything).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dgc_pyro.inference.predict import UNCERTAINTY_SCORES, Prediction
from dgc_pyro.metrics import (
    brier_score,
    check_proba,
    coverage_curve,
    expected_calibration_error,
    negative_log_likelihood,
    reliability_bins,
)

__all__ = [
    "UNCERTAINTY_SCORES",
    "calibration",
    "coverage_accuracy_curve",
    "reject",
    "reliability",
    "uncertainty_score",
]


def _numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):
        t = t.detach().cpu().numpy()
    return np.asarray(t)


def _proba_of(proba: Any) -> np.ndarray:
    return _numpy(proba.proba if isinstance(proba, Prediction) else proba)


def uncertainty_score(proba: Any, score: str = "entropy") -> np.ndarray:
    """Per-example uncertainty ``(N,)`` of a probability matrix or a :class:`Prediction`.

    ``score`` is one of :data:`UNCERTAINTY_SCORES`; the entropy decomposition scores need a
    :class:`Prediction` (a probability matrix does not carry the per-draw posteriors).
    """
    if score not in UNCERTAINTY_SCORES:
        raise ValueError(f"score must be one of {UNCERTAINTY_SCORES}, got {score!r}")
    if isinstance(proba, Prediction):
        values = _numpy(proba.uncertainty(score))
        return values if score == "least_confidence" else values.astype(np.float64)
    if score in ("mutual_information", "expected_entropy"):
        raise ValueError(f"score {score!r} needs a Prediction (from dgc_pyro.inference.predict), not a proba matrix")
    p = check_proba(proba)
    if score == "least_confidence":
        return 1.0 - p.max(axis=1)
    return -(p * np.log(np.clip(p, 1e-30, None))).sum(axis=1)


def reject(proba: Any, threshold: float, score: str = "entropy") -> np.ndarray:
    """Boolean mask ``(N,)``, True where the example is rejected (``score > threshold``)."""
    return uncertainty_score(proba, score) > float(threshold)


def calibration(y_true: Any, proba: Any, n_bins: int = 15) -> dict[str, float]:
    """``ece`` (top-label, ``n_bins`` equal-width bins), ``nll`` and ``brier`` of a class posterior."""
    p = _proba_of(proba)
    return {
        "ece": expected_calibration_error(y_true, p, n_bins=n_bins),
        "nll": negative_log_likelihood(y_true, p),
        "brier": brier_score(y_true, p),
    }


def reliability(y_true: Any, proba: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin data of a reliability diagram (see :func:`dgc_pyro.metrics.reliability_bins`)."""
    return reliability_bins(y_true, _proba_of(proba), n_bins=n_bins)


def coverage_accuracy_curve(y_true: Any, proba: Any, score: str = "entropy") -> dict[str, np.ndarray]:
    """Accuracy and ACSA on the accepted examples as the reject threshold sweeps the ``score`` of
    :func:`uncertainty_score`: :func:`dgc_pyro.metrics.coverage_curve` of that score.

    Returns ``threshold``, ``coverage`` (increasing, the last point is 1), ``accuracy`` and ``acsa`` (over the
    classes with at least one accepted example); ties are accepted together.
    """
    return coverage_curve(y_true, _proba_of(proba), uncertainty_score(proba, score))
