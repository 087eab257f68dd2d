"""The paper's data-perturbation step: the classifier head sees re-drawn minority latents.

After each main step, every example of class c in the batch has its q(z | x, y) parameters repeated
``floor(1 + rate * (n_max - n_c) / n_c)`` times (the reference code's rule), z is redrawn with fresh
noise and a separate optimiser updates p(y | z) alone. No images are decoded.

With a logit-adjusted label likelihood (a model built with ``class_prior``) the main step adds
tau * log pi to the logits, pi the training class frequencies. The perturbation step's draws do not
follow pi: class c appears n_c * reps_c times. ``perturbation_prior="perturbed"`` gives the step the
offset of the frequencies it actually sees (:func:`perturbation_offset`), so both steps fit the same
balanced classifier; ``"train"`` (the default) keeps the training prior's offset in both.

``perturbation_noise="head"`` (:func:`borrowed_scale`) re-draws the latents of the tail classes (those the
step repeats, ``reps_c > 1``) with the pooled within-class spread of the head classes (``reps_c == 1``)
instead of q's own sigma, as ISDA (Wang et al. 2019), RSG (Wang et al. 2021) and GCL (Li et al. 2022)
transfer the frequent classes' feature variation to the rare ones; ``"own"`` (the default) keeps q's sigma.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

# PERTURBATION_PRIORS (which class frequencies the step's logit adjustment follows) and PERTURBATION_NOISES (whose
# spread the re-drawn tail latents get) live with their options in the configuration.
from dgc_pyro.config import PERTURBATION_NOISES, PERTURBATION_PRIORS, check_choice
from dgc_pyro.models.dgc import DGC, unwrap_normal


def repeat_counts(class_counts: np.ndarray | torch.Tensor, rate: float) -> torch.Tensor:
    """Per-class repetition factors ``floor(1 + rate * (n_max - n_c) / n_c)`` (1 for empty classes)."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    if rate < 0:
        raise ValueError(f"perturbation rate must be >= 0, got {rate}")
    n_max = counts.max()
    safe = counts.clamp_min(1.0)
    reps = torch.floor(1.0 + rate * (n_max - counts) / safe)
    return torch.where(counts > 0, reps, torch.ones_like(reps)).long()


def check_perturbation_prior(prior: str) -> None:
    """Raise ValueError naming ``prior`` unless it is one of :data:`PERTURBATION_PRIORS`."""
    check_choice("perturbation_prior", prior, PERTURBATION_PRIORS)


def check_perturbation_noise(noise: str) -> None:
    """Raise ValueError naming ``noise`` unless it is one of :data:`PERTURBATION_NOISES`."""
    check_choice("perturbation_noise", noise, PERTURBATION_NOISES)


