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
- :class:`SwagHead`: the Gaussian; ``sample`` draws weight vectors, ``applied`` puts one in the head for a block.

Only the head's parameters are modelled; the encoder and decoder stay at the fit's final weights. With
``select_best=True`` the fit may hand back an encoder of an earlier epoch than those the head moments were collected
with: the collector warns when that epoch lies before its window (use ``select_best=False`` with SWAG, or a window
that contains the best epoch). The moments are not part of the checkpoint: a resumed fit collects from the
resumed epoch on, and the collector warns when that misses part of its window.
"""

from __future__ import annotations

import contextlib
import math
from collections import deque
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from dgc_pyro.caller_warning import warn_caller
from dgc_pyro.inference.callbacks import Callback
from dgc_pyro.inference.predict import Prediction, predict
from dgc_pyro.models.dgc import DGC

if TYPE_CHECKING:
    from dgc_pyro.inference.trainer import Trainer

__all__ = ["DEFAULT_MAX_RANK", "SwagCollector", "SwagHead", "SwagMoments", "head_vector"]

#: Deviation columns of the low-rank part kept by default (the SWAG paper's K = 20).
DEFAULT_MAX_RANK = 20


def _check_model(model: Any) -> None:
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    if not model.has_label_head:
        raise ValueError(
            "SWAG of the label head needs a model with a label head p(y | z); latent_prior="
            "'class_conditional' has none (its p(y | z) is Bayes' rule on the class Gaussians)"
        )


def head_vector(model: DGC) -> torch.Tensor:
    """The label head's parameters as one flat float64 CPU vector (``parameters_to_vector`` order)."""
    _check_model(model)
    return parameters_to_vector(model.classifier.parameters()).detach().to("cpu", torch.float64)


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

    def head(self, model: DGC, *, var_clamp: float = 0.0) -> SwagHead:
        """The :class:`SwagHead` of these moments for ``model``'s label head."""
        if self.count == 0 or self.mean is None or self.sq_mean is None:
            raise ValueError("no SWAG snapshot was collected (is the collection window inside the fit's epochs?)")
        return SwagHead(
            model, self.mean, self.sq_mean - self.mean.square(), self.deviations, count=self.count, var_clamp=var_clamp
        )


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
        _check_model(model)
        size = sum(p.numel() for p in model.classifier.parameters())
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(-1).cpu()
        variance = torch.as_tensor(variance, dtype=torch.float64).reshape(-1).cpu()
        if mean.numel() != size or variance.numel() != size:
            raise ValueError(
                f"SWAG moments have {mean.numel()} / {variance.numel()} weights, the model's label head {size}"
            )
        if not (math.isfinite(var_clamp) and var_clamp >= 0):
            raise ValueError(f"var_clamp must be a finite number >= 0, got {var_clamp!r}")
        if not (torch.isfinite(mean).all() and torch.isfinite(variance).all()):
            raise ValueError("SWAG moments must be finite")
        deviations = (
            mean.new_zeros(0, size) if deviations is None else torch.as_tensor(deviations, dtype=torch.float64).cpu()
        )
        if deviations.dim() != 2 or (deviations.numel() and deviations.shape[1] != size):
            raise ValueError(f"SWAG deviations must be (K, {size}), got {tuple(deviations.shape)}")
        self.mean = mean
        # sq_mean - mean^2 can round below zero where the weights hardly moved
        self.variance = variance.clamp_min(var_clamp)
        self.deviations = deviations.reshape(-1, size)
        self.count = int(count)
        self.size = size

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
        _check_model(model)
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
        _check_model(model)
        size = sum(p.numel() for p in model.classifier.parameters())
        if size != self.size:
            raise ValueError(f"this SWAG posterior has {self.size} head weights, the model's label head {size}")

    def predict(
        self, model: DGC, x: torch.Tensor, num_samples: int = 10, *, head_samples: int = 10, **kwargs: Any
    ) -> Prediction:
        """``predict(model, x, num_samples, swag=self, head_samples=head_samples, **kwargs)``."""
        return predict(model, x, num_samples, swag=self, head_samples=head_samples, **kwargs)


class SwagCollector(Callback):
    """Training callback: SWAG moments of the label head over the last ``1 - start`` share of the epochs.

    The window starts at epoch ``ceil(start * epochs) + 1`` (as ``perturbation_start`` counts), so the default
    ``start=0.75`` collects the last quarter. One snapshot after every epoch there (its last step, the perturbation
    update included), or with ``every_steps=k`` one after every k-th step of those epochs. ``max_rank`` deviation
    columns are kept for the low-rank part (0: diagonal only). After the fit, :attr:`head` is the
    :class:`SwagHead` for ``predict(..., swag=collector.head)``.

    SWAG assumes the weights wander around a mode at a roughly constant learning rate; under ``lr_schedule="cosine"``
    the rate is near zero at the end and the window's spread shrinks with it.
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

    def first_epoch_of(self, epochs: int) -> int:
        """The first epoch of the window in a fit of ``epochs`` epochs."""
        return math.ceil(self.start * epochs) + 1

    def on_fit_start(self, trainer: Trainer, start_epoch: int) -> None:
        model = trainer.state.model
        _check_model(model)
        self.model, self._head = model, None
        self.moments = SwagMoments(self.moments.max_rank)
        self.first_epoch = self.first_epoch_of(trainer.plan.epochs)
        if start_epoch >= self.first_epoch:
            warn_caller(
                f"SwagCollector: the fit resumes after epoch {start_epoch}, inside the window that starts at "
                f"epoch {self.first_epoch}; the moments of the epochs before are not in the checkpoint"
            )

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
