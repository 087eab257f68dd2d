"""SWAG of the label head p(y | z) (Maddox et al. 2019): a Gaussian over the head's weights from the training path.

The class posterior of :func:`~dgc_pyro.inference.predict.predict` averages over latent draws but takes one point
estimate of the label head. SWAG fits a Gaussian to the head's weights along the last epochs of SGD/Adam: the
running first and second moments give a diagonal covariance, and the last few deviations from the running mean a
low-rank part,

    theta ~ N(theta_SWA, scale * (Sigma_diag + D D^T / (K - 1))),

with Sigma_diag = mean(theta^2) - theta_SWA^2 and D the K most recent deviations theta_i - theta_SWA,i (the running
mean after snapshot i). ``predict(..., swag=head, head_samples=S)`` then averages the class posterior over S head
draws, and its mutual information includes the head's uncertainty.

- :class:`SwagMoments`: the running moments (float64, on the CPU), what a hand computation can check.
- :class:`SwagCollector`: a training callback (:mod:`dgc_pyro.inference.callbacks`) that updates the moments with the
  head's weights after every epoch of the last ``1 - start`` share of the fit (or every ``every_steps`` steps there);
  ``collector.head`` is the fitted :class:`SwagHead`.
- :class:`SwagHead`: the Gaussian; ``sample`` draws weight vectors, ``applied`` puts one in the head for a block;
  ``to_state`` / ``from_state`` are its tensors and record in a model file (:func:`dgc_pyro.checkpoint.save_model`).

The recipe option: ``fit(..., swag_start=0.75)`` (a :class:`~dgc_pyro.config.TrainConfig` field, ``dgc-pyro fit
--swag-start 0.75``) runs a collector with ``max_rank=swag_rank`` and ``every_steps=swag_every_steps``, and leaves
the head in ``history.model.swag``, which ``save_model`` writes beside the weights and ``load_model`` reads back.

Only the head's parameters are modelled; the encoder and decoder stay at the fit's final weights. With
``select_best=True`` the fit may hand back an encoder of an earlier epoch than those the head moments were collected
with: the collector warns when that epoch lies before its window (use ``select_best=False`` with SWAG, or a window
that contains the best epoch). The moments are part of the training state (the collector is a stateful callback:
``state_key``, ``state_dict``, ``load_state_dict``), so a fit resumed inside the window ends with the head of the
uninterrupted fit; a checkpoint without them (written by a collector of other settings) makes the collector warn
that it misses the earlier part of its window.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from dgc_pyro.caller_warning import warn_caller
from dgc_pyro.config import first_window_epoch
from dgc_pyro.inference.callbacks import Callback
from dgc_pyro.models.dgc import DGC
from dgc_pyro.models.swag_head import SwagHead, check_label_head, head_vector

if TYPE_CHECKING:
    from dgc_pyro.inference.trainer import Trainer

__all__ = ["DEFAULT_MAX_RANK", "SwagCollector", "SwagHead", "SwagMoments", "head_vector"]

#: Deviation columns of the low-rank part kept by default (the SWAG paper's K = 20).
DEFAULT_MAX_RANK = 20


class SwagMoments:
    """Running SWAG moments of flat weight vectors: ``mean``, ``sq_mean`` (both float64) and the last ``max_rank``
    deviations from the running mean, each taken after the mean was updated with its own snapshot."""

    def __init__(self, max_rank: int = DEFAULT_MAX_RANK) -> None:
        if isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 0:
            raise ValueError(f"max_rank must be an integer >= 0, got {max_rank!r}")
        self.max_rank = max_rank
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.sq_mean: torch.Tensor | None = None
        self._deviations: deque[torch.Tensor] = deque(maxlen=max_rank or None)

    def update(self, theta: torch.Tensor) -> None:
        """Add one snapshot ``theta`` (a flat vector)."""
        theta = theta.detach().reshape(-1).to("cpu", torch.float64)
        if not torch.isfinite(theta).all():
            raise ValueError("SWAG snapshot has non-finite weights")
        if self.mean is None:
            self.mean, self.sq_mean = torch.zeros_like(theta), torch.zeros_like(theta)
        elif theta.shape != self.mean.shape:
            raise ValueError(f"SWAG snapshot has {theta.numel()} weights, the earlier ones {self.mean.numel()}")
        self.count += 1
        self.mean += (theta - self.mean) / self.count
        self.sq_mean += (theta.square() - self.sq_mean) / self.count
        if self.max_rank:
            self._deviations.append(theta - self.mean)

    @property
    def deviations(self) -> torch.Tensor:
        """``(K, D)``: the last K <= ``max_rank`` deviations, oldest first (``(0, D)`` without any)."""
        if self.mean is None:
            return torch.zeros(0, 0, dtype=torch.float64)
        if not self._deviations:
            return self.mean.new_zeros(0, self.mean.numel())
        return torch.stack(list(self._deviations))

    def state_dict(self) -> dict[str, Any]:
        """A copy of the moments (``max_rank``, ``count`` and, after a snapshot, ``mean``, ``sq_mean`` and
        ``deviations``): what a training state stores."""
        state: dict[str, Any] = {"max_rank": self.max_rank, "count": self.count}
        if self.mean is not None and self.sq_mean is not None:
            state.update(mean=self.mean.clone(), sq_mean=self.sq_mean.clone(), deviations=self.deviations.clone())
        return state

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> SwagMoments:
        """The moments of a :meth:`state_dict` (copied); ValueError naming what does not fit."""
        moments = cls(state.get("max_rank", -1))
        count = state.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"SWAG moments have a bad count {count!r}")
        if count == 0:
            return moments
        tensors = [state.get(k) for k in ("mean", "sq_mean", "deviations")]
        if not all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors):
            raise ValueError("SWAG moments lack their mean, sq_mean or deviations tensors")
        mean, sq_mean, deviations = (t.detach().to("cpu", torch.float64).clone() for t in tensors)
        size = mean.numel()
        if mean.dim() != 1 or sq_mean.shape != mean.shape:
            raise ValueError(f"SWAG moments have mean {tuple(mean.shape)} and sq_mean {tuple(sq_mean.shape)}")
        if (
            deviations.dim() != 2
            or deviations.shape[1] not in (0, size)
            or len(deviations) > min(count, moments.max_rank)
        ):
            raise ValueError(f"SWAG moments have deviations {tuple(deviations.shape)} for {size} weights")
        if not all(torch.isfinite(t).all() for t in (mean, sq_mean, deviations)):
            raise ValueError("SWAG moments hold non-finite values")
        moments.count, moments.mean, moments.sq_mean = count, mean, sq_mean
        moments._deviations.extend(deviations.reshape(-1, size).unbind(0))
        return moments

    def head(self, model: DGC, *, var_clamp: float = 0.0) -> SwagHead:
        """The :class:`SwagHead` of these moments for ``model``'s label head."""
        if self.count == 0 or self.mean is None or self.sq_mean is None:
            raise ValueError("no SWAG snapshot was collected (is the collection window inside the fit's epochs?)")
        return SwagHead(
            model, self.mean, self.sq_mean - self.mean.square(), self.deviations, count=self.count, var_clamp=var_clamp
        )


