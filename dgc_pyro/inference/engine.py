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

Inside a data-parallel worker (:mod:`dgc_pyro.inference.distributed`) a step receives the global batch,
computes the loss on its shard (with the noise the single-process step would have drawn for those
rows), all-reduces the gradients in one flat buffer and applies the identical Adam update on every rank.
"""

from __future__ import annotations

import types
import warnings
from typing import Any, Callable

import pyro
import pyro.infer
import pyro.optim
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.scale_messenger import ScaleMessenger
from pyro.poutine.util import site_is_subsample

from dgc_pyro.inference.capture import CapturedGradients, GraphCaptureError
from dgc_pyro.inference.dist_context import DistContext, GlobalNoise, check_engine
from dgc_pyro.inference.objectives import Objective
from dgc_pyro.inference.perturbation import borrowed_scale, guide_normal_params, perturbation_loss
from dgc_pyro.models.bare import bare_method
from dgc_pyro.models.dgc import DGC

ENGINES = ("torch", "graph", "svi")
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

__all__ = ["ENGINES", "Step", "TracedELBO", "adam_kernel", "compile_networks", "make_step", "traced_elbo_kind"]


# ----------------------------------------------------------------------------- the sync-free ELBO
def traced_elbo_kind(loss_fn: Objective) -> str | None:
    """``"mc"`` / ``"analytic"`` when ``loss_fn`` is the ``differentiable_loss`` of a one-particle
    ``Trace_ELBO`` / ``TraceMeanField_ELBO`` (what :class:`TracedELBO` computes exactly), else None."""
    owner = getattr(loss_fn, "__self__", None)
    if getattr(loss_fn, "__func__", None) is not pyro.infer.Trace_ELBO.differentiable_loss:
        return None
    if getattr(owner, "num_particles", None) != 1:
        return None
    if type(owner) is pyro.infer.Trace_ELBO:
        return "mc"
    if type(owner) is pyro.infer.TraceMeanField_ELBO:
        return "analytic"
    return None


def _log_prob_sum(site: dict[str, Any]) -> torch.Tensor:
    log_p = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    return scale_and_mask(log_p, site["scale"], site["mask"]).sum()


def _sample_sites(trace: poutine.Trace):
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and not site_is_subsample(site):
            yield name, site


class TracedELBO:
    """Negative ELBO of a Pyro model/guide pair from one guide trace and the model replayed against it.

    Computes what ``Trace_ELBO(num_particles=1).differentiable_loss`` (``kind="mc"``) or
    ``TraceMeanField_ELBO(num_particles=1).differentiable_loss`` (``kind="analytic"``: closed-form
    KL(q || p) of latent sites where ``kl_divergence`` is registered) computes for fully reparameterised
    guides, but without host synchronisation: no ``.item()``, no NaN hooks, no validation. Guides with
    non-reparameterised or enumerated sites are handed to Pyro's own estimator (``fallback``) on the
    same traces. The trace handlers are built once and reused every step.

    ``elbo(*args, **kwargs)`` returns ``(loss, guide_trace)``.
    """

    def __init__(self, model_fn: Callable, guide_fn: Callable, kind: str = "mc",
                 fallback: pyro.infer.ELBO | None = None) -> None:
        if kind not in ("mc", "analytic"):
            raise ValueError(f"kind must be 'mc' or 'analytic', got {kind!r}")
        self.kind = kind
        self.fallback = fallback
        self._guide = poutine.trace(guide_fn)
        self._empty = poutine.Trace()
        self._replay = ReplayMessenger(trace=self._empty)
        self._model = poutine.trace(self._replay(model_fn))

    def traces(self, *args: Any, **kwargs: Any) -> tuple[poutine.Trace, poutine.Trace]:
        """``(model_trace, guide_trace)`` of one draw."""
        self._guide(*args, **kwargs)
        guide_tr = self._guide.msngr.trace
        self._replay.trace = guide_tr
        try:
            self._model(*args, **kwargs)
        finally:
            self._replay.trace = self._empty
        return self._model.msngr.trace, guide_tr

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, poutine.Trace]:
        model_tr, guide_tr = self.traces(*args, **kwargs)
        return self.loss(model_tr, guide_tr), guide_tr

    def loss(self, model_tr: poutine.Trace, guide_tr: poutine.Trace) -> torch.Tensor:
        """The negative ELBO from a model trace and the guide trace it was replayed against."""
        for _, site in _sample_sites(guide_tr):
            if not site["is_observed"] and (
                not getattr(site["fn"], "has_rsample", False) or site["infer"].get("enumerate")
            ):
                return self._pyro_loss(model_tr, guide_tr)
        elbo: torch.Tensor | float = 0.0
        done: set[str] = set()
        for name, site in _sample_sites(model_tr):
            guide_site = guide_tr.nodes.get(name)
            if self.kind == "analytic" and not site["is_observed"] and guide_site is not None:
                try:
                    kl = torch.distributions.kl_divergence(guide_site["fn"], site["fn"])
                except NotImplementedError:
                    pass
                else:
                    kl = scale_and_mask(kl, guide_site["scale"], guide_site["mask"])
                    elbo = elbo - (kl.sum() if torch.is_tensor(kl) else kl * guide_site["fn"].batch_shape.numel())
                    done.add(name)
                    continue
            elbo = elbo + _log_prob_sum(site)
        for name, site in _sample_sites(guide_tr):
            if name not in done:
                elbo = elbo - _log_prob_sum(site)
        if not torch.is_tensor(elbo):
            raise ValueError("the model and guide have no sample sites: nothing to fit")
        return -elbo

    def _pyro_loss(self, model_tr: poutine.Trace, guide_tr: poutine.Trace) -> torch.Tensor:
        elbo = self.fallback or (pyro.infer.Trace_ELBO() if self.kind == "mc" else pyro.infer.TraceMeanField_ELBO())
        model_tr.compute_log_prob()
        guide_tr.compute_score_parts()
        loss, surrogate = elbo._differentiable_loss_particle(model_tr, guide_tr)
        return surrogate + (loss - surrogate.detach())


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


# ----------------------------------------------------------------------------- the step
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
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One training step ``step(x, y) -> (loss, perturbation_loss)`` as 0-d tensors (no host sync).

    ``reps``: per-class repetition counts of the perturbation step (on ``device``). ``compile``: True (or
    a dict of ``torch.compile`` options) compiles the networks first (:func:`compile_networks`), or, with
    ``engine="graph"``, the captured graph of the loss and its gradients. ``perturbation_offset``: the
    perturbation step's logit offset (:func:`~dgc_pyro.inference.perturbation.perturbation_offset`).
    ``dist``: this rank's data-parallel context (:mod:`dgc_pyro.inference.distributed` passes it); None in a
    single-process fit. ``borrow_from``: boolean mask of the head classes whose pooled within-class spread the tail classes'
    re-drawn latents get (:func:`~dgc_pyro.inference.perturbation.borrowed_scale`); None keeps q's own sigma.
    The step exposes its optimisers as ``step.optimizers`` (``{"main": ..., "perturbation": ...}``) and
    ``step.set_perturbing(on)``, which turns the perturbation update on or off from the next call (deferred
    re-balancing). The switch is read in Python at every call, outside any captured graph, which returns the
    guide's parameters whenever ``perturb`` is set, so a ``"graph"`` step never bakes the switch in.
    A ``"graph"`` step raises :class:`~dgc_pyro.inference.capture.GraphCaptureError` when a model cannot be
    captured; with ``fallback`` it warns once instead and runs the torch engine's step from then on (the same
    numbers, on the same optimisers), and ``step.engine`` becomes ``"torch"``.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    ctx = dist
    if ctx is not None:
        check_engine(engine)
        if borrow_from is not None:  # the head classes' spread would be one shard's, not the global batch's
            raise ValueError("perturbation_noise='head' is not supported in data-parallel fits")
    if compile and engine != "graph":
        compile_networks(model, compile if isinstance(compile, dict) else None)
    if ctx is not None:
        ctx.broadcast_model(model)  # identical starting point on every rank
    kernel = adam_kernel(device)
    cls_params = list(model.classifier.parameters())
    cls_opt = torch.optim.Adam(cls_params, lr=classifier_lr, betas=betas, **kernel)
    zero = torch.zeros((), device=device)
    max_reps = int(reps.max()) if perturb else 0  # one host sync, at set-up
    latent_dim = model.latent_dim
    switch = types.SimpleNamespace(on=True)  # step.set_perturbing: deferred re-balancing turns it on late

    def set_perturbing(on: bool) -> None:
        switch.on = bool(on)

    def perturbation(guide_trace, x: torch.Tensor, y: torch.Tensor, shard: tuple[int, int] | None = None,
                     guide_params: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        if not (perturb and switch.on):
            return zero
        if shard is None:
            loc, scale = guide_params or guide_normal_params(guide_trace, model, x, y)
            if borrow_from is not None:
                scale = borrowed_scale(loc, scale, y, borrow_from)
            loss = perturbation_loss(model, loc, scale, y, reps, max_reps=max_reps, offset=perturbation_offset)
        else:
            # x, y: the global batch; the guide trace holds this rank's shard. The noise and the
            # normaliser are the global batch's, so the shards' losses sum to the single-process loss.
            lo, hi = shard
            noise = torch.randn((x.shape[0], max_reps, latent_dim), dtype=x.dtype, device=x.device)
            total = reps[y].sum()
            if hi > lo:
                loc, scale = guide_normal_params(guide_trace, model, x[lo:hi], y[lo:hi])
                loss = perturbation_loss(model, loc, scale, y[lo:hi], reps, max_reps=max_reps,
                                         noise=noise[lo:hi], total=total, offset=perturbation_offset)
                loss.backward()
            else:
                loss = zero
            (loss,) = ctx.all_reduce_gradients(model, cls_params, [loss], with_buffers=False)
            cls_opt.step()
            cls_opt.zero_grad(set_to_none=True)
            return loss
        loss.backward()
        cls_opt.step()
        cls_opt.zero_grad(set_to_none=True)
        return loss.detach()

    fast = engine in ("torch", "graph")
    model_call = bare_method(model, "model") if fast else model.model
    guide_call = bare_method(model, "guide") if fast else model.guide
    model_fn, guide_fn = _PerExample(model_call), _PerExample(guide_call)
    noise = None
    if ctx is not None:
        noise = GlobalNoise()
        guide_fn = _PerExample(noise(guide_call))

    def shard_of(x: torch.Tensor) -> tuple[int, int]:
        n = x.shape[0]
        lo, hi = ctx.shard(n)
        model_fn.denominator = guide_fn.denominator = n
        noise.lo, noise.hi, noise.total = lo, hi, n
        return lo, hi

    if engine == "svi":
        traced_guide = poutine.trace(guide_fn)  # records q(z | x, y) for the perturbation step
        optim = pyro.optim.Adam({"lr": lr, "betas": betas, **kernel})  # one torch Adam per parameter, same kernel
        svi = pyro.infer.SVI(model_fn, traced_guide, optim, loss=loss_fn)

        def svi_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            # pyro.infer.SVI collects parameters through Pyro's global param store; a fresh store scope
            # per step registers exactly this model's parameters, so other models cannot leak in.
            with pyro.settings.context(module_local_params=False), pyro.get_param_store().scope():
                loss = svi.step(x, y)
            return torch.tensor(loss, device=device), perturbation(traced_guide.trace, x, y)

        svi_step.optimizers = {"main": optim, "perturbation": cls_opt}  # for checkpoints (resume.py)
        svi_step.set_perturbing = set_perturbing
        return svi_step

    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=lr, betas=betas, **kernel)
    kind = traced_elbo_kind(loss_fn)
    traced = TracedELBO(model_fn, guide_fn, kind, fallback=loss_fn.__self__) if kind else None
    recorder = poutine.trace(guide_fn) if traced is None else None  # records q(z | x, y) for the perturbation step

    def loss_and_guide_trace(x: torch.Tensor, y: torch.Tensor):
        if traced is not None:
            return traced(x, y)
        return loss_fn(model_fn, recorder, x, y), recorder.trace

    def torch_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with pyro.validation_enabled(False):
            if ctx is None:
                loss, guide_tr = loss_and_guide_trace(x, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.detach(), perturbation(guide_tr, x, y)
            lo, hi = shard_of(x)
            if hi > lo:
                loss, guide_tr = loss_and_guide_trace(x[lo:hi], y[lo:hi])
                loss.backward()
            else:  # fewer examples than ranks in this (last) batch
                loss, guide_tr = zero, None
            (loss,) = ctx.all_reduce_gradients(model, params, [loss], with_buffers=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss, perturbation(guide_tr, x, y, (lo, hi))

    torch_step.optimizers = {"main": opt, "perturbation": cls_opt}  # for checkpoints (resume.py)
    torch_step.set_perturbing = set_perturbing
    if engine != "graph":
        return torch_step

    def captured_loss(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        loss, guide_tr = loss_and_guide_trace(x, y)
        return (loss, *guide_normal_params(guide_tr, model, x, y)) if perturb else (loss,)

    captured = CapturedGradients(model, captured_loss, compile=compile)

    def graph_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if graph_step.engine == "torch":
            return torch_step(x, y)
        try:
            with pyro.validation_enabled(False):
                loss, *guide_params = captured(x, y)
        except GraphCaptureError as e:
            if not fallback:
                raise
            # A failed capture changed nothing (no gradients, buffers and random state restored), and the torch
            # step computes what the graph would have, so the fit continues from this very step unchanged.
            reason = str(e).removesuffix("; use engine='torch'")
            warnings.warn(f"engine='graph': {reason}; falling back to engine='torch' for this fit", RuntimeWarning,
                          stacklevel=5)  # the caller of fit
            graph_step.engine = "torch"
            return torch_step(x, y)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss, perturbation(None, x, y, guide_params=tuple(guide_params))

    graph_step.engine = "graph"  # "torch" once a capture failed
    graph_step.optimizers = {"main": opt, "perturbation": cls_opt}
    graph_step.set_perturbing = set_perturbing
    graph_step.captured = captured
    return graph_step
