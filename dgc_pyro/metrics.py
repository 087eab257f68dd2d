"""Evaluation metrics for imbalanced classification, calibration metrics, and text tables.

Imbalance metrics follow the DGC paper (Wang, Lyu & Jing, CVPR 2020):

* ``acsa``   average class-specific accuracy = mean over classes of recall;
* ``gmean``  as in the paper's code: mean over classes of sqrt(recall_c * specificity_c).
  This is *not* imbalanced-learn's ``geometric_mean_score`` (the geometric mean of the
  recalls); the two differ in general;
* ``fmacro`` macro-averaged F1;
* ``r_mi``   recall of the minority (smallest) class;
* ``p_ma``   precision of the majority (largest) class;
* ``acc``    plain accuracy.

Conventions shared by every function here:

* All ``num_classes`` classes are included in every average, also classes absent from
  ``y_true`` (or from ``y_pred``). Undefined ratios (0/0) are 0, as scikit-learn's
  ``zero_division=0``: a class with no test examples gets recall 0 and pulls ``acsa`` down;
  a class never predicted gets precision 0. This differs from
  ``sklearn.metrics.balanced_accuracy_score``, which silently drops classes absent from
  ``y_true``. Evaluate on a split that contains every class to avoid the ambiguity.
* Specificity of class c is TN / (TN + FP) = TN / (number of examples not in c), 0 when
  every example belongs to c.
* Inputs may be lists, numpy arrays or torch tensors (moved to CPU). Labels must be
  integers (integer-valued floats are accepted) in ``[0, num_classes)``; if
  ``num_classes`` is omitted it is ``max(label) + 1`` over both arrays (and at least
  ``len(train_counts)`` when given), and labels implying more than
  ``max(1000, 10 * len(y_true))`` classes are refused (see ``INFERRED_CLASSES_FLOOR``).
  At least two classes are required.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score

__all__ = [
    "IMBALANCE_METRICS",
    "accuracy_at_coverage",
    "aurc",
    "brier_score",
    "check_proba",
    "coverage_curve",
    "expected_calibration_error",
    "format_comparison",
    "format_paired",
    "format_table",
    "fpr_at_tpr",
    "imbalance_report",
    "negative_log_likelihood",
    "ood_auroc",
    "paired_difference",
    "per_class_table",
    "reliability_bins",
    "risk_coverage_curve",
]

IMBALANCE_METRICS: tuple[str, ...] = ("acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc")

# Rows of a probability matrix must sum to 1 within this tolerance. Loose enough for
# float16/float32 softmax output, tight enough to reject logits or log-probabilities.
PROBA_ROW_SUM_ATOL = 1e-3


# ---------------------------------------------------------------------------------------
# Input validation
# ---------------------------------------------------------------------------------------


def _to_numpy(x: Any) -> np.ndarray:
    # Duck-typed so that importing this module does not require torch.
    if hasattr(x, "detach") and hasattr(x, "cpu"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _as_labels(x: Any, name: str) -> np.ndarray:
    arr = _to_numpy(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of class labels, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty; metrics need at least one example")
    if arr.dtype.kind == "b":
        raise ValueError(f"{name} must hold integer class labels, got booleans")
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise ValueError(f"{name} must hold integer class labels, got non-integer floats")
        arr = arr.astype(np.int64)
    elif arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    elif arr.dtype == np.uint64 and int(arr.max()) > np.iinfo(np.int64).max:
        # Checked before the cast, which would wrap such values around to negative labels.
        raise ValueError(f"{name} contains label {int(arr.max())}, beyond the int64 range; labels must be 0..K-1")
    return arr.astype(np.int64, copy=False)


def _check_range(arr: np.ndarray, name: str, num_classes: int) -> None:
    bad = arr[(arr < 0) | (arr >= num_classes)]
    if bad.size:
        raise ValueError(
            f"{name} contains label {int(bad[0])} outside [0, {num_classes}) ({bad.size} out-of-range value(s))"
        )


#: With ``num_classes`` omitted, the labels may imply at most ``max(INFERRED_CLASSES_FLOOR,
#: INFERRED_CLASSES_PER_EXAMPLE * n)`` classes for ``n`` examples. At most ``2n`` classes can occur in
#: ``y_true`` and ``y_pred`` together, so beyond ``10n`` at least 80% of the classes would be absent from
#: both, each scoring 0 in every average: the labels are then codes, not class indices, and the
#: ``K x K`` confusion matrix of ``K = max(label) + 1`` could need terabytes. The floor keeps small
#: evaluations of many-class models working (a 1000 x 1000 matrix is 8 MB).
INFERRED_CLASSES_FLOOR = 1000
INFERRED_CLASSES_PER_EXAMPLE = 10


def _resolve_num_classes(num_classes: int | None, arrays: Iterable[np.ndarray], at_least: int = 0) -> int:
    if num_classes is None:
        arrays = list(arrays)
        top = max(int(a.max()) for a in arrays)
        n = max(a.size for a in arrays)
        limit = max(INFERRED_CLASSES_FLOOR, INFERRED_CLASSES_PER_EXAMPLE * n)
        if top + 1 > limit:
            raise ValueError(
                f"y_true and y_pred have labels up to {top}, which would mean {top + 1} classes for {n} examples (at most {limit} "
                "are inferred); pass num_classes explicitly, or if the labels are arbitrary codes rather than "
                "class indices 0..K-1, remap them first, e.g. classes, y = np.unique(y, return_inverse=True)"
            )
        num_classes = max(top + 1, at_least)
        if num_classes < 2:
            raise ValueError(
                "only one class label occurs in the data; pass num_classes explicitly (metrics need at least 2 classes)"
            )
        return num_classes
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)):
        raise ValueError(f"num_classes must be an int, got {type(num_classes).__name__}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return int(num_classes)


def _as_counts(train_counts: Any, num_classes: int | None) -> np.ndarray:
    counts = _to_numpy(train_counts)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"train_counts must be a non-empty 1-D sequence, got shape {counts.shape}")
    if counts.dtype.kind not in "iuf" or not np.all(np.isfinite(counts)) or np.any(counts < 0):
        raise ValueError("train_counts must hold finite non-negative numbers")
    if num_classes is not None and counts.size != num_classes:
        raise ValueError(f"train_counts has {counts.size} entries but num_classes is {num_classes}")
    return counts


def _labels_pair(
    y_true: Any, y_pred: Any, num_classes: int | None, train_counts: Any = None
) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    yt = _as_labels(y_true, "y_true")
    yp = _as_labels(y_pred, "y_pred")
    if yt.shape != yp.shape:
        raise ValueError(f"y_true and y_pred have different lengths ({yt.size} vs {yp.size})")
    counts = None
    if train_counts is not None:
        counts = _as_counts(train_counts, num_classes)
    n = _resolve_num_classes(num_classes, (yt, yp), at_least=0 if counts is None else counts.size)
    if counts is not None and counts.size != n:
        raise ValueError(f"train_counts has {counts.size} entries but the labels imply {n} classes")
    _check_range(yt, "y_true", n)
    _check_range(yp, "y_pred", n)
    return yt, yp, n, counts


def _check_class_index(value: int | None, name: str, num_classes: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int class index, got {type(value).__name__}")
    if not 0 <= value < num_classes:
        raise ValueError(f"{name}={value} is outside [0, {num_classes})")
    return int(value)


# ---------------------------------------------------------------------------------------
# Per-class quantities
# ---------------------------------------------------------------------------------------


def _per_class(yt: np.ndarray, yp: np.ndarray, n: int) -> dict[str, np.ndarray]:
    labels = list(range(n))
    cm = confusion_matrix(yt, yp, labels=labels)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    negatives = yt.size - support
    tn = negatives - (predicted - tp)
    specificity = np.divide(tn, negatives, out=np.zeros(n, dtype=float), where=negatives > 0)
    return {
        "confusion": cm,
        "support": support,
        "recall": recall_score(yt, yp, labels=labels, average=None, zero_division=0),
        "precision": precision_score(yt, yp, labels=labels, average=None, zero_division=0),
        "f1": f1_score(yt, yp, labels=labels, average=None, zero_division=0),
        "specificity": specificity,
    }


def imbalance_report(
    y_true: Any,
    y_pred: Any,
    *,
    num_classes: int | None = None,
    train_counts: Sequence[float] | np.ndarray | Any | None = None,
    minority_class: int | None = None,
    majority_class: int | None = None,
) -> dict[str, float]:
    """Imbalance metrics of the DGC paper: ``acsa``, ``gmean``, ``fmacro``, ``r_mi``, ``p_ma``, ``acc``.

    The minority class (for ``r_mi``) and majority class (for ``p_ma``) are, in order of
    preference: ``minority_class`` / ``majority_class`` if given; else argmin / argmax of
    ``train_counts``; else the least / most frequent class *present* in ``y_true``. Pass
    ``train_counts`` whenever evaluating on a balanced test set (the usual case in the
    paper), since there the ``y_true`` frequencies say nothing about which class was rare
    in training. Ties go to the lowest class index.

    See the module docstring for how absent classes and undefined ratios are treated.
    """
    yt, yp, n, counts = _labels_pair(y_true, y_pred, num_classes, train_counts)
    minority = _check_class_index(minority_class, "minority_class", n)
    majority = _check_class_index(majority_class, "majority_class", n)
    if counts is not None:
        minority = int(np.argmin(counts)) if minority is None else minority
        majority = int(np.argmax(counts)) if majority is None else majority
    else:
        # Classes absent from y_true would always be "smallest" with an undefined recall;
        # only present classes are candidates.
        freq = np.bincount(yt, minlength=n).astype(float)
        present = freq > 0
        if minority is None:
            minority = int(np.argmin(np.where(present, freq, np.inf)))
        if majority is None:
            majority = int(np.argmax(freq))

    pc = _per_class(yt, yp, n)
    recall, precision = pc["recall"], pc["precision"]
    return {
        "acsa": float(np.mean(recall)),
        "gmean": float(np.mean(np.sqrt(recall * pc["specificity"]))),
        "fmacro": float(f1_score(yt, yp, labels=list(range(n)), average="macro", zero_division=0)),
        "r_mi": float(recall[minority]),
        "p_ma": float(precision[majority]),
        "acc": float(accuracy_score(yt, yp)),
    }


def per_class_table(
    y_true: Any,
    y_pred: Any,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    train_counts: Sequence[float] | np.ndarray | Any | None = None,
) -> list[dict[str, Any]]:
    """One row per class: ``class``, ``name``, ``train_count`` (only if ``train_counts`` given),
    ``support``, ``recall``, ``precision``, ``f1``, ``specificity``.

    ``name`` defaults to the class index as a string. Feed the result to :func:`format_table`.
    """
    yt, yp, n, counts = _labels_pair(y_true, y_pred, num_classes, train_counts)
    if class_names is not None:
        class_names = list(class_names)
        if len(class_names) != n:
            raise ValueError(f"class_names has {len(class_names)} entries but there are {n} classes")
    pc = _per_class(yt, yp, n)
    rows: list[dict[str, Any]] = []
    for c in range(n):
        row: dict[str, Any] = {"class": c, "name": str(class_names[c]) if class_names is not None else str(c)}
        if counts is not None:
            value = counts[c]
            row["train_count"] = int(value) if float(value).is_integer() else float(value)
        row.update(
            support=int(pc["support"][c]),
            recall=float(pc["recall"][c]),
            precision=float(pc["precision"][c]),
            f1=float(pc["f1"][c]),
            specificity=float(pc["specificity"][c]),
        )
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------
# Text tables
# ---------------------------------------------------------------------------------------


def _cell(value: Any, floatfmt: str) -> tuple[str, bool]:
    """Rendered text and whether it is numeric (numbers are right-aligned)."""
    if value is None:
        return "-", False
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)), False
    if isinstance(value, (int, np.integer)):
        return str(int(value)), True
    if isinstance(value, (float, np.floating)):
        return format(float(value), floatfmt), True
    return str(value), False


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None, floatfmt: str = ".4f") -> str:
    """Render ``rows`` as a plain, aligned text table (header, dashed rule, one line per row).

    ``columns`` defaults to the keys of all rows in first-seen order. Floats use
    ``floatfmt``; missing values and ``None`` show as ``-``; numbers are right-aligned,
    text left-aligned. Returns ``""`` when there are no rows and no columns.
    """
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    columns = list(columns)
    if not columns:
        return ""
    cells = [[_cell(row.get(col), floatfmt) for col in columns] for row in rows]
    widths = [max([len(col)] + [len(r[i][0]) for r in cells]) for i, col in enumerate(columns)]
    numeric = [bool(cells) and all(r[i][1] or r[i][0] == "-" for r in cells) for i in range(len(columns))]

    def line(texts: Sequence[str]) -> str:
        parts = [t.rjust(w) if num else t.ljust(w) for t, w, num in zip(texts, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(columns), "  ".join("-" * w for w in widths)]
    out.extend(line([text for text, _ in r]) for r in cells)
    return "\n".join(out)


def format_comparison(
    reports: Mapping[str, Mapping[str, float]],
    metrics: Sequence[str] = IMBALANCE_METRICS,
    floatfmt: str = ".4f",
) -> str:
    """Table of several methods' reports: one row per method, one column per metric.

    ``reports`` maps a method name (e.g. ``"DGC"``, ``"logit-adjusted CE"``) to the dict
    returned by :func:`imbalance_report`. Metrics a report lacks show as ``-``.
    """
    rows = [{"method": name, **{m: report.get(m) for m in metrics}} for name, report in reports.items()]
    return format_table(rows, columns=["method", *metrics], floatfmt=floatfmt)


# ---------------------------------------------------------------------------------------
# Calibration
# ---------------------------------------------------------------------------------------


def check_proba(proba: Any) -> np.ndarray:
    """Validate a class-probability matrix ``(n_examples, n_classes)``: finite, in [0, 1], rows summing to 1.

    Returns it as float64, clipped to [0, 1] (within the tolerance). Logits or log-probabilities are refused
    with a message that says so.
    """
    p = _to_numpy(proba)
    if p.ndim != 2:
        raise ValueError(f"proba must be a 2-D (n_examples, n_classes) array, got shape {p.shape}")
    if p.shape[0] == 0 or p.shape[1] == 0:
        raise ValueError(f"proba is empty (shape {p.shape})")
    if p.dtype.kind not in "iuf":
        raise ValueError(f"proba must be numeric, got dtype {p.dtype}")
    p = p.astype(np.float64)
    if not np.all(np.isfinite(p)):
        raise ValueError("proba contains NaN or infinite values")
    if np.any(p < -PROBA_ROW_SUM_ATOL) or np.any(p > 1 + PROBA_ROW_SUM_ATOL):
        raise ValueError("proba values must lie in [0, 1]; did you pass logits or log-probabilities?")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > PROBA_ROW_SUM_ATOL)
    if bad.size:
        raise ValueError(
            f"rows of proba must sum to 1 (tolerance {PROBA_ROW_SUM_ATOL}); row {int(bad[0])} sums to "
            f"{sums[bad[0]]:.6g} ({bad.size} bad row(s)); did you pass logits or unnormalised scores?"
        )
    return np.clip(p, 0.0, 1.0)


def _proba_pair(y_true: Any, proba: Any) -> tuple[np.ndarray, np.ndarray]:
    p = check_proba(proba)
    yt = _as_labels(y_true, "y_true")
    if yt.size != p.shape[0]:
        raise ValueError(f"y_true has {yt.size} labels but proba has {p.shape[0]} rows")
    _check_range(yt, "y_true", p.shape[1])
    return yt, p


def _binned(yt: np.ndarray, p: np.ndarray, n_bins: int) -> dict[str, np.ndarray]:
    if isinstance(n_bins, bool) or not isinstance(n_bins, (int, np.integer)) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    confidence = p.max(axis=1)
    correct = (p.argmax(axis=1) == yt).astype(float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # Right-closed bins (edges[i], edges[i+1]], as in Guo et al. (2017); comparing with the
    # edges themselves avoids the rounding of conf * n_bins at bin boundaries.
    idx = np.searchsorted(edges[1:-1], confidence, side="left")
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=confidence, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.where(count > 0, conf_sum / count, np.nan)
        mean_acc = np.where(count > 0, acc_sum / count, np.nan)
    return {"edges": edges, "confidence": mean_conf, "accuracy": mean_acc, "count": count}


def reliability_bins(y_true: Any, proba: Any, n_bins: int = 15) -> dict[str, np.ndarray]:
    """Per-bin data for a reliability diagram (top-label confidence, equal-width bins).

    Returns ``edges`` (n_bins + 1), and per bin ``confidence`` (mean top-label probability),
    ``accuracy`` (fraction whose argmax equals the label) and ``count``. Bins are
    right-closed ``(edges[i], edges[i+1]]``; empty bins have NaN confidence/accuracy (so a
    plot skips them) and count 0.
    """
    yt, p = _proba_pair(y_true, proba)
    return _binned(yt, p, n_bins)


def expected_calibration_error(y_true: Any, proba: Any, n_bins: int = 15) -> float:
    """Top-label expected calibration error with ``n_bins`` equal-width confidence bins.

    ECE = sum over bins of (count_b / N) * |accuracy_b - confidence_b|, in [0, 1].
    """
    yt, p = _proba_pair(y_true, proba)
    bins = _binned(yt, p, n_bins)
    filled = bins["count"] > 0
    gaps = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float(np.sum(bins["count"][filled] * gaps) / yt.size)


def negative_log_likelihood(y_true: Any, proba: Any, eps: float = 1e-12) -> float:
    """Mean negative log-probability of the true class, with probabilities floored at ``eps``
    so that a confident mistake costs ``-log(eps)`` instead of infinity."""
    yt, p = _proba_pair(y_true, proba)
    picked = p[np.arange(yt.size), yt]
    return float(np.mean(-np.log(np.maximum(picked, eps))))


def brier_score(y_true: Any, proba: Any) -> float:
    """Multiclass Brier score: mean over examples of sum_c (proba_c - onehot_c)^2, in [0, 2]."""
    yt, p = _proba_pair(y_true, proba)
    onehot = np.zeros_like(p)
    onehot[np.arange(yt.size), yt] = 1.0
    return float(np.mean(np.sum((p - onehot) ** 2, axis=1)))


# ---------------------------------------------------------------------------------------
# Selective prediction (the reject option)
# ---------------------------------------------------------------------------------------


def risk_coverage_curve(correct: Any, score: Any) -> dict[str, np.ndarray]:
    """Risk (error rate of the accepted inputs) against coverage as a reject threshold sweeps ``score``.

    ``correct`` ``(N,)`` is True where the prediction is right; on a mixed stream of in- and
    out-of-distribution inputs an out-of-distribution input is never correct, so accepting it counts as an
    error. ``score`` is an outlier/uncertainty score (higher = rejected first). Inputs are accepted from the
    lowest score up, ties together; returns ``coverage``, ``risk`` and ``threshold`` in increasing coverage.
    """
    c = np.asarray(_to_numpy(correct)).reshape(-1).astype(bool)
    s = np.asarray(_to_numpy(score), dtype=float).reshape(-1)
    if len(c) == 0 or c.shape != s.shape:
        raise ValueError(f"correct and score must be non-empty and of one length, got {c.shape} and {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"score contains NaN or inf ({int((~np.isfinite(s)).sum())} of {len(s)} values)")
    order = np.argsort(s, kind="stable")
    s_sorted, errors = s[order], np.cumsum(~c[order])
    ends = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))  # last index of each tie group
    k = ends + 1
    return {"coverage": k / len(c), "risk": errors[ends] / k, "threshold": s_sorted[ends]}


def aurc(correct: Any, score: Any) -> float:
    """Area under the risk-coverage curve (Geifman & El-Yaniv 2018): the mean risk over the coverages
    1/N, 2/N, ..., 1 (ties accepted together count at their group's risk); lower is better."""
    curve = risk_coverage_curve(correct, score)
    sizes = np.diff(np.concatenate([[0.0], curve["coverage"]]))
    return float(np.sum(sizes * curve["risk"]))


def coverage_curve(y_true: Any, proba: Any, uncertainty: Any) -> dict[str, np.ndarray]:
    """Accuracy and ACSA on the accepted examples as a reject threshold sweeps ``uncertainty`` (larger = less certain):
    :func:`risk_coverage_curve` of ``proba``'s argmax, with the per-class view beside it.

    Returns arrays of equal length, in increasing coverage (one point per distinct score; ties accepted together):

    - ``threshold``: accept examples whose score is <= this value;
    - ``coverage``: fraction of examples accepted (the last point is 1);
    - ``accuracy``: accuracy on the accepted examples (1 - the risk);
    - ``acsa``: mean per-class recall on the accepted examples, over the classes that have at least one accepted
      example (a class whose examples are all rejected is left out rather than counted as recall 0).
    """
    yt, p = _proba_pair(y_true, proba)
    s = np.asarray(_to_numpy(uncertainty), dtype=float)
    if s.shape != yt.shape:
        raise ValueError(f"the uncertainty scores have shape {s.shape} but y_true has {yt.size} labels")
    correct = p.argmax(axis=1) == yt
    curve = risk_coverage_curve(correct, s)
    n, c = p.shape
    order = np.argsort(s, kind="stable")
    k = np.rint(curve["coverage"] * n).astype(int)  # the accepted count at each point
    onehot = np.zeros((n, c))
    onehot[np.arange(n), yt[order]] = 1.0
    total_c = np.cumsum(onehot, axis=0)[k - 1]
    correct_c = np.cumsum(onehot * correct[order][:, None], axis=0)[k - 1]
    with np.errstate(invalid="ignore", divide="ignore"):
        recall = np.where(total_c > 0, correct_c / total_c, np.nan)
    return {
        "threshold": curve["threshold"],
        "coverage": curve["coverage"],
        "accuracy": np.cumsum(correct[order])[k - 1] / k,
        "acsa": np.nanmean(recall, axis=1),
    }


def accuracy_at_coverage(correct: Any, score: Any, coverage: float) -> float:
    """Accuracy on the most certain ``coverage`` share of the inputs (e.g. 0.8: the 20% with the highest ``score``
    rejected); ``correct`` and ``score`` as in :func:`risk_coverage_curve`.

    The threshold is the first point of the curve that accepts at least that share, so a tie straddling the cut is
    accepted whole.
    """
    if isinstance(coverage, bool) or not isinstance(coverage, (int, float, np.floating)) or not 0.0 < coverage <= 1.0:
        raise ValueError(f"coverage must lie in (0, 1], got {coverage!r}")
    curve = risk_coverage_curve(correct, score)
    # A tolerance so that 0.8 of 10 inputs (0.8000000000000002 in floats) still stops at 8.
    i = int(np.searchsorted(curve["coverage"], float(coverage) - 1e-12, side="left"))
    return float(1.0 - curve["risk"][i])


# ---------------------------------------------------------------------------------------
# Out-of-distribution detection
# ---------------------------------------------------------------------------------------


def _score_pair(score_in: Any, score_out: Any) -> tuple[np.ndarray, np.ndarray]:
    s_in = np.asarray(_to_numpy(score_in), dtype=float).reshape(-1)
    s_out = np.asarray(_to_numpy(score_out), dtype=float).reshape(-1)
    for name, s in (("score_in", s_in), ("score_out", s_out)):
        if len(s) == 0:
            raise ValueError(f"{name} is empty; OOD metrics need scores of both in- and out-of-distribution inputs")
        if not np.isfinite(s).all():
            raise ValueError(f"{name} contains NaN or inf ({int((~np.isfinite(s)).sum())} of {len(s)} values)")
    return s_in, s_out


def ood_auroc(score_in: Any, score_out: Any) -> float:
    """Area under the ROC curve of telling out-of-distribution inputs from in-distribution ones.

    Scores are *outlier* scores: higher means "more likely out of distribution" (e.g. the negative density,
    the entropy, or 1 - max probability). 0.5 is chance, 1.0 a perfect separation; ties count one half.
    """
    from sklearn.metrics import roc_auc_score

    s_in, s_out = _score_pair(score_in, score_out)
    labels = np.concatenate([np.zeros(len(s_in)), np.ones(len(s_out))])
    return float(roc_auc_score(labels, np.concatenate([s_in, s_out])))


def fpr_at_tpr(score_in: Any, score_out: Any, tpr: float = 0.95) -> float:
    """FPR at ``tpr`` TPR (FPR95 for the default): the share of out-of-distribution inputs still accepted when the
    threshold keeps ``tpr`` of the in-distribution ones (in-distribution is the positive class, as in Liu et al.,
    2020). Scores are outlier scores, as in :func:`ood_auroc`; lower is better.
    """
    if not 0.0 < float(tpr) <= 1.0:
        raise ValueError(f"tpr must lie in (0, 1], got {tpr!r}")
    s_in, s_out = _score_pair(score_in, score_out)
    # Accept an input when its outlier score is <= the tpr-quantile of the in-distribution scores.
    threshold = np.quantile(s_in, float(tpr), method="higher")
    return float(np.mean(s_out <= threshold))


# ---------------------------------------------------------------------------------------
# Comparing two methods over seeds
# ---------------------------------------------------------------------------------------


def paired_difference(a: Any, b: Any) -> dict[str, Any]:
    """Paired comparison of two methods' scores over the same seeds (``a[i]`` and ``b[i]`` share seed i).

    Returns the mean difference ``a - b``, its sample std, a 95% Student-t interval, the two-sided paired
    t-test's p-value (None when fewer than two seeds or every difference is equal), and the seeds ``a``
    wins and loses.
    """
    from scipy import stats

    x, z = np.asarray(_to_numpy(a), dtype=float), np.asarray(_to_numpy(b), dtype=float)
    if x.ndim != 1 or x.shape != z.shape:
        raise ValueError(
            f"paired_difference needs two 1-D score arrays of one length, got shapes {x.shape} and {z.shape}"
        )
    if len(x) == 0:
        raise ValueError("paired_difference needs at least one pair of scores")
    if not (np.isfinite(x).all() and np.isfinite(z).all()):
        raise ValueError("paired_difference: the scores contain NaN or inf")
    diff = x - z
    n = len(diff)
    cell: dict[str, Any] = {
        "mean": float(diff.mean()),
        "wins": int((diff > 0).sum()),
        "losses": int((diff < 0).sum()),
        "n": n,
        "std": None,
        "ci95": None,
        "p_value": None,
    }
    if n > 1:
        sd = float(diff.std(ddof=1))
        half = float(stats.t.ppf(0.975, n - 1)) * sd / np.sqrt(n)
        cell.update(std=sd, ci95=[float(diff.mean()) - half, float(diff.mean()) + half])
        if sd > 0:
            cell["p_value"] = float(stats.ttest_rel(x, z).pvalue)
    return cell


def format_paired(pairs: Mapping[str, Mapping[str, Mapping[str, Any]]]) -> str:
    """Markdown table of :func:`paired_difference` cells, ``{"A - B": {metric: cell}}``, one row per pair and metric.

    The last column counts the seeds where A scores higher and lower than B (for an error metric such as ECE,
    higher is worse)."""
    lines = [
        "| paired difference | metric | mean | 95% CI | p (paired t) | seeds A > B / A < B of n |",
        "|---|---|---|---|---|---|",
    ]
    for pair, cells in pairs.items():
        for metric, c in cells.items():
            ci = f"[{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]" if c["ci95"] else "—"
            p = f"{c['p_value']:.3f}" if c["p_value"] is not None else "—"
            lines.append(
                f"| {pair} | {metric} | {c['mean']:+.4f} | {ci} | {p} | {c['wins']} / {c['losses']} of {c['n']} |"
            )
    return "\n".join(lines) + "\n"
