"""Synthetic minority augmentation: counts follow imbalanced-learn, samples are valid images, the filter filters."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from fixtures import load_benchmark
from imblearn.utils import check_sampling_strategy

from dgc_pyro.inference import AugmentationWarning, augment, synthetic_counts
from dgc_pyro.models import DGC, likelihood_mean

SHAPE = (1, 8, 8)
COUNTS = (12, 6, 3, 1)
augment_module = sys.modules["dgc_pyro.inference.augment"]


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(COUNTS)), COUNTS)
    x = rng.random((len(y), *SHAPE)).astype(np.float32)
    return torch.from_numpy(x), torch.from_numpy(y)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return DGC(SHAPE, num_classes=len(COUNTS), latent_dim=4, likelihood="normal").eval()


def _per_class(y: torch.Tensor) -> np.ndarray:
    return np.bincount(y.numpy(), minlength=len(COUNTS))


def test_auto_balances_every_class_to_the_majority(model, data):
    x, y = data
    xs, ys = augment(model, x, y, seed=0)
    assert xs.dtype == torch.float32 and ys.dtype == torch.int64
    assert xs.shape == (sum(max(COUNTS) - c for c in COUNTS), *SHAPE)
    assert ys.shape == (xs.shape[0],)
    assert (_per_class(y) + _per_class(ys)).tolist() == [max(COUNTS)] * len(COUNTS)
    assert float(xs.min()) >= 0.0 and float(xs.max()) <= 1.0
    assert torch.equal(ys, ys.sort().values)  # grouped by class, increasing
    assert 0 not in ys.tolist()  # the majority class gets nothing


@pytest.mark.parametrize(
    "strategy",
    ["auto", "not majority", "minority", "not minority", "all", {2: 7, 3: 12}, lambda y: {1: 10}],
    ids=["auto", "not-majority", "minority", "not-minority", "all", "dict", "callable"],
)
def test_counts_match_imblearn(model, data, strategy):
    x, y = data
    _, ys = augment(model, x, y, strategy, seed=1)
    expected = check_sampling_strategy(strategy, y.numpy(), "over-sampling")
    got = _per_class(ys)
    for c in range(len(COUNTS)):
        assert got[c] == expected.get(c, 0), (c, got, expected)
    assert synthetic_counts(y, strategy) == {int(c): int(n) for c, n in expected.items() if n > 0}


def test_dict_strategy_gives_target_totals(model, data):
    x, y = data
    _, ys = augment(model, x, y, {3: 9, 1: 6}, seed=0)
    after = _per_class(y) + _per_class(ys)
    assert after.tolist() == [12, 6, 3, 9]


def test_float_strategy_binary_only(model, data):
    x, y = data
    keep = y <= 1  # binary: 12 vs 6
    _, ys = augment(model, x[keep], y[keep], 0.75, seed=0)
    assert _per_class(ys).tolist() == [0, 3, 0, 0]  # 0.75 * 12 = 9 = 6 + 3
    with pytest.raises(ValueError, match="only when the type of target is binary"):
        augment(model, x, y, 0.5)


def test_dict_below_current_count_is_refused(model, data):
    x, y = data
    with pytest.raises(ValueError, match="should be greater or equal"):
        augment(model, x, y, {0: 5})


def test_seed_reproducible(model, data):
    x, y = data
    a, _ = augment(model, x, y, seed=3)
    b, _ = augment(model, x, y, seed=3)
    c, _ = augment(model, x, y, seed=4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@torch.no_grad()
def test_zero_perturbation_decodes_posterior_means_of_sources_equally_often(model, data):
    x, y = data
    # Class 2 has 3 real examples and needs 9 more: each source is decoded exactly 3 times.
    xs, ys = augment(model, x, y, {2: 12}, perturbation_scale=0.0, seed=0)
    src = x[y == 2]
    loc, _ = model.encode(src, torch.full((3,), 2))
    decoded = likelihood_mean(model.likelihood_name, model.decoder(loc))
    dist = ((xs[:, None] - decoded[None]) ** 2).flatten(2).sum(-1)  # (9, 3)
    assert float(dist.min(1).values.max()) < 1e-10
    assert np.bincount(dist.argmin(1).numpy(), minlength=3).tolist() == [3, 3, 3]
    # With noise the samples differ from the posterior-mean decodes.
    xn, _ = augment(model, x, y, {2: 12}, perturbation_scale=1.0, seed=0)
    assert float(((xn[:, None] - decoded[None]) ** 2).flatten(2).sum(-1).min()) > 1e-8


def test_residual_output_is_the_source_plus_the_decoded_change(model, data):
    x, y = data
    # Without noise the decoded change is zero: every sample is one of its class's real examples.
    xs, ys = augment(model, x, y, {2: 12}, perturbation_scale=0.0, seed=0, output="residual")
    src = x[y == 2]
    dist = ((xs[:, None] - src[None]) ** 2).flatten(2).sum(-1)  # (9, 3)
    assert float(dist.min(1).values.max()) < 1e-10
    assert np.bincount(dist.argmin(1).numpy(), minlength=3).tolist() == [3, 3, 3]
    # With noise: the same draws as output="mean" (same seed), moved onto the source images.
    xm, _ = augment(model, x, y, {2: 12}, perturbation_scale=1.0, seed=0)
    xr, _ = augment(model, x, y, {2: 12}, perturbation_scale=1.0, seed=0, output="residual")
    assert xr.shape == xm.shape and float(xr.min()) >= 0.0 and float(xr.max()) <= 1.0
    assert float(((xr[:, None] - src[None]) ** 2).flatten(2).sum(-1).min()) > 1e-8
    nearest_real = ((xr[:, None] - src[None]) ** 2).flatten(2).sum(-1).min(1).values
    nearest_mean = ((xm[:, None] - src[None]) ** 2).flatten(2).sum(-1).min(1).values
    assert (nearest_real < nearest_mean).all()  # closer to the real data than the blurry mean images


def _fake_proba(calls):
    """Deterministic stand-in for predict_proba: p(y = c | x) = mean pixel value for every c."""

    def fake(model, x, num_samples=10, **kwargs):
        calls.append((x.shape[0], num_samples, kwargs.get("balanced", False)))
        m = x.flatten(1).mean(1, keepdim=True)
        return m.expand(-1, model.num_classes).clone()

    return fake


def test_filter_keeps_only_samples_above_threshold(model, data, monkeypatch):
    x, y = data
    unfiltered, _ = augment(model, x, y, seed=0)
    threshold = float(unfiltered.flatten(1).mean(1).median())  # about half pass
    calls = []
    monkeypatch.setattr(augment_module, "predict_proba", _fake_proba(calls))
    xs, ys = augment(model, x, y, seed=0, filter_threshold=threshold, num_samples_filter=3)
    assert calls and all(s == 3 and balanced for _, s, balanced in calls)  # class-balanced scoring by default
    assert (_per_class(y) + _per_class(ys)).tolist() == [max(COUNTS)] * len(COUNTS)  # quota met
    assert bool((xs.flatten(1).mean(1) >= threshold).all())


def test_filter_that_never_passes_warns_and_returns_fewer(model, data, monkeypatch):
    x, y = data
    calls = []
    monkeypatch.setattr(augment_module, "predict_proba", _fake_proba(calls))
    with pytest.warns(AugmentationWarning, match="class 3: 0 of 11, stopped after round 2 of 3 with 0 of 135 draws"):
        xs, ys = augment(model, x, y, seed=0, filter_threshold=1.0, max_rounds=3)
    assert len(calls) == 2  # no class could fill its quota in the last round, so it is not drawn
    assert xs.shape == (0, *SHAPE) and ys.shape == (0,)


def test_hopeless_classes_stop_early_however_many_rounds_are_allowed(model, data, monkeypatch):
    x, y = data
    calls = []
    monkeypatch.setattr(augment_module, "predict_proba", _fake_proba(calls))
    with pytest.warns(AugmentationWarning, match="class 3: 0 of 11, stopped after round 3 of 10 with 0 of 255 draws"):
        augment(model, x, y, seed=0, filter_threshold=1.0, max_rounds=10)
    # Round 1 draws each quota (6, 9, 11) with slack, later rounds ten times it plus 10 (70, 100, 120). Class 3
    # stops after round 3 (3/255 of 7 x 120 draws < 11), classes 1 and 2 after round 4.
    assert len(calls) == 4
    drawn = sum(n for n, _, _ in calls)
    assert drawn == (9 + 12 + 15) + 2 * (70 + 100 + 120) + (70 + 100)
    assert drawn < (9 + 12 + 15) + 9 * (70 + 100 + 120) / 3  # a third of what ten full rounds would draw


def test_a_low_but_sufficient_acceptance_rate_is_not_given_up():
    hopeless = augment_module._hopeless
    assert not hopeless(need=100, passed=30, drawn=1000, rounds_left=5)  # (30 + 3) / 1000 of 5 x 1010 draws: 167
    assert hopeless(need=100, passed=5, drawn=1000, rounds_left=5)  # (5 + 3) / 1000 of the same: 40
    assert hopeless(need=100, passed=0, drawn=1000, rounds_left=1)
    assert not hopeless(need=0, passed=0, drawn=10, rounds_left=0)


def test_filter_can_score_with_the_training_prior(model, data, monkeypatch):
    x, y = data
    calls = []
    monkeypatch.setattr(augment_module, "predict_proba", _fake_proba(calls))
    augment(model, x, y, {3: 2}, seed=0, filter_threshold=0.0, filter_balanced=False)
    assert calls and not any(balanced for _, _, balanced in calls)


def test_real_posterior_filter_runs(model, data):
    x, y = data
    xs, ys = augment(model, x, y, {3: 3}, seed=0, filter_threshold=0.0, num_samples_filter=2)
    assert _per_class(ys).tolist() == [0, 0, 0, 2]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"perturbation_scale": -1.0}, "perturbation_scale"),
        ({"filter_threshold": 1.5}, "filter_threshold"),
        ({"num_samples_filter": 0}, "num_samples_filter"),
        ({"batch_size": 0}, "batch_size"),
        ({"output": "sample"}, "output"),
    ],
)
def test_bad_options(model, data, kwargs, match):
    x, y = data
    with pytest.raises(ValueError, match=match):
        augment(model, x, y, **kwargs)


def test_bad_inputs(model, data):
    x, y = data
    with pytest.raises(ValueError, match="wrong shape"):
        augment(model, x.reshape(len(x), -1), y)
    with pytest.raises(ValueError):
        augment(model, x, y + 10)  # labels beyond num_classes
    with pytest.raises(ValueError, match="outside"):
        augment(model, x * 2, y)
    with pytest.raises(TypeError, match="DGC"):
        augment(torch.nn.Linear(2, 2), x, y)


# --- dgc-pyro augment ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    from dgc_pyro.cli import main

    run = tmp_path_factory.mktemp("fit")
    argv = ["fit", "--epochs", "2", "--baseline", "none", "--no-progress", "--num-samples", "1", "--out", str(run)]
    assert main(argv) == 0
    return run / "model.safetensors"


def test_cli_augment_writes_npz_and_grids(digits_checkpoint, tmp_path, capsys):
    from dgc_pyro.cli import main
    from dgc_pyro.data import DIGITS_COUNTS

    out = tmp_path / "aug"
    rc = main(["augment", "--checkpoint", str(digits_checkpoint), "--out", str(out), "--grid-per-class", "8"])
    assert rc == 0
    with np.load(out / "synthetic.npz", allow_pickle=False) as f:
        xs, ys = f["x"], f["y"]
    assert xs.dtype == np.float32 and ys.dtype == np.int64
    assert xs.shape == (len(ys), *SHAPE)
    assert xs.min() >= 0.0 and xs.max() <= 1.0
    after = np.bincount(ys, minlength=10) + np.array(DIGITS_COUNTS)
    assert after.tolist() == [max(DIGITS_COUNTS)] * 10
    grids = sorted(p.name for p in out.glob("grid_class_*.png"))
    assert grids == [f"grid_class_{c}.png" for c in range(1, 10)]  # class 0 is the majority
    assert (out / "grid_class_9.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "before" in printed and "after" in printed
    assert f"{sum(DIGITS_COUNTS)}" in printed and f"{10 * max(DIGITS_COUNTS)}" in printed


def test_cli_augment_dict_strategy_and_no_grids(digits_checkpoint, tmp_path):
    from dgc_pyro.cli import main

    out = tmp_path / "aug"
    rc = main(
        [
            "augment",
            "--checkpoint",
            str(digits_checkpoint),
            "--out",
            str(out),
            "--sampling-strategy",
            "8:20,9:30",
            "--grid-per-class",
            "0",
        ]
    )
    assert rc == 0
    with np.load(out / "synthetic.npz") as f:
        assert np.bincount(f["y"], minlength=10).tolist() == [0] * 8 + [7, 20]
    assert not list(out.glob("*.png"))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sampling-strategy", "0.5"], "binary"),
        (["--counts", "100,90,70,52,40,30,22,17,13,10"], "trained on"),
        (["--grid-per-class", "-1"], "grid-per-class"),
    ],
)
def test_cli_augment_errors_are_one_line(digits_checkpoint, tmp_path, capsys, extra, message):
    from dgc_pyro.cli import main

    rc = main(["augment", "--checkpoint", str(digits_checkpoint), "--out", str(tmp_path / "o"), *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_cli_augment_missing_checkpoint(tmp_path, capsys):
    from dgc_pyro.cli import main

    assert main(["augment", "--checkpoint", str(tmp_path / "none.safetensors"), "--out", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err


# --- benchmarks/augmentation.py --------------------------------------------------------------------


def test_augmentation_benchmark_smoke_on_digits(tmp_path):
    import json

    from dgc_pyro.data import DIGITS_COUNTS

    bench = load_benchmark("augmentation")
    out = tmp_path / "result.json"
    result = bench.main(
        [
            "--dataset",
            "digits",
            "--quick",
            "--epochs",
            "1",
            "--val-num-samples",
            "1",
            "--out",
            str(out),
            "--grid",
            str(tmp_path / "grid.png"),
        ]
    )
    quick_counts = [max(4, n // 10) for n in DIGITS_COUNTS]
    assert result["train_counts"] == quick_counts
    assert set(result["reports"]) == {"CNN imbalanced", "CNN +DGC samples", "CNN +SMOTE"}
    for report in result["reports"].values():
        assert all(0.0 <= report[m] <= 1.0 for m in ("acsa", "gmean", "fmacro", "r_mi", "p_ma"))
    assert result["synthetic_per_class"] == {
        c: max(quick_counts) - n for c, n in enumerate(quick_counts) if n < max(quick_counts)
    }
    saved = json.loads(out.read_text())
    assert saved["reports"]["CNN +DGC samples"]["acsa"] == pytest.approx(result["reports"]["CNN +DGC samples"]["acsa"])
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def _fake_run(seed: int, dgc: float, plain: float, smote: float, threshold: float | None = 0.9) -> dict:
    report = lambda v: {"acsa": v, "r_mi": v - 0.1}
    return {
        "seed": seed,
        "dataset": "fashion",
        "command": f"... --seed {seed}",
        "train_counts": [4, 2],
        "dgc": {"filter_threshold": threshold, "best_epoch": seed, "history": []},
        "cnn": {"epochs": 20},
        "reports": {"CNN +DGC samples": report(dgc), "CNN imbalanced": report(plain), "CNN +SMOTE": report(smote)},
    }


def test_collect_pairs_runs_by_seed(tmp_path, capsys):
    import json

    bench = load_benchmark("augmentation")
    runs = [_fake_run(3, 0.83, 0.80, 0.79), _fake_run(1, 0.81, 0.82, 0.78), _fake_run(2, 0.85, 0.80, 0.80)]
    paths = []
    for r in runs:
        paths.append(tmp_path / f"seed{r['seed']}.json")
        paths[-1].write_text(json.dumps(r))
    summary = bench.main(["--collect", *map(str, paths), "--out", str(tmp_path / "summary.json")])
    assert summary["seeds"] == [1, 2, 3]
    assert summary["arms"]["CNN +DGC samples"]["acsa"]["per_seed"] == pytest.approx([0.81, 0.85, 0.83])
    vs_plain = summary["paired"]["CNN +DGC samples - CNN imbalanced"]["acsa"]
    diffs = np.array([-0.01, 0.05, 0.03])
    assert vs_plain["mean"] == pytest.approx(diffs.mean())
    assert (vs_plain["wins"], vs_plain["losses"], vs_plain["n"]) == (2, 1, 3)
    assert vs_plain["ci95"][0] < diffs.mean() < vs_plain["ci95"][1]
    from scipy import stats

    assert vs_plain["p_value"] == pytest.approx(stats.ttest_1samp(diffs, 0.0).pvalue)
    vs_smote = summary["paired"]["CNN +DGC samples - CNN +SMOTE"]["r_mi"]
    assert (vs_smote["wins"], vs_smote["losses"]) == (3, 0)
    assert json.loads((tmp_path / "summary.json").read_text())["seeds"] == [1, 2, 3]
    out = capsys.readouterr().out
    assert "| CNN +DGC samples - CNN imbalanced | acsa | +0.0233 |" in out
    # these fake runs predate synthetic_added_per_class: the summary says their added counts are unknown
    assert summary["added_counts_not_recorded"] == sorted(map(str, paths))
    assert "do not record how many examples each arm added" in out


def test_augmentation_records_a_filter_shortfall_and_collect_refuses_it(tmp_path, capsys):
    import json

    bench = load_benchmark("augmentation")
    out = tmp_path / "short.json"
    # threshold 1.0: no sample passes, so the DGC arm adds nothing while SMOTE adds the full request
    with pytest.warns(AugmentationWarning, match="too few synthetic samples"):
        result = bench.main(
            [
                "--dataset",
                "digits",
                "--quick",
                "--arms",
                "dgc",
                "smote",
                "--filter-threshold",
                "1.0",
                "--dgc-epochs",
                "1",
                "--cnn-epochs",
                "2",
                "--val-num-samples",
                "1",
                "--same-steps-control",
                "--out",
                str(out),
            ]
        )
    requested = {int(c): n for c, n in result["synthetic_per_class"].items()}
    added = result["synthetic_added_per_class"]
    assert added["+SMOTE"] == requested
    assert sum(added["+DGC samples"].values()) < sum(requested.values())
    assert result["arms_short_of_request"] == ["+DGC samples"]
    # the control of each arm takes that arm's steps: the DGC arm added nothing, so its control keeps 2 epochs
    n = sum(result["train_counts"])
    n_dgc = sum(added["+DGC samples"].values())
    dgc_control = result["same_steps_control"]["+DGC samples"]
    assert dgc_control == f"imbalanced, {max(1, round(2 * (n + n_dgc) / n))} epochs"
    smote_control = result["same_steps_control"]["+SMOTE"]
    assert smote_control == f"imbalanced, {round(2 * (n + sum(requested.values())) / n)} epochs" != dgc_control
    assert {f"CNN {dgc_control}", f"CNN {smote_control}"} <= set(result["reports"])
    saved = json.loads(out.read_text())
    assert saved["synthetic_added_per_class"]["+DGC samples"] == {str(c): k for c, k in added["+DGC samples"].items()}
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--collect", str(out)])
    assert exit_info.value.code == 2
    assert "arm 'CNN +DGC samples' added" in capsys.readouterr().err


def test_collect_pools_runs_whose_arms_added_the_request(tmp_path):
    bench = load_benchmark("augmentation")
    runs = [_fake_run(1, 0.83, 0.80, 0.79), _fake_run(2, 0.81, 0.82, 0.78)]
    for r in runs:
        r["synthetic_per_class"] = {"1": 2}
        r["synthetic_added_per_class"] = {"+DGC samples": {"1": 2}, "+SMOTE": {"1": 2}}
    assert bench.compare_seeds(bench.merge_runs(runs, ["1", "2"]))["seeds"] == [1, 2]
    runs[1]["synthetic_added_per_class"]["+DGC samples"] = {"1": 1}
    with pytest.raises(ValueError, match="seed 2: arm 'CNN \\+DGC samples' added"):
        bench.compare_seeds(bench.merge_runs(runs, ["1", "2"]))


@pytest.mark.parametrize("option", [["--eval-dgc"], ["--grid", "grid.png"]])
def test_augmentation_refuses_dgc_options_without_the_dgc_arm(tmp_path, capsys, option):
    bench = load_benchmark("augmentation")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--dataset", "digits", "--quick", "--arms", "imbalanced", "smote", *option])
    assert exit_info.value.code == 2
    assert f"{option[0]} need(s) a fitted DGC" in capsys.readouterr().err


def test_collect_refuses_runs_of_different_configurations(tmp_path):
    bench = load_benchmark("augmentation")
    with pytest.raises(ValueError, match="seed 2 differs .* 'dgc'"):
        bench.compare_seeds([_fake_run(1, 0.8, 0.8, 0.8), _fake_run(2, 0.8, 0.8, 0.8, threshold=None)])
    with pytest.raises(ValueError, match="duplicate seeds"):
        bench.compare_seeds([_fake_run(1, 0.8, 0.8, 0.8), _fake_run(1, 0.8, 0.8, 0.8)])
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["--collect", str(bad)])
    assert exit_info.value.code == 2


def test_class_grid_refuses_an_empty_sample_set(tmp_path):
    from types import SimpleNamespace

    bench = load_benchmark("augmentation")
    split = SimpleNamespace(
        num_classes=3,
        x_train=torch.rand(6, 1, 4, 4),
        y_train=torch.tensor([0, 0, 1, 1, 2, 2]),
        class_names=["a", "b", "c"],
        name="toy",
    )
    with pytest.raises(ValueError, match="no synthetic samples"):
        bench.save_class_grid(tmp_path / "grid.png", split, torch.empty(0, 1, 4, 4), torch.empty(0, dtype=torch.long))
    assert not (tmp_path / "grid.png").exists()
    bench.save_class_grid(tmp_path / "grid.png", split, torch.rand(2, 1, 4, 4), torch.tensor([1, 2]))
    assert (tmp_path / "grid.png").read_bytes()[:4] == b"\x89PNG"


def test_random_oversampling_arm_without_a_dgc(tmp_path):
    from dgc_pyro.data import DIGITS_COUNTS

    bench = load_benchmark("augmentation")
    result = bench.main(["--dataset", "digits", "--quick", "--epochs", "1", "--arms", "imbalanced", "ros"])
    assert set(result["reports"]) == {"CNN imbalanced", "CNN +random over-sampling"}
    assert result["dgc"]["best_epoch"] is None and "dgc_fit" not in result["seconds"]
    assert result["arms"] == ["imbalanced", "ros"]
    # the copies are real training images, as many per class as the strategy asks
    split_counts = np.array([max(4, n // 10) for n in DIGITS_COUNTS])
    x = torch.rand(int(split_counts.sum()), 1, 2, 2)
    y = torch.repeat_interleave(torch.arange(len(split_counts)), torch.from_numpy(split_counts))
    x_add, y_add = bench._random_oversampling(x, y, "auto", seed=0)
    assert (
        np.bincount(y_add.numpy(), minlength=len(split_counts)).tolist() == (split_counts.max() - split_counts).tolist()
    )
    matches = (x_add[:, None] == x[None]).flatten(2).all(-1)
    assert matches.any(1).all()
    assert (y[matches.float().argmax(1)] == y_add).all()


def test_collect_joins_runs_of_one_seed_and_checks_shared_arms(tmp_path):
    bench = load_benchmark("augmentation")
    dgc_run = _fake_run(1, 0.83, 0.80, 0.79)
    ros_run = _fake_run(1, 0.0, 0.80, 0.0)
    ros_run["reports"] = {
        "CNN imbalanced": ros_run["reports"]["CNN imbalanced"],
        "CNN +random over-sampling": {"acsa": 0.81, "r_mi": 0.71},
    }
    merged = bench.merge_runs([dgc_run, ros_run], ["dgc.json", "ros.json"])
    assert len(merged) == 1
    assert set(merged[0]["reports"]) == {
        "CNN +DGC samples",
        "CNN imbalanced",
        "CNN +SMOTE",
        "CNN +random over-sampling",
    }
    summary = bench.compare_seeds(merged + bench.merge_runs([_fake_run(2, 0.8, 0.8, 0.8)], ["2.json"]))
    # seed 2 has no random over-sampling arm, so the default comparison leaves that arm out
    assert set(summary["paired"]) == {"CNN +DGC samples - CNN imbalanced", "CNN +DGC samples - CNN +SMOTE"}
    ros_run["reports"]["CNN imbalanced"] = {"acsa": 0.70, "r_mi": 0.6}
    with pytest.raises(ValueError, match="'CNN imbalanced' scores differently in dgc.json and ros.json"):
        bench.merge_runs([dgc_run, ros_run], ["dgc.json", "ros.json"])


def test_filter_cost_benchmark_compares_the_early_stop_with_all_rounds(model, data):
    bench = load_benchmark("augment_filter_cost")
    x, y = data
    original = augment_module._hopeless
    stop = bench.run_filter(model, x, y, threshold=1.0, seed=0, early_stop=True)
    full = bench.run_filter(model, x, y, threshold=1.0, seed=0, early_stop=False)
    assert stop["kept"] == full["kept"] == 0 and "stopped after round" in stop["warning"]
    assert stop["rounds"] < full["rounds"] == 10 and stop["scored"] < full["scored"]
    assert augment_module._hopeless is original  # the early stop is switched back on afterwards


def test_seed_fixes_which_samples_pass_the_filter_and_leaves_the_global_state_alone(model, data):
    x, y = data
    state = torch.get_rng_state()
    runs = [augment(model, x, y, seed=3, filter_threshold=0.26, num_samples_filter=2, max_rounds=3) for _ in range(2)]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(123)  # a different global state must not change the outcome either
    again = augment(model, x, y, seed=3, filter_threshold=0.26, num_samples_filter=2, max_rounds=3)
    for a in runs[1:] + [again]:
        assert torch.equal(a[0], runs[0][0]) and torch.equal(a[1], runs[0][1])


def test_a_request_larger_than_memory_is_refused_before_any_drawing(model, data, monkeypatch):
    x, y = data
    monkeypatch.setattr(augment_module, "_physical_memory", lambda: 2**30)  # a 1 GiB machine
    with pytest.raises(
        ValueError,
        match=r"asks for 10,000,000 synthetic examples, 2\.4 GiB as float32, more than half "
        r"of this machine's 1\.0 GiB",
    ):
        augment(model, x, y, {3: 10_000_001})
    assert augment(model, x, y, {3: 5}, seed=0)[0].shape == (4, *SHAPE)  # small requests are untouched


def test_progress_bar_goes_to_stderr_and_changes_nothing(model, data, capsys):
    x, y = data
    quiet = augment(model, x, y, seed=3, filter_threshold=0.0, num_samples_filter=2)
    assert capsys.readouterr().err == ""
    shown = augment(model, x, y, seed=3, filter_threshold=0.0, num_samples_filter=2, progress=True)
    err = capsys.readouterr().err
    assert "augment" in err and "draw" in err and "round 1" in err  # the bar, with the filter's round
    assert torch.equal(quiet[0], shown[0]) and torch.equal(quiet[1], shown[1])
