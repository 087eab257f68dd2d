"""The shared scalar-argument checks (``dgc_pyro.arguments``) that fit, fit_baseline and the CLI rely on."""

from __future__ import annotations

import math

import numpy as np
import pytest

from dgc_pyro.arguments import check_betas, check_fraction, check_non_negative, check_positive, check_seed


@pytest.mark.parametrize("value", [1, 3, np.int64(5), 0.5, np.float32(2.0), 1e-9])
def test_check_positive_accepts_positive_numbers(value):
    check_positive("lr", value)


@pytest.mark.parametrize(
    ("value", "integer", "message"),
    [
        (0, False, "lr must be positive and finite, got 0"),
        (-1e-3, False, "lr must be positive and finite, got -0.001"),
        (math.inf, False, "lr must be positive and finite, got inf"),
        (math.nan, False, "lr must be positive and finite, got nan"),
        (True, False, "lr must be a positive number, got True"),  # a bool is not a count
        ("1e-3", False, "lr must be a positive number, got '1e-3'"),
        (None, True, "lr must be a positive integer, got None"),
        (2.0, True, "lr must be an integer, got 2.0"),
        (np.float64(3), True, "lr must be an integer, got"),
    ],
)
def test_check_positive_names_the_problem(value, integer, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        check_positive("lr", value, integer=integer)


def test_check_non_negative_allows_zero_and_refuses_negatives():
    check_non_negative("rate", 0.0)
    check_non_negative("steps", 0, integer=True)
    check_non_negative("steps", np.int32(7), integer=True)
    with pytest.raises(ValueError, match="rate must be a finite number >= 0, got -1"):
        check_non_negative("rate", -1)
    with pytest.raises(ValueError, match="rate must be a finite number >= 0, got inf"):
        check_non_negative("rate", math.inf)
    with pytest.raises(ValueError, match="steps must be a non-negative integer, got 1.5"):
        check_non_negative("steps", 1.5, integer=True)
    with pytest.raises(ValueError, match="steps must be a non-negative integer, got False"):
        check_non_negative("steps", False, integer=True)


def test_check_seed():
    check_seed(0)
    check_seed(np.uint32(2**32 - 1))
    for bad in (-1, 1.0, "1", None, True):
        with pytest.raises(ValueError, match="seed must be a non-negative integer"):
            check_seed(bad)


@pytest.mark.parametrize("value", [0, 0.0, 0.1, 0.999])
def test_check_fraction_accepts_the_half_open_unit_interval(value):
    check_fraction("val_fraction", value)


@pytest.mark.parametrize("value", [1, 1.0, -0.1, math.nan, "0.1", None, True])
def test_check_fraction_refuses_everything_else(value):
    with pytest.raises(ValueError, match=r"val_fraction must be in \[0, 1\), got"):
        check_fraction("val_fraction", value)


def test_check_betas():
    check_betas((0.5, 0.999))
    check_betas([0, 0])
    for bad in ((0.9,), (0.9, 1.0), (-0.1, 0.9), "ab", None, (0.9, 0.99, 0.1)):
        with pytest.raises(ValueError, match=r"betas must be two numbers in \[0, 1\)"):
            check_betas(bad)
