"""Training steps: one SVI update of DGC plus the paper's data-perturbation update.

Two engines run the same loss over the same Pyro model/guide pair:

- ``engine="torch"``: the objective's differentiable loss, one fused (CUDA) / foreach (CPU)
  ``torch.optim.Adam`` over all parameters, gradients set to None after each step, Pyro/torch argument
  validation off inside the step, and no host synchronisation: a step returns 0-d device tensors and
  the epoch loop reads them once per epoch. For the built-in ``"elbo"`` (``Trace_ELBO``) and
  ``"elbo-analytic"`` (``TraceMeanField_ELBO``) objectives with one particle the loss is computed by
  :class:`TracedELBO`, the same estimator read off the same model and guide traces without the
  ``.item()`` calls and NaN hooks that Pyro's implementation makes on every call (each one a device
  synchronisation on CUDA); other objectives are called as they are;
- ``engine="graph"``: the ``"torch"`` engine's loss, with its gradients, captured once per batch shape as
  a graph of aten operations (:class:`~dgc_pyro.inference.capture.CapturedGradients`) and replayed, so
  the Pyro model and guide are traced once instead of every step; with ``compile`` the graph (not the
  networks) goes to ``torch.compile``. Single process only; the default of
  :func:`~dgc_pyro.inference.fit`, which falls back to ``"torch"`` (``make_step(..., fallback=True)``) when a
  model cannot be captured;
- ``engine="svi"``: textbook ``pyro.infer.SVI`` with ``pyro.optim.Adam``, for reference and for users
  who compose further Pyro machinery around it.

Each engine is a step object (:class:`TorchStep`, :class:`GraphStep`, :class:`SviStep`) with one protocol,
:class:`Step`: ``step(x, y) -> (loss, perturbation_loss)`` as 0-d tensors, ``step.optimizers`` (``{"main": ...,
"perturbation": ...}``, what checkpoints save and schedules set), ``step.engine`` and ``step.set_perturbing(on)``.
The paper's perturbation update is its own auxiliary objective,
:class:`~dgc_pyro.inference.perturbation.PerturbationStep`, which every step runs after its main update.
:func:`make_step` builds a step from the fit's settings.

Inside a data-parallel worker (:mod:`dgc_pyro.inference.distributed`) a step receives the global batch,
computes the loss on its shard (with the noise the single-process step would have drawn for those
rows), all-reduces the gradients in one flat buffer and applies the identical Adam update on every rank.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import pyro
import pyro.infer
import pyro.optim
import torch
from pyro import poutine
from pyro.poutine.scale_messenger import ScaleMessenger

from dgc_pyro.caller_warning import warn_caller
from dgc_pyro.config import ENGINES, check_choice  # the names live with the option
from dgc_pyro.inference.capture import CapturedGradients, GraphCaptureError
from dgc_pyro.inference.dist_context import DistContext, GlobalNoise, check_engine
from dgc_pyro.inference.objectives import Objective
from dgc_pyro.inference.perturbation import PerturbationStep, guide_normal_params
from dgc_pyro.inference.traced_elbo import TracedELBO, traced_elbo_kind
from dgc_pyro.models.bare import bare_method
from dgc_pyro.models.dgc import DGC

__all__ = [
    "ENGINES",
    "GraphStep",
    "Step",
    "SviStep",
    "TorchStep",
    "TracedELBO",
    "adam_kernel",
    "compile_networks",
    "make_step",
    "traced_elbo_kind",
]


class Step(Protocol):
    """What the training loop needs of a step: a call on a batch, and its optimisers by name."""

    engine: str
    optimizers: dict[str, Any]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on the batch; ``(loss, perturbation_loss)`` as 0-d tensors, without host synchronisation."""
        ...

    def set_perturbing(self, on: bool) -> None:
        """Turn the perturbation update on or off from the next call."""
        ...


