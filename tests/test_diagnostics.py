"""Uncertainty, calibration, reject option, PSIS k-hat, the ArviZ DataTree, LOO and the plots."""

from __future__ import annotations

import math
import warnings

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
import xarray as xr

from dgc_pyro import diagnostics as dg
from dgc_pyro.inference import class_log_weights, fit, predict
from dgc_pyro.models import DGC

K = 4  # classes 0..3 of digits: a model learns them in a second


pytestmark = pytest.mark.usefixtures("one_thread")


def _fit_tiny(digits, seed: int = 0, epochs: int = 4, latent_dim: int = 4) -> DGC:
    tr = digits.y_train < K
    torch.manual_seed(seed)
    model = DGC(digits.input_shape, K, latent_dim=latent_dim, likelihood="normal", label_weight=20.0)
    fit(
        model,
        digits.x_train[tr],
        digits.y_train[tr],
        epochs=epochs,
        batch_size=64,
        lr=3e-3,
        progress=False,
        val_fraction=0,
        objective="elbo-analytic",
        perturbation_rate=0,
        seed=seed,
    )
    return model


@pytest.fixture(scope="module")
def tiny(digits, one_thread, device):
    """The fitted model with test data on its device (``--device``): every comparison below is on one device,
    and the diagnostics and metrics are handed tensors where the model put them (CUDA ones on a GPU)."""
    te = digits.y_test < K
    model = _fit_tiny(digits)
    x, y = digits.x_test[te].to(device), digits.y_test[te].to(device)
    torch.manual_seed(1)
    return model, x, y, predict(model, x, 10)


@pytest.fixture(scope="module")
def trees(digits, tiny):
    model, x, y, _ = tiny
    weak = _fit_tiny(digits, seed=1, epochs=1, latent_dim=2)
    x, y = x[:40], y[:40]
    return (
        dg.to_datatree(model, x, y, num_samples=60, include_x=True, seed=0),
        dg.to_datatree(weak, x, y, num_samples=60, seed=0),
    )


# ------------------------------------------------------------------ uncertainty decomposition


def test_entropy_bounds_and_the_decomposition(tiny):
    _, _, _, pred = tiny
    tol = 1e-5
    assert (pred.entropy >= -tol).all() and (pred.entropy <= math.log(K) + tol).all()
    assert (pred.mutual_information >= 0).all()
    assert (pred.expected_entropy >= -tol).all()
    assert (pred.expected_entropy <= pred.entropy + tol).all()
    assert torch.allclose(pred.entropy - pred.expected_entropy, pred.mutual_information, atol=1e-4)
    # The fitted model is not uniformly unsure: entropies spread inside [0, log C].
    assert pred.entropy.min() < 0.5 * math.log(K) < pred.entropy.max()


def test_uncertainty_scores_from_proba_and_prediction_agree(tiny):
    _, _, _, pred = tiny
    np.testing.assert_allclose(dg.uncertainty_score(pred.proba, "entropy"), pred.entropy.cpu().numpy(), atol=1e-5)
    lc = dg.uncertainty_score(pred, "least_confidence")
    assert np.all((lc >= 0) & (lc <= 1 - 1 / K + 1e-6))
    np.testing.assert_allclose(dg.uncertainty_score(pred, "mutual_information"), pred.mutual_information.cpu().numpy())
    with pytest.raises(ValueError, match="needs a Prediction"):
        dg.uncertainty_score(pred.proba, "mutual_information")
    with pytest.raises(ValueError, match="score must be one of"):
        dg.uncertainty_score(pred, "variance")
    logits = torch.log(pred.proba[:4]) * 3
    with pytest.raises(ValueError, match="did you pass logits"):
        dg.reject(logits, 0.5)
    with pytest.raises(ValueError, match="rows of proba must sum to 1"):
        dg.uncertainty_score(torch.full((4, K), 1.8 / K), "least_confidence")


def test_good_k_needs_at_least_two_draws():
    assert dg.good_k(100) == pytest.approx(0.5)
    for bad in (1, 0, 2.5):
        with pytest.raises(ValueError, match="num_draws must be an integer >= 2"):
            dg.good_k(bad)


# ------------------------------------------------------------------ calibration


