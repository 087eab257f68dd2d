"""Tests for dgc_pyro.metrics: imbalance metrics, tables and calibration."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import balanced_accuracy_score, f1_score

from dgc_pyro.metrics import (
    IMBALANCE_METRICS,
    brier_score,
    expected_calibration_error,
    format_comparison,
    format_table,
    imbalance_report,
    negative_log_likelihood,
    per_class_table,
    reliability_bins,
)

# Hand-worked 3-class example. Confusion matrix (rows = true, columns = predicted):
#
#              pred 0  pred 1  pred 2 | support
#   true 0        4       1       0   |   5
#   true 1        2       1       0   |   3
#   true 2        0       1       1   |   2
#   ---------------------------------
#   predicted     6       3       1       N = 10
#
# recall      r0 = 4/5,  r1 = 1/3,  r2 = 1/2          -> ACSA = (4/5 + 1/3 + 1/2)/3 = 49/90
# precision   p0 = 4/6,  p1 = 1/3,  p2 = 1/1
# F1 = 2TP/(2TP+FP+FN):  f0 = 8/11, f1 = 2/6, f2 = 2/3  -> F_macro = (8/11 + 1)/3 = 19/33
# specificity TN/(N - support):
#   c0: FP = 2, negatives = 5, TN = 3 -> 3/5
#   c1: FP = 2, negatives = 7, TN = 5 -> 5/7
#   c2: FP = 0, negatives = 8, TN = 8 -> 1
# G_macro = (sqrt(4/5*3/5) + sqrt(1/3*5/7) + sqrt(1/2*1)) / 3
# accuracy = (4 + 1 + 1)/10 = 0.6
CM = np.array([[4, 1, 0], [2, 1, 0], [0, 1, 1]])
RECALL = [4 / 5, 1 / 3, 1 / 2]
PRECISION = [4 / 6, 1 / 3, 1.0]
F1 = [8 / 11, 1 / 3, 2 / 3]
SPECIFICITY = [3 / 5, 5 / 7, 1.0]
ACSA = 49 / 90
FMACRO = 19 / 33
GMEAN = (math.sqrt(4 / 5 * 3 / 5) + math.sqrt(1 / 3 * 5 / 7) + math.sqrt(1 / 2)) / 3


def labels_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = [], []
    for i, row in enumerate(cm):
        for j, count in enumerate(row):
            y_true += [i] * int(count)
            y_pred += [j] * int(count)
    return np.array(y_true), np.array(y_pred)


Y_TRUE, Y_PRED = labels_from_confusion(CM)


@pytest.fixture(autouse=True)
def _no_warnings():
    # zero_division=0 everywhere: sklearn must not emit UndefinedMetricWarning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


class TestImbalanceReport:
    def test_hand_computed(self):
        r = imbalance_report(Y_TRUE, Y_PRED)
        assert set(r) == set(IMBALANCE_METRICS)
        assert all(isinstance(v, float) for v in r.values())
        assert r["acsa"] == pytest.approx(ACSA)
        assert r["fmacro"] == pytest.approx(FMACRO)
        assert r["gmean"] == pytest.approx(GMEAN)
        assert r["acc"] == pytest.approx(0.6)
        # No train_counts: smallest/largest class by y_true frequency -> class 2 / class 0.
        assert r["r_mi"] == pytest.approx(1 / 2)
        assert r["p_ma"] == pytest.approx(4 / 6)

    def test_train_counts_choose_minority_and_majority(self):
        r = imbalance_report(Y_TRUE, Y_PRED, train_counts=[10, 100, 1000])
        assert r["r_mi"] == pytest.approx(4 / 5)  # class 0 is rarest in training
        assert r["p_ma"] == pytest.approx(1.0)  # class 2 is most common in training
        assert r["acsa"] == pytest.approx(ACSA)

    def test_explicit_classes_override_train_counts(self):
        r = imbalance_report(Y_TRUE, Y_PRED, train_counts=[10, 100, 1000], minority_class=1, majority_class=1)
        assert r["r_mi"] == pytest.approx(1 / 3)
        assert r["p_ma"] == pytest.approx(1 / 3)

    def test_balanced_test_set_needs_train_counts(self):
        # On a balanced test set the y_true frequencies tie; ties go to the lowest index.
        y = np.array([0, 0, 1, 1, 2, 2])
        p = np.array([0, 1, 1, 1, 2, 0])
        r = imbalance_report(y, p)
        assert r["r_mi"] == pytest.approx(0.5) and r["p_ma"] == pytest.approx(0.5)
        r = imbalance_report(y, p, train_counts=np.array([500, 50, 5]))
        assert r["r_mi"] == pytest.approx(0.5)  # class 2: one of two right
        assert r["p_ma"] == pytest.approx(0.5)  # class 0: predicted twice, right once

    def test_against_sklearn(self):
        r = imbalance_report(Y_TRUE, Y_PRED)
        assert r["acsa"] == pytest.approx(balanced_accuracy_score(Y_TRUE, Y_PRED))
        assert r["fmacro"] == pytest.approx(f1_score(Y_TRUE, Y_PRED, average="macro"))

    @settings(max_examples=60, deadline=None)
    @given(st.data())
    def test_matches_sklearn_property(self, data):
        c = data.draw(st.integers(2, 6))
        n = data.draw(st.integers(c, 60))
        y = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
        y[:c] = np.arange(c)  # every class present, where balanced_accuracy agrees with ACSA
        p = np.array(data.draw(st.lists(st.integers(0, c - 1), min_size=n, max_size=n)))
        r = imbalance_report(y, p, num_classes=c)
        assert r["acsa"] == pytest.approx(balanced_accuracy_score(y, p))
        assert r["fmacro"] == pytest.approx(f1_score(y, p, average="macro", labels=list(range(c)), zero_division=0))
        assert 0.0 <= r["gmean"] <= 1.0

    def test_per_class_specificity_matches_imblearn(self):
        from imblearn.metrics import specificity_score

        rows = per_class_table(Y_TRUE, Y_PRED)
        expected = specificity_score(Y_TRUE, Y_PRED, labels=[0, 1, 2], average=None)
        np.testing.assert_allclose([row["specificity"] for row in rows], expected)
        np.testing.assert_allclose(expected, SPECIFICITY)

    def test_accepts_lists_and_tensors(self):
        expected = imbalance_report(Y_TRUE, Y_PRED)
        assert imbalance_report(Y_TRUE.tolist(), Y_PRED.tolist()) == expected
        assert imbalance_report(torch.from_numpy(Y_TRUE), torch.from_numpy(Y_PRED)) == expected
        assert imbalance_report(Y_TRUE.astype(float), Y_PRED.astype(np.int32)) == expected
        assert imbalance_report(Y_TRUE, Y_PRED, train_counts=torch.tensor([3, 2, 1])) == imbalance_report(
            Y_TRUE, Y_PRED, train_counts=[3, 2, 1]
        )

    def test_perfect_prediction(self):
        y = np.array([0, 1, 2, 2, 1, 0, 0])
        r = imbalance_report(y, y)
        assert all(v == pytest.approx(1.0) for v in r.values())

    def test_absent_class_counts_as_zero_recall(self):
        # Class 3 never occurs: with zero_division=0 it contributes recall 0 to ACSA, unlike
        # balanced_accuracy_score, which ignores it.
        y = np.array([0, 0, 1, 2])
        r = imbalance_report(y, y, num_classes=4)
        assert r["acsa"] == pytest.approx(3 / 4)
        assert balanced_accuracy_score(y, y) == pytest.approx(1.0)
        assert r["acc"] == pytest.approx(1.0)
        # Fallback minority ignores the absent class: smallest present class is 1 (or 2).
        assert r["r_mi"] == pytest.approx(1.0)

    def test_num_classes_inferred_from_both_arrays(self):
        rows = per_class_table([0, 1, 1], [0, 1, 2])
        assert len(rows) == 3 and rows[2]["support"] == 0 and rows[2]["recall"] == 0.0

    @pytest.mark.parametrize(
        ("y_true", "y_pred", "kwargs", "match"),
        [
            ([0, 1, 1], [0, 1], {}, "different lengths"),
            ([], [], {}, "empty"),
            ([0, 1, 3], [0, 1, 1], {"num_classes": 3}, r"y_true contains label 3 outside \[0, 3\)"),
            ([0, 1, 1], [0, -1, 1], {}, "y_pred contains label -1"),
            ([0, 0.5, 1], [0, 1, 1], {}, "non-integer"),
            (["a", "b"], [0, 1], {}, "integer class labels"),
            ([[0, 1]], [[0, 1]], {}, "1-D"),
            ([0, 1], [0, 1], {"num_classes": 1}, "at least 2"),
            ([0, 0], [0, 0], {}, "pass num_classes"),
            ([0, 1], [0, 1], {"train_counts": [1, 2, 3], "num_classes": 2}, "train_counts has 3"),
            ([0, 1, 2], [0, 1, 2], {"train_counts": [1, 2]}, "train_counts has 2"),
            ([0, 1], [0, 1], {"train_counts": [1, -2]}, "non-negative"),
            ([0, 1], [0, 1], {"minority_class": 2}, "minority_class=2"),
            ([0, 1], [0, 1], {"majority_class": -1}, "majority_class=-1"),
            (
                [0, 1, 3 * 10**7],
                [0, 1, 1],
                {},
                r"labels up to 30000000, .* for 3 examples \(at most 1000 are inferred\)",
            ),
            ([0, 1, 1], [0, 1, 10**12], {}, r"labels up to 1000000000000.*np\.unique\(y, return_inverse=True\)"),
            (
                np.array([0, 1, 2**63], dtype=np.uint64),
                [0, 1, 1],
                {},
                "y_true contains label 9223372036854775808, beyond",
            ),
        ],
    )
    def test_bad_input(self, y_true, y_pred, kwargs, match):
        with pytest.raises(ValueError, match=match):
            imbalance_report(y_true, y_pred, **kwargs)

    def test_inferred_classes_are_bounded_by_the_number_of_examples(self):
        # Up to max(1000, 10 n) classes are inferred; absent ones score 0 as documented.
        assert imbalance_report([0, 1], [0, 999])["acsa"] == pytest.approx(1 / 1000)
        assert imbalance_report(np.arange(200) % 2, np.full(200, 1999))["acc"] == 0.0
        with pytest.raises(ValueError, match="at most 2000 are inferred"):
            imbalance_report(np.arange(200) % 2, np.full(200, 2000))
        # An explicit num_classes is the caller's choice and is not bounded.
        assert imbalance_report([0, 1], [0, 1], num_classes=1500)["acc"] == 1.0


class TestTables:
    def test_per_class_table_values(self):
        rows = per_class_table(Y_TRUE, Y_PRED, class_names=["cat", "dog", "emu"], train_counts=[10, 100, 1000])
        assert [r["name"] for r in rows] == ["cat", "dog", "emu"]
        assert [r["train_count"] for r in rows] == [10, 100, 1000]
        assert [r["support"] for r in rows] == [5, 3, 2]
        for key, expected in [("recall", RECALL), ("precision", PRECISION), ("f1", F1), ("specificity", SPECIFICITY)]:
            np.testing.assert_allclose([r[key] for r in rows], expected)
        assert list(rows[0]) == ["class", "name", "train_count", "support", "recall", "precision", "f1", "specificity"]

    def test_per_class_table_without_train_counts(self):
        rows = per_class_table(Y_TRUE, Y_PRED)
        assert "train_count" not in rows[0]
        assert [r["name"] for r in rows] == ["0", "1", "2"]

    def test_class_names_length_checked(self):
        with pytest.raises(ValueError, match="class_names has 2"):
            per_class_table(Y_TRUE, Y_PRED, class_names=["a", "b"])

    def test_format_table(self):
        text = format_table([{"name": "a", "x": 0.5, "n": 3}, {"name": "bbbb", "x": 1.0, "n": 12, "extra": None}])
        lines = text.splitlines()
        assert lines[0].split() == ["name", "x", "n", "extra"]
        assert set(lines[1].replace(" ", "")) == {"-"}
        assert lines[2].split() == ["a", "0.5000", "3", "-"]
        assert lines[3].split() == ["bbbb", "1.0000", "12", "-"]
        # Columns line up: every line has the same position for the start of column 2.
        assert len({len(line) for line in lines[:2]}) == 1
        assert lines[2].index("0.5000") == lines[3].index("1.0000")

    def test_format_table_columns_and_floatfmt(self):
        text = format_table([{"a": 1.23456, "b": "x"}], columns=["b", "a"], floatfmt=".2f")
        assert text.splitlines()[0].split() == ["b", "a"]
        assert "1.23" in text and "1.2346" not in text

    def test_format_table_empty(self):
        assert format_table([]) == ""
        assert format_table([], columns=["a"]).splitlines()[0] == "a"

    def test_format_comparison(self):
        dgc = imbalance_report(Y_TRUE, Y_PRED)
        base = {"acsa": 0.5, "gmean": 0.6}
        text = format_comparison({"DGC": dgc, "logit-adjusted CE": base})
        lines = text.splitlines()
        assert lines[0].split() == ["method", *IMBALANCE_METRICS]
        assert lines[2].split()[0] == "DGC"
        assert f"{ACSA:.4f}" in lines[2]
        assert lines[3].startswith("logit-adjusted CE")
        assert lines[3].split()[-1] == "-"


def _two_class(conf: np.ndarray, correct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Binary proba whose predicted class is 0 with the given confidence; label 0 if correct."""
    proba = np.stack([conf, 1 - conf], axis=1)
    y = np.where(correct, 0, 1)
    return y, proba