# ----------------------------------------------------------------------------- helpers of the step
class _PerExample:
    """``fn(x, y)`` under ``poutine.scale(1 / denominator)``: a per-example loss, so the learning rate
    does not depend on the batch size. ``denominator`` defaults to ``len(x)``; the distributed step sets
    it to the global batch size so that the shards' losses and gradients add up to the global ones."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.denominator: int | None = None
        self._scales: dict[int, ScaleMessenger] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        n = self.denominator or x.shape[0]
        scale = self._scales.get(n)
        if scale is None:
            scale = self._scales[n] = ScaleMessenger(scale=1.0 / n)
        with scale:
            return self.fn(x, y, *args, **kwargs)


def adam_kernel(device: torch.device) -> dict[str, Any]:
    """The ``torch.optim.Adam`` implementation options every engine uses on ``device``: fused on CUDA, foreach
    elsewhere. One choice for all engines: fused and foreach Adam round differently, enough to move a short fit's
    weights by ~1e-6 (``benchmarks/adam_kernels.py``), which put ``engine="svi"`` (then on Pyro's foreach Adam)
    outside the engines' equality tolerance on CUDA, where the other engines ran fused Adam."""
    fused = device.type == "cuda"
    return {"foreach": not fused, "fused": fused or None}


def compile_networks(model: DGC, options: dict[str, Any] | None = None) -> DGC:
    """``torch.compile`` the encoder, decoder and classifier of ``model`` in place (``nn.Module.compile``).

    The state-dict keys do not change, so checkpoints stay compatible. Pyro's tracing, the
    distributions and the optimiser stay eager. Returns ``model``.
    """
    opts = dict(options or {})
    for net in (model.encoder, model.decoder, model.classifier):
        net.compile(**opts)
    return model


# ----------------------------------------------------------------------------- the steps
class _StepBase:
    """The parts every engine shares: the main optimiser, the perturbation update and the switch."""

    engine = ""

    def __init__(self, optimizer: Any, perturbation: PerturbationStep) -> None:
        self.optimizer, self.perturbation = optimizer, perturbation

    @property
    def optimizers(self) -> dict[str, Any]:
        """``{"main": ..., "perturbation": ...}``: what checkpoints save (resume.py) and schedules set."""
        return {"main": self.optimizer, "perturbation": self.perturbation.optimizer}

    def set_perturbing(self, on: bool) -> None:
        """Deferred re-balancing: the perturbation update runs from the next call only while ``on``."""
        self.perturbation.on = bool(on)


class TorchStep(_StepBase):
    """``engine="torch"``: the objective's differentiable loss and one ``torch.optim`` optimiser over all parameters.

    The model and guide are called without PyroModule's bookkeeping (:func:`~dgc_pyro.models.bare.bare_method`)
    and traced every step; with ``dist`` the step computes its rank's shard of the global batch and all-reduces
    the gradients before the identical update on every rank.
    """

    engine = "torch"

    def __init__(
        self,
        model: DGC,
        loss_fn: Objective,
        optimizer: torch.optim.Optimizer,
        perturbation: PerturbationStep,
        *,
        dist: DistContext | None = None,
    ) -> None:
        super().__init__(optimizer, perturbation)
        self.model, self.dist = model, dist
        self.params = [p for group in optimizer.param_groups for p in group["params"]]
        self.zero = perturbation.zero
        model_call, guide_call = bare_method(model, "model"), bare_method(model, "guide")
        self.model_fn, self.guide_fn = _PerExample(model_call), _PerExample(guide_call)
        self.noise: GlobalNoise | None = None
        if dist is not None:
            self.noise = GlobalNoise()
            self.guide_fn = _PerExample(self.noise(guide_call))
        self.loss_fn = loss_fn
        kind = traced_elbo_kind(loss_fn)
        self.traced = TracedELBO(self.model_fn, self.guide_fn, kind, fallback=loss_fn.__self__) if kind else None
        # records q(z | x, y) for the perturbation step when the loss is a callable of its own
        self.recorder = poutine.trace(self.guide_fn) if self.traced is None else None

    def loss_and_guide_trace(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """The main loss of a batch and the guide trace it was computed from."""
        if self.traced is not None:
            return self.traced(x, y)
        return self.loss_fn(self.model_fn, self.recorder, x, y), self.recorder.trace

    def _update(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with pyro.validation_enabled(False):
            if self.dist is None:
                loss, guide_tr = self.loss_and_guide_trace(x, y)
                loss.backward()
                self._update()
                return loss.detach(), self.perturbation(x, y, guide_trace=guide_tr)
            lo, hi = self._shard_of(x)
            if hi > lo:
                loss, guide_tr = self.loss_and_guide_trace(x[lo:hi], y[lo:hi])
                loss.backward()
            else:  # fewer examples than ranks in this (last) batch
                loss, guide_tr = self.zero, None
            (loss,) = self.dist.all_reduce_gradients(self.model, self.params, [loss], with_buffers=True)
            self._update()
            return loss, self.perturbation(x, y, guide_trace=guide_tr, shard=(lo, hi))

    def _shard_of(self, x: torch.Tensor) -> tuple[int, int]:
        n = x.shape[0]
        lo, hi = self.dist.shard(n)
        self.model_fn.denominator = self.guide_fn.denominator = n  # the global batch's per-example scale
        self.noise.lo, self.noise.hi, self.noise.total = lo, hi, n
        return lo, hi


class GraphStep(TorchStep):
    """``engine="graph"``: :class:`TorchStep`'s loss and gradients captured once per batch shape and replayed.

    The perturbation switch is read in Python at every call, outside the captured graph, which returns the
    guide's parameters whenever the perturbation update is active, so the switch is never baked in. When a model
    cannot be captured the call raises :class:`~dgc_pyro.inference.capture.GraphCaptureError`, or with
    ``fallback`` warns once and runs :class:`TorchStep`'s update from then on (the same numbers, on the same
    optimisers), and ``engine`` becomes ``"torch"``.
    """

    def __init__(
        self,
        model: DGC,
        loss_fn: Objective,
        optimizer: torch.optim.Optimizer,
        perturbation: PerturbationStep,
        *,
        compile: bool | dict[str, Any] = False,
        fallback: bool = False,
    ) -> None:
        super().__init__(model, loss_fn, optimizer, perturbation)
        self.engine = "graph"  # "torch" once a capture failed
        self.fallback = fallback
        self.captured = CapturedGradients(model, self._captured_loss, compile=compile)

    def _captured_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss, guide_tr = self.loss_and_guide_trace(x, y)
        if self.perturbation.active:
            return (loss, *guide_normal_params(guide_tr, self.model, x, y))
        return (loss,)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.engine == "torch":
            return super().__call__(x, y)
        try:
            with pyro.validation_enabled(False):
                loss, *guide_params = self.captured(x, y)
        except GraphCaptureError as e:
            if not self.fallback:
                raise
            # A failed capture changed nothing (no gradients, buffers and random state restored), and the torch
            # step computes what the graph would have, so the fit continues from this very step unchanged.
            reason = str(e).removesuffix("; use engine='torch'")
            warn_caller(f"engine='graph': {reason}; falling back to engine='torch' for this fit")
            self.engine = "torch"
            return super().__call__(x, y)
        self._update()
        return loss, self.perturbation(x, y, guide_params=tuple(guide_params))


class SviStep(_StepBase):
    """``engine="svi"``: textbook ``pyro.infer.SVI`` with a ``pyro.optim`` optimiser; single process."""

    engine = "svi"

    def __init__(
        self,
        model: DGC,
        loss_fn: Objective,
        optimizer: pyro.optim.PyroOptim,
        perturbation: PerturbationStep,
        device: torch.device,
    ) -> None:
        super().__init__(optimizer, perturbation)
        self.device = device
        self.traced_guide = poutine.trace(_PerExample(model.guide))  # records q(z | x, y) for the perturbation step
        self.svi = pyro.infer.SVI(_PerExample(model.model), self.traced_guide, optimizer, loss=loss_fn)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # pyro.infer.SVI collects parameters through Pyro's global param store; a fresh store scope
        # per step registers exactly this model's parameters, so other models cannot leak in.
        with pyro.settings.context(module_local_params=False), pyro.get_param_store().scope():
            loss = self.svi.step(x, y)
        return torch.tensor(loss, device=self.device), self.perturbation(x, y, guide_trace=self.traced_guide.trace)


# ----------------------------------------------------------------------------- the factory
def make_step(
    model: DGC,
    loss_fn: Objective,
    engine: str,
    lr: float,
    betas: tuple[float, float],
    classifier_lr: float,
    perturb: bool,
    reps: torch.Tensor,
    device: torch.device,
    *,
    compile: bool | dict[str, Any] = False,
    perturbation_offset: torch.Tensor | None = None,
    fallback: bool = False,
    borrow_from: torch.Tensor | None = None,
    dist: DistContext | None = None,
) -> TorchStep | GraphStep | SviStep:
    """The training step of ``engine`` with Adam optimisers (``lr``, ``betas``; ``classifier_lr`` for the
    perturbation update): a :class:`Step`, ``step(x, y) -> (loss, perturbation_loss)`` as 0-d tensors.

    ``perturb``: run the perturbation update, ``reps`` its per-class repetition counts (on ``device``).
    ``compile``: True (or a dict of ``torch.compile`` options) compiles the networks first
    (:func:`compile_networks`), or, with ``engine="graph"``, the captured graph of the loss and its gradients.
    ``perturbation_offset``: the perturbation step's logit offset
    (:func:`~dgc_pyro.inference.perturbation.perturbation_offset`). ``borrow_from``: boolean mask of the head
    classes whose pooled within-class spread the tail classes' re-drawn latents get
    (:func:`~dgc_pyro.inference.perturbation.borrowed_scale`); None keeps q's own sigma. ``fallback``: a
    ``"graph"`` step that cannot capture the model warns and continues as ``"torch"`` (:class:`GraphStep`).
    ``dist``: this rank's data-parallel context (:mod:`dgc_pyro.inference.distributed` passes it); None in a
    single-process fit.
    """
    check_choice("engine", engine, ENGINES)
    if dist is not None:
        check_engine(engine)
        if borrow_from is not None:  # the head classes' spread would be one shard's, not the global batch's
            raise ValueError("perturbation_noise='head' is not supported in data-parallel fits")
    if compile and engine != "graph":
        compile_networks(model, compile if isinstance(compile, dict) else None)
    if dist is not None:
        dist.broadcast_model(model)  # identical starting point on every rank
    kernel = adam_kernel(device)
    cls_opt = torch.optim.Adam(list(model.classifier.parameters()), lr=classifier_lr, betas=betas, **kernel)
    perturbation = PerturbationStep(
        model, reps, cls_opt, device, active=perturb, offset=perturbation_offset, borrow_from=borrow_from, dist=dist
    )
    if engine == "svi":
        optim = pyro.optim.Adam({"lr": lr, "betas": betas, **kernel})  # one torch Adam per parameter, same kernel
        return SviStep(model, loss_fn, optim, perturbation, device)
    opt = torch.optim.Adam(list(model.parameters()), lr=lr, betas=betas, **kernel)
    if engine == "graph":
        return GraphStep(model, loss_fn, opt, perturbation, compile=compile, fallback=fallback)
    return TorchStep(model, loss_fn, opt, perturbation, dist=dist)