def test_calibration_of_a_perfectly_calibrated_toy_is_zero():
    # Confidence levels 0.6, 0.75, 0.9, each on 20 examples of which exactly that share is right.
    rows, labels = [], []
    for conf in (0.6, 0.75, 0.9):
        n_right = round(conf * 20)
        for i in range(20):
            rows.append([conf, 1 - conf])
            labels.append(0 if i < n_right else 1)
    out = dg.calibration(labels, np.array(rows))
    assert set(out) == {"ece", "nll", "brier"}
    assert out["ece"] == pytest.approx(0.0, abs=1e-12)
    # NLL and Brier of a calibrated binary forecast: the mean entropy and mean of 2 p (1 - p).
    expected_nll = np.mean([-(c * math.log(c) + (1 - c) * math.log(1 - c)) for c in (0.6, 0.75, 0.9)])
    assert out["nll"] == pytest.approx(expected_nll, rel=1e-9)
    assert out["brier"] == pytest.approx(np.mean([2 * c * (1 - c) for c in (0.6, 0.75, 0.9)]), rel=1e-9)
    # An over-confident version of the same forecasts is miscalibrated.
    over = dg.calibration(labels, np.array([[0.99, 0.01]] * len(labels)))
    assert over["ece"] > 0.2


def test_calibration_accepts_a_prediction_and_matches_the_metrics_module(tiny):
    from dgc_pyro.metrics import expected_calibration_error

    _, _, y, pred = tiny
    out = dg.calibration(y, pred)
    assert out["ece"] == pytest.approx(expected_calibration_error(y, pred.proba, n_bins=15))
    assert 0 <= out["ece"] <= 1 and out["nll"] > 0 and 0 <= out["brier"] <= 2


# ------------------------------------------------------------------ reject option


def test_reject_option_reduces_coverage_and_raises_accuracy(tiny):
    model, x, y, pred = tiny
    threshold = float(pred.entropy.median())
    torch.manual_seed(1)
    rej = predict(model, x, 10, reject_threshold=threshold)
    assert torch.equal(rej.rejected, rej.entropy > threshold)
    assert 0 < rej.rejected.float().mean() < 1
    assert torch.equal(
        rej.labels_with_reject[rej.rejected], torch.full((int(rej.rejected.sum()),), -1, device=rej.labels.device)
    )
    assert torch.equal(rej.labels_with_reject[~rej.rejected], rej.labels[~rej.rejected])
    accepted = ~rej.rejected
    overall = (rej.labels == y).float().mean()
    assert (rej.labels[accepted] == y[accepted]).float().mean() >= overall
    assert overall > 1.5 / K  # the tiny model is clearly better than chance
    # Extremes and the other scores.
    assert not predict(model, x[:20], 10, reject_threshold=math.inf).rejected.any()
    assert predict(model, x[:20], 10, reject_threshold=-1.0, reject_score="least_confidence").rejected.all()
    assert pred.rejected is None and torch.equal(pred.labels_with_reject, pred.labels)


def test_coverage_accuracy_curve(tiny):
    _, _, y, pred = tiny
    curve = dg.coverage_accuracy_curve(y, pred, score="entropy")
    assert set(curve) == {"threshold", "coverage", "accuracy", "acsa"}
    n = len(curve["coverage"])
    assert all(len(v) == n for v in curve.values())
    assert np.all(np.diff(curve["coverage"]) > 0) and curve["coverage"][-1] == pytest.approx(1.0)
    assert np.all(np.diff(curve["threshold"]) > 0)
    overall = float((pred.labels == y).float().mean())
    assert curve["accuracy"][-1] == pytest.approx(overall)
    from dgc_pyro.metrics import imbalance_report

    assert curve["acsa"][-1] == pytest.approx(imbalance_report(y, pred.labels, num_classes=K)["acsa"])
    half = np.searchsorted(curve["coverage"], 0.5)
    assert curve["accuracy"][half] >= overall
    # From a bare proba matrix, the same curve.
    again = dg.coverage_accuracy_curve(y, pred.proba, score="entropy")
    np.testing.assert_allclose(again["accuracy"], curve["accuracy"])


def test_coverage_curve_groups_ties():
    proba = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    curve = dg.coverage_accuracy_curve([0, 1, 0, 0], proba, score="least_confidence")
    np.testing.assert_allclose(curve["coverage"], [0.5, 1.0])
    np.testing.assert_allclose(curve["accuracy"], [0.5, 0.75])
    np.testing.assert_allclose(curve["acsa"], [0.5, 0.5])  # class 1 never right; class 0: 1/1, then 3/3


# ------------------------------------------------------------------ importance sampling reliability


