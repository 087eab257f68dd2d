"""Pyro model/guide pairs of DGC and their networks."""

from dgc_pyro.models.dgc import DGC, LATENT_PRIORS
from dgc_pyro.models.latent_prior import COVARIANCES, ClassConditionalPrior
from dgc_pyro.models.likelihoods import LIKELIHOODS, likelihood_mean, make_likelihood
from dgc_pyro.models.networks import PRESETS, Classifier, Decoder, Encoder, build_networks

__all__ = [
    "COVARIANCES",
    "DGC",
    "LATENT_PRIORS",
    "LIKELIHOODS",
    "PRESETS",
    "ClassConditionalPrior",
    "Classifier",
    "Decoder",
    "Encoder",
    "build_networks",
    "likelihood_mean",
    "make_likelihood",
]
