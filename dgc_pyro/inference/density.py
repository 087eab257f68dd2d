"""Calibrating the out-of-distribution flag of a fitted model on held-out images (:func:`fit_ood_threshold`).

The scores, the flag itself and the reject rules live in :mod:`dgc_pyro.ood_detector` (re-exported here).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from dgc_pyro.inference.predict import predict
from dgc_pyro.ood_detector import _LEVELS, OOD_SCORES, REJECT_RULES, OODDetector, complexity_nats, ood_score

__all__ = ["OOD_SCORES", "REJECT_RULES", "OODDetector", "complexity_nats", "fit_ood_threshold", "ood_score"]


def fit_ood_threshold(
    model: Any,
    x_dev: Any,
    false_alarm: float = 0.05,
    *,
    score: str = "typicality",
    num_samples: int = 10,
    density_samples: int | None = None,
    balanced: bool | None = None,
    seed: int = 0,
    progress: bool = False,
    swag: Any = None,
    head_samples: int | None = None,
) -> OODDetector:
    """Calibrate the OOD flag on held-out in-distribution images and attach it to ``model`` (``model.ood_detector``).

    ``x_dev`` must be images the model was not trained on (the validation split, or unused training images):
    on training images the density is optimistic and the flag would fire too often on new data. The
    threshold is the (1 - ``false_alarm``) quantile of ``score`` on ``x_dev``, so about that share of new
    in-distribution inputs is flagged. The draws are seeded (``seed``) inside a forked random state. ``swag`` and
    ``head_samples`` (:func:`~dgc_pyro.inference.predict.predict`'s, head draws seeded with ``seed``) calibrate the
    flag on the prediction it will be applied to when that averages over a SWAG head. Returns the detector; :func:`~dgc_pyro.checkpoint.save_model` saves it with the weights.
    """
    if (
        isinstance(false_alarm, bool)
        or not isinstance(false_alarm, (int, float, np.floating))
        or not 0.0 < float(false_alarm) < 1.0
    ):
        raise ValueError(f"false_alarm must be a rate strictly between 0 and 1, got {false_alarm!r}")
    if score not in OOD_SCORES:
        raise ValueError(f"score must be one of {OOD_SCORES}, got {score!r}")
    n = len(x_dev) if hasattr(x_dev, "__len__") else 0
    minimum = math.ceil(1.0 / float(false_alarm))
    if n < minimum:
        raise ValueError(
            f"x_dev has {n} images; a false-alarm rate of {false_alarm} needs at least {minimum} "
            "held-out in-distribution images"
        )
    devices = [model.device] if model.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        pred = predict(
            model,
            x_dev,
            num_samples,
            density_samples=density_samples,
            progress=progress,
            balanced=model.has_class_prior if balanced is None else balanced,
            ood=False,
            swag=swag,
            head_samples=head_samples,
            head_seed=seed,
        )
    log_density = pred.log_density.detach().cpu()
    center = float(log_density.median())
    x_cpu = torch.as_tensor(x_dev).cpu() if score == "complexity" else None
    s = ood_score(log_density, x_cpu, score, center).double().numpy()
    threshold = float(np.quantile(s, 1.0 - float(false_alarm), method="higher"))
    detector = OODDetector(
        score=score,
        false_alarm=float(false_alarm),
        threshold=threshold,
        center=center,
        score_quantiles=np.quantile(s, _LEVELS).tolist(),
        entropy_quantiles=np.quantile(pred.entropy.detach().cpu().double().numpy(), _LEVELS).tolist(),
        num_dev=int(n),
        num_samples=int(num_samples),
        density_samples=int(pred.density_samples or 0),
        head_samples=int(pred.head_samples or 0),
    )
    model.ood_detector = detector
    return detector