def test_importance_diagnostics_shapes_and_values(tiny):
    _, _, _, pred = tiny
    n, c, d = pred.log_weights.shape
    assert d == 10 * K  # the mixture rule shares S * C draws
    diag = dg.importance_diagnostics(pred)
    assert diag["khat"].shape == (n, c) and diag["ess"].shape == (n, c)
    assert np.isfinite(diag["khat"]).all()
    assert np.all((diag["ess"] >= 1 - 1e-9) & (diag["ess"] <= d + 1e-9))
    assert diag["good_k"] == pytest.approx(min(1 - 1 / math.log10(d), 0.7))
    assert diag["flagged"].shape == (n,)
    assert np.array_equal(diag["flagged"], diag["khat"].max(1) > diag["good_k"])


def test_khat_separates_light_and_heavy_tailed_weights():
    rng = np.random.default_rng(0)
    light = rng.normal(0.0, 0.1, size=(5, 2, 200))
    heavy = np.log(rng.pareto(0.8, size=(5, 2, 2000)) + 1e-12)  # tail index 0.8 -> k = 1.25
    assert dg.importance_diagnostics(light)["khat"].max() < 0.5
    k_heavy = dg.importance_diagnostics(heavy)["khat"]
    assert k_heavy.min() > 0.7 and abs(np.median(k_heavy) - 1.25) < 0.3
    ess_equal = dg.importance_diagnostics(np.zeros((2, 2, 30)))["ess"]
    np.testing.assert_allclose(ess_equal, 30.0)


def test_a_latent_rule_prediction_has_no_importance_weights_to_diagnose(tiny):
    model, x, _, pred = tiny
    assert pred.rule == "mixture"
    latent = predict(model, x[:5], 30, rule="latent")
    assert latent.rule == "latent"
    with pytest.raises(ValueError, match="no importance sampling"):
        dg.importance_diagnostics(latent)


def test_khat_needs_enough_draws(tiny):
    model, x, _, _ = tiny
    lw = class_log_weights(model, x[:5], 10, rule="iw")  # only 10 draws per class
    with pytest.raises(ValueError, match="at least 25 draws"):
        dg.importance_diagnostics(lw)


# ------------------------------------------------------------------ ArviZ DataTree


def test_datatree_groups_dims_and_sizes(trees, tiny):
    dt, small = trees
    assert isinstance(dt, xr.DataTree)
    assert {"posterior", "posterior_predictive", "log_likelihood", "observed_data", "sample_stats"} <= set(dt.children)
    post = dt["posterior"]
    assert post["z"].dims == ("chain", "draw", "example", "latent_dim")
    assert post["z"].shape == (1, 60, 40, 4)
    assert post["class_proba"].dims == ("chain", "draw", "example", "class")
    np.testing.assert_allclose(post["class_proba"].sum("class").values, 1.0, atol=1e-5)
    assert dict(post.sizes) == {"chain": 1, "draw": 60, "example": 40, "latent_dim": 4, "class": K}
    pp = dt["posterior_predictive"]
    assert pp["y"].dims == ("chain", "draw", "example") and pp["y"].shape == (1, 60, 40)
    assert pp["x"].dims == ("chain", "draw", "example", "channel", "row", "col")
    ll = dt["log_likelihood"]
    assert set(ll.data_vars) == {"x", "y", "xy"}
    for name in ("x", "y", "xy"):
        assert ll[name].dims == ("chain", "draw", "example")
        assert np.isfinite(ll[name].values).all()
    np.testing.assert_allclose(ll["xy"].values, ll["x"].values + ll["y"].values)
    assert (ll["y"].values <= 0).all()
    obs = dt["observed_data"]
    np.testing.assert_array_equal(obs["y"].values, tiny[2][:40].cpu().numpy())
    assert obs["x"].shape == (40, 1, 8, 8)
    assert set(dt["sample_stats"].data_vars) == {"log_p", "log_q"}
    assert "x" not in small["posterior_predictive"] and "x" not in small["observed_data"]
    assert small["posterior"]["z"].shape == (1, 60, 40, 2)


def test_loo_and_model_comparison(trees):
    dt, weak = trees
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # high k-hat warnings on a 4-epoch model
        res = dg.loo(dt)
        joint = dg.loo(dt, method="joint")
        table = dg.compare_models({"fitted": dt, "weak": weak}, round_to="none")
    assert math.isfinite(res.elpd) and math.isfinite(res.se) and res.n_data_points == 40
    assert res.pareto_k.shape == (40,) and res.elpd_i.shape == (40,)
    assert math.isfinite(joint.elpd)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        weak_elpd = dg.loo(weak).elpd
    # Ranked by ELPD, best first, with the ELPDs of loo() itself.
    expected = sorted([("fitted", res.elpd), ("weak", weak_elpd)], key=lambda t: -t[1])
    assert list(table.index) == [name for name, _ in expected]
    assert table["elpd"].tolist() == pytest.approx([e for _, e in expected])
    assert table["elpd_diff"].iloc[1] == pytest.approx(expected[1][1] - expected[0][1])  # arviz: worse minus best
    assert {"elpd", "elpd_diff", "weight"} <= set(table.columns)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        pseudo = dg.compare_models({"fitted": dt, "weak": weak}, weighting="pseudo-bma")
    assert pseudo["weight"].sum() == pytest.approx(1.0) and list(pseudo.index) == list(table.index)
    with pytest.raises(ValueError, match="method"):
        dg.loo(dt, method="kfold")


