"""Reliability of the importance sampling behind each class posterior: PSIS k-hat and ESS.

:func:`dgc_pyro.inference.predict` estimates log p(x, y = c) for every example and class from D
importance weights (``Prediction.log_weights``, shape ``(N, C, D)``). Fitting a generalised Pareto
distribution to the largest weights (Pareto-smoothed importance sampling, Vehtari et al. 2024) gives
the shape k-hat: below ``good_k = min(1 - 1/log10(D), 0.7)`` the estimate is reliable, above 0.7 it
rests on a handful of draws and is not to be trusted. The Kish effective sample size
``(sum w)^2 / sum w^2`` of the raw weights tells how many draws carry the estimate.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from dgc_pyro.inference.predict import Prediction

__all__ = ["MIN_DRAWS", "good_k", "importance_diagnostics", "pareto_khat"]

#: PSIS fits its tail to floor(D / 5) draws (for D <= 225) and needs at least 5 of them.
MIN_DRAWS = 25


def good_k(num_draws: int) -> float:
    """The sample-size dependent k-hat threshold min(1 - 1/log10(D), 0.7) of Vehtari et al. (2024)."""
    if isinstance(num_draws, bool) or not isinstance(num_draws, (int, np.integer)) or num_draws < 2:
        raise ValueError(f"num_draws must be an integer >= 2 (the threshold uses log10 of it), got {num_draws!r}")
    return min(1.0 - 1.0 / math.log10(num_draws), 0.7)


def _psis_khat_rows(lw: np.ndarray) -> np.ndarray:
    from arviz_stats.base import array_stats  # imported on use: arviz_stats takes seconds to import

    # arviz_stats' psislw takes *negative* log ratios (it was written for 1 / p(y_i | theta) in LOO).
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            _, khat = array_stats.psislw(-lw, axis=-1)
        return np.asarray(khat, dtype=np.float64)
    except ValueError:
        # A row whose largest weights are all equal cannot be fitted; score rows one at a time.
        out = np.full(lw.shape[0], np.nan)
        for i, row in enumerate(lw):
            try:
                _, k = array_stats.psislw(-row, axis=-1)
                out[i] = float(k)
            except ValueError:
                pass
        return out


def pareto_khat(log_weights: Any) -> np.ndarray:
    """PSIS k-hat over the last axis of ``log_weights`` (any leading shape); NaN where no fit is possible."""
    lw = log_weights.detach().cpu().numpy() if hasattr(log_weights, "detach") else np.asarray(log_weights)
    lw = lw.astype(np.float64)
    d = lw.shape[-1]
    if d < MIN_DRAWS:
        raise ValueError(
            f"PSIS needs at least {MIN_DRAWS} draws per estimate, got {d}; predict with more num_samples "
            '(rule="mixture" uses num_samples * num_classes draws)'
        )
    flat = lw.reshape(-1, d)
    finite = np.isfinite(flat).all(axis=1)
    khat = np.full(flat.shape[0], np.nan)
    if finite.any():
        khat[finite] = _psis_khat_rows(flat[finite])
    return khat.reshape(lw.shape[:-1])


def importance_diagnostics(log_weights: Any) -> dict[str, Any]:
    """PSIS k-hat and effective sample size of every (example, class) importance-sampling estimate.

    Args:
        log_weights: ``(N, C, D)`` log weights, e.g. ``Prediction.log_weights`` or
            :func:`~dgc_pyro.inference.class_log_weights`; a :class:`Prediction` is accepted too.

    Returns:
        ``khat`` ``(N, C)``, ``ess`` ``(N, C)`` (Kish ESS of the normalised raw weights, in [1, D]),
        ``good_k`` (the threshold for D draws), ``num_draws`` D, and ``flagged`` ``(N,)``: True where
        the k-hat of any class exceeds ``good_k`` (the class posterior normalises over all classes, so
        one unreliable class estimate makes the whole posterior of that example unreliable).
    """
    if isinstance(log_weights, Prediction):
        if log_weights.rule == "latent":
            raise ValueError(
                'this prediction used rule="latent", which averages p(y | z) over q(z | x) without importance '
                'weights; there is no importance sampling to diagnose (predict with rule="mixture" or "iw")'
            )
        log_weights = log_weights.log_weights
    lw = log_weights.detach().cpu().numpy() if hasattr(log_weights, "detach") else np.asarray(log_weights)
    lw = lw.astype(np.float64)
    if lw.ndim != 3:
        raise ValueError(f"log_weights must have shape (N, C, D), got {lw.shape}")
    d = lw.shape[-1]
    khat = pareto_khat(lw)
    shifted = lw - lw.max(axis=-1, keepdims=True)
    w = np.exp(shifted)
    w /= w.sum(axis=-1, keepdims=True)
    ess = 1.0 / (w**2).sum(axis=-1)
    threshold = good_k(d)
    return {
        "khat": khat,
        "ess": ess,
        "good_k": threshold,
        "num_draws": d,
        "flagged": np.nan_to_num(khat, nan=np.inf).max(axis=1) > threshold,
    }
