"""Train/test splits: the paper's imbalanced subsets, user arrays, and stratified hold-outs."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .protocol import dev_indices, imbalanced_indices
from .sources import default_counts, open_source
from .validation import REMAP_HINT, check_features, check_labels, check_xy

__all__ = ["ImbalancedSplit", "load_imbalanced", "split_from_arrays", "stratified_holdout"]

#: What :func:`load_imbalanced` puts in the split's test slot: the official test split, or a dev set of unused
#: training images.
EVALUATION_SETS = ("test", "dev")

#: Fraction of the data carved out as test set by :func:`split_from_arrays` when no test arrays are given.
DEFAULT_TEST_FRACTION = 0.2


@dataclass
class ImbalancedSplit:
    """An imbalanced training set and its test set, ready for a model.

    ``x_*`` are float32 tensors (n, *input_shape) in [0, 1]; ``y_*`` are int64 class indices.
    """

    name: str
    x_train: torch.Tensor = field(repr=False)
    y_train: torch.Tensor = field(repr=False)
    x_test: torch.Tensor = field(repr=False)
    y_test: torch.Tensor = field(repr=False)
    class_names: list[str]
    num_classes: int
    input_shape: tuple[int, ...]

    @property
    def train_counts(self) -> np.ndarray:
        """Number of training examples per class (length ``num_classes``)."""
        return np.bincount(self.y_train.cpu().numpy(), minlength=self.num_classes)

    @property
    def test_counts(self) -> np.ndarray:
        """Number of test examples per class (length ``num_classes``)."""
        return np.bincount(self.y_test.cpu().numpy(), minlength=self.num_classes)

    @property
    def imbalance_ratio(self) -> float:
        """Largest over smallest training class size (inf if a class is empty)."""
        c = self.train_counts
        return float(c.max() / c.min()) if c.min() > 0 else float("inf")


def _resolve_counts(name: str, counts: Sequence[int] | Mapping[int, int] | None, num_classes: int) -> dict[int, int]:
    if counts is None:
        counts = default_counts(name)
    if isinstance(counts, Mapping):
        resolved = {int(c): n for c, n in counts.items()}
    elif isinstance(counts, (str, bytes)):
        raise ValueError("counts must be a sequence of integers; use parse_counts() for strings like '40,20,10'")
    else:
        resolved = dict(enumerate(counts))
    if len(resolved) != num_classes or set(resolved) != set(range(num_classes)):
        raise ValueError(
            f"counts must give one count for each of the {num_classes} classes of {name}, got {len(resolved)} entries"
        )
    # Every class appears in the test set, so each must be seen in training.
    zero = [c for c, n in sorted(resolved.items()) if isinstance(n, (int, np.integer)) and n < 1]
    if zero:
        raise ValueError(f"counts must be >= 1 for every class; classes {zero} have {[resolved[c] for c in zero]}")
    return resolved


def load_imbalanced(
    name: str = "digits",
    root: str | os.PathLike[str] | None = None,
    *,
    counts: Sequence[int] | Mapping[int, int] | None = None,
    seed: int = 0,
    download: bool = False,
    evaluate_on: str = "test",
    dev_per_class: int = 1000,
) -> ImbalancedSplit:
    """Load the paper's imbalanced training subset of ``name`` and its full official test split.

    ``counts`` defaults to :func:`~dgc_pyro.data.sources.default_counts`; ``seed`` selects
    the random subset exactly as in :func:`imbalanced_indices`. Only the selected training images
    are decoded.

    ``evaluate_on="dev"`` puts a class-balanced development set in place of the test split:
    ``dev_per_class`` official training images of each class that the subset left out
    (:func:`~dgc_pyro.data.protocol.dev_indices`). Recipe choices scored on it never see the test split.
    """
    if evaluate_on not in EVALUATION_SETS:
        raise ValueError(f"evaluate_on must be one of {EVALUATION_SETS}, got {evaluate_on!r}")
    train_src = open_source(name, root, split="train", download=download)
    wanted = _resolve_counts(train_src.name, counts, train_src.num_classes)
    idx = imbalanced_indices(train_src.labels, wanted, seed)
    if evaluate_on == "dev":
        held = dev_indices(train_src.labels, idx, dev_per_class, seed)
        x_test, y_test = train_src.images(held), torch.from_numpy(train_src.labels[held].copy())
    else:
        test_src = open_source(name, root, split="test", download=download)
        x_test, y_test = test_src.images(), torch.from_numpy(test_src.labels.copy())
    return ImbalancedSplit(
        name=train_src.name,
        x_train=train_src.images(idx),
        y_train=torch.from_numpy(train_src.labels[idx].copy()),
        x_test=x_test,
        y_test=y_test,
        class_names=list(train_src.class_names),
        num_classes=train_src.num_classes,
        input_shape=train_src.input_shape,
    )


def stratified_holdout(y: Any, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (train, holdout) with about ``fraction`` of each class held out.

    Per class with ``n`` examples, ``round(fraction * n)`` go to the holdout, clipped so that at
    least one stays in train and, when ``n >= 2``, at least one is held out. Rare classes would
    otherwise vanish from one side, which breaks per-class metrics such as ACSA on the holdout.
    Both index arrays are sorted int64.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be a number strictly between 0 and 1, got {fraction!r}")
    labels = check_labels(y, name="y").numpy()
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = len(members)
        k = int(np.floor(fraction * n + 0.5))
        k = min(max(k, 1 if n >= 2 else 0), n - 1)
        if k:
            held.append(rng.choice(members, size=k, replace=False))
    holdout = np.sort(np.concatenate(held)).astype(np.int64) if held else np.zeros(0, dtype=np.int64)
    train = np.setdiff1d(np.arange(len(labels), dtype=np.int64), holdout).astype(np.int64)
    return train, holdout


def _refuse_channels_last(x: torch.Tensor, name: str) -> None:
    """Images must be (n, C, H, W) with C = 1 or 3; (n, H, W, C) would silently become C = H channels of W x C
    images (the same channels-last hint as :func:`check_features` gives when the shape is known)."""
    if x.ndim == 4 and x.shape[3] in (1, 3) and x.shape[1] not in (1, 3):
        shape = tuple(x.shape)
        raise ValueError(
            f"{name} has shape {shape}, which looks like channels-last (n, H, W, C) images; store them as "
            f"(n, C, H, W) = (n, {shape[3]}, {shape[1]}, {shape[2]}), e.g. {name}.transpose(0, 3, 1, 2)"
        )


def split_from_arrays(
    x_train: Any,
    y_train: Any,
    x_test: Any = None,
    y_test: Any = None,
    *,
    name: str = "arrays",
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
) -> ImbalancedSplit:
    """Build an :class:`ImbalancedSplit` from user arrays, validating them.

    Images are ``(n, C, H, W)``; 4-D arrays that look channels-last, ``(n, H, W, C)`` with C = 1 or 3, are
    refused with the transpose that fixes them.

    Without test arrays a stratified 20% test set is carved from the training arrays with
    :func:`stratified_holdout` (seed 0); classes with a single example then stay in training only.
    ``num_classes`` defaults to ``max label + 1`` over train and test labels; every class must
    have at least one training example, so labels implying more classes than there are training
    labels are refused (remap arbitrary label codes to 0..K-1 first, e.g. with ``np.unique``).
    """
    if (x_test is None) != (y_test is None):
        raise ValueError(
            "give both x_test and y_test, or neither (a stratified 20% test set is then carved from the training data)"
        )
    xt = check_features(x_train, name="x_train")
    _refuse_channels_last(xt, "x_train")
    yt = check_labels(y_train, name="y_train")
    yte = check_labels(y_test, name="y_test") if y_test is not None else None
    if num_classes is None:
        tops = {"y_train": int(yt.max())}
        if yte is not None:
            tops["y_test"] = int(yte.max())
        which = max(tops, key=tops.__getitem__)
        num_classes = tops[which] + 1
        # Every class needs a training example, so more classes than training labels cannot be right; checked
        # before anything is sized by num_classes (a label of 10**12 would otherwise allocate terabytes).
        if num_classes > len(yt):
            raise ValueError(
                f"{which} has labels up to {tops[which]}, which imply {num_classes} classes, but y_train has only "
                f"{len(yt)} labels, so not every class can have a training example; {REMAP_HINT}"
            )
    x, y = check_xy(xt, yt, num_classes=num_classes, require_all_classes=True, names=("x_train", "y_train"))
    input_shape = tuple(x.shape[1:])
    if x_test is None:
        tr, te = stratified_holdout(y, DEFAULT_TEST_FRACTION, seed=0)
        if len(te) == 0:
            raise ValueError(
                f"x_train and y_train are too small to split: each of the {num_classes} classes has a single "
                f"example, so no test set can be carved from them; carving one needs at least 2 examples of a class, "
                f"and 3 of every class so that each class is in the training, validation and test sets "
                f"({3 * num_classes} examples); add examples, or give x_test and y_test"
            )
        x_te, y_te = x[torch.from_numpy(te)], y[torch.from_numpy(te)]
        x, y = x[torch.from_numpy(tr)], y[torch.from_numpy(tr)]
    else:
        # The test set may hold any subset of the classes, so check_xy's class checks do not apply.
        x_te = check_features(x_test, input_shape=input_shape, name="x_test")
        y_te = check_labels(yte, num_classes=num_classes, name="y_test")
        if len(x_te) != len(y_te):
            raise ValueError(f"x_test and y_test have different lengths: {len(x_te)} examples, {len(y_te)} labels")
    if class_names is None:
        class_names = [str(c) for c in range(num_classes)]
    elif len(class_names) != num_classes:
        raise ValueError(f"class_names has {len(class_names)} entries but there are {num_classes} classes")
    return ImbalancedSplit(
        name=name,
        x_train=x,
        y_train=y,
        x_test=x_te,
        y_test=y_te,
        class_names=[str(c) for c in class_names],
        num_classes=int(num_classes),
        input_shape=input_shape,
    )