class TestCalibration:
    def test_perfectly_calibrated_is_zero(self):
        # Bin around 0.8: 10 examples, 8 correct. Bin around 0.6: 5 examples, 3 correct.
        # Bin at 1.0: 4 examples, all correct.
        conf = np.array([0.8] * 10 + [0.6] * 5 + [1.0] * 4)
        correct = np.array([1] * 8 + [0] * 2 + [1] * 3 + [0] * 2 + [1] * 4, dtype=bool)
        y, proba = _two_class(conf, correct)
        assert expected_calibration_error(y, proba, n_bins=10) == pytest.approx(0.0, abs=1e-12)
        assert expected_calibration_error(y, proba) == pytest.approx(0.0, abs=1e-12)

    def test_overconfident_gap(self):
        # Confidence 0.9 everywhere but only half right: ECE = |0.5 - 0.9| = 0.4.
        conf = np.full(10, 0.9)
        correct = np.array([1, 0] * 5, dtype=bool)
        y, proba = _two_class(conf, correct)
        assert expected_calibration_error(y, proba) == pytest.approx(0.4)

    def test_mixed_bins_weighted_by_size(self):
        # 4 examples at 0.95 with 2 right (gap 0.45); 6 examples at 0.55 with 3 right (gap 0.05).
        # ECE = 0.4 * 0.45 + 0.6 * 0.05 = 0.21
        conf = np.array([0.95] * 4 + [0.55] * 6)
        correct = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
        y, proba = _two_class(conf, correct)
        assert expected_calibration_error(y, proba, n_bins=10) == pytest.approx(0.21)

    def test_reliability_bins(self):
        conf = np.array([0.95] * 4 + [0.55] * 6)
        correct = np.array([1, 1, 0, 0, 1, 1, 1, 0, 0, 0], dtype=bool)
        y, proba = _two_class(conf, correct)
        bins = reliability_bins(y, proba, n_bins=10)
        np.testing.assert_allclose(bins["edges"], np.linspace(0, 1, 11))
        assert bins["count"].tolist() == [0, 0, 0, 0, 0, 6, 0, 0, 0, 4]
        assert bins["confidence"][5] == pytest.approx(0.55) and bins["accuracy"][5] == pytest.approx(0.5)
        assert bins["confidence"][9] == pytest.approx(0.95) and bins["accuracy"][9] == pytest.approx(0.5)
        assert np.isnan(bins["confidence"][0]) and np.isnan(bins["accuracy"][0])

    def test_bins_are_right_closed_at_edges(self):
        # Confidence exactly 0.6 belongs to (0.4, 0.6] with 5 bins, even though 0.6 * 5
        # is not exactly 3 in floating point for every edge.
        y, proba = _two_class(np.array([0.6, 0.8, 1.0]), np.ones(3, dtype=bool))
        assert reliability_bins(y, proba, n_bins=5)["count"].tolist() == [0, 0, 1, 1, 1]

    def test_nll_hand_computed(self):
        proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.25, 0.25, 0.5]])
        y = np.array([0, 2, 2])
        expected = -(math.log(0.7) + math.log(0.1) + math.log(0.5)) / 3
        assert negative_log_likelihood(y, proba) == pytest.approx(expected)

    def test_nll_floors_zero_probability(self):
        proba = np.array([[1.0, 0.0]])
        assert negative_log_likelihood([1], proba, eps=1e-8) == pytest.approx(-math.log(1e-8))

    def test_brier_hand_computed(self):
        proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
        y = np.array([0, 2])
        # row 0: 0.3^2 + 0.2^2 + 0.1^2 = 0.14 ; row 1: 0.1^2 + 0.8^2 + 0.9^2 = 1.46
        assert brier_score(y, proba) == pytest.approx((0.14 + 1.46) / 2)
        assert brier_score([0], [[1.0, 0.0]]) == pytest.approx(0.0)
        assert brier_score([1], [[1.0, 0.0]]) == pytest.approx(2.0)

    def test_accepts_tensors(self):
        proba = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1]], dtype=torch.float32)
        y = torch.tensor([0, 1])
        assert brier_score(y, proba) == pytest.approx(brier_score(y.numpy(), proba.numpy().astype(float)), abs=1e-6)
        assert negative_log_likelihood(y, proba) == pytest.approx(-(math.log(0.7) + math.log(0.8)) / 2, abs=1e-6)

    @pytest.mark.parametrize("fn", [expected_calibration_error, negative_log_likelihood, brier_score, reliability_bins])
    @pytest.mark.parametrize(
        ("y", "proba", "match"),
        [
            ([0, 1], [[0.6, 0.4], [0.5, 0.7]], "sum to 1"),
            ([0, 1], [[2.0, -1.0], [0.5, 0.5]], r"\[0, 1\]"),
            ([0, 1], [[0.5, 0.5]], "2 labels but proba has 1 rows"),
            ([0, 2], [[0.5, 0.5], [0.5, 0.5]], "label 2 outside"),
            ([0], [0.5, 0.5], "2-D"),
            ([0], [[np.nan, 1.0]], "NaN"),
            ([], np.zeros((0, 2)), "empty"),
        ],
    )
    def test_bad_input(self, fn, y, proba, match):
        with pytest.raises(ValueError, match=match):
            fn(y, proba)

    def test_bad_n_bins(self):
        with pytest.raises(ValueError, match="n_bins"):
            expected_calibration_error([0], [[1.0, 0.0]], n_bins=0)


