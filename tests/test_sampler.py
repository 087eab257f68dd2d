"""DGCSampler: an imbalanced-learn over-sampler that fits DGC and adds its synthetic examples."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.utils._param_validation import InvalidParameterError

from dgc_pyro import DGCSampler
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
    assert sorted(set(yr[len(x):].tolist())) == ["two"]  # the minority class
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
    sampler = DGCSampler(input_shape=(1, 8, 8), epochs=3, filter_threshold=0.5, random_state=1)
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
    syn_mean, syn_res, real = xr_mean[len(x):], xr_res[len(x):], x

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
