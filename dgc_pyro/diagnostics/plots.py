"""Matplotlib figures of the diagnostics: reliability diagram, accuracy-coverage, k-hat, class-frequency PPC, and
PNG grids of real and synthetic images.

Each ``plot_*`` function draws on ``ax`` (a new figure when None) and returns the axes. ``pyplot`` is imported
only when a new figure is needed, so the functions also work on a headless ``Agg`` backend. The ``save_*``
functions write a PNG file atomically (Agg backend) and return nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dgc_pyro.diagnostics.importance import importance_diagnostics
from dgc_pyro.diagnostics.uncertainty import calibration, coverage_accuracy_curve, reliability

__all__ = [
    "plot_coverage_accuracy",
    "plot_khat",
    "plot_ppc_class_frequencies",
    "plot_reliability",
    "save_augmentation_grid",
    "save_image_grid",
]


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


def _as_image(a: np.ndarray) -> np.ndarray:
    """One example as something ``imshow`` draws: (1, H, W) -> (H, W), (3, H, W) -> (H, W, 3), a vector as a
    square when its length is one, else as a one-row strip."""
    if a.ndim == 3 and a.shape[0] == 1:
        return a[0]
    if a.ndim == 3 and a.shape[0] == 3:
        return np.transpose(a, (1, 2, 0))
    flat = a.reshape(-1)
    side = math.isqrt(flat.size)
    return flat.reshape(side, side) if side * side == flat.size else flat[None, :]


def save_image_grid(
    path: str | Path,
    rows: Sequence[tuple[str, Sequence[Any]]],
    *,
    title: str = "",
    ncols: int | None = None,
    cell: float = 0.9,
    dpi: int = 80,
) -> None:
    """PNG grid with one labelled row per ``(label, images)`` in ``rows``.

    An image is an array ``(C, H, W)`` (C = 1 or 3) or ``(D,)`` in [0, 1], or None for an empty cell (a gap);
    ``ncols`` defaults to the longest row, ``cell`` is the side of a cell in inches.
    """
    from io import BytesIO

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from dgc_pyro.io import atomic_write_bytes

    if not rows:
        raise ValueError("no rows to show in a grid")
    ncols = ncols or max(1, max(len(images) for _, images in rows))
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * cell, len(rows) * (cell + 0.05) + 0.4), squeeze=False)
    for r, (label, images) in enumerate(rows):
        for k in range(ncols):
            ax = axes[r, k]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if k < len(images) and images[k] is not None:
                image = _as_image(np.asarray(images[k]))
                ax.imshow(image, cmap="gray", vmin=0.0, vmax=1.0, aspect="auto" if image.shape[0] == 1 else None)
            if k == 0:
                ax.set_ylabel(label, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def save_augmentation_grid(path: str | Path, real: Any, synthetic: Any, title: str = "", ncols: int = 8) -> None:
    """PNG grid of one class: a row of ``ncols`` real examples above rows of synthetic ones.

    ``real`` and ``synthetic`` are arrays ``(n, C, H, W)`` (C = 1 or 3) or ``(n, D)`` in [0, 1]
    (:func:`save_image_grid` draws them).
    """
    real, synthetic = np.asarray(real)[:ncols], np.asarray(synthetic)
    rows = [("real", list(real))] if len(real) else []
    rows += [("synthetic", list(synthetic[i : i + ncols])) for i in range(0, len(synthetic), ncols)]
    save_image_grid(path, rows, title=title, ncols=ncols)
