"""Training objectives: loss callables ``loss(model_fn, guide_fn, *args, **kwargs) -> Tensor``.

Each objective is a differentiable function of the model and guide traces, the form
``pyro.infer.SVI`` accepts as ``loss=``; the same callables drive the fast training engine.
"""

from __future__ import annotations

from typing import Callable

import pyro.infer
import torch

Objective = Callable[..., torch.Tensor]


def elbo_loss(num_particles: int = 1) -> Objective:
    """Negative ELBO estimated by ``pyro.infer.Trace_ELBO`` (Monte Carlo KL)."""
    return pyro.infer.Trace_ELBO(num_particles=num_particles, vectorize_particles=num_particles > 1).differentiable_loss


def analytic_elbo_loss(num_particles: int = 1) -> Objective:
    """Negative ELBO with the KL(q || p) term in closed form (``TraceMeanField_ELBO``)."""
    return pyro.infer.TraceMeanField_ELBO(
        num_particles=num_particles, vectorize_particles=num_particles > 1
    ).differentiable_loss


OBJECTIVES: dict[str, Callable[[], Objective]] = {
    "elbo": elbo_loss,
    "elbo-analytic": analytic_elbo_loss,
}


def get_objective(name: str | Objective) -> Objective:
    """Resolve an objective by name, or pass a loss callable through unchanged."""
    if callable(name):
        return name
    try:
        return OBJECTIVES[name]()
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)}") from None
