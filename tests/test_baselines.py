"""Baselines on DGC's backbone: each loss against its paper's formula, and tiny fits on digits."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from dgc_pyro.baselines import (
    BASELINE_LOSSES,
    BASELINES,
    balanced_softmax_loss,
    baseline_loss,
    cb_focal_loss,
    class_balanced_weights,
    fit_baseline,
    ldam_loss,
    ldam_margins,
    logit_adjusted_loss,
)
from dgc_pyro.metrics import imbalance_report

COUNTS = torch.tensor([400.0, 100.0, 25.0, 4.0])


pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(n: int = 16, c: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, generator=g), torch.randint(0, c, (n,), generator=g)


def test_logit_adjusted_is_ce_on_logits_plus_log_prior():
    logits, y = _batch()
    prior = COUNTS / COUNTS.sum()
    expected = F.cross_entropy(logits + prior.log(), y)
    assert logit_adjusted_loss(logits, y, prior).item() == pytest.approx(expected.item(), rel=1e-6)
    assert baseline_loss("logit_adjusted", logits, y, COUNTS).item() == pytest.approx(expected.item(), rel=1e-6)
    # tau scales the adjustment
    expected2 = F.cross_entropy(logits + 2.0 * prior.log(), y)
    assert logit_adjusted_loss(logits, y, prior, tau=2.0).item() == pytest.approx(expected2.item(), rel=1e-6)


def test_balanced_softmax_is_ce_on_logits_plus_log_counts():
    logits, y = _batch(seed=1)
    expected = F.cross_entropy(logits + COUNTS.log(), y)
    assert balanced_softmax_loss(logits, y, COUNTS).item() == pytest.approx(expected.item(), rel=1e-6)
    assert baseline_loss("balanced_softmax", logits, y, COUNTS).item() == pytest.approx(expected.item(), rel=1e-6)
    # log n and log prior differ by a constant, which softmax ignores: balanced softmax = logit adjustment (tau 1)
    assert expected.item() == pytest.approx(logit_adjusted_loss(logits, y, COUNTS / COUNTS.sum()).item(), rel=1e-5)


def test_ldam_margins_largest_for_the_smallest_class():
    m = ldam_margins(COUNTS)
    assert m.max().item() == pytest.approx(0.5)
    assert m.argmax().item() == COUNTS.argmin().item()
    # Delta_c proportional to n_c^(-1/4)
    ratio = m * COUNTS**0.25
    assert torch.allclose(ratio, ratio[0].expand_as(ratio))
    assert torch.all(m[:-1] < m[1:])


def test_ldam_loss_formula_and_drw_weights():
    cos, y = _batch(seed=2)
    cos = torch.tanh(cos)
    m = ldam_margins(COUNTS)
    adjusted = cos.clone()
    adjusted[torch.arange(len(y)), y] -= m[y]
    assert ldam_loss(cos, y, COUNTS).item() == pytest.approx(F.cross_entropy(30.0 * adjusted, y).item(), rel=1e-6)
    w = class_balanced_weights(COUNTS, 0.9999)
    expected = F.cross_entropy(30.0 * adjusted, y, weight=w)
    assert baseline_loss("ldam_drw", cos, y, COUNTS, drw_active=True).item() == pytest.approx(expected.item(), rel=1e-6)
    assert baseline_loss("ldam_drw", cos, y, COUNTS, drw_active=False).item() == pytest.approx(
        F.cross_entropy(30.0 * adjusted, y).item(), rel=1e-6
    )


def test_class_balanced_weights():
    w = class_balanced_weights(COUNTS, 0.999)
    assert w.sum().item() == pytest.approx(len(COUNTS))
    assert torch.all(w[:-1] < w[1:])  # rarer classes weigh more
    beta = 0.999
    raw = (1 - beta) / (1 - beta**COUNTS)
    assert torch.allclose(w, raw / raw.sum() * len(COUNTS))


def test_cb_focal_reduces_to_ce_and_matches_formula():
    logits, y = _batch(seed=3)
    # beta = 0: every class weighs 1; gamma = 0: no focal factor -> plain cross-entropy.
    assert cb_focal_loss(logits, y, COUNTS, beta=0.0, gamma=0.0).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6
    )
    p = torch.softmax(logits, -1)[torch.arange(len(y)), y]
    w = class_balanced_weights(COUNTS, 0.999)[y]
    expected = (w * (1 - p) ** 2.0 * -p.log()).mean()
    assert cb_focal_loss(logits, y, COUNTS, beta=0.999, gamma=2.0).item() == pytest.approx(expected.item(), rel=1e-5)


def test_unknown_loss_rejected():
    logits, y = _batch()
    with pytest.raises(ValueError):
        baseline_loss("focal", logits, y, COUNTS)
    with pytest.raises(ValueError):
        fit_baseline("nope", torch.rand(4, 3), torch.tensor([0, 1, 0, 1]))


@pytest.mark.parametrize("name", BASELINES)
def test_tiny_fit_beats_chance_on_digits(name, digits):
    fitted = fit_baseline(
        name, digits.x_train, digits.y_train, num_classes=10, epochs=6, batch_size=32, lr=3e-3, device="cpu", seed=0
    )
    proba = fitted.predict_proba(digits.x_test)
    assert proba.shape == (len(digits.y_test), 10)
    assert torch.allclose(proba.sum(-1), torch.ones(len(proba)), atol=1e-4)
    acsa = imbalance_report(digits.y_test, proba.argmax(-1), num_classes=10)["acsa"]
    assert acsa > 0.3, (name, acsa)


def test_every_loss_is_listed():
    assert set(BASELINE_LOSSES) <= set(BASELINES)
    logits, y = _batch()
    for name in BASELINE_LOSSES:
        assert torch.isfinite(baseline_loss(name, logits, y, COUNTS))


def test_select_best_false_keeps_the_last_epoch_of_the_same_trajectory(digits):
    # A rate this high makes validation ACSA fall in the last epoch (seed 2: .48 at epoch 4, .36 at 5), so the two
    # settings must keep different weights.
    kw = dict(num_classes=10, epochs=5, batch_size=32, lr=0.1, device="cpu", seed=2)
    best = fit_baseline("logit_adjusted", digits.x_train, digits.y_train, **kw)
    last = fit_baseline("logit_adjusted", digits.x_train, digits.y_train, select_best=False, **kw)
    # the same seeded run, so the same per-epoch validation scores; only the weights kept differ
    assert [r["val_acsa"] for r in last.history] == [r["val_acsa"] for r in best.history]
    assert last.best_epoch == 5 and last.val_acsa == last.history[-1]["val_acsa"]
    assert best.val_acsa == max(r["val_acsa"] for r in best.history)
    assert best.best_epoch < 5, "this trajectory no longer peaks before its last epoch: choose another seed"
    assert not torch.equal(best.predict_proba(digits.x_test), last.predict_proba(digits.x_test))


def test_keep_last_state_keeps_the_last_epoch_beside_the_selected_one(digits):
    kw = dict(num_classes=10, epochs=5, batch_size=32, lr=0.1, device="cpu", seed=2)  # peaks at epoch 4 (see above)
    both = fit_baseline("logit_adjusted", digits.x_train, digits.y_train, keep_last_state=True, **kw)
    last = fit_baseline("logit_adjusted", digits.x_train, digits.y_train, select_best=False, **kw)
    assert both.best_epoch < 5 and fit_baseline("ce", digits.x_train, digits.y_train, **kw).last_state is None
    assert both.last_state.keys() == last.module.state_dict().keys()
    assert all(torch.equal(both.last_state[k], v.cpu()) for k, v in last.module.state_dict().items())


def test_tau_scales_the_log_prior_and_balanced_softmax_equals_logit_adjustment():
    logits, y = _batch()
    prior = COUNTS / COUNTS.sum()
    for tau in (0.0, 0.5, 1.0, 2.0):
        expected = F.cross_entropy(logits + tau * prior.log(), y)
        assert torch.allclose(baseline_loss("logit_adjusted", logits, y, COUNTS, tau=tau), expected)
        # log n and log pi differ by a constant the softmax ignores: the two losses are one
        assert torch.allclose(baseline_loss("balanced_softmax", logits, y, COUNTS, tau=tau), expected, atol=1e-6)
    assert torch.allclose(baseline_loss("logit_adjusted", logits, y, COUNTS, tau=0.0), F.cross_entropy(logits, y))
    # the other losses ignore tau
    assert torch.equal(baseline_loss("ce", logits, y, COUNTS, tau=3.0), baseline_loss("ce", logits, y, COUNTS))


def test_balanced_softmax_tau_scales_the_log_counts():
    logits, y = _batch(seed=3)
    expected = F.cross_entropy(logits + 0.5 * COUNTS.log(), y)
    assert balanced_softmax_loss(logits, y, COUNTS, tau=0.5).item() == pytest.approx(expected.item(), rel=1e-6)
    assert baseline_loss("balanced_softmax", logits, y, COUNTS, tau=0.5).item() == pytest.approx(
        expected.item(), rel=1e-6
    )
    assert baseline_loss("logit_adjusted", logits, y, COUNTS, tau=0.5).item() == pytest.approx(
        expected.item(), rel=1e-5
    )
    # tau = 0 is plain cross-entropy
    assert baseline_loss("balanced_softmax", logits, y, COUNTS, tau=0.0).item() == pytest.approx(
        F.cross_entropy(logits, y).item(), rel=1e-6
    )


def test_tau_changes_the_fit_and_is_refused_where_a_loss_has_none(digits):
    kw = dict(num_classes=10, epochs=1, batch_size=32, lr=3e-3, device="cpu", seed=0)
    one = fit_baseline("balanced_softmax", digits.x_train, digits.y_train, **kw)
    two = fit_baseline("balanced_softmax", digits.x_train, digits.y_train, tau=2.0, **kw)
    assert not torch.equal(one.logits(digits.x_test), two.logits(digits.x_test))
    with pytest.raises(ValueError, match="'ce' has none"):
        fit_baseline("ce", digits.x_train, digits.y_train, tau=0.5, **kw)
    with pytest.raises(ValueError, match="tau must be a finite number >= 0"):
        fit_baseline("logit_adjusted", digits.x_train, digits.y_train, tau=-1.0, **kw)


@pytest.mark.parametrize("name", ["logit_adjusted", "ldam_drw", "logistic"])
def test_logits_and_temperature_give_predict_proba(name, digits):
    fitted = fit_baseline(name, digits.x_train, digits.y_train, num_classes=10, epochs=1, batch_size=32, device="cpu")
    logits = fitted.logits(digits.x_test)
    assert logits.shape == (len(digits.y_test), 10)
    assert torch.allclose(fitted.predict_proba(digits.x_test), torch.softmax(logits, -1), atol=1e-5)
    fitted.temperature = 2.0
    tempered = fitted.predict_proba(digits.x_test)
    assert torch.allclose(tempered, torch.softmax(logits / 2.0, -1), atol=1e-5)
    assert torch.equal(tempered.argmax(-1), logits.argmax(-1))
    fitted.temperature = 0.0
    with pytest.raises(ValueError, match="temperature must be a positive finite number"):
        fitted.predict_proba(digits.x_test)


def test_fit_baseline_shows_an_epoch_bar_on_stderr_only_when_asked(digits, capsys):
    quiet = fit_baseline("ce", digits.x_train, digits.y_train, epochs=2, batch_size=128)
    assert capsys.readouterr().err == ""  # the API default: no bar
    shown = fit_baseline("ce", digits.x_train, digits.y_train, epochs=2, batch_size=128, progress=True)
    err = capsys.readouterr().err
    assert "ce:" in err and "/2 [" in err  # the CLI's: the loss name and the epochs
    assert quiet.history == shown.history  # the bar changes nothing
