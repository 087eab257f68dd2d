"""Validation of user-supplied features and labels.

This module is the single place where arrays coming from users (Python API, CLI, files) are
checked. Every problem is reported as a ``ValueError`` whose message names the argument and the
problem, so that callers never see a shape or dtype error from deep inside a torch model.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

__all__ = ["check_features", "check_labels", "check_xy", "missing_classes"]


def _to_tensor(value: Any, name: str) -> torch.Tensor:
    """Turn an array-like into a tensor without copying more than needed, rejecting non-numbers."""
    if isinstance(value, torch.Tensor):
        t = value.detach()
        if t.is_complex():
            raise ValueError(f"{name} must be real-valued, got complex dtype {t.dtype}")
        return t
    try:
        arr = np.asarray(value)
    except (ValueError, TypeError) as e:
        # Ragged nested lists end up here with numpy's own wording; name the argument.
        raise ValueError(f"{name} could not be converted to a numeric array: {e}") from None
    if arr.dtype.kind not in "biuf":
        raise ValueError(f"{name} must be numeric (bool, int or float), got non-numeric dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize > 1:
        # Checked before the cast: uint64 values >= 2**63 would wrap around to negative int64 values.
        if arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ValueError(
                f"{name} holds uint64 values up to {int(arr.max())}, beyond the int64 range (max 2**63 - 1); "
                "labels must be class indices 0..K-1 and features floats in [0, 1]"
            )
        # torch has only partial support for uint16/32/64; int64 holds every value we accept anyway.
        arr = arr.astype(np.int64)
    # ascontiguousarray would turn a 0-d array into 1-d, hiding scalar input from the checks.
    return torch.from_numpy(arr if arr.flags.c_contiguous else np.ascontiguousarray(arr))


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def check_features(x: Any, *, input_shape: tuple[int, ...] | None = None, name: str = "x") -> torch.Tensor:
    """Validate image/feature data and return it as a float32 tensor of shape (n, *input_shape).

    Values must be finite and lie in [0, 1] (the decoders end in a sigmoid). Integer pixel data
    (0..255) is rejected rather than silently rescaled, so a forgotten ``/ 255`` is visible.
    """
    t = _to_tensor(x, name)
    if t.ndim == 0:
        raise ValueError(f"{name} must be an array of examples with a leading batch dimension, got a scalar")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); at least one example is needed")
    if t.ndim < 2:
        raise ValueError(
            f"{name} must have shape (n_examples, ...features), got a 1-D array of shape {tuple(t.shape)}; "
            "for a single example add a leading batch dimension"
        )

    if input_shape is not None:
        expected = tuple(int(d) for d in input_shape)
        got = tuple(t.shape[1:])
        if got != expected:
            hint = ""
            if tuple(t.shape) == expected:
                hint = "; this looks like a single example: add a leading batch dimension"
            elif len(got) == 3 and len(expected) == 3 and got == (expected[1], expected[2], expected[0]):
                hint = "; this looks like channels-last (n, H, W, C) data: permute it to (n, C, H, W)"
            elif len(expected) == 3 and expected[0] == 1 and got == expected[1:]:
                hint = "; add the channel dimension, e.g. x[:, None]"
            elif int(np.prod(got)) == int(np.prod(expected)):
                hint = f"; reshape it to (n, {', '.join(map(str, expected))})"
            raise ValueError(
                f"{name} has the wrong shape: expected (n, {', '.join(map(str, expected))}), got {tuple(t.shape)}{hint}"
            )

    if t.dtype == torch.bool:
        return t.to(torch.float32)

    if t.is_floating_point():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            n_nan = int(torch.isnan(t).sum())
            n_inf = int(torch.isinf(t).sum())
            raise ValueError(
                f"{name} contains non-finite values: {n_nan} NaN and {n_inf} infinite "
                f"(out of {t.numel()} values); remove or impute them"
            )

    lo, hi = float(t.min()), float(t.max())
    if lo < 0.0 or hi > 1.0:
        if not t.is_floating_point():
            raise ValueError(
                f"{name} holds integer values in [{_fmt(lo)}, {_fmt(hi)}] (dtype {t.dtype}); "
                "features must be floats scaled to [0, 1]: divide 8-bit pixel values by 255, "
                "e.g. x.astype('float32') / 255"
            )
        hint = ""
        if lo >= 0.0 and hi <= 255.0:
            hint = "; if these are 8-bit pixel values, divide by 255"
        raise ValueError(
            f"{name} has values outside [0, 1]: min={_fmt(lo)}, max={_fmt(hi)}; features must be scaled to [0, 1]{hint}"
        )
    return t.to(torch.float32)


def check_labels(y: Any, *, num_classes: int | None = None, name: str = "y") -> torch.Tensor:
    """Validate class labels and return them as a 1-D int64 CPU tensor with values in [0, num_classes).

    Float labels are accepted when every value is a whole number (e.g. labels read from CSV). Labels on a
    GPU come back on the CPU: they are small, and the splits, class counts and metrics use them with NumPy.
    """
    if num_classes is not None:
        if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
        num_classes = int(num_classes)
    t = _to_tensor(y, name)
    if t.ndim != 1:
        hint = ""
        if t.ndim == 2 and t.shape[1] == 1:
            hint = "; flatten it, e.g. y.ravel() or y[:, 0]"
        elif t.ndim == 2 and t.shape[1] > 1:
            hint = "; if these are one-hot rows, convert them with y.argmax(1)"
        raise ValueError(f"{name} must be a 1-D array of class indices, got {t.ndim}-D shape {tuple(t.shape)}{hint}")
    if t.numel() == 0:
        raise ValueError(f"{name} is empty; at least one label is needed")

    if t.is_floating_point():
        finite = torch.isfinite(t)
        if not bool(finite.all()):
            raise ValueError(f"{name} contains {int((~finite).sum())} NaN or infinite values; labels must be integers")
        frac = t != torch.round(t)
        if bool(frac.any()):
            bad = t[frac][:3].tolist()
            raise ValueError(
                f"{name} contains {int(frac.sum())} non-integer values (e.g. {', '.join(_fmt(v) for v in bad)}); "
                "labels must be whole-number class indices 0..K-1"
            )
    t = t.to(device="cpu", dtype=torch.int64)

    if bool((t < 0).any()):
        raise ValueError(
            f"{name} contains {int((t < 0).sum())} negative labels (min {int(t.min())}); "
            "labels must be class indices 0..K-1"
        )
    if num_classes is not None and bool((t >= num_classes).any()):
        raise ValueError(
            f"{name} contains {int((t >= num_classes).sum())} labels >= num_classes={num_classes} "
            f"(max {int(t.max())}); labels must lie in 0..{num_classes - 1}"
        )
    return t


REMAP_HINT = (
    "if the labels are arbitrary codes rather than class indices 0..K-1, remap them first, "
    "e.g. classes, y = np.unique(y, return_inverse=True)"
)


def missing_classes(labels: torch.Tensor, num_classes: int, limit: int = 10) -> tuple[list[int], int]:
    """The first ``limit`` classes of ``range(num_classes)`` absent from ``labels``, and how many are absent.

    Costs O(len(labels)) whatever ``num_classes`` is, so a huge class count never allocates or loops
    over its range.
    """
    present = torch.unique(labels)
    present = present[(present >= 0) & (present < num_classes)]
    absent = num_classes - int(present.numel())
    # Among the first len(present) + limit indices at least `limit` are absent (when that many are).
    window = min(num_classes, int(present.numel()) + limit)
    seen = set(present[present < window].tolist())
    first = [c for c in range(window) if c not in seen][:limit]
    return first, absent


def check_xy(
    x: Any,
    y: Any,
    *,
    input_shape: tuple[int, ...] | None = None,
    num_classes: int | None = None,
    require_all_classes: bool = False,
    names: tuple[str, str] = ("x", "y"),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate a (features, labels) pair: each on its own, their lengths, and class coverage.

    With ``require_all_classes`` every class in ``range(num_classes)`` (or ``0..max(y)`` when
    ``num_classes`` is None) must have at least one example; when ``num_classes`` is None, labels
    implying more classes than there are examples are refused with a hint to remap them.
    ``names`` are the argument names used in error messages.
    """
    x_name, y_name = names
    xt = check_features(x, input_shape=input_shape, name=x_name)
    yt = check_labels(y, num_classes=num_classes, name=y_name)
    if xt.shape[0] != yt.shape[0]:
        raise ValueError(
            f"{x_name} and {y_name} have different lengths: {x_name} has {xt.shape[0]} examples, "
            f"{y_name} has {yt.shape[0]} labels"
        )
    present = torch.unique(yt)
    if present.numel() < 2:
        raise ValueError(
            f"{y_name} contains only one distinct class ({int(present[0])}); classification needs at least two classes"
        )
    if require_all_classes:
        n = int(yt.numel())
        if num_classes is None:
            top = int(present[-1])
            if top + 1 > n:
                raise ValueError(
                    f"{y_name} has labels up to {top}, which imply {top + 1} classes, but only {n} examples, so not "
                    f"every class can have one; {REMAP_HINT}"
                )
        k = num_classes if num_classes is not None else int(present[-1]) + 1
        first, absent = missing_classes(yt, k)
        if absent:
            listed = str(first)
            if absent > len(first):
                listed = f"[{', '.join(map(str, first))}, ...] ({absent} in all)"
            raise ValueError(
                f"classes {listed} have no examples in {y_name} "
                f"(expected every class in 0..{k - 1} to appear at least once)"
            )
    return xt, yt
