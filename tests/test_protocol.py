"""The paper's imbalance protocol: exact counts, determinism, shuffling, errors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dgc_pyro.data import (
    DIGITS_COUNTS,
    PAPER_COUNTS,
    check_features,
    check_labels,
    imbalanced_indices,
    parse_counts,
    stratified_holdout,
)

LABELS = np.repeat(np.arange(5), [50, 40, 30, 20, 10])
COUNTS = (30, 20, 10, 5, 3)


def test_paper_counts_match_table_1():
    assert PAPER_COUNTS["mnist"] == (4000, 2000, 1000, 750, 500, 350, 200, 100, 60, 40)
    assert PAPER_COUNTS["fashion"] == PAPER_COUNTS["mnist"]
    assert PAPER_COUNTS["svhn"] == (4500, 2000, 1000, 800, 600, 500, 400, 250, 150, 80)
    assert PAPER_COUNTS["celeba"] == (15000, 1500, 750, 300, 150)
    assert PAPER_COUNTS["mnist"][0] / PAPER_COUNTS["mnist"][-1] == 100
    assert PAPER_COUNTS["svhn"][0] / PAPER_COUNTS["svhn"][-1] == 56.25


def test_digits_counts_are_imbalanced_and_feasible():
    assert len(DIGITS_COUNTS) == 10
    assert DIGITS_COUNTS[0] / DIGITS_COUNTS[-1] >= 10
    # sklearn digits: at least 174 images a class, 50 a class held out for testing.
    assert max(DIGITS_COUNTS) <= 174 - 50


def test_exact_counts_unique_valid_indices():
    idx = imbalanced_indices(LABELS, COUNTS, seed=0)
    assert idx.dtype == np.int64
    assert len(idx) == sum(COUNTS)
    assert len(np.unique(idx)) == len(idx)
    assert idx.min() >= 0 and idx.max() < len(LABELS)
    np.testing.assert_array_equal(np.bincount(LABELS[idx], minlength=5), COUNTS)


def test_follows_protocol_exactly():
    seed = 123
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(LABELS))
    parts = [perm[LABELS[perm] == c][:n] for c, n in enumerate(COUNTS)]
    ref = np.concatenate(parts)
    rng.shuffle(ref)
    np.testing.assert_array_equal(imbalanced_indices(LABELS, COUNTS, seed), ref)


def test_same_seed_same_indices_different_seed_different():
    a = imbalanced_indices(LABELS, COUNTS, seed=7)
    b = imbalanced_indices(LABELS, COUNTS, seed=7)
    c = imbalanced_indices(LABELS, COUNTS, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert set(a) != set(c)  # a different subset, not only a different order


def test_result_is_shuffled_not_grouped_by_class():
    idx = imbalanced_indices(LABELS, COUNTS, seed=0)
    y = LABELS[idx]
    assert not np.all(np.diff(y) >= 0)
    assert not np.all(np.diff(idx) >= 0)


def test_dict_counts_and_omitted_classes():
    idx = imbalanced_indices(LABELS, {3: 4, 0: 2}, seed=1)
    np.testing.assert_array_equal(np.bincount(LABELS[idx], minlength=5), [2, 0, 0, 4, 0])
    # Dict order does not matter.
    np.testing.assert_array_equal(idx, imbalanced_indices(LABELS, {0: 2, 3: 4}, seed=1))


def test_too_many_requested_names_class_and_numbers():
    with pytest.raises(ValueError, match=r"class 4: requested 11 .* only 10 are available"):
        imbalanced_indices(LABELS, (1, 1, 1, 1, 11), seed=0)
    # A class with no examples at all.
    with pytest.raises(ValueError, match=r"class 5: requested 1 .* only 0"):
        imbalanced_indices(LABELS, (1, 1, 1, 1, 1, 1), seed=0)


def test_bad_counts_and_labels():
    with pytest.raises(ValueError, match="negative count"):
        imbalanced_indices(LABELS, (1, -1), seed=0)
    with pytest.raises(ValueError, match="not an integer"):
        imbalanced_indices(LABELS, (1, 2.5), seed=0)
    with pytest.raises(ValueError, match="empty"):
        imbalanced_indices(LABELS, (), seed=0)
    with pytest.raises(ValueError, match="1-D"):
        imbalanced_indices(LABELS.reshape(10, 15), COUNTS, seed=0)
    with pytest.raises(ValueError, match="non-integer"):
        imbalanced_indices(LABELS + 0.5, COUNTS, seed=0)


def test_parse_counts():
    assert parse_counts("4000,2000,1000") == (4000, 2000, 1000)
    assert parse_counts(" 40, 20 ,10 ") == (40, 20, 10)
    assert parse_counts("40 20") == (40, 20)
    for bad, msg in [
        ("", "empty"),
        ("40,abc", "'abc'.*not an integer"),
        ("40,-2", "negative"),
        ("40,,2", "empty entry"),
        ("40", "at least two classes"),
        ("4.5,3", "not an integer"),
    ]:
        with pytest.raises(ValueError, match=msg):
            parse_counts(bad)


def test_stratified_holdout_guarantees():
    y = np.array([0] * 10 + [1] * 3 + [2] * 2 + [3])
    tr, ho = stratified_holdout(y, 0.2, seed=0)
    assert len(np.intersect1d(tr, ho)) == 0
    assert len(tr) + len(ho) == len(y)
    assert np.bincount(y[ho], minlength=4).tolist() == [2, 1, 1, 0]
    assert np.bincount(y[tr], minlength=4).tolist() == [8, 2, 1, 1]
    tr2, ho2 = stratified_holdout(y, 0.2, seed=0)
    np.testing.assert_array_equal(ho, ho2)
    with pytest.raises(ValueError, match="between 0 and 1"):
        stratified_holdout(y, 1.0, seed=0)


# ---------------------------------------------------------------------------------------------
# Property tests


@st.composite
def labels_and_counts(draw):
    k = draw(st.integers(1, 6))
    sizes = draw(st.lists(st.integers(0, 15), min_size=k, max_size=k))
    counts = [draw(st.integers(0, s)) for s in sizes]
    seed = draw(st.integers(0, 2**32 - 1))
    labels = np.repeat(np.arange(k), sizes)
    order = np.random.default_rng(seed).permutation(len(labels))
    return labels[order], counts, seed


@settings(max_examples=60, deadline=None)
@given(labels_and_counts())
def test_property_imbalanced_indices(data):
    labels, counts, seed = data
    if sum(counts) == 0:
        idx = imbalanced_indices(labels, counts, seed) if len(labels) else np.zeros(0, np.int64)
        assert len(idx) == 0
        return
    idx = imbalanced_indices(labels, counts, seed)
    assert idx.dtype == np.int64
    assert len(np.unique(idx)) == len(idx) == sum(counts)
    assert (idx >= 0).all() and (idx < len(labels)).all()
    np.testing.assert_array_equal(np.bincount(labels[idx], minlength=len(counts))[: len(counts)], counts)
    np.testing.assert_array_equal(idx, imbalanced_indices(labels, counts, seed))


@settings(max_examples=40, deadline=None)
@given(labels_and_counts(), st.integers(1, 5))
def test_property_too_many_always_rejected(data, extra):
    labels, counts, seed = data
    if len(labels) == 0:
        return
    sizes = np.bincount(labels, minlength=len(counts))
    c = int(np.argmax(sizes))
    counts = list(counts)
    counts[c] = int(sizes[c]) + extra
    with pytest.raises(ValueError, match=f"class {c}: requested"):
        imbalanced_indices(labels, counts, seed)


@settings(max_examples=50, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 4),
    st.integers(1, 20),
    st.sampled_from([np.nan, np.inf, -np.inf]),
    st.data(),
)
def test_property_check_features_rejects_non_finite(n, h, n_bad, bad, data):
    x = np.random.default_rng(0).random((n, 1, h, h)).astype(np.float32)
    flat = x.reshape(-1)
    pos = data.draw(st.lists(st.integers(0, flat.size - 1), min_size=1, max_size=n_bad, unique=True))
    flat[pos] = bad
    with pytest.raises(ValueError, match="non-finite") as e:
        check_features(x)
    kind = "NaN" if np.isnan(bad) else "infinite"
    assert f"{len(pos)} {kind}" in str(e.value)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(allow_nan=False, allow_infinity=False, min_value=-1e6, max_value=1e6), min_size=1, max_size=30)
)
def test_property_check_features_range(values):
    x = np.asarray(values, dtype=np.float64).reshape(-1, 1)
    if np.all((x >= 0) & (x <= 1)):
        out = check_features(x)
        assert out.dtype.is_floating_point and out.shape == x.shape
    else:
        with pytest.raises(ValueError, match=r"outside \[0, 1\]"):
            check_features(x)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-5, 12), min_size=1, max_size=30), st.integers(1, 12))
def test_property_check_labels(values, k):
    y = np.asarray(values)
    if y.min() < 0:
        with pytest.raises(ValueError, match="negative"):
            check_labels(y, num_classes=k)
    elif y.max() >= k:
        with pytest.raises(ValueError, match=f">= num_classes={k}"):
            check_labels(y, num_classes=k)
    else:
        out = check_labels(y.astype(np.float64), num_classes=k)  # whole floats are fine
        assert out.tolist() == values


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 9), min_size=1, max_size=20), st.floats(0.01, 0.99), st.data())
def test_property_check_labels_rejects_fractional_and_nan(values, frac, data):
    y = np.asarray(values, dtype=np.float64)
    i = data.draw(st.integers(0, len(y) - 1))
    y[i] += frac
    with pytest.raises(ValueError, match="non-integer"):
        check_labels(y)
    y[i] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        check_labels(y)
