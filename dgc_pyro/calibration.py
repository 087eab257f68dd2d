"""Post-hoc calibration: one temperature T fitted on held-out data (temperature scaling, Guo et al. 2017).

``temperature_scale(scores, labels)`` finds the T > 0 that minimises the negative log-likelihood of
``softmax(scores / T)`` on a held-out set; ``apply_temperature(scores, T)`` gives the rescaled class
probabilities. ``scores`` are logits or log-probabilities (N, C): dividing log p by T and renormalising is
the same as dividing the logits by T, so a DGC, whose prediction carries only ``proba``, is calibrated as
``apply_temperature(pred.proba.log(), T)`` and a baseline through its ``logits``. T < 1 sharpens an
under-confident model, T > 1 softens an over-confident one; argmax predictions (and so ACSA) never change.

Fit T on a class-balanced held-out set of training images (``load_imbalanced(..., evaluate_on="dev")``), never
on the test split. This module needs only torch and numpy, so both inference and diagnostics can import it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["TEMPERATURE_BOUNDS", "apply_temperature", "check_temperature", "temperature_scale"]

#: The search interval of :func:`temperature_scale`. The held-out NLL is unimodal in log T; a T at a bound means
#: the data asked for more (e.g. a held-out set the model classifies perfectly drives T towards 0).
TEMPERATURE_BOUNDS: tuple[float, float] = (0.01, 100.0)
#: log-probabilities of -inf (a probability that underflowed to 0) are floored here: the log of the smallest
#: positive float32, so that one such entry costs a large but finite NLL instead of making it infinite.
LOG_FLOOR = math.log(1e-45)
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_ITERATIONS = 80  # golden-section steps: the interval shrinks to 0.618^80 of log(100/0.01), about 1e-16


def _scores(scores: Any, name: str = "logits_or_log_proba") -> torch.Tensor:
    arr = scores.detach().cpu().numpy() if torch.is_tensor(scores) else np.asarray(scores)
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    t = torch.from_numpy(arr.astype(np.float64))
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] < 2:
        raise ValueError(
            f"{name} must be a (N, C) matrix with N >= 1 examples and C >= 2 classes, got shape {tuple(t.shape)}"
        )
    if torch.isnan(t).any() or torch.isposinf(t).any():
        raise ValueError(f"{name} contains NaN or +inf ({int((torch.isnan(t) | torch.isposinf(t)).sum())} values)")
    if torch.isneginf(t).all(dim=1).any():
        raise ValueError(f"{name} has a row that is -inf everywhere (no class has any probability)")
    return t.clamp_min(LOG_FLOOR)


def _labels(labels: Any, n: int, num_classes: int) -> torch.Tensor:
    arr = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"labels must be a 1-D sequence of {n} class labels (one per row), got shape {arr.shape}")
    if arr.dtype.kind not in "iuf" or (arr.dtype.kind == "f" and not np.all(arr == np.round(arr))):
        raise ValueError("labels must hold integer class labels")
    y = torch.from_numpy(arr.astype(np.int64))
    bad = (y < 0) | (y >= num_classes)
    if bad.any():
        raise ValueError(f"labels contain {int(y[bad][0])}, outside [0, {num_classes})")
    return y


def check_temperature(temperature: Any) -> float:
    """``temperature`` as a float; ValueError naming it unless it is a positive finite number."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.integer, np.floating))
        or not math.isfinite(temperature)
        or not temperature > 0
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    return float(temperature)


def _nll(scores: torch.Tensor, y: torch.Tensor, log_t: float) -> float:
    scaled = scores / math.exp(log_t)
    return float((torch.logsumexp(scaled, dim=1) - scaled.gather(1, y[:, None]).squeeze(1)).mean())


def temperature_scale(logits_or_log_proba: Any, labels: Any) -> float:
    """The temperature T minimising the mean NLL of ``softmax(logits_or_log_proba / T)`` on ``labels``.

    ``logits_or_log_proba`` is an (N, C) matrix (numpy or torch) of one held-out set, ``labels`` its N classes.
    A bounded golden-section search on log T over :data:`TEMPERATURE_BOUNDS` (the NLL is convex in 1/T, so
    unimodal in log T). Deterministic; raises ValueError naming the problem for bad input.
    """
    scores = _scores(logits_or_log_proba)
    y = _labels(labels, scores.shape[0], scores.shape[1])
    lo, hi = (math.log(b) for b in TEMPERATURE_BOUNDS)
    a, b = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fa, fb = _nll(scores, y, a), _nll(scores, y, b)
    for _ in range(_ITERATIONS):
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - _GOLDEN * (hi - lo)
            fa = _nll(scores, y, a)
        else:
            lo, a, fa = a, b, fb
            b = lo + _GOLDEN * (hi - lo)
            fb = _nll(scores, y, b)
    return float(math.exp((lo + hi) / 2.0))


def apply_temperature(logits_or_log_proba: Any, temperature: float) -> torch.Tensor:
    """Class probabilities ``softmax(logits_or_log_proba / temperature)``, an (N, C) float32 CPU tensor."""
    t = check_temperature(temperature)
    return torch.softmax(_scores(logits_or_log_proba) / t, dim=1).float()
