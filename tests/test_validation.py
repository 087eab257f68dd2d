"""Every bad input gives a ValueError whose message names the problem."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgc_pyro.data import check_features, check_labels, check_xy, split_from_arrays

GOOD_X = np.random.default_rng(0).random((6, 1, 4, 4)).astype(np.float32)
GOOD_Y = np.array([0, 1, 2, 0, 1, 2])


# --- features -----------------------------------------------------------------------------------


def test_features_ok_numpy_and_tensor():
    for x in (GOOD_X, torch.from_numpy(GOOD_X), GOOD_X.astype(np.float64)):
        out = check_features(x, input_shape=(1, 4, 4))
        assert out.dtype == torch.float32 and out.shape == (6, 1, 4, 4)


def test_features_bool_becomes_float():
    out = check_features(GOOD_X > 0.5)
    assert out.dtype == torch.float32
    assert set(out.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize(
    "x, msgs",
    [
        (np.zeros((0, 1, 4, 4), np.float32), ["x is empty"]),
        (np.array([["a", "b"]]), ["non-numeric dtype", "<U1"]),
        (np.array([[0.1, None]], dtype=object), ["non-numeric dtype object"]),
        (np.float32(0.5), ["scalar"]),
        (np.zeros(5, np.float32), ["1-D", "batch dimension"]),
        (torch.zeros((2, 3), dtype=torch.complex64), ["complex"]),
    ],
)
def test_features_bad_kind(x, msgs):
    with pytest.raises(ValueError) as e:
        check_features(x)
    for m in msgs:
        assert m in str(e.value)


def test_features_nan_and_inf_counted():
    x = GOOD_X.copy()
    x[0, 0, 0, :3] = np.nan
    x[1, 0, 0, 0] = np.inf
    with pytest.raises(ValueError) as e:
        check_features(x)
    assert "non-finite" in str(e.value)
    assert "3 NaN" in str(e.value) and "1 infinite" in str(e.value)


def test_features_out_of_range_reports_min_max():
    x = GOOD_X.copy()
    x[0, 0, 0, 0] = -0.5
    x[0, 0, 0, 1] = 2.0
    with pytest.raises(ValueError) as e:
        check_features(x)
    assert "outside [0, 1]" in str(e.value)
    assert "min=-0.5" in str(e.value) and "max=2" in str(e.value)


def test_features_float_pixels_suggest_255():
    with pytest.raises(ValueError, match="divide by 255"):
        check_features(GOOD_X * 255)


def test_features_uint8_not_rescaled_silently():
    x = (GOOD_X * 255).astype(np.uint8)
    with pytest.raises(ValueError) as e:
        check_features(x)
    msg = str(e.value)
    assert "uint8" in msg and "[0, 1]" in msg and "255" in msg
    # uint8 data that is already 0/1 is fine.
    assert check_features((GOOD_X > 0.5).astype(np.uint8)).dtype == torch.float32


@pytest.mark.parametrize(
    "shape, hint",
    [
        ((6, 4, 4, 1), "channels-last"),
        ((6, 4, 4), "channel dimension"),
        ((6, 16), "reshape"),
        ((6, 1, 5, 5), "expected (n, 1, 4, 4)"),
    ],
)
def test_features_wrong_shape(shape, hint):
    with pytest.raises(ValueError) as e:
        check_features(np.zeros(shape, np.float32), input_shape=(1, 4, 4))
    msg = str(e.value)
    assert "wrong shape" in msg and "expected (n, 1, 4, 4)" in msg and str(shape) in msg
    assert hint in msg


def test_features_single_example_hint():
    with pytest.raises(ValueError, match="single example"):
        check_features(np.zeros((1, 4, 4), np.float32), input_shape=(1, 4, 4))


def test_features_argument_name_in_message():
    with pytest.raises(ValueError, match="x_test has values outside"):
        check_features(GOOD_X + 3, name="x_test")


# --- labels -------------------------------------------------------------------------------------


def test_labels_ok():
    out = check_labels([0, 1, 2], num_classes=3)
    assert out.dtype == torch.int64 and out.tolist() == [0, 1, 2]
    assert check_labels(np.array([0.0, 2.0, 1.0])).tolist() == [0, 2, 1]
    assert check_labels(torch.tensor([1, 0], dtype=torch.uint8)).dtype == torch.int64


@pytest.mark.parametrize(
    "y, kwargs, msgs",
    [
        ([], {}, ["y is empty"]),
        (np.array([0.5, 1.0]), {}, ["non-integer", "0.5"]),
        (np.array([0.0, np.nan]), {}, ["NaN"]),
        ([0, -1, 2], {}, ["negative", "min -1"]),
        ([0, 1, 5], {"num_classes": 3}, [">= num_classes=3", "max 5", "0..2"]),
        (np.zeros((4, 1), int), {}, ["1-D", "ravel"]),
        (np.eye(3, dtype=int), {}, ["1-D", "one-hot", "argmax"]),
        (np.array(["cat", "dog"]), {}, ["non-numeric dtype"]),
        ([0, 1], {"num_classes": 0}, ["num_classes must be a positive integer"]),
    ],
)
def test_labels_bad(y, kwargs, msgs):
    with pytest.raises(ValueError) as e:
        check_labels(y, **kwargs)
    for m in msgs:
        assert m in str(e.value)


# --- pairs --------------------------------------------------------------------------------------


def test_xy_ok():
    x, y = check_xy(GOOD_X, GOOD_Y, input_shape=(1, 4, 4), num_classes=3, require_all_classes=True)
    assert x.shape[0] == y.shape[0] == 6


def test_xy_length_mismatch():
    with pytest.raises(ValueError, match="different lengths: x has 6 examples, y has 5 labels"):
        check_xy(GOOD_X, GOOD_Y[:5])


def test_xy_single_class():
    with pytest.raises(ValueError, match="needs at least two classes"):
        check_xy(GOOD_X, np.zeros(6, int))


def test_xy_missing_classes_named():
    with pytest.raises(ValueError, match=r"classes \[3, 4\] have no examples"):
        check_xy(GOOD_X, GOOD_Y, num_classes=5, require_all_classes=True)
    with pytest.raises(ValueError, match=r"classes \[1\] have no examples"):
        check_xy(GOOD_X, [0, 2, 2, 0, 2, 0], require_all_classes=True)


# --- split_from_arrays --------------------------------------------------------------------------


def test_split_from_arrays_with_test():
    s = split_from_arrays(GOOD_X, GOOD_Y, GOOD_X[:2], GOOD_Y[:2], name="mine")
    assert s.name == "mine" and s.num_classes == 3 and s.input_shape == (1, 4, 4)
    assert s.train_counts.tolist() == [2, 2, 2]
    assert s.x_test.shape == (2, 1, 4, 4) and s.y_test.dtype == torch.int64


def test_split_from_arrays_carves_stratified_test():
    rng = np.random.default_rng(1)
    y = np.repeat(np.arange(3), [20, 10, 1])
    x = rng.random((len(y), 5)).astype(np.float32)
    s = split_from_arrays(x, y)
    assert s.test_counts.tolist() == [4, 2, 0]
    assert s.train_counts.tolist() == [16, 8, 1]
    again = split_from_arrays(x, y)
    assert torch.equal(s.x_test, again.x_test)


def test_split_from_arrays_errors():
    with pytest.raises(ValueError, match="both x_test and y_test"):
        split_from_arrays(GOOD_X, GOOD_Y, GOOD_X)
    with pytest.raises(ValueError, match="x_test has the wrong shape"):
        split_from_arrays(GOOD_X, GOOD_Y, np.zeros((2, 1, 5, 5), np.float32), [0, 1])
    with pytest.raises(ValueError, match="x_test and y_test have different lengths"):
        split_from_arrays(GOOD_X, GOOD_Y, GOOD_X[:2], GOOD_Y[:3])
    with pytest.raises(ValueError, match=r"classes \[3\] have no examples"):
        split_from_arrays(GOOD_X, GOOD_Y, GOOD_X[:2], [3, 0])
    with pytest.raises(ValueError, match="y_train contains 1 negative"):
        split_from_arrays(GOOD_X, [0, 1, -1, 0, 1, 2])


# --- labels far beyond the data -----------------------------------------------------------------


def test_missing_classes_costs_the_labels_not_the_class_range():
    from dgc_pyro.data.validation import missing_classes

    y = torch.tensor([0, 2, 5, 2])
    assert missing_classes(y, 7) == ([1, 3, 4, 6], 4)
    assert missing_classes(y, 6, limit=2) == ([1, 3], 3)
    # 10**15 classes: a bincount or a loop over the range would never finish.
    assert missing_classes(y, 10**15, limit=3) == ([1, 3, 4], 10**15 - 3)


def test_xy_missing_classes_of_a_huge_num_classes_are_listed_briefly():
    with pytest.raises(
        ValueError,
        match=r"classes \[3, 4, 5, 6, 7, 8, 9, 10, 11, 12, \.\.\.\] \(999999999997 in all\) "
        r"have no examples in y",
    ):
        check_xy(GOOD_X, GOOD_Y, num_classes=10**12, require_all_classes=True)


def test_xy_inferred_classes_beyond_the_examples_suggest_remapping():
    with pytest.raises(
        ValueError,
        match=r"y has labels up to 30000000, which imply 30000001 classes, but only 6 "
        r"examples.*np\.unique\(y, return_inverse=True\)",
    ):
        check_xy(GOOD_X, [0, 1, 2, 0, 1, 3 * 10**7], require_all_classes=True)


def test_split_from_arrays_names_the_array_with_the_huge_label():
    with pytest.raises(ValueError, match=r"y_test has labels up to 1000000000000, .* but y_train has only 6 labels"):
        split_from_arrays(GOOD_X, GOOD_Y, GOOD_X[:2], [0, 10**12])
    with pytest.raises(ValueError, match=r"classes \[3\] have no examples in y_train"):
        split_from_arrays(GOOD_X, GOOD_Y, GOOD_X[:2], [3, 0])


def test_uint64_beyond_int64_is_not_called_negative():
    y = np.array([0, 1, 2, 0, 1, 2**63 + 5], dtype=np.uint64)
    with pytest.raises(ValueError, match="y holds uint64 values up to 9223372036854775813, beyond the int64 range"):
        check_labels(y)
    assert check_labels(np.array([0, 1, 2**62], dtype=np.uint64)).tolist() == [0, 1, 2**62]
