"""Pixel/feature likelihoods p(x | z) for DGC."""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch


def _bernoulli(out: torch.Tensor, obs_scale: float) -> dist.TorchDistribution:
    # Grey-level pixels in [0, 1] are scored with the binary cross-entropy, as in most image VAEs;
    # validation would reject non-binary observations, so it is switched off for this site only.
    return dist.Bernoulli(logits=out, validate_args=False)


def _continuous_bernoulli(out: torch.Tensor, obs_scale: float) -> dist.TorchDistribution:
    return dist.ContinuousBernoulli(logits=out.clamp(-15.0, 15.0), validate_args=False)


def _normal(out: torch.Tensor, obs_scale: float) -> dist.TorchDistribution:
    return dist.Normal(torch.sigmoid(out), obs_scale)


LIKELIHOODS: dict[str, Callable[[torch.Tensor, float], dist.TorchDistribution]] = {
    "bernoulli": _bernoulli,
    "continuous_bernoulli": _continuous_bernoulli,
    "normal": _normal,
}


def make_likelihood(name: str, decoder_out: torch.Tensor, event_dims: int, obs_scale: float) -> dist.TorchDistribution:
    """The likelihood ``name`` with the decoder's output as natural parameter, one event per example."""
    try:
        factory = LIKELIHOODS[name]
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}; choose from {tuple(LIKELIHOODS)}") from None
    return factory(decoder_out, obs_scale).to_event(event_dims)


def likelihood_mean(name: str, decoder_out: torch.Tensor) -> torch.Tensor:
    """The mean image in [0, 1] of the likelihood ``name`` (used to decode synthetic examples)."""
    if name == "continuous_bernoulli":
        return dist.ContinuousBernoulli(logits=decoder_out.clamp(-15.0, 15.0), validate_args=False).mean
    return torch.sigmoid(decoder_out)
