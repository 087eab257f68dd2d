"""Checks of scalar arguments shared by the training entry points (``fit``, ``fit_baseline``, augmentation).

Each raises ``ValueError`` with a message that names the argument and the value it got, before any work
starts, instead of letting a bad number surface later as a ``ZeroDivisionError`` or a silent no-op.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_betas", "check_fraction", "check_non_negative", "check_positive", "check_seed"]


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def _is_integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, np.integer))


def check_positive(name: str, value: Any, integer: bool = False) -> None:
    """``value`` must be a finite number > 0 (an integer when ``integer``)."""
    if not _is_number(value):
        raise ValueError(f"{name} must be a {'positive integer' if integer else 'positive number'}, got {value!r}")
    if integer and not _is_integer(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not value > 0 or not math.isfinite(value):
        raise ValueError(f"{name} must be positive and finite, got {value!r}")


def check_non_negative(name: str, value: Any, integer: bool = False) -> None:
    """``value`` must be a finite number >= 0 (an integer when ``integer``)."""
    if integer:
        if not _is_integer(value) or value < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    elif not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def check_seed(seed: Any) -> None:
    """A seed is a non-negative integer."""
    check_non_negative("seed", seed, integer=True)


def check_fraction(name: str, value: Any) -> None:
    """``value`` must be a number in [0, 1) (a held-out share: 0 means none, 1 would leave nothing to train on)."""
    if not _is_number(value) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value!r}")


def check_betas(betas: Any) -> None:
    """Adam's ``betas``: two numbers in [0, 1)."""
    try:
        b1, b2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}") from None
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
