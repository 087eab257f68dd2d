"""Training objectives: loss callables ``loss(model_fn, guide_fn, *args, **kwargs) -> Tensor``.

Each objective is a differentiable function of the model and guide traces, the form
``pyro.infer.SVI`` accepts as ``loss=``; the same callables drive the fast training engine.

- ``"elbo"`` / ``"elbo-analytic"``: the Bayesian reading, the negative ELBO (KL of q(z | x, y) to the prior).
- ``"wae-mmd"``: the paper's objective (Eq. 7-8), a Wasserstein auto-encoder with an inverse-multiquadric
  MMD penalty between the encoded latents and prior draws; no KL term.
- ``"wae-mmd-kl"``: the same plus the per-example KL(q(z | x) || p(z)), i.e. the negative ELBO plus the MMD
  penalty (InfoVAE's family, Zhao et al. 2019). Without a KL term nothing keeps q(z | x) wide, and under
  WAE-MMD it shrinks to a point (``benchmarks/posterior_scale.py``); the KL keeps it a distribution.
- ``"iwae"``: the importance-weighted bound of Burda et al. (2016) on log p(x, y) with K = 5 draws of q(z | x, y)
  per example (:func:`iwae_loss`); ``"iwae-cf"`` adds the counterfactual-label term that trains q(z | x, c) for the
  wrong classes c != y too, the proposals the ``"mixture"`` scoring rule evaluates (issue 21, mechanism 4).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import pyro
import pyro.infer
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.trace_messenger import TraceHandler
from pyro.poutine.util import site_is_subsample

Objective = Callable[..., torch.Tensor]

#: Scales s of the inverse-multiquadric kernel, C = 2 * k * s (reference WAE/DGC code).
IMQ_SCALES: tuple[float, ...] = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
RECONSTRUCTIONS = ("likelihood", "l2")


def elbo_loss(num_particles: int = 1) -> Objective:
    """Negative ELBO estimated by ``pyro.infer.Trace_ELBO`` (Monte Carlo KL)."""
    return pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1).differentiable_loss


def analytic_elbo_loss(num_particles: int = 1) -> Objective:
    """Negative ELBO with the KL(q || p) term in closed form (``TraceMeanField_ELBO``)."""
    return pyro.infer.TraceMeanField_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1
    ).differentiable_loss


# ----------------------------------------------------------------------------- WAE-MMD (paper Eq. 7-8)
def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Exact pairwise squared distances (cdist's matmul shortcut can go slightly negative).
    return (a[:, None, :] - b[None, :, :]).pow(2).sum(-1)


def mmd_imq(
    a: torch.Tensor, b: torch.Tensor, scales: Sequence[float] = IMQ_SCALES, *, biased: bool = False
) -> torch.Tensor:
    """Squared MMD between samples ``a`` (n, k) and ``b`` (m, k) with the inverse-multiquadric kernel.

    k(u, v) = C / (C + ||u - v||^2), summed over C = 2 * k * s for s in ``scales`` (k = latent dim),
    as in the paper's reference code. The default estimate is the unbiased U-statistic (diagonal terms
    of the within-sample kernel matrices dropped), which can be slightly negative; ``biased=True`` gives
    the V-statistic (always >= 0). Differentiable in both arguments.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"mmd_imq needs two (n, k) sample matrices with the same k, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    n, m, k = a.shape[0], b.shape[0], a.shape[-1]
    if not biased and (n < 2 or m < 2):
        raise ValueError("the unbiased MMD estimate needs at least two samples on each side")
    d_aa, d_bb, d_ab = _sq_dists(a, a), _sq_dists(b, b), _sq_dists(a, b)
    total = a.new_zeros(())
    for s in scales:
        c = 2.0 * k * float(s)
        k_aa, k_bb, k_ab = c / (c + d_aa), c / (c + d_bb), c / (c + d_ab)
        if biased:
            total = total + k_aa.mean() + k_bb.mean() - 2.0 * k_ab.mean()
        else:
            # The diagonal of k_aa and k_bb is exactly 1.
            total = total + (k_aa.sum() - n) / (n * (n - 1)) + (k_bb.sum() - m) / (m * (m - 1)) - 2.0 * k_ab.mean()
    return total


def _scaled_sum(values: torch.Tensor, site: dict) -> torch.Tensor:
    return scale_and_mask(values, site["scale"], site["mask"]).sum()


