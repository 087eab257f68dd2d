"""The Gaussian over a DGC's label-head weights that SWAG fits (Maddox et al. 2019): :class:`SwagHead`.

It lives with the models, below inference and the checkpoint code, because a model carries it (``model.swag``) and
the model file stores it (:func:`dgc_pyro.checkpoint.save_model`); how it is collected during a fit
(:class:`~dgc_pyro.inference.swag.SwagCollector`) and used in prediction (``predict(..., swag=...)``) is inference's.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from dgc_pyro.models.dgc import DGC

__all__ = ["SwagHead", "check_label_head", "head_vector"]


def check_label_head(model: Any) -> None:
    """Raise TypeError unless ``model`` is a DGC, ValueError unless it has a label head p(y | z)."""
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    if not model.has_label_head:
        raise ValueError(
            "SWAG of the label head needs a model with a label head p(y | z); latent_prior="
            "'class_conditional' has none (its p(y | z) is Bayes' rule on the class Gaussians)"
        )


def head_vector(model: DGC) -> torch.Tensor:
    """The label head's parameters as one flat float64 CPU vector (``parameters_to_vector`` order)."""
    check_label_head(model)
    return parameters_to_vector(model.classifier.parameters()).detach().to("cpu", torch.float64)


class SwagHead:
    """A Gaussian over the label head's weights: ``mean``, the diagonal ``variance`` (clamped at ``var_clamp``) and
    the low-rank ``deviations`` ``(K, D)``; ``count`` is the number of snapshots behind it.

    Built by :class:`SwagCollector` (or :meth:`SwagMoments.head`); ``SwagHead(model, mean, zeros, empty)`` is the
    point mass at ``mean``, whose prediction is the plain prediction of a model with that head.
    """

    def __init__(
        self,
        model: DGC,
        mean: torch.Tensor,
        variance: torch.Tensor,
        deviations: torch.Tensor | None = None,
        *,
        count: int = 1,
        var_clamp: float = 0.0,
    ) -> None:
        check_label_head(model)
        size = sum(p.numel() for p in model.classifier.parameters())
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1).cpu()
        variance = torch.as_tensor(variance, dtype=torch.float64).reshape(-1).cpu()
        if mean.numel() != size or variance.numel() != size:
            raise ValueError(
                f"SWAG moments have {mean.numel()} / {variance.numel()} weights, the model's label head {size}"
            )
        if not (math.isfinite(var_clamp) and var_clamp >= 0):
            raise ValueError(f"var_clamp must be a finite number >= 0, got {var_clamp!r}")
        deviations = (
            mean.new_zeros(0, size) if deviations is None else torch.as_tensor(deviations, dtype=torch.float64).cpu()
        )
        if deviations.dim() != 2 or (deviations.numel() and deviations.shape[1] != size):
            raise ValueError(f"SWAG deviations must be (K, {size}), got {tuple(deviations.shape)}")
        if not all(torch.isfinite(t).all() for t in (mean, variance, deviations)):
            raise ValueError("SWAG moments must be finite")
        self.mean = mean
        # sq_mean - mean^2 can round below zero where the weights hardly moved
        self.variance = variance.clamp_min(var_clamp)
        self.deviations = deviations.reshape(-1, size)
        self.count = int(count)
        self.var_clamp = float(var_clamp)
        self.size = size

    def to_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The head as tensors (float64 ``mean``, ``variance``, ``deviations``) and a JSON record (``count``,
        ``var_clamp``): what a model file holds (:func:`dgc_pyro.checkpoint.save_model`)."""
        tensors = {"mean": self.mean, "variance": self.variance, "deviations": self.deviations}
        return tensors, {"count": self.count, "var_clamp": self.var_clamp}

    @classmethod
    def from_state(cls, model: DGC, tensors: Mapping[str, torch.Tensor], record: Mapping[str, Any]) -> SwagHead:
        """The head of :meth:`to_state`'s ``tensors`` and ``record`` for ``model``; ValueError naming what is wrong."""
        missing = sorted({"mean", "variance", "deviations"} - set(tensors))
        if missing:
            raise ValueError(f"the SWAG head lacks its {', '.join(missing)} tensor(s)")
        count, var_clamp = record.get("count"), record.get("var_clamp", 0.0)
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"the SWAG head has a bad count {count!r}")
        if isinstance(var_clamp, bool) or not isinstance(var_clamp, (int, float)):
            raise ValueError(f"the SWAG head has a bad var_clamp {var_clamp!r}")
        if any(not tensors[k].is_floating_point() for k in ("mean", "variance", "deviations")):
            raise ValueError("the SWAG head's tensors must be floating point")
        if bool((tensors["variance"] < 0).any()):
            raise ValueError("the SWAG head has negative variances")
        return cls(
            model,
            tensors["mean"],
            tensors["variance"],
            tensors["deviations"],
            count=count,
            var_clamp=float(var_clamp),
        )

    @property
    def rank(self) -> int:
        """Columns of the low-rank part in use: the deviations, when there are at least two (K - 1 > 0)."""
        k = self.deviations.shape[0]
        return k if k >= 2 else 0

    def sample(self, num_samples: int, *, seed: int = 0, scale: float | None = None) -> torch.Tensor:
        """``(num_samples, D)`` float64 weight vectors, drawn with their own generator (``seed``), so the global
        random state is untouched. ``scale`` multiplies the covariance; default 0.5 with the low-rank part (SWAG's
        (Sigma_diag + D D^T / (K - 1)) / 2) and 1 for the diagonal alone."""
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
        if scale is None:
            scale = 0.5 if self.rank else 1.0
        if not (math.isfinite(scale) and scale >= 0):
            raise ValueError(f"scale must be a finite number >= 0, got {scale!r}")
        gen = torch.Generator().manual_seed(int(seed))
        z1 = torch.randn(num_samples, self.size, generator=gen, dtype=torch.float64)
        spread = self.variance.sqrt() * z1
        if self.rank:
            z2 = torch.randn(num_samples, self.rank, generator=gen, dtype=torch.float64)
            spread = spread + z2 @ self.deviations / math.sqrt(self.rank - 1)
        return self.mean + math.sqrt(scale) * spread

    @contextlib.contextmanager
    def applied(self, model: DGC, theta: torch.Tensor) -> Iterator[None]:
        """Within the block the label head of ``model`` holds the flat weights ``theta``; restored afterwards."""
        check_label_head(model)
        params = list(model.classifier.parameters())
        if theta.numel() != self.size or sum(p.numel() for p in params) != self.size:
            raise ValueError(
                f"a head draw has {theta.numel()} weights, the model's label head {sum(p.numel() for p in params)}"
            )
        saved = parameters_to_vector(params).detach().clone()
        with torch.no_grad():
            vector_to_parameters(theta.to(saved.device, saved.dtype), params)
        try:
            yield
        finally:
            with torch.no_grad():
                vector_to_parameters(saved, params)

    def check_model(self, model: DGC) -> None:
        """Raise ValueError unless ``model`` has a label head of this posterior's size."""
        check_label_head(model)
        size = sum(p.numel() for p in model.classifier.parameters())
        if size != self.size:
            raise ValueError(f"this SWAG posterior has {self.size} head weights, the model's label head {size}")
