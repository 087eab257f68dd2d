"""Uncertainty-aware prediction: class posteriors from S latent draws per class hypothesis.

For every example x and class c, z_s ~ q(z | x, c) for s = 1..S and

    log w_{s,c} = log p(x | z_s) + log p(y = c | z_s) + log p(z_s) - log q(z_s | x, c)

so that logmeanexp_s log w_{s,c} is the importance-weighted estimate of log p(x, y = c) and the class
posterior is its softmax over c. All classes, draws and examples of a chunk go through the networks in
one vectorised pass (a ``pyro.plate("particles")`` around the model and guide).

Chunks are sized automatically (``max_rows=None``) by the rows each rule really runs through each network
(:func:`rows_per_example`: the ``"latent"`` rule runs one encoder row per example and one label-head row
per draw, no decoder; the other rules C encoder rows and C x S decoder and head rows) and each network's
activation size, measured once per model: on CUDA a quarter of the free memory bounds a pass's working set;
on CPU, where a convolutional decoder runs about twice as fast on ~100-200 rows as on 1000+ (its
activations then stay in cache), the largest activation of a pass is kept near 16 MiB (128 MiB for the
short passes of the ``"latent"`` rule, whose per-pass overheads dominate on a loaded CPU) and the working set
under 512 MiB. When one example's draws exceed that, they are split over several passes, so memory
stays bounded for any ``num_samples``; only a result that cannot fit is refused, before any work.

``channels_last`` switches 4-D (convolution) weights to the channels-last layout for the call (restored
afterwards): float32 all the same, about 2x faster transposed convolutions on CPU, so it is on by
default on CPU (``channels_last=None``) and on CUDA together with ``autocast="bf16"``, which runs the
networks (not the log densities, which stay float32) under bfloat16 autocast for tensor cores; autocast
is off by default, so predictions are float32 unless asked otherwise.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import sys
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import pyro
import torch
from pyro import poutine
from tqdm import tqdm

from dgc_pyro.caller_warning import warn_caller
from dgc_pyro.config import DEFAULT_HEAD_SAMPLES  # label-head draws of predict(..., swag=...) unless given
from dgc_pyro.data.validation import check_features
from dgc_pyro.models.bare import bare_method
from dgc_pyro.models.dgc import DGC, unwrap_normal
from dgc_pyro.ood_detector import REJECT_RULES
from dgc_pyro.registry import Registry

#: The built-in rules' names, for type checkers; a registered rule is passed as its ``str`` name.
ScoringRule = Literal["mixture", "iw", "paper", "latent", "bayes"]
DEFAULT_MAX_ROWS = 8192  # a fixed chunk size for callers that want one; predict's default is automatic
AUTOCAST_CHOICES = (None, "bf16")
#: Chunk budgets: on CPU the working set and the largest single activation (cache), on CUDA a share of
#: the free memory.
CPU_CHUNK_BYTES = 512 * 2**20
CPU_ACTIVATION_BYTES = 16 * 2**20
#: The "latent" rule's passes (an encoder row per example, a label-head row per draw, a few decoder rows for the
#: density) are short, so on a shared, loaded CPU the per-pass overheads dominate: 1,000 Fashion images took
#: 2.2 s in one pass, 4.6 s in passes of 500 and 10.8 s in passes of 166 (the 16 MiB budget) on the project's
#: 2-core machine at load ~9 (density_samples=1). Its largest activation may therefore reach 128 MiB.
LATENT_CPU_ACTIVATION_BYTES = 128 * 2**20
CUDA_CHUNK_SHARE = 0.25
_ROW_LIMITS = {"cpu": (64, 32768), "cuda": (1024, 1 << 20)}
_ROW_BYTES: weakref.WeakKeyDictionary[DGC, dict[str, int]] = weakref.WeakKeyDictionary()


#: Per-example uncertainty scores of a :class:`Prediction` (larger = less certain); the reject option's scores.
UNCERTAINTY_SCORES = ("entropy", "least_confidence", "mutual_information", "expected_entropy")


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
        rule: the scoring rule that produced ``log_weights`` (None when built by hand).
        rejected: ``(N,)`` bool mask of the reject option (``predict(..., reject=...)`` or
            ``reject_threshold=t``): True where the example is rejected; None when no reject option was used.
            ``labels`` always holds the argmax; :attr:`labels_with_reject` has -1 where rejected.
        log_density: ``(N,)`` importance-weighted lower bound on log p(x) in nats per example (None with
            ``density=False``); see :mod:`dgc_pyro.inference.density` for what it means and its pitfalls.
        density_samples: draws behind ``log_density`` (per class hypothesis for the decoding rules).
        ood_score: ``(N,)`` the model's OOD detector score (larger = more unusual), None without a detector.
        ood: ``(N,)`` bool, True where the calibrated OOD flag fires; None without a detector
            (:func:`~dgc_pyro.inference.density.fit_ood_threshold`).
        reject_rank: ``(N,)`` the continuous score behind the reject rule (``"entropy"``: the uncertainty
            score; ``"density"``: ``ood_score``; ``"both"``: the larger dev percentile of the two), for
            coverage curves; None when no reject rule was used.
        head_samples: label-head draws the class posterior was averaged over (``predict(..., swag=...)``); the
            draw axis of ``log_weights`` is then head-major, ``head_samples`` blocks of the rule's draws. None
            for the point-estimate head.
    """

    labels: torch.Tensor
    proba: torch.Tensor
    entropy: torch.Tensor
    expected_entropy: torch.Tensor
    mutual_information: torch.Tensor
    spread: torch.Tensor
    log_weights: torch.Tensor
    rejected: torch.Tensor | None = None
    rule: str | None = None
    log_density: torch.Tensor | None = None
    density_samples: int | None = None
    ood_score: torch.Tensor | None = None
    ood: torch.Tensor | None = None
    reject_rank: torch.Tensor | None = None
    head_samples: int | None = None

    @property
    def labels_with_reject(self) -> torch.Tensor:
        """``labels`` with -1 for rejected examples (``labels`` itself when no reject option was used)."""
        if self.rejected is None:
            return self.labels
        return torch.where(self.rejected, torch.full_like(self.labels, -1), self.labels)

    def uncertainty(self, score: str = "entropy") -> torch.Tensor:
        """Per-example uncertainty ``(N,)`` named by ``score`` (one of :data:`UNCERTAINTY_SCORES`).

        ``"least_confidence"`` is 1 - max_c p(y = c | x); the others are the attributes of the same name.
        """
        if score not in UNCERTAINTY_SCORES:
            raise ValueError(f"score must be one of {UNCERTAINTY_SCORES}, got {score!r}")
        if score == "least_confidence":
            return 1.0 - self.proba.max(dim=1).values
        return getattr(self, score)


