"""Fitting by SVI and uncertainty-aware prediction on tiny data."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dgc_pyro.inference import fit, predict, predict_proba
from dgc_pyro.inference.perturbation import repeat_counts
from dgc_pyro.inference.predict import class_log_weights, posterior_from_log_weights
from dgc_pyro.models import DGC


def _tiny(digits, **kwargs):
    torch.manual_seed(0)
    return DGC(
        digits.input_shape, digits.num_classes, latent_dim=kwargs.pop("latent_dim", 4), likelihood="normal", **kwargs
    )


def test_loss_decreases_on_tiny_data(digits):
    model = _tiny(digits)
    hist = fit(model, digits.x_train, digits.y_train, epochs=6, batch_size=64, lr=3e-3, progress=False, val_fraction=0)
    assert hist.model is model
    assert len(hist.losses) == 6
    assert hist.losses[-1] < hist.losses[0] - 10, hist.losses
    assert all(math.isfinite(v) for v in hist.losses)


def test_validation_split_is_carved_from_training_and_selects_best(digits):
    model = _tiny(digits)
    hist = fit(
        model, digits.x_train, digits.y_train, epochs=3, batch_size=64, lr=3e-3, progress=False, val_fraction=0.2
    )
    assert {"val_acsa", "val_gmean", "val_fmacro"} <= set(hist.epochs[0])
    best = max(hist.epochs, key=lambda e: e["val_acsa"])
    assert hist.best_epoch == best["epoch"]
    # 20% of every class is held out, so the training counts shrink accordingly.
    assert sum(hist.train_counts) < len(digits.y_train)
    assert all(c >= 1 for c in hist.train_counts)


def test_torch_and_svi_engines_compute_the_same_updates(digits):
    x, y = digits.x_train[:128], digits.y_train[:128]
    results = []
    for engine in ("torch", "svi"):
        model = _tiny(digits)
        hist = fit(model, x, y, epochs=2, batch_size=64, lr=1e-3, progress=False, val_fraction=0, engine=engine, seed=3)
        results.append((hist.losses, [p.detach().clone() for p in model.parameters()]))
    (loss_a, params_a), (loss_b, params_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-4)
    for pa, pb in zip(params_a, params_b):
        assert torch.allclose(pa, pb, atol=1e-5)


def test_elbo_analytic_objective_and_custom_loss_callable(digits):
    import pyro.infer

    x, y = digits.x_train[:96], digits.y_train[:96]
    for objective in ("elbo-analytic", pyro.infer.Trace_ELBO().differentiable_loss):
        hist = fit(_tiny(digits), x, y, epochs=2, batch_size=48, progress=False, val_fraction=0, objective=objective)
        assert all(math.isfinite(v) for v in hist.losses)
    with pytest.raises(ValueError, match="unknown objective"):
        fit(_tiny(digits), x, y, epochs=1, objective="nope", progress=False)


def test_repeat_counts_follow_the_reference_rule():
    reps = repeat_counts(np.array([100, 50, 10]), 0.6)
    # floor(1 + 0.6 * (100 - n) / n)
    assert reps.tolist() == [1, 1 + int(0.6 * 50 / 50), int(1 + 0.6 * 90 / 10)]
    assert repeat_counts(np.array([5, 5]), 0.6).tolist() == [1, 1]


@pytest.fixture(scope="module")
def fitted(digits):
    model = _tiny(digits, latent_dim=16)
    fit(
        model,
        digits.x_train,
        digits.y_train,
        epochs=20,
        batch_size=32,
        lr=3e-3,
        progress=False,
        val_fraction=0,
        objective="elbo-analytic",
    )
    return model


@pytest.mark.parametrize("rule", ["mixture", "iw", "paper"])
def test_probabilities_sum_to_one_and_uncertainty_is_bounded(fitted, digits, rule):
    x = digits.x_test[:40]
    pred = predict(fitted, x, num_samples=5, rule=rule)
    c = digits.num_classes
    assert pred.proba.shape == (40, c)
    assert torch.allclose(pred.proba.sum(-1), torch.ones(40, device=pred.proba.device), atol=1e-5)  # the model's device
    assert torch.equal(pred.labels, pred.proba.argmax(-1))
    assert (pred.entropy >= -1e-6).all() and (pred.entropy <= math.log(c) + 1e-5).all()
    assert (pred.mutual_information >= 0).all()
    assert (pred.expected_entropy <= pred.entropy + 1e-5).all()
    assert (pred.spread >= 0).all() and (pred.spread <= 0.5 + 1e-6).all()
    draws = 5 * c if rule == "mixture" else 5
    assert pred.log_weights.shape == (40, c, draws)


def test_fitted_model_beats_chance_and_predict_proba_matches_predict(fitted, digits):
    torch.manual_seed(0)
    proba = predict_proba(fitted, digits.x_test, num_samples=5)
    acc = (proba.argmax(-1).cpu() == digits.y_test).float().mean().item()  # proba lives on the model's device
    assert acc > 0.5  # chance is 0.1
    torch.manual_seed(0)
    assert torch.allclose(predict(fitted, digits.x_test, 5).proba, proba)


def test_chunking_does_not_change_predictions(fitted, digits):
    x = digits.x_test[:30]
    torch.manual_seed(1)
    a = class_log_weights(fitted, x, 4, rule="iw", max_rows=10 * 4 * 30)
    torch.manual_seed(1)
    whole = class_log_weights(fitted, x, 4, rule="iw", max_rows=10 * 4 * 30)
    assert torch.equal(a, whole)
    torch.manual_seed(2)
    chunked = class_log_weights(fitted, x, 4, rule="iw", max_rows=40)  # one example per chunk
    torch.manual_seed(2)  # the same draws, example by example: the chunks must come back in order
    by_hand = torch.cat([class_log_weights(fitted, x[i : i + 1], 4, rule="iw", max_rows=40) for i in range(len(x))])
    assert torch.equal(chunked, by_hand)


def test_posterior_from_known_weights():
    # Two classes, one draw each: weights exp(0) and exp(log 3) -> p = (1/4, 3/4).
    log_w = torch.tensor([[[0.0], [math.log(3.0)]]])
    pred = posterior_from_log_weights(log_w)
    assert torch.allclose(pred.proba, torch.tensor([[0.25, 0.75]]))
    assert pred.labels.item() == 1
    assert pred.mutual_information.item() == pytest.approx(0.0, abs=1e-6)


def test_predict_rejects_bad_input(fitted):
    with pytest.raises(ValueError, match="shape"):
        predict(fitted, torch.rand(3, 1, 28, 28))
    with pytest.raises(ValueError, match="NaN"):
        predict(fitted, torch.full((2, 1, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="num_samples"):
        predict(fitted, torch.rand(2, 1, 8, 8), num_samples=0)
    with pytest.raises(ValueError, match="rule"):
        predict(fitted, torch.rand(2, 1, 8, 8), rule="bogus")


def test_fit_rejects_bad_arguments(digits):
    model = _tiny(digits)
    with pytest.raises(ValueError, match="epochs"):
        fit(model, digits.x_train, digits.y_train, epochs=0, progress=False)
    with pytest.raises(ValueError, match="engine"):
        fit(model, digits.x_train, digits.y_train, epochs=1, engine="jax", progress=False)
    with pytest.raises(ValueError, match="length|mismatch|same number"):
        fit(model, digits.x_train, digits.y_train[:-1], epochs=1, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda"):
            fit(model, digits.x_train, digits.y_train, epochs=1, device="cuda", progress=False)


def test_label_free_guide_ignores_the_label_and_latent_rule_works(digits):
    model = _tiny(digits, label_in_guide=False)
    x = digits.x_test[:5]
    loc_a, _ = model.encode(x, torch.zeros(5, dtype=torch.long))
    loc_b, _ = model.encode(x, torch.full((5,), 3))
    assert torch.equal(loc_a, loc_b)
    assert DGC.from_config(model.config).label_in_guide is False
    pred = predict(model, x, num_samples=4, rule="latent")
    assert pred.log_weights.shape == (5, digits.num_classes, 4)
    assert torch.allclose(pred.proba.sum(-1), torch.ones(5), atol=1e-5)


def test_balanced_prediction_divides_out_the_models_label_prior(fitted, digits):
    x = digits.x_test[:20]
    prior = fitted.label_prior()
    assert prior.shape == (digits.num_classes,) and torch.isclose(
        prior.sum(), torch.tensor(1.0, device=prior.device), atol=1e-5
    )
    state = torch.get_rng_state()
    assert torch.equal(fitted.label_prior(), prior)  # own seed: repeatable ...
    assert torch.equal(torch.get_rng_state(), state)  # ... and the caller's random state is untouched
    torch.manual_seed(5)
    plain = predict(fitted, x, 3)
    torch.manual_seed(5)
    balanced = predict(fitted, x, 3, balanced=True)
    expected = torch.softmax(torch.log(plain.proba) - prior.log(), dim=-1)
    assert torch.allclose(balanced.proba, expected, atol=1e-5)


def test_balanced_prediction_of_a_logit_adjusted_model_drops_the_prior_offset(digits):
    counts = np.bincount(digits.y_train.numpy(), minlength=digits.num_classes)
    model = _tiny(digits, class_prior=counts, label_in_guide=False)
    x = digits.x_test[:7]
    torch.manual_seed(3)
    plain = predict(model, x, 1)  # default rule of a label-free guide: "latent"
    torch.manual_seed(3)
    balanced = predict(model, x, 1, balanced=True)
    # one draw: p_bal(y | z) = softmax(f(z)) = softmax(log p(y | z) - tau log pi)
    expected = torch.softmax(torch.log(plain.proba) - model.label_offset, dim=-1)
    assert torch.allclose(balanced.proba, expected, atol=1e-5)
    assert not torch.allclose(balanced.proba, plain.proba, atol=1e-3)
    assert (
        model.label_logits(torch.zeros(1, model.latent_dim))
        .sub(model.classifier(torch.zeros(1, model.latent_dim)))
        .abs()
        .max()
        > 0
    )  # the offset is back after predict


def test_default_rule_of_a_label_free_model_is_latent(digits):
    model = _tiny(digits, label_in_guide=False)
    x = digits.x_test[:4]
    torch.manual_seed(1)
    default = predict(model, x, 3)
    torch.manual_seed(1)
    latent = predict(model, x, 3, rule="latent")
    assert default.log_weights.shape == (4, digits.num_classes, 3)
    assert torch.equal(default.proba, latent.proba)


def test_logit_adjusted_fit_runs_and_validates_balanced(digits, monkeypatch):
    from dgc_pyro.experiment import Recipe

    recipe = Recipe(
        epochs=2, batch_size=32, latent_dim=4, logit_adjustment=1.0, label_in_guide=False, label_weight=10.0
    )
    with pytest.raises(ValueError, match="class counts"):
        recipe.build_model(digits.input_shape, digits.num_classes)
    model = recipe.build_model(digits.input_shape, digits.num_classes, digits.train_counts)
    assert model.has_class_prior and not model.label_in_guide and recipe.balanced
    import sys

    fit_module = sys.modules["dgc_pyro.inference.trainer"]  # where the loop scores the validation split
    calls = []

    def recording_predict(*args, **kwargs):
        calls.append(kwargs.get("balanced"))
        return predict(*args, **kwargs)

    monkeypatch.setattr(fit_module, "predict", recording_predict)
    hist = fit(
        model,
        digits.x_train,
        digits.y_train,
        epochs=2,
        batch_size=32,
        progress=False,
        val_fraction=0.2,
        val_num_samples=2,
    )
    assert all(0.0 <= e["val_acsa"] <= 1.0 for e in hist.epochs)
    assert calls == [True, True]  # the validation split is scored with the prior-free label likelihood
