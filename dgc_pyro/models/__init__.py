"""Pyro model/guide pairs of DGC and their networks."""

from dgc_pyro.models.dgc import DGC
from dgc_pyro.models.likelihoods import LIKELIHOODS, likelihood_mean, make_likelihood
from dgc_pyro.models.networks import PRESETS, Classifier, Decoder, Encoder, build_networks

__all__ = [
    "DGC",
    "Encoder",
    "Decoder",
    "Classifier",
    "build_networks",
    "PRESETS",
    "LIKELIHOODS",
    "make_likelihood",
    "likelihood_mean",
]