def _entropy(p: torch.Tensor) -> torch.Tensor:
    return -(p * torch.log(p.clamp_min(1e-30))).sum(-1)


def scoring_rules_for(model: DGC) -> tuple[str, ...]:
    """The registered scoring rules that apply to ``model`` (:attr:`ScoringRuleSpec.applies_to`): of the built-in
    ones every rule but ``"bayes"``, which needs the class Gaussians of ``latent_prior="class_conditional"``, and for
    such a model only the rules that do not need a label head."""
    return tuple(name for name, spec in SCORING_RULE_REGISTRY.items() if spec.applies_to(model))


def check_rule(model: DGC, rule: str) -> None:
    """Raise ValueError, in one line, when the scoring rule ``rule`` cannot score ``model`` (an unknown name: the
    registry's error)."""
    spec = SCORING_RULE_REGISTRY.get(rule)
    if not spec.applies_to(model):
        needs = spec.requirement or "another model"
        raise ValueError(f"rule={rule!r} needs {needs}; this model takes {', '.join(scoring_rules_for(model))}")


def _normal_of(fn: torch.distributions.Distribution) -> torch.distributions.Normal:
    normal = unwrap_normal(fn)
    if normal is None:
        raise TypeError(f'the "mixture" rule needs a Normal guide for "z", got {type(fn).__name__}')
    return normal


