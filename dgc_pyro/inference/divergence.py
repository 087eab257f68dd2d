"""Divergence: the error a fit raises when its loss turns NaN/inf, and the tools that locate the culprit.

:func:`~dgc_pyro.inference.fit` checks the step losses (:func:`first_nonfinite`, one host sync), and on a
non-finite one replays the step from the last good state and evaluates every site of the model and guide
(:func:`site_terms`), so that :class:`TrainingDivergedError` can name the term that blew up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from dgc_pyro.models.dgc import DGC

__all__ = ["TrainingDivergedError", "describe_term", "first_nonfinite", "site_terms"]


class TrainingDivergedError(FloatingPointError):
    """The training loss (or the perturbation step's loss) became NaN or infinite.

    Attributes: ``epoch`` and ``step`` (1-based, within the epoch) and ``global_step`` of the first
    non-finite step; ``loss`` / ``perturbation_loss`` of that step (None when the loss could not be
    computed); ``terms`` (per-site values found by replaying the step), ``nonfinite_terms`` (their
    names), ``nonfinite_parameters`` (parameters already non-finite before the step), ``last_good_epoch``
    (the epoch whose weights the model was reset to) and ``checkpoint`` (the last good checkpoint file,
    or None without ``checkpoint_dir``).
    """

    def __init__(self, message: str, **info: Any) -> None:
        super().__init__(message)
        self.epoch: int = info.get("epoch", 0)
        self.step: int = info.get("step", 0)
        self.global_step: int = info.get("global_step", 0)
        self.loss: float | None = info.get("loss")
        self.perturbation_loss: float | None = info.get("perturbation_loss")
        self.terms: dict[str, float] = info.get("terms", {})
        self.nonfinite_terms: list[str] = info.get("nonfinite_terms", [])
        self.nonfinite_parameters: list[str] = info.get("nonfinite_parameters", [])
        self.last_good_epoch: int = info.get("last_good_epoch", 0)
        self.checkpoint: Path | None = info.get("checkpoint")


_TERM_NAMES = {
    "x": "reconstruction term -log p(x | z)",
    "y": "label term -log p(y | z)",
    "z": "KL term log q(z | x, y) - log p(z)",
    "perturbation": "perturbation step's cross-entropy",
}


def describe_term(term: str) -> str:
    """The term's site name with what it is, for error messages."""
    return f"{term!r} ({_TERM_NAMES[term]})" if term in _TERM_NAMES else repr(term)


def site_terms(model: DGC, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    """Per-site contributions to the per-example negative ELBO on one batch, with validation off.

    Observed sites give ``-log p(site | ...)``; latent sites give ``log q - log p`` at the guide's draw
    (the Monte Carlo KL term). Scaled like the training loss (``1 / len(x)``, ``label_weight`` on
    ``"y"``). Non-finite values are reported, never raised.
    """
    terms: dict[str, float] = {}
    with torch.no_grad(), pyro.validation_enabled(False), poutine.scale(scale=1.0 / x.shape[0]):
        guide_tr = poutine.trace(model.guide).get_trace(x, y)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x, y)

        def log_prob(node: dict[str, Any]) -> float:
            return float((node["fn"].log_prob(node["value"]) * node["scale"]).sum())

        for name, node in model_tr.nodes.items():
            if node["type"] != "sample" or site_is_subsample(node):
                continue
            if node["is_observed"]:
                terms[name] = -log_prob(node)
            elif name in guide_tr.nodes:
                terms[name] = log_prob(guide_tr.nodes[name]) - log_prob(node)
            else:
                terms[name] = -log_prob(node)
    return terms


def first_nonfinite(mains: list[torch.Tensor], perts: list[torch.Tensor]) -> int | None:
    """Index of the first step whose main or perturbation loss is not finite (None when all are)."""
    if not mains:
        return None
    both = torch.stack([torch.stack(mains), torch.stack(perts)])
    bad = ~torch.isfinite(both).all(0)
    idx = torch.nonzero(bad)
    return int(idx[0, 0]) if idx.numel() else None  # one host sync
