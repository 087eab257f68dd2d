"""The class-conditional latent prior p(z | y) = N(mu_y, diag(sigma_y^2)) and its shrinkage toward the pooled class.

Used by ``DGC(latent_prior="class_conditional")`` (the authors' DGCMM idea: one Gaussian per class in the latent
space, classification by Bayes' rule). The shrinkage is a hierarchical (normal-inverse-gamma) prior on the class
parameters with ``k`` pseudo-examples centred on the pooled class, mu_c ~ N(mu_0, sigma_c^2 / k) and, for per-class
variances, sigma_c^2 ~ InvGamma(k / 2 - 1, k * sigma_0^2 / 2). Its maximum a posteriori point is the familiar
weighted average: with n_c examples of class c whose latents have mean zbar_c,

    mu_c = w_c * zbar_c + (1 - w_c) * mu_0,   w_c = n_c / (n_c + k),

and likewise for the variances, so a tail class borrows the head classes' statistics and a head class keeps its own.
mu_0 and sigma_0^2 are the count-weighted means of the class parameters, held fixed in each step (detached), so the
pull goes from the pooled (head-dominated) statistics to each class, never the other way.
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: Covariance structures of the class-conditional prior: one diagonal for all classes, or one per class.
COVARIANCES = ("shared", "per_class")


class ClassConditionalPrior(nn.Module):
    """Learnable class means ``loc`` ``(C, k)`` and diagonal log scales ``log_scale`` (``(1, k)`` shared or ``(C, k)``).

    The means start at standard-normal draws (so the classes start apart; zeros would leave them to break the
    symmetry through the encoder alone), the scales at one.
    """

    def __init__(self, num_classes: int, latent_dim: int, covariance: str = "shared") -> None:
        super().__init__()
        if covariance not in COVARIANCES:
            raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
        self.covariance = covariance
        self.loc = nn.Parameter(torch.randn(num_classes, latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(num_classes if covariance == "per_class" else 1, latent_dim))

    @property
    def scale(self) -> torch.Tensor:
        """Standard deviations ``(C, k)`` (the shared row broadcast to every class)."""
        return self.log_scale.exp().expand_as(self.loc)

    def params(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loc, scale)`` of p(z | y) for labels ``y`` of any shape: each ``y.shape + (k,)``."""
        y = y.long()
        return self.loc[y], self.scale[y]

    def log_prob_all(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; mu_c, diag(sigma_c^2)) for every class: ``(..., k)`` -> ``(..., C)``."""
        diff = (z[..., None, :] - self.loc) / self.scale
        # a Python constant, not a new tensor: no host-to-device copy inside a captured CUDA graph
        log_norm = self.log_scale.expand_as(self.loc).sum(-1) + 0.5 * self.loc.shape[-1] * math.log(2.0 * math.pi)
        return -0.5 * diff.pow(2).sum(-1) - log_norm

    def shrinkage_penalty(self, class_counts: torch.Tensor, strength: float) -> torch.Tensor:
        """Minus the log hierarchical prior of the class parameters (up to a constant), for ``strength`` = k.

        Mean term (k / 2) sum_c ||(mu_c - mu_0) / sigma_c||^2; with per-class variances also
        (k / 2) sum_c sum_d (log sigma_cd^2 + sigma_0d^2 / sigma_cd^2). Zero for k = 0.
        """
        if strength == 0:
            return self.loc.new_zeros(())
        weights = (class_counts / class_counts.sum()).to(self.loc.dtype)[:, None]  # (C, 1)
        var = self.scale.pow(2)
        mu0 = (weights * self.loc).sum(0).detach()
        penalty = ((self.loc - mu0).pow(2) / var).sum()
        if self.covariance == "per_class":
            var0 = (weights * var).sum(0).detach()
            penalty = penalty + (var.log() + var0 / var).sum()
        return 0.5 * strength * penalty


__all__ = ["COVARIANCES", "ClassConditionalPrior"]
