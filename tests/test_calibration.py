"""Temperature scaling (dgc_pyro.calibration, re-exported by dgc_pyro.diagnostics)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgc_pyro import diagnostics as dg
from dgc_pyro.calibration import TEMPERATURE_BOUNDS, apply_temperature, temperature_scale
from dgc_pyro.metrics import expected_calibration_error, negative_log_likelihood


def _tempered_sample(true_t: float, n: int = 4000, c: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose labels are drawn from softmax(logits / true_t): the NLL-optimal temperature is about true_t."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 3.0, size=(n, c))
    p = np.exp(logits / true_t)
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(c, p=row) for row in p])
    return logits, y


@pytest.mark.parametrize("true_t", [0.5, 1.0, 2.5])
def test_recovers_the_temperature_that_generated_the_labels(true_t):
    logits, y = _tempered_sample(true_t)
    t = temperature_scale(logits, y)
    assert t == pytest.approx(true_t, rel=0.1)
    # The fitted T is a minimum of the NLL: both neighbours are worse.
    nll = lambda tt: negative_log_likelihood(y, apply_temperature(logits, tt))
    assert nll(t) <= min(nll(t * 1.05), nll(t / 1.05))


def test_calibrating_an_over_confident_model_lowers_ece_and_keeps_the_argmax():
    logits, y = _tempered_sample(3.0, seed=1)  # the model's logits are 3x too sharp
    t = temperature_scale(logits[:2000], y[:2000])  # fitted on one half, checked on the other
    raw = torch.softmax(torch.as_tensor(logits[2000:]), -1)
    cal = apply_temperature(logits[2000:], t)
    assert t > 1.0
    assert expected_calibration_error(y[2000:], cal) < expected_calibration_error(y[2000:], raw) / 2
    assert torch.equal(cal.argmax(-1), raw.argmax(-1))


def test_log_probabilities_give_the_temperature_of_their_logits():
    logits, y = _tempered_sample(0.7, n=500, seed=2)
    log_p = torch.log_softmax(torch.as_tensor(logits), -1)
    assert temperature_scale(log_p, y) == pytest.approx(temperature_scale(logits, y), rel=1e-6)
    assert torch.allclose(apply_temperature(log_p, 0.7), apply_temperature(logits, 0.7), atol=1e-6)


def test_a_zero_probability_is_floored_not_infinite():
    proba = torch.tensor([[1.0, 0.0], [0.2, 0.8], [0.9, 0.1]])
    t = temperature_scale(proba.log(), [1, 1, 0])  # the first label has probability 0
    assert TEMPERATURE_BOUNDS[0] <= t <= TEMPERATURE_BOUNDS[1]
    assert torch.isfinite(apply_temperature(proba.log(), t)).all()


def test_a_perfectly_separated_set_ends_at_the_lower_bound():
    logits = np.array([[2.0, 0.0], [0.0, 2.0], [3.0, 1.0]])
    assert temperature_scale(logits, [0, 1, 0]) == pytest.approx(TEMPERATURE_BOUNDS[0], rel=1e-3)


def test_diagnostics_re_exports_the_calibration_functions():
    assert dg.temperature_scale is temperature_scale and dg.apply_temperature is apply_temperature


@pytest.mark.parametrize(
    "scores, labels, match",
    [
        (np.zeros((3,)), [0, 1, 0], r"\(N, C\) matrix"),
        (np.zeros((3, 1)), [0, 0, 0], r"C >= 2 classes"),
        (np.zeros((0, 2)), [], r"N >= 1"),
        (np.array([[0.0, np.nan], [0.0, 1.0]]), [0, 1], "NaN or \\+inf"),
        (np.array([[-np.inf, -np.inf], [0.0, 1.0]]), [0, 1], "-inf everywhere"),
        (np.zeros((2, 2)), [0, 1, 1], "one per row"),
        (np.zeros((2, 2)), [0, 2], r"outside \[0, 2\)"),
        (np.zeros((2, 2)), [0.5, 1], "integer class labels"),
        (np.array([["a", "b"], ["c", "d"]]), [0, 1], "real numbers"),
    ],
)
def test_bad_input_is_named(scores, labels, match):
    with pytest.raises(ValueError, match=match):
        temperature_scale(scores, labels)


@pytest.mark.parametrize("t", [0, -1.0, float("inf"), float("nan"), True, "2"])
def test_apply_refuses_a_bad_temperature(t):
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        apply_temperature(np.zeros((2, 3)), t)
