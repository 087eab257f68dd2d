"""Uncertainty-aware prediction: class posteriors from S latent draws per class hypothesis.

For every example x and class c, z_s ~ q(z | x, c) for s = 1..S and

    log w_{s,c} = log p(x | z_s) + log p(y = c | z_s) + log p(z_s) - log q(z_s | x, c)

so that logmeanexp_s log w_{s,c} is the importance-weighted estimate of log p(x, y = c) and the class
posterior is its softmax over c. All classes, draws and examples of a chunk go through the networks in
one vectorised pass (a ``pyro.plate("particles")`` around the model and guide).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import pyro
import torch
from pyro import poutine

from dgc_pyro.data.validation import check_features
from dgc_pyro.models.dgc import DGC

ScoringRule = Literal["mixture", "iw", "paper"]
SCORING_RULES = ("mixture", "iw", "paper")
DEFAULT_MAX_ROWS = 8192


@dataclass
class Prediction:
    """Labels with per-example uncertainty.

    Attributes:
        labels: predicted class, ``(N,)``.
        proba: class posterior, ``(N, C)``.
        entropy: total predictive entropy of ``proba`` (nats), ``(N,)``.
        expected_entropy: mean entropy of the per-draw class posteriors (aleatoric part).
        mutual_information: ``entropy - expected_entropy`` (epistemic part, >= 0).
        spread: standard deviation over draws of the predicted class's per-draw probability.
        log_weights: ``(N, C, S)`` log importance weights, kept for diagnostics.
    """

    labels: torch.Tensor
    proba: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    spread: torch.Tensor
    log_weights: torch.Tensor


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def _normal_of(fn: torch.distributions.Distribution) -> torch.distributions.Normal:
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    if not isinstance(fn, torch.distributions.Normal):
        raise TypeError(f'the "mixture" rule needs a Normal guide for "z", got {type(fn).__name__}')
    return fn


def _log_weight_chunk(model: DGC, x: torch.Tensor, num_samples: int, rule: str) -> torch.Tensor:
    n, c = x.shape[0], model.num_classes
    # Class-major tiling: row j*n + i holds example i under class hypothesis j.
    xc = x.repeat((c,) + (1,) * (x.dim() - 1))
    yc = torch.arange(c, device=x.device).repeat_interleave(n)
    with pyro.plate("particles", num_samples, dim=-2):
        guide_tr = poutine.trace(model.guide).get_trace(xc, yc)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(xc, yc)
    z = guide_tr.nodes["z"]["value"]  # (S, c*n, k)
    log_px = model_tr.nodes["x"]["fn"].log_prob(xc)  # (S, c*n)
    if rule == "mixture":
        # Balance-heuristic multiple importance sampling: all S*c draws of an example are weighted
        # against the equal mixture of its c class-conditional proposals, and every class is scored on
        # the same draws, so estimator noise cancels between classes.
        q = _normal_of(guide_tr.nodes["z"]["fn"])
        loc = q.loc.expand_as(z)[0].reshape(c, n, -1)
        scale = q.scale.expand_as(z)[0].reshape(c, n, -1)
        zd = z.reshape(num_samples * c, n, 1, -1)  # draws d = (s, j)
        log_q_each = torch.distributions.Normal(loc.transpose(0, 1), scale.transpose(0, 1)).log_prob(zd).sum(-1)
        log_q_mix = torch.logsumexp(log_q_each, dim=-1) - math.log(c)  # (S*c, n)
        log_shared = log_px + model_tr.nodes["z"]["fn"].log_prob(z)  # (S, c*n)
        log_shared = log_shared.reshape(num_samples * c, n) - log_q_mix
        log_py = torch.log_softmax(model.label_logits(zd.squeeze(-2)), dim=-1)  # (S*c, n, c)
        return (log_shared[..., None] + log_py).permute(1, 2, 0)  # (n, c, S*c)
    log_w = log_px + model_tr.nodes["y"]["fn"].log_prob(yc)
    if rule == "iw":
        log_w = log_w + model_tr.nodes["z"]["fn"].log_prob(z) - guide_tr.nodes["z"]["fn"].log_prob(z)
    # (S, c*n) -> (n, c, S)
    return log_w.reshape(num_samples, c, n).permute(2, 1, 0)


@torch.no_grad()
def class_log_weights(
    model: DGC,
    x: torch.Tensor,
    num_samples: int = 10,
    *,
    rule: ScoringRule = "mixture",
    max_rows: int = DEFAULT_MAX_ROWS,
) -> torch.Tensor:
    """Log importance weights ``(N, C, S)`` of every class hypothesis for every example.

    ``rule="mixture"`` (default) draws S latents from each q(z | x, c) and weights all S*C of them
    against the mixture of the C proposals (D = S*C draws shared by every class); ``rule="iw"`` is the
    importance-weighted estimate of log p(x, y=c) with q(z | x, c) alone (D = S); ``rule="paper"`` is
    Eq. 9 of the paper (log p(x | z) + log p(y = c | z), without the prior and proposal terms). Examples are processed
    in chunks of at most ``max_rows`` network rows (examples x classes x draws) to bound memory.
    """
    if rule not in SCORING_RULES:
        raise ValueError(f"rule must be one of {SCORING_RULES}, got {rule!r}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    x = check_features(x, input_shape=model.input_shape)
    per_example = model.num_classes * int(num_samples)
    chunk = max(1, max_rows // per_example)
    was_training = model.training
    model.eval()
    out = []
    try:
        with pyro.settings.context(module_local_params=True):
            for start in range(0, x.shape[0], chunk):
                xb = x[start : start + chunk].to(model.device, non_blocking=True)
                out.append(_log_weight_chunk(model, xb, int(num_samples), rule))
    finally:
        model.train(was_training)
    return torch.cat(out, dim=0)


def posterior_from_log_weights(log_w: torch.Tensor) -> Prediction:
    """Class posterior and uncertainty summaries from log weights ``(N, C, D)`` over D draws.

    The weights are normalised jointly over classes and draws: ``proba`` is their class marginal
    (the softmax of the importance-weighted log p(x, y=c) estimates), each draw's class posterior
    is its conditional, and the expected entropy averages those under the draws' normalised weights,
    so that the mutual information ``entropy - expected_entropy`` is >= 0 exactly.
    """
    n, c, d = log_w.shape
    joint = torch.softmax(log_w.reshape(n, c * d), dim=-1).reshape(n, c, d)
    proba = joint.sum(-1)
    draw_weight = joint.sum(1)  # (N, D)
    per_draw = joint / draw_weight.clamp_min(1e-30)[:, None, :]
    labels = proba.argmax(-1)
    entropy = _entropy(proba)
    expected_entropy = (draw_weight * _entropy(per_draw.transpose(1, 2))).sum(-1)
    picked = per_draw.gather(1, labels[:, None, None].expand(-1, 1, d)).squeeze(1)
    mean = (draw_weight * picked).sum(-1, keepdim=True)
    spread = (draw_weight * (picked - mean) ** 2).sum(-1).sqrt()
    return Prediction(
        labels=labels,
        proba=proba,
        entropy=entropy,
        expected_entropy=expected_entropy,
        mutual_information=(entropy - expected_entropy).clamp_min(0.0),
        spread=spread,
        log_weights=log_w,
    )


def predict(
    model: DGC,
    x: torch.Tensor,
    num_samples: int = 10,
    *,
    rule: ScoringRule = "mixture",
    max_rows: int = DEFAULT_MAX_ROWS,
) -> Prediction:
    """Predicted labels with predictive entropy, its aleatoric/epistemic split and the spread over draws."""
    return posterior_from_log_weights(class_log_weights(model, x, num_samples, rule=rule, max_rows=max_rows))


def predict_proba(
    model: DGC,
    x: torch.Tensor,
    num_samples: int = 10,
    *,
    rule: ScoringRule = "mixture",
    max_rows: int = DEFAULT_MAX_ROWS,
) -> torch.Tensor:
    """Class posterior p(y | x) as an ``(N, C)`` tensor whose rows sum to one."""
    return predict(model, x, num_samples, rule=rule, max_rows=max_rows).proba
