"""ArviZ (1.x) view of a fitted DGC: an ``xarray.DataTree`` of latent draws, predictive checks and LOO.

:func:`to_datatree` draws S latents per example from the amortised posterior q(z | x, y) and stores

- ``posterior``: ``z`` (chain, draw, example, latent_dim) and ``class_proba`` = p(y | z)
  (chain, draw, example, class);
- ``posterior_predictive``: ``y`` drawn from p(y | z) (chain, draw, example) and, with ``include_x``,
  ``x``, the decoded mean images (chain, draw, example, *pixel dims*);
- ``log_likelihood``: per example log p(x_i | z), log p(y_i | z) and their sum, as ``x``, ``y`` and
  ``xy`` (chain, draw, example);
- ``sample_stats``: ``log_p`` = log p(z_i, x_i, y_i) and ``log_q`` = log q(z_i | x_i, y_i)
  (chain, draw, example), the densities that the approximate-posterior LOO needs;
- ``observed_data``: ``y`` (example) and, with ``include_x``, ``x``;
- ``density``: ``log_density`` (example), the importance-weighted log p(x) in nats from the same draws, and
  with a calibrated OOD detector (:func:`~dgc_pyro.inference.density.fit_ood_threshold`) ``ood_score`` and
  the ``ood`` flag.

There is one chain (the draws are independent, not MCMC). Because z is a *local* latent (one per
example), leaving example i out of the data leaves its z_i with the prior p(z); :func:`loo` therefore
uses per-example densities in ``loo_approximate_posterior`` by default, which makes the LOO predictive
the importance-sampled marginal p(x_i, y_i) and its k-hat the reliability of that estimate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from dgc_pyro.data.validation import check_features, check_labels
from dgc_pyro.inference.posterior import posterior_log_densities, posterior_predictive
from dgc_pyro.inference.predict import DEFAULT_MAX_ROWS
from dgc_pyro.models.dgc import DGC

if TYPE_CHECKING:  # ArviZ and xarray are imported on use: they take seconds to import
    import pandas as pd
    import xarray as xr
    from arviz_stats import ELPDData

__all__ = ["LOO_METHODS", "compare_models", "loo", "ppc_class_frequencies", "to_datatree"]

LOO_METHODS = ("pointwise", "joint")


def _pixel_dims(shape: Sequence[int]) -> list[str]:
    if len(shape) == 1:
        return ["feature"]
    if len(shape) == 3:
        return ["channel", "row", "col"]
    return [f"x_dim_{i}" for i in range(len(shape))]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def to_datatree(
    model: DGC,
    x: Any,
    y: Any,
    num_samples: int = 100,
    *,
    include_x: bool = False,
    class_names: Sequence[str] | None = None,
    seed: int | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> xr.DataTree:
    """Posterior draws, posterior predictive, log-likelihood and observed data of ``model`` on ``(x, y)``.

    Args:
        model: a fitted DGC (or subclass keeping the sites "z", "x", "y" and the plate "data").
        x, y: features ``(N, *input_shape)`` and the observed labels ``(N,)``.
        num_samples: draws S per example (use >= 25 for PSIS-based LOO; 100 or more is better).
        include_x: also store the decoded mean images and the observed images (N * S images).
        class_names: coordinates of the ``class`` dim (default 0..C-1).
        seed: draw with this seed without touching the global random state.

    See the module docstring for the groups and their dims.
    """
    from arviz_base import from_dict

    x = check_features(x, input_shape=model.input_shape)
    y = check_labels(y, num_classes=model.num_classes)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"x has {x.shape[0]} examples but y has {y.shape[0]} labels")
    n, c, k = x.shape[0], model.num_classes, model.latent_dim
    if class_names is None:
        class_names = list(range(c))
    elif len(class_names) != c:
        raise ValueError(f"class_names has {len(class_names)} entries but the model has {c} classes")

    draws = posterior_predictive(model, x, y, num_samples=num_samples, return_x=include_x, seed=seed, max_rows=max_rows)
    z = draws["z"]
    dens = posterior_log_densities(model, x, y, z, max_rows=max_rows)
    with torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            class_proba = torch.softmax(model.label_logits(z.to(model.device)), dim=-1)
        finally:
            model.train(was_training)

    def chain(t: torch.Tensor) -> np.ndarray:
        return _np(t)[None]  # one chain

    def chain64(t: torch.Tensor) -> np.ndarray:
        return chain(t).astype(np.float64)  # log densities: differences of large numbers

    pix = _pixel_dims(model.input_shape)
    coords = {
        "example": np.arange(n),
        "latent_dim": np.arange(k),
        "class": np.asarray(class_names),
    }
    attrs = {
        "inference_library": "pyro",
        "model": type(model).__name__,
        "approximation": "amortised variational posterior q(z | x, y)",
        "num_samples": int(num_samples),
    }
    lx, ly = chain64(dens["log_lik_x"]), chain64(dens["log_lik_y"])
    main = from_dict(
        {
            "posterior": {"z": chain(z), "class_proba": chain(class_proba)},
            "log_likelihood": {"x": lx, "y": ly, "xy": lx + ly},
            "sample_stats": {"log_p": chain64(dens["log_prior"]) + lx + ly, "log_q": chain64(dens["log_q"])},
        },
        coords=coords,
        dims={
            "z": ["example", "latent_dim"],
            "class_proba": ["example", "class"],
            "x": ["example"],
            "y": ["example"],
            "xy": ["example"],
            "log_p": ["example"],
            "log_q": ["example"],
        },
        attrs={"posterior": attrs},
    )
    # "x" has pixel dims here and one value per example in log_likelihood, so these groups are
    # converted separately (from_dict takes one dims mapping per variable name).
    pp: dict[str, np.ndarray] = {"y": chain(draws["y"])}
    obs: dict[str, np.ndarray] = {"y": _np(y)}
    if include_x:
        pp["x"] = chain(draws["x"])
        obs["x"] = _np(x)
    data = from_dict(
        {"posterior_predictive": pp, "observed_data": obs},
        coords={"example": coords["example"]},
        dims={"y": ["example"], "x": ["example", *pix]},
    )
    for name, node in data.children.items():
        main[name] = node
    main["density"] = _density_group(model, x, dens, coords["example"])
    return main


def _density_group(model: DGC, x: torch.Tensor, dens: dict[str, torch.Tensor], examples: np.ndarray) -> xr.DataTree:
    """The ``density`` group: log p(x) per example from the draws already taken (free: no further network pass).

    log p(x) ~ logmeanexp_s [log p(z_s) + log p(x | z_s) - log q(z_s | x, y)], an importance-weighted lower bound
    (in expectation) with the proposal at the observed label; with the model's calibrated OOD detector also its
    score and flag (see :mod:`dgc_pyro.inference.density`).
    """
    import xarray as xr

    log_w = (dens["log_prior"] + dens["log_lik_x"] - dens["log_q"]).double()  # (S, N)
    log_density = torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])
    data = {"log_density": ("example", _np(log_density))}
    detector = getattr(model, "ood_detector", None)
    if detector is not None:
        score = detector.scores(log_density.float(), x if detector.score == "complexity" else None)
        data["ood_score"] = ("example", _np(score))
        data["ood"] = ("example", _np(detector.flags(score)))
    attrs = {
        "units": "nats",
        "estimator": "importance-weighted bound on log p(x), proposal q(z | x, y)",
        "num_samples": int(log_w.shape[0]),
    }
    return xr.DataTree(dataset=xr.Dataset(data, coords={"example": examples}, attrs=attrs))


def _log_density(dt: xr.DataTree, name: str, method: str) -> xr.DataArray:
    try:
        da = dt["sample_stats"][name]
    except KeyError:
        raise ValueError(
            f"the DataTree has no sample_stats/{name}; build it with dgc_pyro.diagnostics.to_datatree"
        ) from None
    if method == "joint":
        return da.sum("example")
    return da


def loo(dt: xr.DataTree, var_name: str = "xy", *, method: str = "pointwise", pointwise: bool = True) -> ELPDData:
    """Approximate-posterior PSIS-LOO of a :func:`to_datatree` result (``arviz_stats.loo_approximate_posterior``).

    ``method="pointwise"`` (default) corrects each example's draws by its own log p(z_i, x_i, y_i) -
    log q(z_i | x_i, y_i): the latents are local, so the other examples' draws carry no information
    about example i and would only add noise. ``method="joint"`` uses the sums over examples, the
    recipe for global parameters (kept for comparison; its k-hat grows quickly with N).

    ``var_name`` picks the log-likelihood: ``"xy"`` (default, the joint p(x, y | z)), ``"x"`` or ``"y"``.
    Returns an ``ELPDDataLOO`` (``elpd``, ``se``, ``p``, ``pareto_k`` per example when ``pointwise``).
    """
    from arviz_stats import loo_approximate_posterior

    if method not in LOO_METHODS:
        raise ValueError(f"method must be one of {LOO_METHODS}, got {method!r}")
    log_p = _log_density(dt, "log_p", method)
    log_q = _log_density(dt, "log_q", method)
    return loo_approximate_posterior(dt, log_p=log_p, log_q=log_q, pointwise=pointwise, var_name=var_name)


def compare_models(
    models: Mapping[str, Any],
    var_name: str = "xy",
    *,
    method: str = "pointwise",
    weighting: str = "stacking",
    **kwargs: Any,
) -> pd.DataFrame:
    """Rank models by approximate LOO ELPD with ``arviz_stats.compare``.

    ``models`` maps names to :func:`to_datatree` results (built on the *same* examples) or to
    precomputed :func:`loo` results. ``method`` is the LOO method of :func:`loo` (one of
    :data:`LOO_METHODS`); ``weighting`` is ``arviz_stats.compare``'s ``method``, the model weights
    (``"stacking"``, its default, or ``"bb-pseudo-bma"``, ``"pseudo-bma"``). Other keyword arguments go
    to ``arviz_stats.compare``. Returns its DataFrame, best model first.
    """
    import xarray as xr
    from arviz_stats import compare

    if len(models) < 2:
        raise ValueError("compare_models needs at least two models")
    elpds = {
        name: loo(m, var_name, method=method, pointwise=True) if isinstance(m, xr.DataTree) else m
        for name, m in models.items()
    }
    return compare(elpds, method=weighting, **kwargs)


def ppc_class_frequencies(dt: xr.DataTree, prob: float = 0.9) -> dict[str, np.ndarray]:
    """Posterior predictive check of the class frequencies: observed vs replicated class counts.

    For each posterior predictive draw the labels y_rep ~ p(y | z) of all examples are counted per
    class. Returns ``observed`` ``(C,)``, ``draws`` ``(S, C)``, ``mean``, ``lower`` and ``upper``
    (the central ``prob`` interval), ``p_value`` ``(C,)``: the two-sided posterior predictive
    p-value 2 * min(P(rep <= obs), P(rep >= obs)) clipped to 1, and ``classes``, the class coords.
    """
    y_obs = dt["observed_data"]["y"].values.astype(np.int64)
    y_rep = dt["posterior_predictive"]["y"].values.astype(np.int64)
    if "posterior" in dt.children and "class" in dt["posterior"].coords:
        classes = dt["posterior"]["class"].values
    else:
        classes = np.arange(max(y_obs.max(), y_rep.max()) + 1)
    c = len(classes)
    y_rep = y_rep.reshape(-1, y_rep.shape[-1])  # (chain * draw, example)
    observed = np.bincount(y_obs, minlength=c)
    counts = np.stack([np.bincount(row, minlength=c) for row in y_rep])
    alpha = (1.0 - prob) / 2.0
    p_value = np.minimum(1.0, 2.0 * np.minimum((counts <= observed).mean(0), (counts >= observed).mean(0)))
    return {
        "classes": classes,
        "observed": observed,
        "draws": counts,
        "mean": counts.mean(0),
        "lower": np.quantile(counts, alpha, axis=0),
        "upper": np.quantile(counts, 1.0 - alpha, axis=0),
        "p_value": p_value,
    }