class SwagCollector(Callback):
    """Training callback: SWAG moments of the label head over the last ``1 - start`` share of the epochs.

    The window starts at epoch ``ceil(start * epochs) + 1`` (as ``perturbation_start`` counts), so the default
    ``start=0.75`` collects the last quarter. One snapshot after every epoch there (its last step, the perturbation
    update included), or with ``every_steps=k`` one after every k-th step of those epochs. ``max_rank`` deviation
    columns are kept for the low-rank part (0: diagonal only). After the fit, :attr:`head` is the
    :class:`SwagHead` for ``predict(..., swag=collector.head)``.

    SWAG assumes the weights wander around a mode at a roughly constant learning rate; under ``lr_schedule="cosine"``
    the rate is near zero at the end and the window's spread shrinks with it.

    A stateful callback: the moments are part of the fit's training state under :attr:`state_key` (which names the
    settings, so a checkpoint's moments are only restored into a collector that gathers the same window).
    """

    def __init__(
        self,
        start: float = 0.75,
        *,
        max_rank: int = DEFAULT_MAX_RANK,
        every_steps: int | None = None,
        var_clamp: float = 1e-30,
    ) -> None:
        if isinstance(start, bool) or not isinstance(start, (int, float)) or not 0 <= start < 1:
            raise ValueError(f"start must be a number in [0, 1), got {start!r}")
        if every_steps is not None and (
            isinstance(every_steps, bool) or not isinstance(every_steps, int) or every_steps < 1
        ):
            raise ValueError(f"every_steps must be a positive integer or None, got {every_steps!r}")
        if not (isinstance(var_clamp, (int, float)) and math.isfinite(var_clamp) and var_clamp >= 0):
            raise ValueError(f"var_clamp must be a finite number >= 0, got {var_clamp!r}")
        self.start, self.every_steps, self.var_clamp = float(start), every_steps, float(var_clamp)
        self.moments = SwagMoments(max_rank)
        self.first_epoch: int | None = None
        self.model: DGC | None = None
        self._head: SwagHead | None = None
        self._restored = False  # whether the moments came from a checkpoint (load_state_dict)

    @property
    def state_key(self) -> str:
        """The key of this collector's state in a training state: its settings."""
        return f"SwagCollector(start={self.start}, max_rank={self.moments.max_rank}, every_steps={self.every_steps})"

    def state_dict(self) -> dict[str, Any]:
        """A copy of the moments collected so far (:meth:`SwagMoments.state_dict`)."""
        return self.moments.state_dict()

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Continue from the moments of :meth:`state_dict` (copied); None: start empty (a fresh fit, or a checkpoint
        without them). ValueError when they do not fit this collector."""
        moments = SwagMoments(self.moments.max_rank) if state is None else SwagMoments.from_state_dict(state)
        if moments.max_rank != self.moments.max_rank:
            raise ValueError(
                f"SWAG moments of max_rank={moments.max_rank}, this collector keeps {self.moments.max_rank}"
            )
        self.moments, self._head, self._restored = moments, None, state is not None

    def first_epoch_of(self, epochs: int) -> int:
        """The first epoch of the window in a fit of ``epochs`` epochs."""
        return first_window_epoch(self.start, epochs)

    def on_fit_start(self, trainer: Trainer, start_epoch: int) -> None:
        model = trainer.state.model
        check_label_head(model)
        self.model, self._head = model, None
        self.first_epoch = self.first_epoch_of(trainer.plan.epochs)
        if self.every_steps is not None and self.every_steps > trainer.plan.num_batches:
            raise ValueError(
                f"SwagCollector: every_steps={self.every_steps} (a recipe's swag_every_steps) is more than the "
                f"{trainer.plan.num_batches} steps of an epoch, so the SWAG window would collect nothing"
            )
        if start_epoch == 0:  # a fresh fit collects from nothing, whatever this object held before
            self.moments = SwagMoments(self.moments.max_rank)
        elif start_epoch >= self.first_epoch and not self._restored:
            warn_caller(
                f"SwagCollector: the fit resumes after epoch {start_epoch}, inside the window that starts at "
                f"epoch {self.first_epoch}; the checkpoint holds no moments of this collector's settings, so the "
                "epochs before are missing"
            )
        self._restored = False

    def on_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        if self.every_steps and epoch >= self.first_epoch and (batch + 1) % self.every_steps == 0:
            self.moments.update(head_vector(trainer.state.model))

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, float]) -> None:
        if not self.every_steps and epoch >= self.first_epoch:
            self.moments.update(head_vector(trainer.state.model))

    def on_fit_end(self, trainer: Trainer) -> None:
        best = trainer.state.best_epoch if trainer.state.best_model is not None else None
        if self.moments.count and best is not None and best < self.first_epoch:
            warn_caller(
                f"SwagCollector: select_best hands back the weights of epoch {best}, before the SWAG window "
                f"(epochs {self.first_epoch}-{trainer.last_epoch}); the head moments belong to a later "
                "encoder (fit with select_best=False)"
            )

    @property
    def head(self) -> SwagHead:
        """The fitted :class:`SwagHead` (ValueError before any snapshot)."""
        if self._head is None or self._head.count != self.moments.count:
            if self.model is None:
                raise ValueError("SwagCollector has not run: pass it to fit(..., callbacks=(collector,))")
            self._head = self.moments.head(self.model, var_clamp=self.var_clamp)
        return self._head
