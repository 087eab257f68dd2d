"""Warnings that name the user's line: the first caller outside the package, however deep the call."""

from __future__ import annotations

import os
import warnings

__all__ = ["PACKAGE_DIR", "warn_caller"]

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def warn_caller(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` attributed to the first frame outside ``dgc_pyro`` (the caller of fit, predict, ...).

    A fixed ``stacklevel`` breaks whenever the loop gains or loses a frame; skipping the package's files does not.
    """
    warnings.warn(message, category, skip_file_prefixes=(PACKAGE_DIR,))