def wae_mmd_loss(
    lam: float = 1.0,
    reconstruction: str = "likelihood",
    scales: Sequence[float] = IMQ_SCALES,
    *,
    kl_weight: float = 0.0,
    latent_site: str = "z",
    x_site: str = "x",
    y_site: str = "y",
) -> Objective:
    """The paper's WAE-MMD objective (Eq. 7-8) as a loss callable over the model and guide traces.

    L = E_q(z|x,y)[c1(x, z) + c2(y, z)] + lam * MMD(Q_Z, P_Z), one z draw per example, no KL term:

    - c1: ``reconstruction="likelihood"`` uses -log p(x | z) of the model's ``x_site``;
      ``"l2"`` uses the reference code's 0.5 * ||x - x_hat||^2 with x_hat the likelihood's mean;
    - c2: -log p(y | z) of ``y_site`` (the model's ``label_weight`` scale applies);
    - MMD: :func:`mmd_imq` between the guide's draws of ``latent_site`` and as many draws from the
      model's own prior at that site (so a custom :meth:`DGC.prior` is respected); the unbiased estimate,
      or the biased one for a batch of a single draw, which has no unbiased estimate.

    ``kl_weight`` > 0 adds ``kl_weight`` * KL(q(z | x) || p(z)) per example (closed form where torch has it,
    else the one-draw estimate log q(z) - log p(z)); 0 is the paper's objective.

    ``poutine.scale`` / masks are respected: c1 and c2 are the scaled sums over the batch, and the MMD is
    weighted by the summed scale of the latent site (the batch size without scaling, 1 under the
    engine's ``poutine.scale(1 / B)``), so the balance between terms does not depend on the scaling.
    Usable as ``pyro.infer.SVI(model, guide, optim, loss=wae_mmd_loss())``.
    """
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if not (kl_weight >= 0 and math.isfinite(kl_weight)):
        raise ValueError(f"kl_weight must be a finite number >= 0, got {kl_weight}")
    scales = tuple(float(s) for s in scales)
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be positive, got {scales}")

    def loss(model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
        for name, tr, what in (
            (x_site, model_tr, "model"),
            (y_site, model_tr, "model"),
            (latent_site, guide_tr, "guide"),
        ):
            if name not in tr.nodes:
                raise ValueError(f"wae-mmd needs the site {name!r} in the {what}")
        xs, ys, zs = model_tr.nodes[x_site], model_tr.nodes[y_site], model_tr.nodes[latent_site]
        if reconstruction == "likelihood":
            c1 = -_scaled_sum(xs["fn"].log_prob(xs["value"]), xs)
        else:
            fn, x = xs["fn"], xs["value"]
            event_dims = len(fn.event_shape)
            err = 0.5 * (x - fn.mean).pow(2)
            c1 = _scaled_sum(err.sum(tuple(range(-event_dims, 0))) if event_dims else err, xs)
        c2 = -_scaled_sum(ys["fn"].log_prob(ys["value"]), ys)
        total = c1 + c2
        if kl_weight > 0:
            q, p = guide_tr.nodes[latent_site], zs
            try:
                kl = torch.distributions.kl_divergence(q["fn"], p["fn"])
            except NotImplementedError:
                kl = q["fn"].log_prob(q["value"]) - p["fn"].log_prob(q["value"])
            total = total + kl_weight * _scaled_sum(kl, q)
        if lam > 0:
            z = guide_tr.nodes[latent_site]["value"]
            k = z.shape[-1]
            prior_fn = zs["fn"]  # the model's prior at the latent site, same batch shape as z
            prior_z = prior_fn.rsample() if prior_fn.has_rsample else prior_fn.sample()
            num_particles = z[..., 0, 0].numel() if z.dim() > 2 else 1
            weight = _scaled_sum(torch.ones(z.shape[:-1], device=z.device, dtype=z.dtype), zs) / num_particles
            z, prior_z = z.reshape(-1, k), prior_z.reshape(-1, k)
            # A batch of one draw (a last batch of N mod B == 1) has no unbiased estimate; the V-statistic is defined.
            total = total + lam * weight * mmd_imq(z, prior_z, scales, biased=len(z) < 2)
        return total

    loss.__name__ = f"wae_mmd_loss(lam={lam}, reconstruction={reconstruction!r}" + (
        f", kl_weight={kl_weight})" if kl_weight else ")"
    )
    return loss


# ----------------------------------------------------------------------------- IWAE (Burda et al. 2016)
#: Draws of q per example of the registered ``"iwae"`` and ``"iwae-cf"`` objectives.
IWAE_PARTICLES = 5
_PARTICLE_PLATE = "iwae_particles"


def _importance_traces(
    model: Callable, guide: Callable, particles: int, dim: int, args: tuple, kwargs: dict
) -> tuple[poutine.Trace, poutine.Trace]:
    """Model and guide traces of ``particles`` vectorised draws (a plate at ``dim``, left of the model's plates)."""
    with pyro.plate(_PARTICLE_PLATE, particles, dim=dim):
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(model, trace=guide_tr)).get_trace(*args, **kwargs)
    return model_tr, guide_tr


