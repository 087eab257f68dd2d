"""The paper's imbalance protocol (DGC, CVPR 2020, Table 1).

Shuffle the official training split with the seed, take the first ``n_c`` images of class ``c``,
shuffle again. The seed therefore selects one of the random imbalanced subsets over which the
paper averages its results.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..arguments import check_positive, check_seed
from .validation import check_labels

__all__ = ["DIGITS_COUNTS", "PAPER_COUNTS", "dev_indices", "imbalanced_indices", "parse_counts"]

_MNIST_COUNTS = (4000, 2000, 1000, 750, 500, 350, 200, 100, 60, 40)

#: Per-class training counts of paper Table 1 (index = class index).
PAPER_COUNTS: dict[str, tuple[int, ...]] = {
    "mnist": _MNIST_COUNTS,
    "fashion": _MNIST_COUNTS,
    "svhn": (4500, 2000, 1000, 800, 600, 500, 400, 250, 150, 80),
    # Blond_Hair, Black_Hair, Bald, Brown_Hair, Gray_Hair
    "celeba": (15000, 1500, 750, 300, 150),
}

#: Imbalanced counts (ratio 12) for sklearn's digits, the small offline demo dataset. Digits has
#: 174..183 images a class; 50 a class are held out for testing, so at most 124 remain (class 8).
DIGITS_COUNTS: tuple[int, ...] = (120, 90, 70, 52, 40, 30, 22, 17, 13, 10)


def _counts_to_dict(counts: Sequence[int] | Mapping[int, int]) -> dict[int, int]:
    if isinstance(counts, Mapping):
        items = list(counts.items())
    elif isinstance(counts, (str, bytes)):
        raise ValueError(
            "counts must be a sequence of integers or a {class: count} dict; use parse_counts() for strings"
        )
    else:
        try:
            items = list(enumerate(counts))
        except TypeError:
            raise ValueError(
                f"counts must be a sequence of integers or a {{class: count}} dict, got {counts!r}"
            ) from None
    out: dict[int, int] = {}
    for c, n in items:
        for what, v in (("class", c), ("count", n)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise ValueError(f"counts: {what} {v!r} is not an integer")
        if c < 0:
            raise ValueError(f"counts: class {c} is negative")
        if n < 0:
            raise ValueError(f"counts: class {c} has a negative count ({n})")
        out[int(c)] = int(n)
    if not out:
        raise ValueError("counts is empty")
    return out


def imbalanced_indices(labels: Any, counts: Sequence[int] | Mapping[int, int], seed: Any) -> np.ndarray:
    """Indices of an imbalanced subset: ``counts[c]`` random examples of each class ``c``.

    Exactly the paper's protocol: ``rng = np.random.default_rng(seed)``; permute all indices; for
    each class (in increasing class order) take the first ``counts[c]`` permuted indices whose
    label is ``c``; concatenate and shuffle again with the same ``rng``. Classes missing from
    ``counts`` get no examples. Returns an int64 array of unique indices into ``labels``.
    """
    y = check_labels(labels, name="labels").numpy()
    wanted = _counts_to_dict(counts)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(y))
    permuted = y[perm]
    parts = []
    for c in sorted(wanted):
        pool = perm[permuted == c]
        if wanted[c] > len(pool):
            raise ValueError(f"class {c}: requested {wanted[c]} examples but only {len(pool)} are available")
        parts.append(pool[: wanted[c]])
    out = np.concatenate(parts).astype(np.int64)
    rng.shuffle(out)
    return out


def dev_indices(labels: Any, exclude: Any, per_class: int, seed: int) -> np.ndarray:
    """A class-balanced development set: ``per_class`` random examples of each class, none of them in ``exclude``.

    The paper's subsets use a small part of each official training split (9,000 of Fashion-MNIST's 60,000
    images). The rest are labelled images that no model of that subset sees, so they can score recipe choices
    without touching the test split, and with far less noise than the validation split carved from the subset
    (whose rarest classes hold 4-10 images). Draws come from ``np.random.default_rng([seed, 1])``, so the dev
    set of a subset is fixed by the subset's seed. Returns sorted int64 indices into ``labels``.
    """
    y = check_labels(labels, name="labels").numpy()
    check_positive("per_class", per_class, integer=True)
    check_seed(seed)
    used = np.zeros(len(y), dtype=bool)
    used[np.asarray(exclude, dtype=np.int64)] = True
    rng = np.random.default_rng([int(seed), 1])
    parts = []
    for c in np.unique(y):
        pool = np.flatnonzero((y == c) & ~used)
        if len(pool) < per_class:
            raise ValueError(
                f"class {c}: a dev set of {per_class} a class needs {per_class} unused training examples, "
                f"but only {len(pool)} are left outside the subset; ask for at most {len(pool)} a class"
            )
        parts.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(parts)).astype(np.int64)


def parse_counts(text: str) -> tuple[int, ...]:
    """Parse per-class counts from a CLI string such as ``"4000,2000,1000"`` (commas and/or spaces)."""
    if not isinstance(text, str):
        raise ValueError(f"counts must be given as a string like '4000,2000,1000', got {text!r}")
    tokens = [t for t in re.split(r"[,\s]+", text.strip()) if t]
    if not tokens:
        raise ValueError("counts is empty; give one count per class, e.g. '4000,2000,1000'")
    if re.search(r",\s*,", text) or text.strip().startswith(","):
        raise ValueError(f"counts {text!r} has an empty entry; give one integer per class, e.g. '4000,2000,1000'")
    out = []
    for i, tok in enumerate(tokens):
        try:
            n = int(tok)
        except ValueError:
            raise ValueError(f"counts entry {i} ({tok!r}) is not an integer; expected e.g. '4000,2000,1000'") from None
        if n < 0:
            raise ValueError(f"counts entry {i} ({n}) is negative; counts must be >= 0")
        out.append(n)
    if len(out) < 2:
        raise ValueError(f"counts {text!r} lists {len(out)} class; a classifier needs at least two classes")
    return tuple(out)