def test_ppc_class_frequencies(trees):
    dt, _ = trees
    ppc = dg.ppc_class_frequencies(dt)
    y = dt["observed_data"]["y"].values
    np.testing.assert_array_equal(ppc["observed"], np.bincount(y, minlength=K))
    assert ppc["draws"].shape == (60, K)
    assert (ppc["draws"].sum(1) == 40).all()
    assert np.all(ppc["lower"] <= ppc["mean"]) and np.all(ppc["mean"] <= ppc["upper"])
    assert np.all((ppc["p_value"] >= 0) & (ppc["p_value"] <= 1))


# ------------------------------------------------------------------ plots


def test_ppc_plot_draws_a_rare_class_whose_mean_lies_outside_its_interval():
    # Replicated in 4 of 100 draws: the 90% interval is [0, 0] and the mean 0.04 lies above it.
    ppc = {
        "classes": np.arange(3),
        "observed": np.array([50, 30, 1]),
        "mean": np.array([50.0, 30.0, 0.04]),
        "lower": np.array([45.0, 26.0, 0.0]),
        "upper": np.array([55.0, 34.0, 0.0]),
    }
    ax = dg.plot_ppc_class_frequencies(ppc)
    segments = ax.collections[-1].get_segments()
    assert [tuple(s[:, 1]) for s in segments] == [(45.0, 55.0), (26.0, 34.0), (0.0, 0.0)]
    assert list(ax.lines[-1].get_ydata()) == [50.0, 30.0, 0.04]
    plt.close(ax.figure)


def test_plots_are_drawn_and_saved(tmp_path, tiny, trees):
    _, _, y, pred = tiny
    fig, axes = plt.subplots(2, 2, figsize=(9, 7))
    dg.plot_reliability(y, pred, ax=axes[0, 0], label="DGC")
    dg.plot_coverage_accuracy(y, pred, ax=axes[0, 1])
    dg.plot_khat(pred, ax=axes[1, 0])
    dg.plot_ppc_class_frequencies(trees[0], ax=axes[1, 1])
    assert any("ECE" in t.get_text() for t in axes[0, 0].get_legend().get_texts())
    fig.savefig(tmp_path / "diag.png")
    plt.close(fig)
    ax = dg.plot_reliability(y, pred.proba)  # a new figure when no axes are given
    ax.figure.savefig(tmp_path / "rel.png")
    plt.close(ax.figure)
    assert (tmp_path / "diag.png").stat().st_size > 1000 and (tmp_path / "rel.png").stat().st_size > 1000


def test_datatree_density_group_agrees_with_predict(trees, tiny):
    dt, _ = trees
    model, x, _, _ = tiny
    dens = dt["density"]
    assert dens["log_density"].dims == ("example",) and dens["log_density"].shape == (40,)
    assert dens.attrs["units"] == "nats" and "ood" not in dens  # no detector fitted on this model
    torch.manual_seed(3)
    from_predict = predict(model, x[:40], 30).log_density.double().numpy()
    # two importance-weighted estimates of the same log p(x): the proposal at the observed label (60 draws) and
    # the mixture over the class hypotheses (300 draws): a few nats apart on values spread over ~200 nats
    assert np.abs(dens["log_density"].values - from_predict).mean() < 4.0
    assert np.corrcoef(dens["log_density"].values, from_predict)[0, 1] > 0.99


# ------------------------------------------------------------------ image grids


def test_image_grids_write_png_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(5, 1, 8, 8))
    dg.save_image_grid(tmp_path / "grid.png", [("a", list(images[:2]) + [None] + list(images[2:])), ("b", [images[0]])])
    dg.save_augmentation_grid(tmp_path / "class.png", images[:3], rng.uniform(size=(11, 3, 4, 4)), title="class 1")
    dg.save_augmentation_grid(tmp_path / "vectors.png", rng.uniform(size=(2, 64)), rng.uniform(size=(3, 64)))
    for name in ("grid.png", "class.png", "vectors.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="no rows"):
        dg.save_image_grid(tmp_path / "empty.png", [])
    assert not (tmp_path / "empty.png").exists()
