"""The density of x as an out-of-distribution signal: the scores, the calibrated flag (:class:`OODDetector`) and
the reject rules that use it. Torch and numpy only, so the checkpoint and prediction code below the training
loop can use it; calibrating a flag on a model is :func:`dgc_pyro.inference.density.fit_ood_threshold`.

:func:`~dgc_pyro.inference.predict` estimates log p(x) for every example (``Prediction.log_density``, an
importance-weighted lower bound in nats). A density alone is a treacherous OOD score: simple images (large
flat backgrounds, few strokes) get *higher* likelihoods than the training images under a pixel-wise model
(Nalisnick et al. 2019, "Do deep generative models know what they don't know?"), and the likelihood is
dominated by input complexity (Serrà et al. 2020, "Input complexity and out-of-distribution detection with
likelihood-based generative models"). So the detector offers three scores, larger meaning more unusual:

- ``"density"``: -log p(x) (one-sided: flags only inputs the model explains badly);
- ``"typicality"`` (default): |log p(x) - m|, m the median log p(x) of held-out training images: a
  two-sided typicality test, flagging too-high as well as too-low densities;
- ``"complexity"``: -(log p(x) + L(x)), L(x) the zlib-compressed length of the 8-bit image in nats: the
  log likelihood ratio against a generic compressor (Serrà et al.'s S(x), in nats).

:func:`~dgc_pyro.inference.density.fit_ood_threshold` sets the flag's threshold at the (1 - false_alarm) quantile of the score on
held-out in-distribution images and stores the reference distributions on the model
(``model.ood_detector``, saved with the checkpoint); from then on ``predict`` fills ``Prediction.ood``.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

__all__ = ["OOD_SCORES", "REJECT_RULES", "OODDetector", "complexity_nats", "logit_scores", "ood_score"]

OOD_SCORES = ("typicality", "density", "complexity")
REJECT_RULES = ("entropy", "density", "both")
#: Quantile levels of the stored reference distributions (201 points: 0.5% steps).
_LEVELS = np.linspace(0.0, 1.0, 201)


def complexity_nats(x: torch.Tensor) -> torch.Tensor:
    """L(x): the zlib (level 9) compressed length of each example quantised to 8 bits, in nats, ``(N,)``.

    Inputs are taken in [0, 1] (the package's convention) and clipped to it.
    """
    flat = x.detach().reshape(x.shape[0], -1).float().clamp(0.0, 1.0).mul(255.0).round().to(torch.uint8).cpu().numpy()
    bits = [8 * len(zlib.compress(row.tobytes(), 9)) for row in flat]
    return torch.tensor(bits, dtype=torch.float32) * math.log(2.0)


def ood_score(log_density: torch.Tensor, x: torch.Tensor | None, score: str, center: float = 0.0) -> torch.Tensor:
    """The OOD score ``(N,)`` (larger = more unusual) of :data:`OOD_SCORES` from log p(x); ``center`` is the
    typicality test's reference median, ``x`` is needed for ``"complexity"``."""
    if score not in OOD_SCORES:
        raise ValueError(f"score must be one of {OOD_SCORES}, got {score!r}")
    ld = log_density.detach().float().cpu()
    if score == "density":
        return -ld
    if score == "typicality":
        return (ld - float(center)).abs()
    if x is None:
        raise ValueError('the "complexity" score needs the inputs x')
    return -(ld + complexity_nats(x))


def _calibrated(values: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Reference-distribution percentile of ``values`` in [0, 1], continued linearly above the largest
    reference value (in units of its upper half's spread) so that inputs beyond every reference still rank."""
    q = np.asarray(quantiles, dtype=np.float64)
    u = np.interp(values, q, _LEVELS[: len(q)] if len(q) == len(_LEVELS) else np.linspace(0, 1, len(q)))
    spread = max(q[-1] - q[len(q) // 2], 1e-12)
    above = values > q[-1]
    u[above] = 1.0 + (values[above] - q[-1]) / spread
    return u


def reference_percentile(values: Any, reference: Any) -> np.ndarray:
    """Percentile of ``values`` against the sample ``reference`` as the ``"both"`` rule takes it
    (:meth:`OODDetector.combined`): interpolated in the reference's quantiles at 201 levels, continued linearly above
    the largest."""
    ref = np.quantile(np.asarray(reference, dtype=np.float64), _LEVELS)
    return _calibrated(np.asarray(values, dtype=np.float64), ref)


@dataclass
class OODDetector:
    """A density-based OOD flag calibrated on held-out in-distribution images (see the module docstring).

    Attributes:
        score: one of :data:`OOD_SCORES`.
        false_alarm: the stated false-alarm rate on in-distribution data.
        threshold: flag where the score is strictly greater than this (the dev scores' (1 - false_alarm)
            quantile).
        center: median log p(x) of the dev images (the typicality test's reference).
        score_quantiles, entropy_quantiles: the dev distributions of the score and of the predictive entropy
            at 201 evenly spaced levels (for the entropy threshold and the ``"both"`` ranking).
        num_dev: number of dev images; num_samples, density_samples: the draws they were scored with.
        head_samples: the SWAG head draws the dev predictions averaged over (0: the fitted head alone); a
            prediction made otherwise has other entropies, so ``predict`` warns (records older than this field
            read as 0).
    """

    score: str
    false_alarm: float
    threshold: float
    center: float
    score_quantiles: list[float]
    entropy_quantiles: list[float]
    num_dev: int
    num_samples: int
    density_samples: int
    head_samples: int = 0

    def scores(self, log_density: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        """This detector's OOD score of each example ``(N,)``."""
        return ood_score(log_density, x, self.score, self.center)

    def flags(self, score: torch.Tensor) -> torch.Tensor:
        """True where ``score`` exceeds the threshold."""
        return score > self.threshold

    @property
    def entropy_threshold(self) -> float:
        """The dev entropies' (1 - false_alarm) quantile: the default threshold of ``reject="entropy"``."""
        return float(np.interp(1.0 - self.false_alarm, _LEVELS, np.asarray(self.entropy_quantiles)))

    def combined(self, entropy: torch.Tensor, score: torch.Tensor) -> torch.Tensor:
        """The ``"both"`` ranking score: the larger of the entropy's and the OOD score's dev percentiles, so
        that an input is as suspicious as the more unusual of the two signals makes it."""
        u_ent = _calibrated(entropy.detach().cpu().double().numpy(), np.asarray(self.entropy_quantiles))
        u_ood = _calibrated(score.detach().cpu().double().numpy(), np.asarray(self.score_quantiles))
        return torch.from_numpy(np.maximum(u_ent, u_ood)).float()

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form (saved in the checkpoint's metadata)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> OODDetector:
        """Rebuild from :meth:`to_dict`; a damaged entry raises ValueError naming the problem."""
        if not isinstance(data, dict):
            raise ValueError(f"the OOD detector entry is a {type(data).__name__}, not a mapping")
        try:
            det = cls(
                score=str(data["score"]),
                false_alarm=float(data["false_alarm"]),
                threshold=float(data["threshold"]),
                center=float(data["center"]),
                score_quantiles=[float(v) for v in data["score_quantiles"]],
                entropy_quantiles=[float(v) for v in data["entropy_quantiles"]],
                num_dev=int(data["num_dev"]),
                num_samples=int(data["num_samples"]),
                density_samples=int(data["density_samples"]),
                head_samples=int(data.get("head_samples", 0)),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the OOD detector entry is unusable ({type(e).__name__}: {e})") from None
        if (
            det.score not in OOD_SCORES
            or not 0.0 < det.false_alarm < 1.0
            or len(det.score_quantiles) < 2
            or len(det.entropy_quantiles) < 2
        ):
            raise ValueError(
                "the OOD detector entry is unusable (unknown score, false_alarm outside (0, 1) or no quantiles)"
            )
        return det


def logit_scores(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """A discriminative classifier's outlier scores from its logits ``(N, C)`` (larger = more unusual):
    ``"max_softmax"``, 1 - max softmax probability (Hendrycks & Gimpel 2017), and ``"energy"``, -logsumexp of the
    logits (Liu et al. 2020). The baselines' side of every OOD comparison."""
    return {"max_softmax": 1.0 - torch.softmax(logits, -1).max(-1).values, "energy": -torch.logsumexp(logits, -1)}