def _iw_bound(
    model_tr: poutine.Trace, guide_tr: poutine.Trace, particles: int, latent_site: str, exclude: frozenset[str]
) -> torch.Tensor:
    """Minus the scaled sum over the batch of the per-example bounds log mean_k w_k (the sites in ``exclude`` left
    out of w), plus the sites outside the data plates (global terms, averaged over the draws).

    Pyro scales a site's log-density inside the weight (``poutine.scale``: the engines' 1 / B, the model's
    ``label_weight``), which would turn log mean_k w_k into log mean_k w_k^(1/B). Here the scale every site of
    an example shares, the latent site's, is taken out and applied to the bound; each site keeps only its scale
    relative to it (``label_weight`` for y), so the bound has the same meaning whatever the batch scaling.
    """
    if latent_site not in guide_tr.nodes:
        raise ValueError(f"iwae needs the latent site {latent_site!r} in the guide")
    z = guide_tr.nodes[latent_site]
    if not getattr(z["fn"], "has_rsample", False):
        raise ValueError(f"iwae needs a reparameterised guide at {latent_site!r} (its gradient is the pathwise one)")
    base = z["scale"]
    if not torch.is_tensor(base) and not base > 0:
        raise ValueError(f"iwae needs a positive scale at the latent site, got {base}")
    data_frames = {f for f in z["cond_indep_stack"] if f.name != _PARTICLE_PLATE}
    log_w: torch.Tensor | float = 0.0
    global_terms: torch.Tensor | float = 0.0
    for trace, sign in ((model_tr, 1.0), (guide_tr, -1.0)):
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or name in exclude or site_is_subsample(site):
                continue
            lp = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
            if data_frames <= set(site["cond_indep_stack"]):  # one term per example: inside the weight
                log_w = log_w + sign * scale_and_mask(lp, site["scale"] / base, site["mask"])
            else:  # a global term (e.g. the class-conditional prior's shrinkage): the same in every draw
                global_terms = global_terms + sign * scale_and_mask(lp, site["scale"], site["mask"]).sum() / particles
    if not torch.is_tensor(log_w):
        raise ValueError("the model and guide have no per-example sample sites: nothing to fit")
    bound = torch.logsumexp(log_w, dim=0) - math.log(particles)  # (B,): the particle dim is the leftmost
    return -(base * bound).sum() - global_terms


def _num_classes(site: dict) -> int:
    fn = site["fn"]
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    logits = getattr(fn, "logits", None)
    if logits is None:
        raise ValueError("the counterfactual term needs a Categorical label site")
    return int(logits.shape[-1])


