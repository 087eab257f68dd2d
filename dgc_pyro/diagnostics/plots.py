"""Matplotlib figures of the diagnostics: reliability diagram, accuracy-coverage, k-hat, class-frequency PPC.

Each function draws on ``ax`` (a new figure when None) and returns the axes. ``pyplot`` is imported
only when a new figure is needed, so the functions also work on a headless ``Agg`` backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from dgc_pyro.diagnostics.importance import importance_diagnostics
from dgc_pyro.diagnostics.uncertainty import calibration, coverage_accuracy_curve, reliability

__all__ = ["plot_coverage_accuracy", "plot_khat", "plot_ppc_class_frequencies", "plot_reliability"]


def _axes(ax: Any, figsize: tuple[float, float] = (4.5, 4.0)) -> Any:
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt

    _, ax = plt.subplots(figsize=figsize)
    return ax


def plot_reliability(y_true: Any, proba: Any, ax: Any = None, *, n_bins: int = 15, label: str | None = None) -> Any:
    """Reliability diagram: accuracy vs mean confidence per bin, bin sizes as bars, ECE in the legend."""
    ax = _axes(ax)
    bins = reliability(y_true, proba, n_bins=n_bins)
    ece = calibration(y_true, proba, n_bins=n_bins)["ece"]
    edges = bins["edges"]
    centers = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    share = bins["count"] / max(bins["count"].sum(), 1)
    ax.bar(centers, share, width=width * 0.9, color="0.85", label="share of examples")
    ax.plot([0, 1], [0, 1], ls="--", color="0.4", lw=1, label="perfect calibration")
    filled = bins["count"] > 0
    name = f"{label}, " if label else ""
    ax.plot(bins["confidence"][filled], bins["accuracy"][filled], "o-", label=f"{name}ECE = {ece:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram")
    ax.legend(loc="upper left", fontsize="small")
    return ax


def plot_coverage_accuracy(y_true: Any, proba: Any, ax: Any = None, *, score: str = "entropy") -> Any:
    """Accuracy and ACSA on the accepted examples against coverage, rejecting the most uncertain first."""
    ax = _axes(ax)
    curve = coverage_accuracy_curve(y_true, proba, score=score)
    ax.plot(curve["coverage"], curve["accuracy"], label="accuracy")
    ax.plot(curve["coverage"], curve["acsa"], label="ACSA")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (fraction accepted)")
    ax.set_ylabel("score on accepted examples")
    ax.set_title(f"Reject option by {score.replace('_', ' ')}")
    ax.legend(loc="lower left", fontsize="small")
    return ax


def plot_khat(log_weights: Any, ax: Any = None) -> Any:
    """k-hat of every (example, class) importance-sampling estimate, with the good_k and 0.7 lines."""
    ax = _axes(ax, figsize=(6.0, 3.5))
    diag = importance_diagnostics(log_weights)
    khat = diag["khat"]
    n, c = khat.shape
    for j in range(c):
        ax.scatter(np.arange(n), khat[:, j], s=6, alpha=0.6, label=str(j) if c <= 10 else None)
    ax.axhline(diag["good_k"], color="C3", ls="--", lw=1, label=f"good_k = {diag['good_k']:.2f}")
    ax.axhline(0.7, color="k", ls=":", lw=1)
    ax.set_xlabel("example")
    ax.set_ylabel("Pareto k-hat")
    ax.set_title("PSIS k-hat of the class-posterior estimates")
    ax.legend(title="class", fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return ax


def plot_ppc_class_frequencies(ppc: Any, ax: Any = None, *, prob: float = 0.9) -> Any:
    """Observed class counts (bars) against the posterior predictive mean and ``prob`` interval.

    ``ppc`` is a :func:`~dgc_pyro.diagnostics.ppc_class_frequencies` result or a DataTree.
    """
    from dgc_pyro.diagnostics.datatree import ppc_class_frequencies

    if not isinstance(ppc, dict):
        ppc = ppc_class_frequencies(ppc, prob=prob)
    ax = _axes(ax, figsize=(6.0, 3.5))
    pos = np.arange(len(ppc["observed"]))
    ax.bar(pos, ppc["observed"], color="0.8", label="observed")
    # The interval is drawn on its own: for a rare class the mean of the replicated counts can lie outside
    # the central interval (most draws 0, a few large), which error bars around the mean cannot show.
    ax.vlines(pos, ppc["lower"], ppc["upper"], color="C0", label=f"posterior predictive {prob:.0%} interval")
    ax.plot(pos, ppc["mean"], "o", color="C0", label="posterior predictive mean")
    ax.set_xticks(pos, [str(c) for c in ppc["classes"]])
    ax.set_xlabel("class")
    ax.set_ylabel("count")
    ax.set_title("Class frequencies: posterior predictive check")
    ax.legend(fontsize="small")
    return ax
