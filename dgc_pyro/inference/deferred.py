"""Deferred re-balancing: the re-balancing updates of a fit only in its last epochs.

Two schedules of :func:`~dgc_pyro.inference.fit`, after DRW (Cao et al. 2019: learn the representation on the
natural distribution first, re-balance late) and cRT (Kang et al. 2020: re-train the classifier on
class-balanced batches with the representation frozen):

* ``perturbation_start=s``: the paper's data-perturbation step runs from epoch ``ceil(s * epochs) + 1`` on
  (:func:`first_perturbation_epoch`); before it, the fit is plain SVI. 0 (the default) runs it in every epoch.
* ``retrain_head_epochs=k``: the last ``k`` epochs train the label head p(y | z) alone (:func:`make_head_step`),
  on class-balanced batches (:func:`balanced_order`) of latents drawn from q(z | x, y); the encoder and the
  decoder are frozen (no updates, evaluation mode). They replace the main and the perturbation steps there.

Both are functions of the epoch number alone, so a fit stopped before or inside a deferred stage resumes exactly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from dgc_pyro.config import check_deferred, first_perturbation_epoch  # their home: the configuration
from dgc_pyro.models.dgc import DGC

__all__ = [
    "HeadStep",
    "balanced_order",
    "balanced_weights",
    "check_deferred",
    "first_perturbation_epoch",
    "head_epochs_from",
    "make_head_step",
]


def head_epochs_from(retrain_head_epochs: int, epochs: int) -> int | None:
    """The first epoch of the head re-training stage, or None when there is none."""
    return epochs - retrain_head_epochs + 1 if retrain_head_epochs else None


def balanced_order(weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``len(weights)`` example indices drawn with replacement in proportion to ``weights`` (one epoch's order).

    With ``weights = 1 / n_{y_i}`` (:func:`balanced_weights`) every class is drawn equally often in expectation.
    """
    return torch.multinomial(weights, weights.shape[0], replacement=True, generator=generator)


def balanced_weights(y: torch.Tensor, counts: np.ndarray) -> torch.Tensor:
    """Per-example sampling weights ``1 / n_{y_i}`` (float64, on ``y``'s device) for :func:`balanced_order`."""
    inverse = 1.0 / torch.as_tensor(np.maximum(counts, 1), dtype=torch.float64, device=y.device)
    return inverse[y]


class HeadStep:
    """A step ``step(x, y) -> (loss, 0)`` that re-trains the label head on latents drawn from q(z | x, y).

    z = loc + scale * eps with loc, scale from the (frozen) encoder, one draw per example, and ``optimizer``
    (the perturbation step's, over ``model.classifier``'s parameters) takes one step on the mean cross-entropy.
    The batches are class-balanced, so the logits are those of a uniform class prior (``balanced_labels``): a
    logit-adjusted model adds tau * log pi back at prediction, as it does for the main step's head. Returns 0-d
    tensors, without host synchronisation. It follows the engines' step protocol
    (:class:`~dgc_pyro.inference.engine.Step`); its one optimiser is the perturbation step's.
    """

    engine = "head"

    def __init__(self, model: DGC, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.zero = torch.zeros((), device=model.device)

    @property
    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """``{"perturbation": ...}``: the head shares the perturbation step's optimiser."""
        return {"perturbation": self.optimizer}

    def set_perturbing(self, on: bool) -> None:
        """No perturbation update in head re-training: nothing to switch."""

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        with torch.no_grad():
            loc, scale = model.encode(x, y)
            z = loc + scale * torch.randn_like(loc)
        with model.balanced_labels():
            loss = F.cross_entropy(model.label_logits(z), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach(), self.zero


def make_head_step(model: DGC, optimizer: torch.optim.Optimizer) -> HeadStep:
    """The :class:`HeadStep` of ``model`` with ``optimizer`` (kept as the loop's factory)."""
    return HeadStep(model, optimizer)
