"""Posterior and posterior predictive draws of DGC's latents with :class:`pyro.infer.Predictive`.

The recognition model q(z | x, y) is DGC's approximate posterior. :func:`posterior_predictive` draws
z from it (at the observed labels, at every class hypothesis, or at the predicted class when no label
is given), then runs the generative model on those draws: ``"y"`` is drawn from p(y | z) and, on
request, ``"x"`` is the mean image of p(x | z). All draws go through the networks in one vectorised
pass (``Predictive(parallel=True)``), in chunks of examples to bound memory.

:func:`posterior_log_densities` scores given draws under the model and the guide (log p(z),
log q(z | x, y), log p(x | z), log p(y | z)); the ArviZ conversion in :mod:`dgc_pyro.diagnostics`
builds its log-likelihood and LOO inputs from it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import pyro
import torch
from pyro import poutine
from pyro.infer import Predictive

from dgc_pyro.arguments import check_positive
from dgc_pyro.data.validation import check_features, check_labels
from dgc_pyro.inference.predict import DEFAULT_MAX_ROWS, predict
from dgc_pyro.models.dgc import DGC

__all__ = ["posterior_log_densities", "posterior_predictive"]


@contextlib.contextmanager
def _eval_mode(model: DGC, seed: int | None) -> Iterator[None]:
    """Eval mode (BatchNorm statistics frozen), module-local params, no grad, optional local seed."""
    was_training = model.training
    model.eval()
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            stack.enter_context(pyro.settings.context(module_local_params=True))
            if seed is not None:
                devices = [model.device] if model.device.type == "cuda" else []
                stack.enter_context(torch.random.fork_rng(devices=devices))
                torch.manual_seed(int(seed))  # Pyro samples with torch's generator
            yield
    finally:
        model.train(was_training)


def _chunks(n: int, rows_per_example: int, max_rows: int) -> Iterator[slice]:
    step = max(1, int(max_rows) // max(1, rows_per_example))
    for start in range(0, n, step):
        yield slice(start, min(start + step, n))


def _predictive_chunk(
    model: DGC, x: torch.Tensor, y_cond: torch.Tensor, num_samples: int, return_x: bool
) -> dict[str, torch.Tensor]:
    # The guide is conditioned on the labels; the model is run with y=None so that "y" is drawn from
    # p(y | z) (the posterior predictive) instead of being clamped to the observation.
    def guide(x_: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
        return model.guide(x_, y_)

    def generative(x_: torch.Tensor, y_: torch.Tensor) -> torch.Tensor:
        return model.model(x_, None)

    pred = Predictive(generative, guide=guide, num_samples=num_samples, parallel=True, return_sites=("z", "y"))
    draws = pred(x, y_cond)
    n = x.shape[0]
    out = {
        "z": draws["z"].reshape(num_samples, n, -1),
        "y": draws["y"].reshape(num_samples, n),
    }
    if return_x:
        out["x"] = model.likelihood(out["z"]).mean.reshape((num_samples, n) + tuple(model.input_shape))
    return out


def posterior_predictive(
    model: DGC,
    x: torch.Tensor,
    y: torch.Tensor | None = None,
    *,
    num_samples: int = 100,
    per_class: bool = False,
    return_x: bool = False,
    num_predict_samples: int = 10,
    max_rows: int = DEFAULT_MAX_ROWS,
    seed: int | None = None,
) -> dict[str, torch.Tensor]:
    """Draws of the latents z ~ q(z | x, y) and of the posterior predictive ``y`` (and ``x``).

    Args:
        model: a (fitted) :class:`~dgc_pyro.models.DGC` or subclass.
        x: features ``(N, *model.input_shape)``.
        y: labels ``(N,)`` to condition q(z | x, y) on. When None, each example is conditioned on its
            predicted class (:func:`~dgc_pyro.inference.predict` with ``num_predict_samples`` draws).
            Ignored when ``per_class`` is True.
        num_samples: number S of posterior draws per example (and class hypothesis).
        per_class: draw z at every class hypothesis c = 0..C-1 instead of one label per example.
        return_x: also return the decoded mean images E[x | z] of the draws.
        max_rows: at most this many network rows (draws x examples x hypotheses) per vectorised pass.
        seed: when given, draws with this seed without touching the global random state.

    Returns:
        A dict of tensors on the model's device:

        - ``"z"``: ``(S, N, k)``, or ``(S, C, N, k)`` with ``per_class``;
        - ``"y"``: labels drawn from p(y | z), ``(S, N)`` or ``(S, C, N)``;
        - ``"x"`` (with ``return_x``): mean images ``(S, N, *input_shape)`` or ``(S, C, N, *input_shape)``;
        - ``"labels"``: the labels q was conditioned on, ``(N,)`` (``(C, N)`` with ``per_class``).
    """
    check_positive("num_samples", num_samples, integer=True)
    check_positive("num_predict_samples", num_predict_samples, integer=True)
    num_samples = int(num_samples)
    x = check_features(x, input_shape=model.input_shape)
    n, c = x.shape[0], model.num_classes
    if per_class:
        labels = torch.arange(c).repeat_interleave(n).reshape(c, n)
    elif y is not None:
        labels = check_labels(y, num_classes=c)
        if labels.shape[0] != n:
            raise ValueError(f"x has {n} examples but y has {labels.shape[0]} labels")
    else:
        labels = None  # the predicted classes, computed under the seed below

    hyps = c if per_class else 1
    parts: list[dict[str, torch.Tensor]] = []
    with _eval_mode(model, seed):
        if not per_class and y is None:
            labels = predict(model, x, num_predict_samples, max_rows=max_rows).labels.cpu()
        for sl in _chunks(n, num_samples * hyps, max_rows):
            xb = x[sl].to(model.device)
            m = xb.shape[0]
            if per_class:
                # Class-major tiling: row j*m + i is example i under hypothesis j.
                xt = xb.repeat((c,) + (1,) * (xb.dim() - 1))
                yt = labels[:, sl].reshape(-1).to(model.device)
            else:
                xt, yt = xb, labels[sl].to(model.device)
            d = _predictive_chunk(model, xt, yt, num_samples, return_x)
            if per_class:
                d = {k: v.reshape((num_samples, c, m) + v.shape[2:]) for k, v in d.items()}
            parts.append(d)
    axis = 2 if per_class else 1
    out = {k: torch.cat([p[k] for p in parts], dim=axis) for k in parts[0]}
    out["labels"] = labels.to(out["z"].device)
    return out


def _check_latents(z: object, n: int, model: DGC) -> torch.Tensor:
    if not torch.is_tensor(z):
        raise ValueError(f"z must be a torch tensor of shape (S, N={n}, k={model.latent_dim}), got {type(z).__name__}")
    if not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor, got dtype {z.dtype}")
    if z.dim() != 3 or z.shape[1] != n or z.shape[2] != model.latent_dim:
        raise ValueError(f"z must have shape (S, N={n}, k={model.latent_dim}), got {tuple(z.shape)}")
    if not bool(torch.isfinite(z).all()):
        raise ValueError(f"z contains {int((~torch.isfinite(z)).sum())} NaN or infinite values")
    return z.to(model.dtype)


def posterior_log_densities(
    model: DGC,
    x: torch.Tensor,
    y: torch.Tensor,
    z: torch.Tensor,
    *,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> dict[str, torch.Tensor]:
    """Log densities of latent draws ``z`` ``(S, N, k)`` under the model and the guide, each ``(S, N)``.

    Returns ``log_prior`` = log p(z_s,i), ``log_q`` = log q(z_s,i | x_i, y_i), ``log_lik_x`` =
    log p(x_i | z_s,i) and ``log_lik_y`` = log p(y_i | z_s,i). The sites are read from traces of
    ``model.model`` and ``model.guide`` conditioned on ``z``, so subclasses that override the prior,
    the likelihood or the guide are scored by their own densities. The label term is unscaled:
    ``label_weight`` only reweights it during training.
    """
    x = check_features(x, input_shape=model.input_shape)
    y = check_labels(y, num_classes=model.num_classes)
    if len(y) != len(x):
        raise ValueError(f"x has {len(x)} examples but y has {len(y)} labels")
    z = _check_latents(z, len(x), model)
    s = z.shape[0]
    keys = ("log_prior", "log_q", "log_lik_x", "log_lik_y")
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    with _eval_mode(model, None):
        for sl in _chunks(x.shape[0], s, max_rows):
            xb, yb = x[sl].to(model.device), y[sl].to(model.device)
            zb = z[:, sl].to(model.device)
            with pyro.plate("particles", s, dim=-2):
                g = poutine.trace(poutine.condition(model.guide, data={"z": zb})).get_trace(xb, yb)
                t = poutine.trace(poutine.condition(model.model, data={"z": zb})).get_trace(xb, yb)
            parts["log_q"].append(g.nodes["z"]["fn"].log_prob(zb).expand(s, xb.shape[0]))
            parts["log_prior"].append(t.nodes["z"]["fn"].log_prob(zb).expand(s, xb.shape[0]))
            parts["log_lik_x"].append(t.nodes["x"]["fn"].log_prob(xb).expand(s, xb.shape[0]))
            parts["log_lik_y"].append(t.nodes["y"]["fn"].log_prob(yb).expand(s, xb.shape[0]))
    return {k: torch.cat(v, dim=1) for k, v in parts.items()}