def _log_weight_chunk(
    model: DGC, x: torch.Tensor, num_samples: int, rule: str, density_draws: int = 0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log weights ``(n, C, D)`` of one pass of ``rule`` (its :attr:`ScoringRuleSpec.log_weights`), and with
    ``density_draws > 0`` the log-sum-exp over this pass's draws of the importance weights of log p(x), ``(n, K)``
    (see :meth:`ScoringRuleSpec.density_count`)."""
    return SCORING_RULE_REGISTRY.get(rule).log_weights(model, x, num_samples, density_draws)


def _bayes_chunk(
    model: DGC, x: torch.Tensor, num_samples: int, density_draws: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"bayes"`` rule's pass: :func:`_bayes_log_weights`; its density reuses the same draws."""
    log_w = _bayes_log_weights(model, bare_method(model, "guide"), x, num_samples)
    # sum_c p(c) p(z | c) = p(z): the per-draw weights of log p(x) are the class sums, (n, S)
    return log_w, (torch.logsumexp(log_w, dim=1) if density_draws > 0 else None)


def _latent_chunk(
    model: DGC, x: torch.Tensor, num_samples: int, density_draws: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"latent"`` rule's pass: q(z | x) taken as the posterior, p(y | x) ~ mean_s p(y | z_s), no importance
    weights; for the density the first ``density_draws`` draws of q(z | x) are decoded (the only decoder rows that
    rule runs). Only a trained label-free guide (label_in_guide=False) makes q(z | x) meaningful."""
    # The same model and guide, without PyroModule's per-parameter bookkeeping where it is moot.
    guide_fn, model_fn = bare_method(model, "guide"), bare_method(model, "model")
    with pyro.plate("particles", num_samples, dim=-2):
        guide_tr = poutine.trace(guide_fn).get_trace(x, None)
    z = guide_tr.nodes["z"]["value"]
    log_py = torch.log_softmax(model.label_logits(z), dim=-1)  # (S, n, c)
    dens = None
    if density_draws > 0:
        zd = z[:density_draws]
        log_q = guide_tr.nodes["z"]["fn"].log_prob(z)[:density_draws]
        # The model's own sites (a subclass's prior or likelihood included), at the drawn latents; y is
        # observed at a placeholder (its term is unused) so that no random number is drawn for it.
        y0 = torch.zeros(zd.shape[:-1], dtype=torch.long, device=x.device)
        with pyro.plate("particles", density_draws, dim=-2):
            model_tr = poutine.trace(poutine.condition(model_fn, data={"z": zd, "y": y0})).get_trace(x, None)
        log_w_x = model_tr.nodes["x"]["fn"].log_prob(x) + model_tr.nodes["z"]["fn"].log_prob(zd) - log_q
        dens = torch.logsumexp(log_w_x, dim=0)[:, None]  # (n, 1)
    return log_py.permute(1, 2, 0), dens


def _class_hypothesis_traces(
    model: DGC, x: torch.Tensor, num_samples: int
) -> tuple[torch.Tensor, torch.Tensor, Any, Any]:
    """The tiled inputs and labels, and the guide and model traces of S draws of q(z | x, c) for every class
    hypothesis c: class-major tiling, row j*n + i holds example i under class hypothesis j."""
    n, c = x.shape[0], model.num_classes
    guide_fn, model_fn = bare_method(model, "guide"), bare_method(model, "model")
    xc = x.repeat((c,) + (1,) * (x.dim() - 1))
    yc = torch.arange(c, device=x.device).repeat_interleave(n)
    with pyro.plate("particles", num_samples, dim=-2):
        guide_tr = poutine.trace(guide_fn).get_trace(xc, yc)
        model_tr = poutine.trace(poutine.replay(model_fn, trace=guide_tr)).get_trace(xc, yc)
    return xc, yc, guide_tr, model_tr


def _mixture_chunk(
    model: DGC, x: torch.Tensor, num_samples: int, density_draws: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"mixture"`` rule's pass. Balance-heuristic multiple importance sampling: all S*c draws of an example
    are weighted against the equal mixture of its c class-conditional proposals, and every class is scored on the
    same draws, so estimator noise cancels between classes; the density terms are the same weights."""
    n, c = x.shape[0], model.num_classes
    xc, _, guide_tr, model_tr = _class_hypothesis_traces(model, x, num_samples)
    z = guide_tr.nodes["z"]["value"]  # (S, c*n, k)
    log_px = model_tr.nodes["x"]["fn"].log_prob(xc)  # (S, c*n)
    q = _normal_of(guide_tr.nodes["z"]["fn"])
    loc = q.loc.expand_as(z)[0].reshape(c, n, -1)
    scale = q.scale.expand_as(z)[0].reshape(c, n, -1)
    zd = z.reshape(num_samples * c, n, 1, -1)  # draws d = (s, j)
    log_q_each = torch.distributions.Normal(loc.transpose(0, 1), scale.transpose(0, 1)).log_prob(zd).sum(-1)
    log_q_mix = torch.logsumexp(log_q_each, dim=-1) - math.log(c)  # (S*c, n)
    log_shared = log_px + model_tr.nodes["z"]["fn"].log_prob(z)  # (S, c*n)
    log_shared = log_shared.reshape(num_samples * c, n) - log_q_mix
    log_py = torch.log_softmax(model.label_logits(zd.squeeze(-2)), dim=-1)  # (S*c, n, c)
    # sum_c p(y = c | z) = 1, so the weights of log p(x) are the shared part alone.
    dens = torch.logsumexp(log_shared, dim=0)[:, None] if density_draws > 0 else None
    return (log_shared[..., None] + log_py).permute(1, 2, 0), dens  # (n, c, S*c)


def _per_class_chunk(
    model: DGC, x: torch.Tensor, num_samples: int, density_draws: int, importance_weighted: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``"iw"`` (``importance_weighted``) and ``"paper"`` rules' pass: per class hypothesis, the importance
    weights of log p(x, y = c) with q(z | x, c) alone, or Eq. 9 of the paper (log p(x | z) + log p(y = c | z));
    the density terms are the per-class weights of log p(x, y = c) (y is marginalised by the sum over c)."""
    n, c = x.shape[0], model.num_classes
    xc, yc, guide_tr, model_tr = _class_hypothesis_traces(model, x, num_samples)
    z = guide_tr.nodes["z"]["value"]  # (S, c*n, k)
    log_px = model_tr.nodes["x"]["fn"].log_prob(xc)  # (S, c*n)
    log_w = log_px + model_tr.nodes["y"]["fn"].log_prob(yc)
    log_iw = log_w + model_tr.nodes["z"]["fn"].log_prob(z) - guide_tr.nodes["z"]["fn"].log_prob(z)
    if importance_weighted:
        log_w = log_iw
    dens = None
    if density_draws > 0:
        dens = torch.logsumexp(log_iw.reshape(num_samples, c, n), dim=0).transpose(0, 1)  # (n, c)
    # (S, c*n) -> (n, c, S)
    return log_w.reshape(num_samples, c, n).permute(2, 1, 0), dens


def _bayes_log_weights(model: DGC, guide_fn: Any, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Bayes' rule for the class-conditional prior: log w_{s,c} = log p(y = c) + log p(x | z_s) + log p(z_s | y = c)
    - log q(z_s | x), ``(n, C, S)``, on one set of draws z_s ~ q(z | x) shared by every class.

    Every class is scored on the same draws (one decoder pass per draw, not per class), so the draws' noise in
    p(x | z_s) / q(z_s | x) is common to all classes; the posterior's softmax over (c, s) gives
    p(y = c | x) proportional to p(y = c) * mean_s [p(x | z_s) p(z_s | y = c) / q(z_s | x)].
    """
    if getattr(model, "class_gaussians", None) is None:
        raise ValueError(
            "rule='bayes' needs a model built with latent_prior='class_conditional' (a p(z | y) per class)"
        )
    with pyro.plate("particles", num_samples, dim=-2):
        guide_tr = poutine.trace(guide_fn).get_trace(x, None)
    node = guide_tr.nodes["z"]
    z = node["value"]  # (S, n, k)
    log_shared = model.likelihood(z).log_prob(x) - node["fn"].log_prob(z)  # (S, n)
    log_w = log_shared[..., None] + model.class_prior_log_density(z) + model.label_log_prior()  # (S, n, C)
    return log_w.permute(1, 2, 0)


# ----------------------------------------------------------------------------- the scoring-rule registry
#: A rule's pass: ``(model, x, num_samples, density_draws) -> (log_w (n, C, D), log p(x) terms (n, K) or None)``.
LogWeightsFn = Callable[[DGC, torch.Tensor, int, int], tuple[torch.Tensor, torch.Tensor | None]]
#: Rows each network runs per example: ``(num_classes, num_samples, density_samples) -> {"encoder": ..., ...}``.
RowsFn = Callable[[int, int, int], dict[str, int]]


def _per_class_rows(num_classes: int, num_samples: int, density_samples: int) -> dict[str, int]:
    # every class hypothesis encoded once, every (class, draw) pair decoded and classified; the density is free
    return {"encoder": num_classes, "decoder": num_classes * num_samples, "classifier": num_classes * num_samples}


def _latent_rows(num_classes: int, num_samples: int, density_samples: int) -> dict[str, int]:
    d = min(density_samples, num_samples)
    return {"encoder": 1, "decoder": d, "classifier": num_samples + d}


def _bayes_rows(num_classes: int, num_samples: int, density_samples: int) -> dict[str, int]:
    return {"encoder": 1, "decoder": num_samples, "classifier": 0}  # shared draws: one decoder row each, no label head


def _any_model(model: DGC) -> bool:
    return True


def _has_class_gaussians(model: DGC) -> bool:
    return getattr(model, "class_gaussians", None) is not None


def _paper_applies(model: DGC) -> bool:
    # a class-conditional model may have no label head, and Eq. 9 scores with it
    return not _has_class_gaussians(model) or model.has_label_head


@dataclass(frozen=True)
class ScoringRuleSpec:
    """What :func:`predict` needs to know about a scoring rule (an entry of :data:`SCORING_RULE_REGISTRY`).

    Attributes:
        log_weights: one vectorised pass, ``(model, x, num_samples, density_draws)`` ->
            ``(log_w, dens)``: the ``(n, C, D)`` log weights of the n examples of ``x`` under every class, and
            with ``density_draws > 0`` the ``(n, K)`` log-sum-exp over this pass's draws of the importance
            weights of log p(x) (else None). It runs under ``torch.no_grad`` and in eval mode.
        rows: rows each network (``"encoder"``, ``"decoder"``, ``"classifier"``) runs per example,
            ``(num_classes, num_samples, density_samples)`` -> dict; it sizes the chunks (default: C encoder rows,
            C x S decoder and label-head rows).
        pools_classes: every class is scored on the draws of all C proposals, so D = S x C (``"mixture"``);
            otherwise D = S. Sizes the result and its temporaries.
        own_density_draws: the density decodes ``density_samples`` draws of its own (``"latent"``, whose class
            posterior needs no decoder); otherwise it reuses all of the rule's draws.
        cpu_activation_bytes: the largest single activation of a CPU pass (cache budget; see the module docs).
        applies_to: whether the rule can score a given model (:func:`scoring_rules_for`).
        requirement: what ``applies_to`` asks of a model, in words, for the error of :func:`check_rule`.
    """

    log_weights: LogWeightsFn
    rows: RowsFn = _per_class_rows
    pools_classes: bool = False
    own_density_draws: bool = False
    cpu_activation_bytes: int = CPU_ACTIVATION_BYTES
    applies_to: Callable[[DGC], bool] = _any_model
    requirement: str = ""

    def draws(self, num_classes: int, num_samples: int) -> int:
        """D, the draws per example and class in the log weights."""
        return num_samples * num_classes if self.pools_classes else num_samples

    def density_count(self, num_classes: int, num_samples: int, density_draws: int) -> int:
        """Importance weights averaged per term of the log p(x) estimate: the ``density_draws`` decoded draws
        (``own_density_draws``), else every draw of the rule (summed over the C classes where it scores each)."""
        return density_draws if self.own_density_draws else self.draws(num_classes, num_samples)


#: The scoring rules :func:`predict` accepts by name; add one with ``SCORING_RULE_REGISTRY.register(name, spec)``
#: (docs/extending.md).
SCORING_RULE_REGISTRY: Registry[ScoringRuleSpec] = Registry("scoring rule")
SCORING_RULE_REGISTRY.register("mixture", ScoringRuleSpec(_mixture_chunk, pools_classes=True))
SCORING_RULE_REGISTRY.register("iw", ScoringRuleSpec(functools.partial(_per_class_chunk, importance_weighted=True)))
SCORING_RULE_REGISTRY.register(
    "paper",
    ScoringRuleSpec(
        functools.partial(_per_class_chunk, importance_weighted=False),
        applies_to=_paper_applies,
        requirement="a label head (Eq. 9 scores with p(y | z); this class-conditional model has none)",
    ),
)
SCORING_RULE_REGISTRY.register(
    "latent",
    ScoringRuleSpec(
        _latent_chunk, rows=_latent_rows, own_density_draws=True, cpu_activation_bytes=LATENT_CPU_ACTIVATION_BYTES
    ),
)
SCORING_RULE_REGISTRY.register(
    "bayes",
    ScoringRuleSpec(
        _bayes_chunk,
        rows=_bayes_rows,
        applies_to=_has_class_gaussians,
        requirement="a model built with latent_prior='class_conditional' (a p(z | y) per class)",
    ),
)
#: The built-in rules' names (the registry's :meth:`~dgc_pyro.registry.Registry.names` also lists added ones).
SCORING_RULES: tuple[str, ...] = SCORING_RULE_REGISTRY.names()


@torch.no_grad()
def class_log_weights(
    model: DGC,
    x: torch.Tensor,
    num_samples: int = 10,
    *,
    rule: str | None = None,
    max_rows: int | None = None,
    autocast: str | None = None,
    channels_last: bool | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Log importance weights ``(N, C, S)`` of every class hypothesis for every example.

    ``rule=None`` (default) takes the model's :attr:`~DGC.default_rule`: ``"mixture"`` for the paper's
    label-conditioned guide, ``"latent"`` for a label-free one. ``rule="mixture"`` draws S latents from each q(z | x, c) and weights all S*C of them
    against the mixture of the C proposals (D = S*C draws shared by every class); ``rule="iw"`` is the
    importance-weighted estimate of log p(x, y=c) with q(z | x, c) alone (D = S); ``rule="latent"``
    averages p(y | z) over S draws of the label-free q(z | x) (for ``label_in_guide=False``); ``rule="paper"`` is
    Eq. 9 of the paper (log p(x | z) + log p(y = c | z), without the prior and proposal terms).

    Examples are processed in chunks to bound memory: ``max_rows`` caps the rows of the busiest network
    in one pass (``"mixture"``, ``"iw"``, ``"paper"``: C x S decoder rows per example; ``"latent"``: S
    label-head rows and one encoder row per example); ``None`` sizes the chunks from the device's memory
    and each network's activation size (:func:`chunk_plan`). When one example's rows exceed the budget
    its draws are split over several passes as well. A request whose result cannot fit in memory is
    refused with a ValueError before any work (:func:`check_prediction_size`).
    ``autocast="bf16"`` runs the networks under bfloat16 autocast (their outputs and every log density
    stay float32); ``channels_last`` (default: on CPU, and on CUDA with autocast) uses channels-last
    convolution weights for the call. The result is float32 either way. ``progress`` shows a tqdm bar
    over the chunks on stderr.
    """
    return _class_log_weights(
        model,
        x,
        num_samples,
        rule=rule,
        max_rows=max_rows,
        autocast=autocast,
        channels_last=channels_last,
        progress=progress,
    )[0]


def _check_count(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


@torch.no_grad()
def _class_log_weights(
    model: DGC,
    x: torch.Tensor,
    num_samples: int,
    *,
    rule: str | None,
    max_rows: int | None,
    autocast: str | None,
    channels_last: bool | None,
    progress: bool,
    density_samples: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`class_log_weights` and, with ``density_samples > 0``, the importance-weighted log p(x) ``(N,)``
    of the same pass (``density_samples`` is the number of draws the ``"latent"`` rule decodes for it; the
    other rules use all their draws)."""
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    if rule is None:
        rule = model.default_rule
    check_rule(model, rule)
    spec = SCORING_RULE_REGISTRY.get(rule)
    _check_count("num_samples", num_samples, 1)
    _check_count("density_samples", density_samples, 0)
    if autocast not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast must be one of {AUTOCAST_CHOICES}, got {autocast!r}")
    if max_rows is not None and (
        isinstance(max_rows, bool) or not isinstance(max_rows, (int, np.integer)) or max_rows < 1
    ):
        raise ValueError(f"max_rows must be a positive integer or None, got {max_rows!r}")
    x = check_features(x, input_shape=model.input_shape)
    num_samples = int(num_samples)
    # The latent rule decodes at most its own draws; the other rules' density costs no extra rows.
    density_draws = min(int(density_samples), num_samples) if spec.own_density_draws else int(density_samples > 0)
    check_prediction_size(model, x.shape[0], num_samples, rule=rule)
    was_training = model.training
    model.eval()
    if channels_last is None:
        channels_last = model.device.type == "cpu" or autocast is not None
    out, dens_out = [], []
    try:
        examples, draws = chunk_plan(
            model, rule, num_samples, max_rows=max_rows, density_samples=density_draws if spec.own_density_draws else 0
        )
        blocks = [(s, min(s + draws, num_samples)) for s in range(0, num_samples, draws)]
        starts = range(0, x.shape[0], examples)
        with contextlib.ExitStack() as stack:
            stack.enter_context(pyro.settings.context(module_local_params=True))
            if channels_last:
                stack.enter_context(_channels_last(model))
            if autocast is not None:
                stack.enter_context(_network_autocast(model, torch.bfloat16))
            bar = stack.enter_context(
                tqdm(
                    total=len(starts) * len(blocks),
                    desc="predict",
                    unit="chunk",
                    disable=not progress,
                    file=sys.stderr,
                    leave=False,
                )
            )
            for start in starts:
                xb = x[start : start + examples].to(model.device, model.dtype, non_blocking=True)
                if channels_last and xb.dim() == 4:
                    xb = xb.contiguous(memory_format=torch.channels_last)
                parts, dens = [], None
                for lo, hi in blocks:
                    here = max(0, min(density_draws, hi) - lo) if spec.own_density_draws else density_draws
                    log_w, d = _log_weight_chunk(model, xb, hi - lo, rule, here)
                    parts.append(log_w.float())
                    if d is not None:
                        dens = d.float() if dens is None else torch.logaddexp(dens, d.float())
                    bar.update(1)
                out.append(parts[0] if len(parts) == 1 else _join_draw_blocks(parts, rule, model.num_classes))
                if dens is not None:
                    dens_out.append(dens)
    finally:
        model.train(was_training)
    log_density = None
    if dens_out:
        count = spec.density_count(model.num_classes, num_samples, density_draws)
        log_density = torch.logsumexp(torch.cat(dens_out, dim=0), dim=-1) - math.log(count)
    return torch.cat(out, dim=0), log_density


def _join_draw_blocks(parts: list[torch.Tensor], rule: str, num_classes: int) -> torch.Tensor:
    """Log weights of one example chunk from its draw blocks, in the draw order of a single pass.

    The ``"mixture"`` rule's draw axis is class-major within a block (d = s * C + j), so blocks of draws
    simply concatenate: every draw is weighted against the same per-example mixture, whatever its block.
    """
    return torch.cat(parts, dim=-1)


# ----------------------------------------------------------------------------- chunk sizes
def _row_bytes(model: DGC) -> dict[str, int]:
    """Bytes of the largest activation per row of each network (``"encoder"``, ``"decoder"``,
    ``"classifier"``) in a no-grad prediction pass, at the parameters' element size, measured once per model.
    """
    cached = _ROW_BYTES.get(model)
    if cached is not None:
        return cached
    nets = {"encoder": model.encoder, "decoder": model.decoder, "classifier": model.classifier}
    largest = {name: 1 for name in nets}

    def recorder(name: str) -> Any:
        def record(module: torch.nn.Module, args: Any, output: Any) -> None:
            for t in output if isinstance(output, (tuple, list)) else (output,):
                if torch.is_tensor(t):
                    largest[name] = max(largest[name], t.numel())

        return record

    handles = [m.register_forward_hook(recorder(name)) for name, net in nets.items() for m in net.modules()]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            x = model._zero.new_zeros((1, *model.input_shape))
            loc, _ = model.encode(x, None)
            model.label_logits(loc)
            model.decoder(loc)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    elem = next(iter(model.parameters())).element_size()
    row = {name: elem * n for name, n in largest.items()}
    _ROW_BYTES[model] = row
    return row


def rows_per_example(rule: str, num_classes: int, num_samples: int, density_samples: int = 0) -> dict[str, int]:
    """Rows each network runs per example under ``rule`` with ``num_samples`` draws.

    ``"latent"``: the encoder once and the label head once per draw, and the decoder (and the head) once for
    each of the ``density_samples`` draws decoded for the density score; ``"bayes"``: the encoder once and the
    decoder once per draw; the other built-in rules encode every class hypothesis once and decode and classify every
    (class, draw) pair (their density score is free). A registered rule gives its own (:attr:`ScoringRuleSpec.rows`).
    """
    return SCORING_RULE_REGISTRY.get(rule).rows(num_classes, num_samples, density_samples)


def _example_bytes(model: DGC, rule: str, num_samples: int, density_samples: int = 0) -> tuple[int, int]:
    """``(working set, largest activation)`` in bytes of one example's pass with ``num_samples`` draws.

    The working set is three times each network's activations (a layer's input, its output and a
    workspace live together) plus the mixture rule's block of D x C x k log densities (about five
    temporaries of it) and the (C, D) log weights themselves.
    """
    per_row = _row_bytes(model)
    rows = rows_per_example(rule, model.num_classes, num_samples, density_samples)
    elem = next(iter(model.parameters())).element_size()
    c, k = model.num_classes, model.latent_dim
    spec = SCORING_RULE_REGISTRY.get(rule)
    draws = spec.draws(c, num_samples)
    extra = elem * c * draws * (1 + (5 * k if spec.pools_classes else 0))
    acts = [rows[name] * per_row[name] for name in rows]
    return 3 * sum(acts) + extra, max(acts)


def _budget(model: DGC, rule: str) -> tuple[int, int | None]:
    """``(working-set bytes, largest-activation bytes or None)`` of one pass of ``rule`` on the model's device."""
    device = model.device
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(CUDA_CHUNK_SHARE * free), None
    return CPU_CHUNK_BYTES, SCORING_RULE_REGISTRY.get(rule).cpu_activation_bytes


def chunk_plan(
    model: DGC, rule: str, num_samples: int, *, max_rows: int | None = None, density_samples: int = 0
) -> tuple[int, int]:
    """``(examples, draws)`` per vectorised pass of ``rule`` with ``num_samples`` draws per example.

    With ``max_rows`` the busiest network runs at most that many rows per pass (at least one draw of one
    example). Without it the pass fits the device's budget (see the module docstring) and keeps at least
    the device's minimum of rows (64 on CPU) when the examples allow it. When a single example exceeds
    the budget, its draws are split: ``examples == 1`` and ``draws < num_samples``. ``density_samples``:
    the draws the ``"latent"`` rule decodes per example for the density score.
    """
    rows = rows_per_example(rule, model.num_classes, num_samples, density_samples)
    busiest = max(rows.values())
    if max_rows is not None:
        examples = int(max_rows) // busiest
        if examples >= 1:
            return examples, num_samples
        per_draw = max(rows_per_example(rule, model.num_classes, 1, min(density_samples, 1)).values())
        return 1, max(1, int(max_rows) // per_draw)
    lo, hi = _ROW_LIMITS.get(model.device.type, _ROW_LIMITS["cpu"])
    working_set, activation = _example_bytes(model, rule, num_samples, density_samples)
    ws_budget, act_budget = _budget(model, rule)
    examples = ws_budget // working_set
    if act_budget is not None:
        examples = min(examples, act_budget // max(activation, 1))
    examples = max(examples, lo // busiest)  # tiny networks: at least ``lo`` rows per pass
    examples = min(examples, max(1, hi // busiest))
    if examples >= 1:
        return int(examples), num_samples
    # One example is too big: the largest number of draws whose pass fits (one draw at the least).
    draws = num_samples
    while draws > 1:
        draws = max(1, draws // 2)
        ws, act = _example_bytes(model, rule, draws, min(density_samples, draws))
        if ws <= ws_budget and (act_budget is None or act <= act_budget):
            break
    return 1, draws


def auto_max_rows(model: DGC, rule: str = "mixture", num_samples: int = 10) -> int:
    """Rows of the busiest network per vectorised pass for ``model`` on its device under ``rule``
    (the automatic chunk size of :func:`class_log_weights`, see :func:`chunk_plan`)."""
    examples, draws = chunk_plan(model, rule, num_samples)
    return examples * max(rows_per_example(rule, model.num_classes, draws).values())


def _available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: ``torch.cuda.mem_get_info`` on CUDA, MemAvailable (Linux) or the free
    physical pages elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse


#: The (N, C, D) log weights live beside about three same-sized temporaries while the posterior is formed.
_RESULT_COPIES = 4


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} PiB"


def check_prediction_size(model: DGC, num_examples: int, num_samples: int, *, rule: str | None = None) -> None:
    """Raise ValueError (one line, naming the sizes) when the ``(N, C, D)`` log weights of a prediction of
    ``num_examples`` examples with ``num_samples`` draws would not fit in the free memory of the model's device.

    Chunking bounds the networks' memory, but the result itself is kept whole (the posterior normalises over
    all draws), so this is the one request that cannot be made to fit: it is refused before any work.
    """
    rule = model.default_rule if rule is None else rule
    c = model.num_classes
    draws = SCORING_RULE_REGISTRY.get(rule).draws(c, num_samples)
    needed = _RESULT_COPIES * 4 * int(num_examples) * c * draws
    available = _available_bytes(model.device)
    if needed > available:
        raise ValueError(
            f"num_samples={num_samples} is too many for {num_examples} examples: the ({num_examples}, {c}, {draws}) "
            f"log weights of the {rule!r} rule and the posterior's temporaries need {_format_bytes(needed)}, more than "
            f"the {_format_bytes(available)} free on {model.device}; use fewer draws or predict fewer examples per call"
        )


# ----------------------------------------------------------------------------- autocast / channels-last
@contextlib.contextmanager
def _network_autocast(model: DGC, dtype: torch.dtype) -> Iterator[None]:
    """Run the encoder, decoder and classifier under autocast, handing float32 outputs to the model."""
    device_type = model.device.type
    active: list[torch.autocast] = []

    def enter(module: torch.nn.Module, args: Any) -> None:
        ctx = torch.autocast(device_type=device_type, dtype=dtype)
        ctx.__enter__()
        active.append(ctx)

    def leave(module: torch.nn.Module, args: Any, output: Any) -> Any:
        active.pop().__exit__(None, None, None)
        if isinstance(output, tuple):
            return tuple(t.float() if torch.is_tensor(t) and t.is_floating_point() else t for t in output)
        return output.float() if torch.is_tensor(output) and output.is_floating_point() else output

    nets = (model.encoder, model.decoder, model.classifier)
    handles = [net.register_forward_pre_hook(enter) for net in nets]
    handles += [net.register_forward_hook(leave) for net in nets]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        while active:
            active.pop().__exit__(None, None, None)


@contextlib.contextmanager
def _channels_last(model: DGC) -> Iterator[None]:
    """Channels-last 4-D weights for the duration of the block (restored afterwards)."""
    four_d = [t for t in list(model.parameters()) + list(model.buffers()) if t.dim() == 4]
    if not four_d:
        yield
        return
    model.to(memory_format=torch.channels_last)
    try:
        yield
    finally:
        model.to(memory_format=torch.contiguous_format)


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


#: Draws of q(z | x) the ``"latent"`` rule decodes for the density score by default: the decoder is that rule's
#: only extra cost (its class posterior needs none); one draw (the single-sample bound, an ELBO estimate) keeps
#: ``dgc-pyro evaluate`` of the 10,000 Fashion test images near its 30 s target on the loaded 2-core CPU
#: (benchmarks/evaluate_speed.py), where two took several times longer. The other rules use all their draws.
DEFAULT_DENSITY_SAMPLES = 1


class HeadPosterior(Protocol):
    """What :func:`predict` needs of a posterior over the label head's weights
    (:class:`~dgc_pyro.inference.swag.SwagHead`)."""

    def check_model(self, model: DGC) -> None:
        """Raise ValueError unless the posterior fits ``model``'s label head."""
        ...

    def sample(self, num_samples: int, *, seed: int = 0) -> torch.Tensor:
        """``(num_samples, D)`` flat head weight vectors."""
        ...

    def applied(self, model: DGC, theta: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """A block within which ``model``'s label head holds ``theta``."""
        ...


def predict(
    model: DGC,
    x: torch.Tensor,
    num_samples: int = 10,
    *,
    rule: str | None = None,
    max_rows: int | None = None,
    reject_threshold: float | None = None,
    reject_score: str = "entropy",
    reject: str | None = None,
    density: bool = True,
    density_samples: int | None = None,
    ood: bool = True,
    autocast: str | None = None,
    channels_last: bool | None = None,
    balanced: bool = False,
    progress: bool = False,
    swag: HeadPosterior | None = None,
    head_samples: int | None = None,
    head_seed: int = 0,
) -> Prediction:
    """Predicted labels with predictive entropy, its aleatoric/epistemic split, the spread over draws, and the
    density of x.

    ``log_density`` is an importance-weighted lower bound on log p(x) (nats per example) from the draws the
    rule already takes: the mixture proposal's weights (``"mixture"``), the per-class weights of
    log p(x, y = c) summed over c (``"iw"``, ``"paper"``), or ``density_samples`` (default
    :data:`DEFAULT_DENSITY_SAMPLES` = 1, at most ``num_samples``) decoded draws of q(z | x) (``"latent"``, whose
    class posterior needs no decoder). ``density=False`` skips it (and the flags). When the model carries an
    OOD detector (:func:`~dgc_pyro.inference.density.fit_ood_threshold`) and ``ood`` is True, ``ood_score``
    and the calibrated ``ood`` flags are filled in.

    The reject option abstains (``rejected``; :attr:`Prediction.labels_with_reject`):

    - ``reject="entropy"``: where ``reject_score`` (``"entropy"``, ``"least_confidence"`` = 1 - max proba,
      ``"mutual_information"`` or ``"expected_entropy"``) is strictly greater than ``reject_threshold``
      (default: the detector's dev-set entropy quantile at its false-alarm rate);
    - ``reject="density"``: where the OOD flag fires (needs a detector);
    - ``reject="both"``: where either does: inputs the model cannot classify or cannot explain.

    ``reject_threshold`` alone (``reject=None``) is the entropy rule. ``max_rows``, ``autocast``,
    ``channels_last`` and ``progress`` (a tqdm bar on stderr): see :func:`class_log_weights`.
    With ``balanced=True`` the prediction targets a class-balanced test distribution, which is what ACSA
    measures: a model built with ``class_prior`` scores with its prior-free label likelihood softmax(f(z))
    (:meth:`DGC.balanced_labels`); any other model has its own label marginal p(y) (:meth:`DGC.label_prior`)
    divided out, so the class scores are log p(x | y = c) instead of log p(x, y = c). The density is that of
    the model's x either way.

    ``swag`` (a :class:`~dgc_pyro.inference.swag.SwagHead`, from a
    :class:`~dgc_pyro.inference.swag.SwagCollector` of the fit) averages the class posterior over ``head_samples``
    (default :data:`DEFAULT_HEAD_SAMPLES`) draws of the label head's weights (drawn with ``head_seed``): each draw
    runs the rule's pass with the same latent draws (common random numbers, so the blocks differ only by the
    head), each block's weights are normalised to one, so every head draw's class posterior counts equally, and
    the blocks are joined on the draw axis. ``proba`` is then the mean of the head draws' posteriors, and
    ``mutual_information`` includes the head's uncertainty. It costs ``head_samples`` times the rule's pass (every
    network runs again, not only the head). ``log_density`` is the mean over the head draws in probability.
    """

    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    if reject is None and reject_threshold is not None:
        reject = "entropy"
    if reject is not None and reject not in REJECT_RULES:
        raise ValueError(f"reject must be one of {REJECT_RULES} or None, got {reject!r}")
    detector = getattr(model, "ood_detector", None) if ood and density else None
    if reject in ("density", "both") and detector is None:
        why = (
            "density=False and ood=False switch it off"
            if not (ood and density)
            else "the model has no OOD detector; calibrate one with dgc_pyro.inference.fit_ood_threshold(model, x_dev)"
        )
        raise ValueError(f'reject="{reject}" needs the calibrated OOD flag: {why}')
    if reject == "entropy" and reject_threshold is None and detector is None:
        raise ValueError(
            'reject="entropy" needs reject_threshold (or a model with an OOD detector, whose dev-set '
            "entropy quantile is the default)"
        )
    if density_samples is None:
        density_samples = DEFAULT_DENSITY_SAMPLES
    _check_count("density_samples", density_samples, 1)
    rule = rule or model.default_rule
    options = {
        "rule": rule,
        "max_rows": max_rows,
        "autocast": autocast,
        "channels_last": channels_last,
        "progress": progress,
        "density_samples": int(density_samples) if density else 0,
    }
    if swag is None:
        if head_samples is not None:
            raise ValueError("head_samples needs swag=... (a posterior over the label head, e.g. SwagCollector.head)")
        log_w, log_density = _balanced_log_weights(model, x, num_samples, balanced, options)
    else:
        head_samples = DEFAULT_HEAD_SAMPLES if head_samples is None else head_samples
        _check_count("head_samples", head_samples, 1)
        log_w, log_density = _head_averaged_log_weights(
            model, x, num_samples, balanced, options, swag, int(head_samples), head_seed
        )
    pred = posterior_from_log_weights(log_w)
    pred.rule = rule
    pred.head_samples = int(head_samples) if swag is not None else None
    if log_density is not None:
        pred.log_density = log_density
        own = SCORING_RULE_REGISTRY.get(rule).own_density_draws
        pred.density_samples = min(int(density_samples), int(num_samples)) if own else int(num_samples)
    if detector is not None:
        if (pred.head_samples or 0) != detector.head_samples:
            # the flag's dev quantiles (entropy and, through the head-averaged density, the score) came from another
            # class posterior: its rates are not the stated ones
            warn_caller(
                f"the OOD flag was calibrated on predictions {_head_words(detector.head_samples)}, this one is "
                f"{_head_words(pred.head_samples or 0)}: its false-alarm rate may not hold; predict as it was "
                "calibrated, or calibrate it again (fit_ood_threshold) with these options"
            )
        score = detector.scores(log_density, x if detector.score == "complexity" else None).to(log_w.device)
        pred.ood_score = score
        pred.ood = detector.flags(score)
    if reject is not None:
        _apply_reject(pred, reject, reject_threshold, reject_score, detector)
    return pred


def _head_words(head_samples: int) -> str:
    return f"averaged over {head_samples} SWAG head draws" if head_samples else "of the fitted head alone"


def _balanced_log_weights(
    model: DGC, x: torch.Tensor, num_samples: int, balanced: bool, options: dict[str, Any]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One prediction pass: the rule's log weights (the label marginal divided out for ``balanced``) and density."""
    with model.balanced_labels() if balanced else contextlib.nullcontext():
        log_w, log_density = _class_log_weights(model, x, num_samples, **options)
    if balanced and not model.has_class_prior:
        log_prior = model.label_prior().log().to(log_w.device, log_w.dtype)
        log_w = log_w - log_prior[None, :, None]
    return log_w, log_density


def _head_averaged_log_weights(
    model: DGC,
    x: torch.Tensor,
    num_samples: int,
    balanced: bool,
    options: dict[str, Any],
    swag: HeadPosterior,
    head_samples: int,
    head_seed: int,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`predict`'s ``swag`` path: one pass per head draw on the same latent draws, each block normalised to
    one per example, joined head-major on the draw axis; the densities averaged in probability."""
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    swag.check_model(model)
    check_prediction_size(
        model,
        check_features(x, input_shape=model.input_shape).shape[0],
        num_samples * head_samples,
        rule=options["rule"],
    )
    thetas = swag.sample(head_samples, seed=head_seed)
    cuda = [model.device] if model.device.type == "cuda" else []
    blocks, densities = [], []
    with torch.random.fork_rng(devices=cuda):
        start = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]
        for theta in thetas:
            # common random numbers: every head draw sees the latent draws of the first
            torch.set_rng_state(start[0])
            for d, state in zip(cuda, start[1]):
                torch.cuda.set_rng_state(state, d)
            with swag.applied(model, theta):
                log_w, log_density = _balanced_log_weights(model, x, num_samples, balanced, options)
            blocks.append(log_w - torch.logsumexp(log_w.flatten(1), dim=1)[:, None, None])
            densities.append(log_density)
        end = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]
    # leave the global generators where one plain prediction would have left them
    torch.set_rng_state(end[0])
    for d, state in zip(cuda, end[1]):
        torch.cuda.set_rng_state(state, d)
    log_density = None
    if densities[0] is not None:
        log_density = torch.logsumexp(torch.stack(densities), dim=0) - math.log(head_samples)
    return torch.cat(blocks, dim=-1), log_density


def _apply_reject(pred: Prediction, reject: str, threshold: float | None, score: str, detector: Any) -> None:
    """Fill ``pred.rejected`` and ``pred.reject_rank`` for a reject rule of :func:`predict`."""
    device = pred.labels.device
    uncertainty = pred.uncertainty(score).to(device, torch.float32)
    if threshold is None:
        threshold = detector.entropy_threshold
    by_uncertainty = uncertainty > float(threshold)
    if reject == "entropy":
        pred.rejected, pred.reject_rank = by_uncertainty, uncertainty
    elif reject == "density":
        pred.rejected, pred.reject_rank = pred.ood, pred.ood_score
    else:
        pred.rejected = by_uncertainty | pred.ood
        pred.reject_rank = detector.combined(uncertainty, pred.ood_score).to(device)


def predict_proba(
    model: DGC,
    x: torch.Tensor,
    num_samples: int = 10,
    *,
    rule: str | None = None,
    max_rows: int | None = None,
    autocast: str | None = None,
    channels_last: bool | None = None,
    balanced: bool = False,
) -> torch.Tensor:
    """Class posterior p(y | x) as an ``(N, C)`` tensor whose rows sum to one (see :func:`predict`)."""
    return predict(
        model,
        x,
        num_samples,
        rule=rule,
        max_rows=max_rows,
        autocast=autocast,
        balanced=balanced,
        channels_last=channels_last,
        density=False,
    ).proba