def iwae_loss(
    num_particles: int = IWAE_PARTICLES,
    *,
    counterfactual_weight: float = 0.0,
    latent_site: str = "z",
    y_site: str = "y",
    max_plate_nesting: int = 1,
) -> Objective:
    """The importance-weighted bound (IWAE, Burda et al. 2016) as a loss callable over the model and guide traces.

    Per example, with K = ``num_particles`` draws z_k ~ q(z | x, y) (vectorised in a plate left of the model's
    ``max_plate_nesting`` plates),

        L_K(x, y) = log (1/K) sum_k p(x | z_k) p(y | z_k)^label_weight p(z_k) / q(z_k | x, y),

    a lower bound on log p(x, y) that tightens with K and equals the one-draw ELBO estimate at K = 1; the loss is
    minus its scaled sum over the batch (the engines' per-example scale and masks apply, see :func:`_iw_bound`).
    Pyro's ``RenyiELBO(alpha=0)`` is the same bound but has no ``differentiable_loss`` (the torch and graph engines
    need one; its ``loss_and_grads`` calls ``.item()``) and puts ``poutine.scale`` inside the weight, so under the
    engines' ``scale(1 / B)`` it would average w^(1/B) instead of w. The gradient is the pathwise one of a
    reparameterised guide (the encoder's gradient gets noisier with K, Rainforth et al. 2018).

    ``counterfactual_weight`` > 0 adds that weight times the x-only bound under a wrong label: for every example a
    class c != y drawn uniformly, z_k ~ q(z | x, c) and log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k | x, c), the
    label site left out (so the label head never sees a wrong label). Why: the ``"mixture"`` scoring rule
    estimates every class's p(x, y = c) from the proposals q(z | x, c) of all classes, but the plain bound trains
    q(z | x, c) only at the observed class, so the proposals of the wrong classes are whatever the encoder does
    with a label it never saw, and their importance weights can be heavy-tailed. The x-only bound under q(z | x, c)
    is maximised at q(z | x, c) = p(z | x), which is a proposal with bounded weights for every class:
    p(x | z) p(c | z) p(z) / p(z | x) = p(x) p(c | z) <= p(x). The term also trains the decoder and the prior
    (it is a bound on log p(x), with no label in it). The wrong labels are drawn from the global generator, as
    the guide's noise is, so seeded fits stay reproducible and the graph engine can capture the step. Weight 0
    (the default) computes nothing more than the plain bound, draw for draw. It needs a label-conditioned guide
    (``DGC(label_in_guide=True)``) to mean anything; with q(z | x) it only adds a second x-only bound.

    Usable as ``pyro.infer.SVI(model, guide, optim, loss=iwae_loss())`` and as ``fit(..., objective=...)``; the
    guide the engines pass (a trace recorder for the perturbation step) keeps the observed label's trace.
    """
    if isinstance(num_particles, bool) or not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
    if (
        isinstance(counterfactual_weight, bool)
        or not isinstance(counterfactual_weight, (int, float))
        or not (math.isfinite(counterfactual_weight) and counterfactual_weight >= 0)
    ):
        raise ValueError(f"counterfactual_weight must be a finite number >= 0, got {counterfactual_weight!r}")
    if isinstance(max_plate_nesting, bool) or not isinstance(max_plate_nesting, int) or max_plate_nesting < 0:
        raise ValueError(f"max_plate_nesting must be an integer >= 0, got {max_plate_nesting!r}")
    dim = -(max_plate_nesting + 1)
    weight = float(counterfactual_weight)

    def loss(model: Callable, guide: Callable, *args, **kwargs) -> torch.Tensor:
        model_tr, guide_tr = _importance_traces(model, guide, num_particles, dim, args, kwargs)
        total = _iw_bound(model_tr, guide_tr, num_particles, latent_site, frozenset())
        if weight == 0:
            return total
        y = args[1] if len(args) > 1 else kwargs.get("y")
        if y is None or y_site not in model_tr.nodes:
            raise ValueError(f"the counterfactual term needs observed labels at the site {y_site!r}")
        classes = _num_classes(model_tr.nodes[y_site])
        # c = y + u mod C with u uniform on 1..C-1: uniform over the wrong classes, no data-dependent control flow
        wrong = (y + torch.randint(1, classes, y.shape, device=y.device)) % classes
        cf_args, cf_kwargs = ((args[0], wrong, *args[2:]), kwargs) if len(args) > 1 else (args, {**kwargs, "y": wrong})
        recorded = guide.msngr.trace if isinstance(guide, TraceHandler) else None
        cf_model_tr, cf_guide_tr = _importance_traces(model, guide, num_particles, dim, cf_args, cf_kwargs)
        if (
            recorded is not None
        ):  # the engines' recorder hands the observed label's q(z | x, y) to the perturbation step
            guide.msngr.trace = recorded
        return total + weight * _iw_bound(cf_model_tr, cf_guide_tr, num_particles, latent_site, frozenset({y_site}))

    loss.__name__ = f"iwae_loss(num_particles={num_particles}" + (
        f", counterfactual_weight={weight:g})" if weight else ")"
    )
    return loss


OBJECTIVES: dict[str, Callable[[], Objective]] = {
    "elbo": elbo_loss,
    "elbo-analytic": analytic_elbo_loss,
    "wae-mmd": wae_mmd_loss,
    # The reference code's cost: c1 = 0.5 ||x - x_hat||^2 (pair it with label_weight = batch size to
    # reproduce its batch-summed label cross-entropy).
    "wae-mmd-l2": functools.partial(wae_mmd_loss, reconstruction="l2"),
    "wae-mmd-kl": functools.partial(wae_mmd_loss, kl_weight=1.0),
    # Issue 21, mechanism 4: the importance-weighted bound, and the same with the counterfactual-label term.
    "iwae": iwae_loss,
    "iwae-cf": functools.partial(iwae_loss, counterfactual_weight=1.0),
}


def get_objective(name: str | Objective) -> Objective:
    """Resolve an objective by name, or pass a loss callable through unchanged."""
    if callable(name):
        return name
    try:
        return OBJECTIVES[name]()
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}") from None
