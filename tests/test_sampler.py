"""DGCSampler: an imbalanced-learn over-sampler that fits DGC and adds its synthetic examples."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.utils._param_validation import InvalidParameterError

from dgc_pyro import DGCSampler
from dgc_pyro.experiment import DEFAULT_RECIPES, Recipe, default_recipe
from dgc_pyro.inference import History
from dgc_pyro.models import DGC

COUNTS = {0: 30, 1: 12, 2: 6}
FAST = dict(epochs=1, batch_size=16, latent_dim=4, device="cpu")


@pytest.fixture(scope="module")
def flat():
    """Flat 64-pixel digits in [0, 1], classes 0/1/2 with 30/12/6 examples."""
    x, y = load_digits(return_X_y=True)
    idx = np.concatenate([np.flatnonzero(y == c)[:n] for c, n in COUNTS.items()])
    idx = np.random.default_rng(0).permutation(idx)
    return x[idx] / 16.0, y[idx]


def test_fit_resample_balances_flat_vectors(flat):
    x, y = flat
    sampler = DGCSampler(random_state=0, **FAST)
    xr, yr = sampler.fit_resample(x, y)
    assert isinstance(xr, np.ndarray) and isinstance(yr, np.ndarray)
    assert xr.shape == (90, 64) and yr.shape == (90,)
    assert np.bincount(yr).tolist() == [30, 30, 30]
    assert xr.min() >= 0.0 and xr.max() <= 1.0
    assert yr.dtype == y.dtype and xr.dtype == np.float64
    np.testing.assert_array_equal(xr[: len(x)], x)  # originals first, unchanged
    np.testing.assert_array_equal(yr[: len(y)], y)
    assert isinstance(sampler.model_, DGC) and sampler.model_.input_shape == (64,)
    assert isinstance(sampler.history_, History) and len(sampler.history_.epochs) == 1
    assert dict(sampler.sampling_strategy_) == {1: 18, 2: 24}
    assert sampler.n_synthetic_ == {1: 18, 2: 24}


def test_input_shape_reshapes_for_the_model_and_output_stays_flat(flat):
    x, y = flat
    sampler = DGCSampler(input_shape=(1, 8, 8), sampling_strategy={2: 10}, random_state=0, **FAST)
    xr, yr = sampler.fit_resample(x.astype(np.float32), y)
    assert sampler.model_.input_shape == (1, 8, 8) and sampler.input_shape_ == (1, 8, 8)
    assert xr.shape == (len(x) + 4, 64) and xr.dtype == np.float32
    assert np.bincount(yr).tolist() == [30, 12, 10]


def test_images_in_images_out_with_string_labels(flat):
    x, y = flat
    names = np.array(["zero", "one", "two"])[y]
    sampler = DGCSampler(sampling_strategy="minority", random_state=0, **FAST)
    xr, yr = sampler.fit_resample(x.reshape(-1, 1, 8, 8), names)
    assert xr.shape == (len(x) + 24, 1, 8, 8)
    assert yr.dtype == names.dtype
    assert sorted(set(yr[len(x) :].tolist())) == ["two"]  # the minority class
    assert list(sampler.classes_) == ["one", "two", "zero"]


def test_random_state_makes_it_reproducible(flat):
    x, y = flat
    a, _ = DGCSampler(random_state=3, sampling_strategy={2: 8}, **FAST).fit_resample(x, y)
    b, _ = DGCSampler(random_state=3, sampling_strategy={2: 8}, **FAST).fit_resample(x, y)
    np.testing.assert_array_equal(a, b)


def test_inside_imblearn_pipeline(flat):
    from imblearn.pipeline import Pipeline

    x, y = flat
    pipe = Pipeline([("dgc", DGCSampler(random_state=0, **FAST)), ("clf", LogisticRegression(max_iter=300))])
    scores = cross_val_score(pipe, x, y, cv=2, scoring="balanced_accuracy")
    assert scores.shape == (2,) and np.all(np.isfinite(scores)) and scores.mean() > 0.5
    pipe.fit(x, y)
    assert pipe.predict(x).shape == y.shape
    assert pipe.named_steps["clf"].n_features_in_ == 64


def test_clone_and_get_params():
    # objective given: its default is now the recipe's (None), and the assertion below checks the echo
    sampler = DGCSampler(
        input_shape=(1, 8, 8), epochs=3, filter_threshold=0.5, random_state=1, objective="elbo-analytic"
    )
    params = sampler.get_params()
    assert params["input_shape"] == (1, 8, 8) and params["epochs"] == 3 and params["filter_threshold"] == 0.5
    assert params["sampling_strategy"] == "auto" and params["objective"] == "elbo-analytic"
    assert params["engine"] == "graph"  # fit's fast step, as everywhere
    copy = clone(sampler)
    assert copy is not sampler and copy.get_params() == params
    assert not hasattr(copy, "model_")


def test_residual_output_stays_near_the_real_examples(flat):
    x, y = flat
    xr_mean, _ = DGCSampler(random_state=0, **FAST).fit_resample(x, y)
    xr_res, yr = DGCSampler(random_state=0, output="residual", **FAST).fit_resample(x, y)
    assert np.bincount(yr).tolist() == [30, 30, 30]
    assert xr_res.min() >= 0.0 and xr_res.max() <= 1.0
    syn_mean, syn_res, real = xr_mean[len(x) :], xr_res[len(x) :], x

    def nearest(a):
        return ((a[:, None, :] - real[None, :, :]) ** 2).sum(-1).min(1)

    assert np.median(nearest(syn_res)) < np.median(nearest(syn_mean))


def test_parameters_are_validated(flat):
    x, y = flat
    with pytest.raises(InvalidParameterError, match="epochs"):
        DGCSampler(epochs=0).fit_resample(x, y)
    with pytest.raises(InvalidParameterError, match="likelihood"):
        DGCSampler(likelihood="poisson").fit_resample(x, y)
    with pytest.raises(InvalidParameterError, match="output"):
        DGCSampler(output="sample").fit_resample(x, y)
    with pytest.raises(InvalidParameterError, match="engine"):
        DGCSampler(engine="jax").fit_resample(x, y)
    with pytest.raises(ValueError, match="input_shape"):
        DGCSampler(input_shape=(1, 7, 7), **FAST).fit_resample(x, y)
    with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
        DGCSampler(**FAST).fit_resample(x * 16, y)


def test_the_default_recipe_is_the_one_dgc_pyro_fit_uses_for_the_shape(flat):
    x, y = flat
    assert default_recipe(input_shape=(1, 8, 8)) == DEFAULT_RECIPES["digits"]
    assert default_recipe(input_shape=(1, 28, 28)) == DEFAULT_RECIPES["mnist"] == DEFAULT_RECIPES["fashion"]
    assert default_recipe(input_shape=(64,)) == Recipe() == default_recipe("an_npz_file", input_shape=(3, 5, 5))
    sampler = DGCSampler(input_shape=(1, 8, 8), epochs=1, device="cpu", random_state=0, sampling_strategy={2: 8})
    sampler.fit_resample(x, y)
    # the digits recipe, one epoch (the shortcut), no validation split (class 2 has 6 examples)
    assert sampler.recipe_ == dataclasses.replace(DEFAULT_RECIPES["digits"], epochs=1, val_fraction=0.0)
    assert sampler.model_.label_weight == DEFAULT_RECIPES["digits"].label_weight == 10.0
    assert sampler.model_.latent_dim == DEFAULT_RECIPES["digits"].latent_dim


def test_a_custom_recipe_reaches_the_model(flat):
    x, y = flat
    custom = Recipe(
        epochs=1,
        batch_size=16,
        latent_dim=3,
        label_weight=7.0,
        obs_scale=0.2,
        logit_adjustment=1.0,
        label_in_guide=False,
        objective="elbo-analytic",
        perturbation_rate=0.0,
    )
    sampler = DGCSampler(recipe=custom, random_state=0, device="cpu", sampling_strategy={2: 8})
    xr, yr = sampler.fit_resample(x, y)
    model = sampler.model_
    assert sampler.recipe_ == dataclasses.replace(custom, val_fraction=0.0)
    assert (model.label_weight, model.obs_scale, model.logit_adjustment, model.label_in_guide, model.latent_dim) == (
        7.0,
        0.2,
        1.0,
        False,
        3,
    )
    assert model.has_class_prior and len(sampler.history_.epochs) == 1 and np.bincount(yr).tolist() == [30, 12, 8]
    # a shortcut given beside the recipe replaces that field only
    short = DGCSampler(recipe=custom, latent_dim=5, random_state=0, device="cpu", sampling_strategy={2: 8})
    short.fit_resample(x, y)
    assert short.model_.latent_dim == 5 and short.model_.label_weight == 7.0
    with pytest.raises(InvalidParameterError, match="recipe"):
        DGCSampler(recipe={"label_weight": 7.0}).fit_resample(x, y)