def head_classes(reps_per_class: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the head classes: those the perturbation step does not repeat (``reps_c == 1``)."""
    return reps_per_class == 1


def borrowed_scale(loc: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """``scale`` with the rows of tail-class examples replaced by the head classes' pooled within-class spread.

    The spread is the per-dimension standard deviation of z ~ q(z | x) within a head class, pooled over the
    head classes of this batch: by the law of total variance, the pooled (unbiased) variance of the class
    members' locations plus the mean of q's own variances, ``sum_c sum_{i in c} (loc_i - mean_c)^2 /
    (n_head - C_head) + mean_i scale_i^2``. A tail example's re-drawn latent ``loc_i + spread * eps`` then
    scatters around it as widely as head-class latents scatter within their class. Rows of head classes, and
    every row when the batch holds no head example, keep q's own scale. Fixed shapes, no host synchronisation.

    Args:
        loc, scale: q(z | x, y)'s parameters, ``(n, k)`` (detached).
        y: labels ``(n,)``.
        head: boolean mask ``(C,)`` of the head classes (:func:`head_classes`).
    """
    classes = torch.arange(head.shape[0], device=y.device)
    member = ((y[:, None] == classes) & head).to(loc.dtype)  # (n, C): example i in head class c
    in_head = member.sum(1)  # (n,) 1 for head examples
    n_c = member.sum(0)  # (C,)
    mean = (member.T @ loc) / n_c.clamp_min(1.0)[:, None]  # (C, k)
    centred = (loc - member @ mean) * in_head[:, None]  # head rows minus their class mean, tail rows 0
    n_head = in_head.sum()
    dof = (n_head - (n_c > 0).sum()).clamp_min(1.0)
    variance = centred.square().sum(0) / dof + (scale.square() * in_head[:, None]).sum(0) / n_head.clamp_min(1.0)
    tail = ~head[y] & (n_head > 0)
    return torch.where(tail[:, None], variance.sqrt().expand_as(scale), scale)


def check_perturbation_model(model: Any, rate: Any) -> None:
    """Raise ValueError when the step is asked of a model without a label head (``DGC.has_label_head`` False).

    The step trains the classifier network p(y | z) alone; the class-conditional prior's p(y | z) is Bayes' rule
    on its class Gaussians, which the step's optimiser does not hold, so it would silently do nothing.
    """
    if (
        isinstance(rate, (int, float, np.integer, np.floating))
        and not isinstance(rate, bool)
        and rate > 0
        and not getattr(model, "has_label_head", True)
    ):
        raise ValueError(
            f"perturbation_rate={rate} needs a label head p(y | z), which a model with "
            "latent_prior='class_conditional' does not have; use perturbation_rate=0"
        )


def perturbation_offset(model: DGC, reps_per_class: torch.Tensor, prior: str = "train") -> torch.Tensor | None:
    """The logit offset of the perturbation step, or None to use ``model.label_logits`` unchanged.

    ``"train"``: None (the model's own offset, tau * log pi). ``"perturbed"``: tau * log pi', with
    pi'_c proportional to pi_c * reps_c, the class frequencies of the step's re-drawn latents. Models
    without a class prior have no offset, so both settings give None.
    """
    check_perturbation_prior(prior)
    if prior == "train" or not model.has_class_prior:
        return None
    pi = torch.tensor(model.class_prior, dtype=torch.float64) * reps_per_class.detach().cpu().double()
    offset = model.logit_adjustment * (pi / pi.sum()).log()
    return offset.to(dtype=model.label_offset.dtype, device=model.label_offset.device)


def guide_normal_params(
    guide_trace: Any, model: DGC, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (loc, scale) of q(z | x, y), shape (n, k), from a recorded guide trace, re-encoding only for
    non-Normal guides.

    A vectorised multi-particle ELBO records the distribution expanded to (particles, n, k); every particle
    has the same parameters, so the first one is taken.
    """
    node = guide_trace.nodes.get("z") if guide_trace is not None else None
    d = unwrap_normal(node["fn"] if node is not None else None)
    if d is not None:
        loc, scale = d.loc.detach(), d.scale.detach()
        lead = (0,) * max(loc.dim() - 2, 0)
        loc, scale = loc[lead], scale.expand_as(loc)[lead]
        return loc, scale
    with torch.no_grad():
        return model.encode(x, y)


def perturbation_loss(
    model: DGC,
    loc: torch.Tensor,
    scale: torch.Tensor,
    y: torch.Tensor,
    reps_per_class: torch.Tensor,
    *,
    max_reps: int | None = None,
    noise: torch.Tensor | None = None,
    total: torch.Tensor | float | None = None,
    offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of p(y | z) on latents re-drawn from q(z | x, y), minority examples repeated.

    Example i of class c contributes ``reps_per_class[c]`` fresh draws z = loc_i + scale_i * eps; the
    loss is the mean cross-entropy over all those draws. The draws are laid out as a fixed
    ``(n, max_reps)`` grid with the surplus masked out, so the shapes never depend on the labels' values
    and no host synchronisation is needed (a ``repeat_interleave`` by a tensor of counts would need one).

    Args:
        max_reps: a static upper bound of ``reps_per_class`` (default: its maximum, one host sync;
            the training engine computes it once per fit).
        noise: standard-normal draws ``(n, max_reps, latent_dim)`` (default: fresh ``torch.randn``).
        total: the normaliser (default: the number of draws of this batch, ``reps_per_class[y].sum()``);
            the distributed engine passes the global batch's count so the shards' losses add up.
        offset: logit offset replacing the model's class-prior offset (:func:`perturbation_offset`);
            None keeps ``model.label_logits`` as it is.
    """
    reps = reps_per_class[y]
    if max_reps is None:
        max_reps = int(reps_per_class.max())
    n, k = loc.shape[0], loc.shape[-1]
    if noise is None:
        noise = torch.randn((n, max_reps, k), dtype=loc.dtype, device=loc.device)
    z = loc[:, None, :] + scale[:, None, :] * noise  # (n, max_reps, k)
    if offset is None:
        logits = model.label_logits(z.reshape(n * max_reps, k))
    else:
        with model.balanced_labels():
            logits = model.label_logits(z.reshape(n * max_reps, k)) + offset
    ce = F.cross_entropy(logits, y[:, None].expand(n, max_reps).reshape(-1), reduction="none").reshape(n, max_reps)
    keep = torch.arange(max_reps, device=loc.device) < reps[:, None]
    if total is None:
        total = reps.sum()
    return torch.where(keep, ce, torch.zeros((), dtype=ce.dtype, device=ce.device)).sum() / total


class PerturbationStep:
    """The data-perturbation update as an auxiliary objective: :func:`perturbation_loss` on p(y | z) alone,
    minimised by its own optimiser after every main step (as Pyro's ``ss_vae_M2`` adds its auxiliary
    classification loss as a second objective beside the ELBO).

    ``step(x, y, guide_trace=..., guide_params=..., shard=...)`` returns the detached 0-d loss; without host
    synchronisation. q(z | x, y) comes from ``guide_params`` (the graph engine's captured outputs) or from the main
    step's ``guide_trace``. ``active`` is False for ``perturbation_rate=0`` (the step returns 0 and touches
    nothing); ``on`` is the deferred re-balancing switch (:mod:`dgc_pyro.inference.deferred`), read at every call.
    ``offset``: :func:`perturbation_offset`; ``borrow_from``: :func:`borrowed_scale`'s head classes (None: q's own
    sigma). With ``dist`` (a data-parallel rank) ``x, y`` are the global batch, ``shard`` this rank's rows, and the
    noise and the normaliser are the global batch's, so the shards' losses and gradients sum to the
    single-process ones.
    """

    def __init__(
        self,
        model: DGC,
        reps: torch.Tensor,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
        *,
        active: bool,
        offset: torch.Tensor | None = None,
        borrow_from: torch.Tensor | None = None,
        dist: Any = None,
    ) -> None:
        self.model, self.reps, self.optimizer = model, reps, optimizer
        self.active, self.on = bool(active), True
        self.offset, self.borrow_from, self.dist = offset, borrow_from, dist
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.zero = torch.zeros((), device=device)
        self.max_reps = int(reps.max()) if self.active else 0  # one host sync, at set-up

    def __call__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        guide_trace: Any = None,
        guide_params: tuple[torch.Tensor, torch.Tensor] | None = None,
        shard: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        if not (self.active and self.on):
            return self.zero
        model, reps = self.model, self.reps
        if shard is None:
            loc, scale = guide_params or guide_normal_params(guide_trace, model, x, y)
            if self.borrow_from is not None:
                scale = borrowed_scale(loc, scale, y, self.borrow_from)
            loss = perturbation_loss(model, loc, scale, y, reps, max_reps=self.max_reps, offset=self.offset)
            loss.backward()
            self._update()
            return loss.detach()
        # x, y: the global batch; the guide trace holds this rank's shard.
        lo, hi = shard
        noise = torch.randn((x.shape[0], self.max_reps, model.latent_dim), dtype=x.dtype, device=x.device)
        total = reps[y].sum()
        if hi > lo:
            loc, scale = guide_normal_params(guide_trace, model, x[lo:hi], y[lo:hi])
            loss = perturbation_loss(
                model,
                loc,
                scale,
                y[lo:hi],
                reps,
                max_reps=self.max_reps,
                noise=noise[lo:hi],
                total=total,
                offset=self.offset,
            )
            loss.backward()
        else:
            loss = self.zero
        (loss,) = self.dist.all_reduce_gradients(model, self.params, [loss], with_buffers=False)
        self._update()
        return loss

    def _update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
