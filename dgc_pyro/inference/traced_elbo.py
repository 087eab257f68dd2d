"""The sync-free ELBO of the torch and graph engines: Pyro's estimator read off one model and guide trace.

For the built-in ``"elbo"`` (``Trace_ELBO``) and ``"elbo-analytic"`` (``TraceMeanField_ELBO``) objectives with one
particle, :class:`TracedELBO` computes the same estimator without the ``.item()`` calls and NaN hooks that Pyro's
implementation makes on every call (each one a device synchronisation on CUDA).

One private Pyro method stays in use: ``ELBO._differentiable_loss_particle(model_trace, guide_trace)``, for guides
with non-reparameterised or enumerated sites. Pyro's public ``differentiable_loss(model, guide, *args)`` runs the
model and guide again, which would draw new latents: the loss must come from the traces already drawn (the
perturbation step and the graph capture read the same guide trace), and no public method takes traces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyro
import pyro.infer
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.util import site_is_subsample

from dgc_pyro.inference.objectives import Objective

__all__ = ["TracedELBO", "traced_elbo_kind"]


def traced_elbo_kind(loss_fn: Objective) -> str | None:
    """``"mc"`` / ``"analytic"`` when ``loss_fn`` is the ``differentiable_loss`` of a one-particle
    ``Trace_ELBO`` / ``TraceMeanField_ELBO`` (what :class:`TracedELBO` computes exactly), else None."""
    owner = getattr(loss_fn, "__self__", None)
    if getattr(loss_fn, "__func__", None) is not pyro.infer.Trace_ELBO.differentiable_loss:
        return None
    if getattr(owner, "num_particles", None) != 1:
        return None
    if type(owner) is pyro.infer.Trace_ELBO:
        return "mc"
    if type(owner) is pyro.infer.TraceMeanField_ELBO:
        return "analytic"
    return None


def _log_prob_sum(site: dict[str, Any]) -> torch.Tensor:
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"]).sum()


def _sample_sites(trace: poutine.Trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


class TracedELBO:
    """Negative ELBO of a Pyro model/guide pair from one guide trace and the model replayed against it.

    Computes what ``Trace_ELBO(num_particles=1).differentiable_loss`` (``kind="mc"``) or
    ``TraceMeanField_ELBO(num_particles=1).differentiable_loss`` (``kind="analytic"``: closed-form
    KL(q || p) of latent sites where ``kl_divergence`` is registered) computes for fully reparameterised
    guides, but without host synchronisation: no ``.item()``, no NaN hooks, no validation. Guides with
    non-reparameterised or enumerated sites are handed to Pyro's own estimator (``fallback``) on the
    same traces. The trace handlers are built once and reused every step.

    ``elbo(*args, **kwargs)`` returns ``(loss, guide_trace)``.
    """

    def __init__(
        self, model_fn: Callable, guide_fn: Callable, kind: str = "mc", fallback: pyro.infer.ELBO | None = None
    ) -> None:
        if kind not in ("mc", "analytic"):
            raise ValueError(f"kind must be 'mc' or 'analytic', got {kind!r}")
        self.kind = kind
        self.fallback = fallback
        self._guide = poutine.trace(guide_fn)
        self._empty = poutine.Trace()
        self._replay = ReplayMessenger(trace=self._empty)
        self._model = poutine.trace(self._replay(model_fn))

    def traces(self, *args: Any, **kwargs: Any) -> tuple[poutine.Trace, poutine.Trace]:
        """``(model_trace, guide_trace)`` of one draw."""
        self._guide(*args, **kwargs)
        guide_tr = self._guide.msngr.trace
        self._replay.trace = guide_tr
        try:
            self._model(*args, **kwargs)
        finally:
            self._replay.trace = self._empty
        return self._model.msngr.trace, guide_tr

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, poutine.Trace]:
        model_tr, guide_tr = self.traces(*args, **kwargs)
        return self.loss(model_tr, guide_tr), guide_tr

    def loss(self, model_tr: poutine.Trace, guide_tr: poutine.Trace) -> torch.Tensor:
        """The negative ELBO from a model trace and the guide trace it was replayed against."""
        for _, site in _sample_sites(guide_tr):
            if not site["is_observed"] and (
                not getattr(site["fn"], "has_rsample", False) or site["infer"].get("enumerate")
            ):
                return self._pyro_loss(model_tr, guide_tr)
        elbo: torch.Tensor | float = 0.0
        done: set[str] = set()
        for name, site in _sample_sites(model_tr):
            guide_site = guide_tr.nodes.get(name)
            if self.kind == "analytic" and not site["is_observed"] and guide_site is not None:
                try:
                    kl = torch.distributions.kl_divergence(guide_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
                else:
                    kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
                    elbo = elbo - (kl.sum() if torch.is_tensor(kl) else kl * guide_site["fn"].batch_shape.numel())
                    done.add(name)
                    continue
            elbo = elbo + _log_prob_sum(site)
        for name, site in _sample_sites(guide_tr):
            if name not in done:
                elbo = elbo - _log_prob_sum(site)
        if not torch.is_tensor(elbo):
            raise ValueError("the model and guide have no sample sites: nothing to fit")
        return -elbo

    def _pyro_loss(self, model_tr: poutine.Trace, guide_tr: poutine.Trace) -> torch.Tensor:
        elbo = self.fallback or (pyro.infer.Trace_ELBO() if self.kind == "mc" else pyro.infer.TraceMeanField_ELBO())
        model_tr.compute_log_prob()
        guide_tr.compute_score_parts()
        loss, surrogate = elbo._differentiable_loss_particle(model_tr, guide_tr)
        return surrogate + (loss - surrogate.detach())