# ---------------------------------------------------------------------------------------
# Paired comparisons over seeds
# ---------------------------------------------------------------------------------------


def test_paired_difference_matches_scipy_and_the_t_interval():
    from scipy import stats

    from dgc_pyro.metrics import paired_difference

    a, b = [0.86, 0.87, 0.85, 0.88], [0.85, 0.88, 0.83, 0.86]
    cell = paired_difference(a, b)
    diff = np.subtract(a, b)
    assert cell["mean"] == pytest.approx(diff.mean()) and cell["std"] == pytest.approx(diff.std(ddof=1))
    half = stats.t.ppf(0.975, 3) * diff.std(ddof=1) / 2
    assert cell["ci95"] == pytest.approx([diff.mean() - half, diff.mean() + half])
    assert cell["p_value"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert (cell["wins"], cell["losses"], cell["n"]) == (3, 1, 4)
    # one seed: no spread, no interval; equal differences: no p-value
    one = paired_difference(torch.tensor([0.9]), np.array([0.8]))
    assert one["mean"] == pytest.approx(0.1) and one["ci95"] is None and one["p_value"] is None
    same = paired_difference([1.0, 2.0], [0.5, 1.5])
    assert same["std"] == 0 and same["p_value"] is None and same["ci95"] == pytest.approx([0.5, 0.5])


@pytest.mark.parametrize(
    "a, b, match",
    [
        ([1.0, 2.0], [1.0], "two 1-D score arrays of one length"),
        ([[1.0]], [[1.0]], "two 1-D score arrays of one length"),
        ([], [], "at least one pair"),
        ([1.0, float("nan")], [1.0, 2.0], "NaN or inf"),
    ],
)
def test_paired_difference_names_bad_input(a, b, match):
    from dgc_pyro.metrics import paired_difference

    with pytest.raises(ValueError, match=match):
        paired_difference(a, b)


def test_format_paired_rows():
    from dgc_pyro.metrics import format_paired, paired_difference

    text = format_paired(
        {"A - B": {"acsa": paired_difference([0.9, 0.8], [0.7, 0.75]), "ece": paired_difference([0.02], [0.04])}}
    )
    lines = text.strip().splitlines()
    assert lines[0].startswith("| paired difference | metric | mean | 95% CI")
    assert lines[2].startswith("| A - B | acsa | +0.1250 | [") and lines[2].endswith("| 2 / 0 of 2 |")
    assert lines[3] == "| A - B | ece | -0.0200 | — | — | 0 / 1 of 1 |"


# --------------------------------------------------------------------------- selective prediction
def test_accuracy_at_coverage_by_hand():
    from dgc_pyro.metrics import accuracy_at_coverage

    # Four inputs, the two least certain ones wrong (aurc and risk_coverage_curve: tests/test_density.py).
    correct = np.array([True, True, False, False])
    unc = np.array([0.1, 0.2, 0.4, 0.45])
    assert accuracy_at_coverage(correct, unc, 0.5) == 1.0
    assert accuracy_at_coverage(correct, unc, 0.75) == pytest.approx(2 / 3)
    assert accuracy_at_coverage(correct, unc, 1.0) == 0.5
    assert accuracy_at_coverage(correct, np.zeros(4), 0.25) == 0.5  # the tie is accepted whole


def test_coverage_at_a_float_edge_stops_at_the_exact_count():
    from dgc_pyro.metrics import accuracy_at_coverage

    correct = np.array([True] * 8 + [False, False])
    assert accuracy_at_coverage(correct, np.arange(10.0), 0.8) == 1.0  # the two errors are the least certain


def test_coverage_curve_agrees_with_the_risk_coverage_curve():
    from dgc_pyro.metrics import coverage_curve, risk_coverage_curve

    proba = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.55, 0.45], [0.3, 0.7]])
    y = np.array([0, 0, 1, 1, 1])
    unc = np.array([0.1, 0.2, 0.2, 0.45, 0.3])
    curve = coverage_curve(y, proba, unc)
    rc = risk_coverage_curve(proba.argmax(1) == y, unc)
    assert np.allclose(curve["accuracy"], 1.0 - rc["risk"]) and np.array_equal(curve["coverage"], rc["coverage"])
    # per-class recall on the accepted: at coverage 3/5 class 0 has 2 of 2 right, class 1 0 of 1
    assert curve["acsa"][1] == pytest.approx(0.5)


@pytest.mark.parametrize(
    "unc, coverage, match",
    [
        ([0.1, 0.2], 0.5, "of one length"),
        ([0.1, np.nan, 0.3], 0.5, "NaN or inf"),
        ([0.1, 0.2, 0.3], 0.0, r"coverage must lie in \(0, 1\]"),
        ([0.1, 0.2, 0.3], 1.5, r"coverage must lie in \(0, 1\]"),
    ],
)
def test_selective_metrics_name_bad_input(unc, coverage, match):
    from dgc_pyro.metrics import accuracy_at_coverage

    with pytest.raises(ValueError, match=match):
        accuracy_at_coverage([True, False, True], unc, coverage)
