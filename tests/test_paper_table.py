"""Smoke test of benchmarks/paper_table.py on tiny fixtures of every dataset layout (and digits)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from fixtures import load_benchmark, write_celeba_fixture, write_mnist_fixture, write_svhn_fixture

METRICS = ("acsa", "fmacro", "gmean", "r_mi", "p_ma", "ece")


@pytest.fixture(scope="module")
def paper_table():
    return load_benchmark("paper_table")


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_mnist_fixture(root, per_class=4, test_per_class=2)
    write_svhn_fixture(root, per_class=4, test_per_class=2)
    write_celeba_fixture(root, per_class=3, valid_per_class=1, test_per_class=2, n_none=1, n_two=1)
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


CASES = {
    "mnist": ["--counts", "4,3,3,3,3,2,2,2,2,2"],
    "svhn": ["--counts", "4,3,3,3,3,2,2,2,2,2"],
    "celeba": ["--counts", "3,2,2,2,2"],
    "digits": ["--counts", "12,10,8,6,5,4,4,3,3,3"],
}


@pytest.mark.parametrize("dataset", list(CASES))
def test_quick_table_writes_summary_runs_and_markdown(dataset, paper_table, data_root, tmp_path):
    out = tmp_path / "out"
    seeds = ["1", "2"] if dataset == "digits" else ["1"]  # std over two seeds once; one seed keeps the rest fast
    argv = [
        "--dataset",
        dataset,
        "--data-dir",
        str(data_root),
        "--seeds",
        *seeds,
        "--quick",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--out",
        str(out),
        *CASES[dataset],
    ]
    assert paper_table.main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == set(paper_table.METHODS)
    for method, metrics in summary.items():
        for metric in METRICS:
            cell = metrics[metric]
            assert set(cell) == {"mean", "std"}, (method, metric)
            assert 0.0 <= cell["mean"] <= 1.0 and cell["std"] >= 0.0
        for seed in map(int, seeds):
            run = json.loads((out / "runs" / f"{method}_seed{seed}.json").read_text())
            assert run["seed"] == seed and run["method"] == method
    table = (out / "table.md").read_text()
    assert "| Method | ACSA | F_macro | G_macro | R_MI | P_MA | ECE | Wall time (s) |" in table
    assert ("DGC (paper, published)" in table) == (dataset != "digits")
    assert "±" in table


def test_resume_reuses_runs_and_methods_subset(paper_table, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "3",
        "--quick",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "ce",
        "dgc_wae_mmd",
        "--out",
        str(out),
    ]
    assert paper_table.main(argv) == 0
    first = json.loads((out / "runs" / "ce_seed3.json").read_text())
    assert paper_table.main(argv + ["--resume"]) == 0
    assert json.loads((out / "runs" / "ce_seed3.json").read_text()) == first
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"ce", "dgc_wae_mmd"}
    assert summary["ce"]["acsa"]["std"] == 0.0
    recipe = json.loads((out / "runs" / "dgc_wae_mmd_seed3.json").read_text())["recipe"]
    assert recipe["objective"].startswith("wae-mmd")


def test_render_table_has_paper_row(paper_table):
    summary = {"dgc_elbo": {m: {"mean": 0.5, "std": 0.01} for m in METRICS} | {"seconds": {"mean": 3.0, "std": 0.0}}}
    text = paper_table.render_table("fashion", summary, [1, 2])
    assert "| DGC (paper, published) | 0.8364 | 0.8314 | 0.9010 | 0.8864 | 0.6900 | — | — |" in text
    assert "| DGC, ELBO (ours) | 0.5000 ± 0.0100" in text


def test_collect_summarises_existing_runs_without_fitting(paper_table, tmp_path, capsys):
    out = tmp_path / "out"
    common = [
        "--dataset",
        "digits",
        "--quick",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--out",
        str(out),
    ]
    # two "per-seed processes", as benchmarks/gpu_suite.sh runs them
    assert paper_table.main(common + ["--seeds", "1", "--methods", "ce", "dgc_elbo"]) == 0
    assert paper_table.main(common + ["--seeds", "2", "--methods", "ce"]) == 0
    before = sorted(p.name for p in (out / "runs").iterdir())
    assert paper_table.main(common + ["--seeds", "1", "2", "--methods", "ce", "dgc_elbo", "--collect"]) == 0
    assert sorted(p.name for p in (out / "runs").iterdir()) == before  # nothing was fitted
    assert "seed 2 dgc_elbo: no" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"ce", "dgc_elbo"}
    ce = [json.loads((out / "runs" / f"ce_seed{s}.json").read_text())["acsa"] for s in (1, 2)]
    assert summary["ce"]["acsa"]["mean"] == pytest.approx(sum(ce) / 2)  # both of ce's seeds were pooled
    assert summary["dgc_elbo"]["acsa"]["std"] == 0.0  # dgc_elbo ran one seed
    run = json.loads((out / "runs" / "dgc_elbo_seed1.json").read_text())
    assert run["val_acsa"] is not None and 0.0 <= run["val_acsa"] <= 1.0
    assert "collected from per-seed runs" in (out / "table.md").read_text()


def test_collect_from_pools_runs_of_other_tables_and_reference_sets_the_pairs(paper_table, tmp_path):
    common = [
        "--dataset",
        "digits",
        "--quick",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "ce",
        "logit_adjusted",
    ]
    first, second, pooled = tmp_path / "a", tmp_path / "b", tmp_path / "pooled"
    assert paper_table.main(common + ["--seeds", "1", "--out", str(first)]) == 0
    assert paper_table.main(common + ["--seeds", "2", "--out", str(second)]) == 0
    argv = common + [
        "--seeds",
        "1",
        "2",
        "--collect",
        "--collect-from",
        str(first),
        str(second),
        "--reference",
        "logit_adjusted",
        "--out",
        str(pooled),
    ]
    assert paper_table.main(argv) == 0
    assert not (pooled / "runs").exists()  # nothing fitted, nothing copied
    runs = {s: json.loads((d / "runs" / f"ce_seed{s}.json").read_text())["acsa"] for s, d in ((1, first), (2, second))}
    summary = json.loads((pooled / "summary.json").read_text())
    assert summary["ce"]["acsa"]["mean"] == pytest.approx((runs[1] + runs[2]) / 2)
    pairs = json.loads((pooled / "paired.json").read_text())
    assert set(pairs) == {"logit_adjusted - ce"} and pairs["logit_adjusted - ce"]["acsa"]["n"] == 2
    assert "Paired over seeds (Logit-adjusted CE minus each method" in (pooled / "table.md").read_text()
    with pytest.raises(SystemExit, match="--collect-from pools finished runs; it needs --collect"):
        paper_table.main([a for a in argv if a != "--collect"])
    with pytest.raises(SystemExit, match="--reference dgc_elbo is not among --methods"):
        paper_table.main(common + ["--seeds", "1", "--collect", "--reference", "dgc_elbo", "--out", str(pooled)])
    with pytest.raises(SystemExit, match="--collect-from: no runs/ folder in"):
        paper_table.main(
            common + ["--seeds", "1", "--collect", "--collect-from", str(tmp_path / "nowhere"), "--out", str(pooled)]
        )


def test_also_last_scores_the_last_epoch_without_changing_the_selected_one(paper_table, tmp_path):
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "1",
        "--quick",
        "--epochs",
        "3",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "dgc_elbo",
        "logit_adjusted",
    ]
    plain, both = tmp_path / "plain", tmp_path / "both"
    assert paper_table.main(argv + ["--out", str(plain)]) == 0
    assert paper_table.main(argv + ["--also-last", "--out", str(both)]) == 0
    for method in ("dgc_elbo", "logit_adjusted"):
        before = json.loads((plain / "runs" / f"{method}_seed1.json").read_text())
        after = json.loads((both / "runs" / f"{method}_seed1.json").read_text())
        assert "last_epoch" not in before
        assert after["acsa"] == before["acsa"] and after["ece"] == before["ece"]  # keeping the last weights is free
        assert after["last_epoch"]["epoch"] == 3 and 0.0 <= after["last_epoch"]["acsa"] <= 1.0
        if after["best_epoch"] == 3:
            assert after["last_epoch"]["acsa"] == after["acsa"]
    # The kept last-epoch weights are those a fit that keeps the last epoch ends with.
    last = tmp_path / "last"
    assert (
        paper_table.main(
            argv + ["--recipe-set", "select_best=false", "--methods", "logit_adjusted", "--out", str(last)]
        )
        == 0
    )
    kept = json.loads((both / "runs" / "logit_adjusted_seed1.json").read_text())["last_epoch"]
    assert kept["acsa"] == json.loads((last / "runs" / "logit_adjusted_seed1.json").read_text())["acsa"]
    pairs = json.loads((both / "paired_last_epoch.json").read_text())
    assert set(pairs) == {"dgc_elbo: last - selected", "logit_adjusted: last - selected"}
    assert "Last epoch minus the epoch selected on validation" in (both / "table.md").read_text()
    assert not (plain / "paired_last_epoch.json").exists()


def test_evaluate_on_dev_scores_unused_training_images_and_never_mixes_with_test_runs(paper_table, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "1",
        "--quick",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "ce",
        "--out",
        str(out),
    ]
    assert paper_table.main(argv + ["--evaluate-on", "dev", "--dev-per-class", "3"]) == 0
    run = json.loads((out / "runs" / "ce_seed1.json").read_text())
    assert run["evaluated_on"] == "dev:3" and run["test_size"] == 30
    assert "NOT the test split" in (out / "table.md").read_text()
    config = (out / "config.json").read_text()
    with pytest.raises(SystemExit, match="evaluated_on: 'dev:3' in the run, 'test' now"):
        paper_table.main(argv + ["--resume"])
    with pytest.raises(SystemExit, match="evaluated_on: 'dev:3' in the run, 'dev:4' now"):
        paper_table.main(argv + ["--collect", "--evaluate-on", "dev", "--dev-per-class", "4"])
    assert (out / "config.json").read_text() == config  # refused before anything was written
    with pytest.raises(SystemExit, match="--dev-per-class sizes the dev set; it needs --evaluate-on dev"):
        paper_table.main(argv + ["--dev-per-class", "3"])
    test_out = tmp_path / "test"
    assert paper_table.main([a if a != str(out) else str(test_out) for a in argv]) == 0
    assert json.loads((test_out / "runs" / "ce_seed1.json").read_text())["evaluated_on"] == "test"
    assert "scored on the official test split" in (test_out / "table.md").read_text()


def test_dgc_variants_set_their_recipe(paper_table, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "1",
        "--quick",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "dgc_elbo_paper_guide_la",
        "--out",
        str(out),
    ]
    assert paper_table.main(argv) == 0
    run = json.loads((out / "runs" / "dgc_elbo_paper_guide_la_seed1.json").read_text())
    assert run["recipe"]["label_in_guide"] is True and run["recipe"]["logit_adjustment"] == 1.0
    assert run["rule"] == "mixture"


def test_class_conditional_variant_is_scored_by_bayes_rule(paper_table, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "1",
        "--quick",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "dgc_class_conditional",
        "--out",
        str(out),
    ]
    assert paper_table.main(argv) == 0
    run = json.loads((out / "runs" / "dgc_class_conditional_seed1.json").read_text())
    assert run["recipe"]["latent_prior"] == "class_conditional" and run["recipe"]["perturbation_rate"] == 0.0
    assert run["rule"] == "bayes"


def test_transform_reaches_every_method_and_needs_images(paper_table, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "1",
        "--quick",
        "--backbone",
        "conv",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "dgc_elbo",
        "logit_adjusted",
        "--transform",
        "shift",
        "--out",
        str(out),
    ]
    assert paper_table.main(argv) == 0
    dgc = json.loads((out / "runs" / "dgc_elbo_seed1.json").read_text())
    la = json.loads((out / "runs" / "logit_adjusted_seed1.json").read_text())
    assert dgc["recipe"]["transform"] == "shift" and la["settings"]["transform"] == "shift"
    assert "training transform shift, constant learning rate (every method)" in (out / "table.md").read_text()
    with pytest.raises(SystemExit, match="--transform shift shifts image pixels; it needs --backbone conv"):
        paper_table.main([a if a != "conv" else "mlp" for a in argv])


def test_committed_fashion_summary_has_the_promised_shape(paper_table):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fashion" / "summary.json"
    summary = json.loads(path.read_text())
    assert {"dgc_elbo", "dgc_wae_mmd", *paper_table.BASELINE_LOSSES} <= set(summary)
    for method in ("dgc_elbo", "dgc_wae_mmd", *paper_table.BASELINE_LOSSES):
        for metric in METRICS:
            cell = summary[method][metric]
            assert set(cell) == {"mean", "std"}, (method, metric)
            assert 0.0 <= cell["mean"] <= 1.0 and 0.0 <= cell["std"] < 0.5, (method, metric)


def test_select_best_false_keeps_the_last_epoch_for_every_method(paper_table, tmp_path):
    out = tmp_path / "last"
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "1",
        "--quick",
        "--epochs",
        "3",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "dgc_elbo",
        "logit_adjusted",
        "--out",
        str(out),
        "--recipe-set",
        "select_best=false",
        "--also-last",
    ]
    assert paper_table.main(argv) == 0
    dgc = json.loads((out / "runs" / "dgc_elbo_seed1.json").read_text())
    base = json.loads((out / "runs" / "logit_adjusted_seed1.json").read_text())
    assert dgc["recipe"]["select_best"] is False and base["settings"]["select_best"] is False
    for run in (dgc, base):  # the scored weights are the last epoch's, and validation still monitors every epoch
        assert run["best_epoch"] == 3 and run["acsa"] == run["last_epoch"]["acsa"]
        assert all("val_acsa" in r for r in run["history"])
    pairs = json.loads((out / "paired_last_epoch.json").read_text())
    assert all(cell["acsa"]["mean"] == 0.0 for cell in pairs.values())
    assert "weights of the last epoch (every method)" in (out / "table.md").read_text()


def test_quick_keeps_the_epochs_of_a_cpu_sized_recipe(paper_table):
    quick = paper_table.build_parser().parse_args(["--dataset", "digits", "--quick", "--out", "unused"])
    assert paper_table.recipe_for("digits", quick).epochs == paper_table.default_recipe("digits").epochs
    quick.dataset = "fashion"
    fashion = paper_table.recipe_for("fashion", quick)
    assert fashion.epochs == paper_table.QUICK["epochs"] and fashion.preset == "small"


def test_every_preset_brings_its_own_recipe(paper_table):
    from dgc_pyro.experiment import DEFAULT_RECIPES, PRESET_CHANGES, default_recipe

    fashion = DEFAULT_RECIPES["fashion"]
    assert default_recipe("fashion") == fashion == default_recipe("fashion", "small")
    paper = default_recipe("fashion", "paper")
    assert paper.preset == "paper" and paper.lr == 3e-4 == PRESET_CHANGES["paper"]["lr"]  # measured on an H200
    assert dataclasses.replace(paper, preset="small", lr=fashion.lr) == fashion  # nothing else changes
    with pytest.raises(ValueError, match="preset must be one of"):
        default_recipe("fashion", "huge")
    # benchmarks/paper_table.py --preset paper takes the preset's recipe; --recipe-set still wins
    args = paper_table.build_parser().parse_args(["--dataset", "fashion", "--preset", "paper", "--out", "unused"])
    assert paper_table.recipe_for("fashion", args) == paper
    args.recipe_set = ["lr=1e-4"]
    assert paper_table.recipe_for("fashion", args).lr == 1e-4


def test_recipe_set_changes_the_dgc_recipe_and_rejects_unknown_fields(paper_table, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "1",
        "--quick",
        "--epochs",
        "1",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "dgc_elbo",
        "--out",
        str(out),
        "--recipe-set",
        "perturbation_prior=perturbed",
        "label_weight=300",
    ]
    assert paper_table.main(argv) == 0
    run = json.loads((out / "runs" / "dgc_elbo_seed1.json").read_text())
    assert run["recipe"]["perturbation_prior"] == "perturbed" and run["recipe"]["label_weight"] == 300.0
    assert json.loads((out / "config.json").read_text())["recipe"]["label_weight"] == 300.0
    with pytest.raises(SystemExit, match="--recipe-set: recipe override 'lable_weight=3': no field 'lable_weight'"):
        paper_table.main(argv[:-2] + ["lable_weight=3"])


def test_lr_schedule_reaches_dgc_and_every_baseline(paper_table, tmp_path):
    out = tmp_path / "out"
    argv = [
        "--dataset",
        "digits",
        "--seeds",
        "1",
        "--quick",
        "--epochs",
        "2",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--methods",
        "dgc_elbo",
        "logit_adjusted",
        "--out",
        str(out),
        "--lr-schedule",
        "cosine",
    ]
    assert paper_table.main(argv) == 0
    dgc = json.loads((out / "runs" / "dgc_elbo_seed1.json").read_text())
    base = json.loads((out / "runs" / "logit_adjusted_seed1.json").read_text())
    assert dgc["recipe"]["lr_schedule"] == "cosine" and base["settings"]["lr_schedule"] == "cosine"
    for run in (dgc, base):
        assert [r["epoch"] for r in run["history"]] == [1, 2]
    assert base["history"][0]["lr"] > base["history"][1]["lr"] > 0  # epoch 2 starts half way down the cosine
    # DGC's first epoch is fit's learning-rate warm-up (on by default; its record holds the first step's rate)
    assert 0 < dgc["history"][0]["lr"] < dgc["recipe"]["lr"] and 0 < dgc["history"][1]["lr"] < dgc["recipe"]["lr"]
    table = (out / "table.md").read_text()
    assert base["best_epoch"] in (1, 2) and "cosine learning rate (every method)" in table
    pairs = json.loads((out / "paired.json").read_text())
    cell = pairs["dgc_elbo - logit_adjusted"]["acsa"]
    assert cell["n"] == 1 and cell["mean"] == pytest.approx(dgc["acsa"] - base["acsa"])
    assert "| dgc_elbo - logit_adjusted | acsa |" in table


def test_paired_comparisons_use_the_seeds_both_methods_ran(paper_table):
    def run(seed, acsa, ece=0.05):
        return {"seed": seed, "acsa": acsa, "ece": ece}

    runs = {
        "dgc_elbo": [run(1, 0.86), run(2, 0.87), run(3, 0.85)],
        "ce": [run(3, 0.83), run(1, 0.84)],  # seed 2 missing, order differs
        "ldam_drw": [run(9, 0.8)],
    }  # no seed in common: left out
    pairs = paper_table.paired_comparisons(runs)
    assert list(pairs) == ["dgc_elbo - ce"]
    assert pairs["dgc_elbo - ce"]["acsa"]["n"] == 2
    assert pairs["dgc_elbo - ce"]["acsa"]["mean"] == pytest.approx(((0.86 - 0.84) + (0.85 - 0.83)) / 2)
    assert pairs["dgc_elbo - ce"]["ece"]["mean"] == pytest.approx(0.0)
    assert paper_table.paired_comparisons({"ce": runs["ce"]}) == {}


def test_pooling_refuses_runs_made_with_other_settings_and_the_header_names_the_pooled_seeds(paper_table, tmp_path):
    out = tmp_path / "out"
    common = [
        "--dataset",
        "digits",
        "--quick",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--out",
        str(out),
    ]
    assert paper_table.main(common + ["--epochs", "1", "--seeds", "1", "--methods", "ce", "dgc_elbo"]) == 0
    assert paper_table.main(common + ["--epochs", "1", "--seeds", "2", "--methods", "ce"]) == 0
    config = (out / "config.json").read_text()
    with pytest.raises(
        SystemExit,
        match=r"ce_seed1.json was made with other settings .*settings.epochs: 1 in the run, "
        r"2 now",
    ):
        paper_table.main(common + ["--epochs", "2", "--seeds", "1", "2", "--methods", "ce", "--collect"])
    with pytest.raises(SystemExit, match=r"dgc_elbo_seed1.json was made with other settings .*recipe.label_weight: "):
        paper_table.main(
            common
            + ["--epochs", "1", "--seeds", "1", "--methods", "dgc_elbo", "--resume", "--recipe-set", "label_weight=7"]
        )
    with pytest.raises(SystemExit, match=r"backbone: 'mlp' in the run, 'conv' now"):
        paper_table.main(
            common + ["--epochs", "1", "--seeds", "1", "--methods", "ce", "--collect", "--backbone", "conv"]
        )
    with pytest.raises(SystemExit, match=r"train_counts: \[12, 10, .*\] in the run, \[13, 10, "):
        paper_table.main(
            [a if a != "12,10,8,6,5,4,4,3,3,3" else "13,10,8,6,5,4,4,3,3,3" for a in common]
            + ["--epochs", "1", "--seeds", "1", "--methods", "ce", "--collect"]
        )
    assert (out / "config.json").read_text() == config  # refused before anything was written
    # Asked for three seeds, two exist: the header names the two, and dgc_elbo's row says it has one.
    assert (
        paper_table.main(
            common + ["--epochs", "1", "--seeds", "1", "2", "3", "--methods", "ce", "dgc_elbo", "--collect"]
        )
        == 0
    )
    table = (out / "table.md").read_text()
    assert "mean ± std over seeds 1, 2\n" in table
    assert "| DGC, ELBO (ours) (1 of 2 seeds) |" in table and "| CE |" in table


def test_baseline_set_reaches_the_baselines_and_is_part_of_their_settings(paper_table, tmp_path):
    out = tmp_path / "out"
    common = [
        "--dataset",
        "digits",
        "--quick",
        "--num-samples",
        "2",
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--counts",
        "12,10,8,6,5,4,4,3,3,3",
        "--seeds",
        "1",
        "--out",
        str(out),
    ]
    assert (
        paper_table.main(common + ["--methods", "logit_adjusted", "ce", "--baseline-set", "lr=0.002", "tau=1.5"]) == 0
    )
    la = json.loads((out / "runs" / "logit_adjusted_seed1.json").read_text())
    ce = json.loads((out / "runs" / "ce_seed1.json").read_text())
    assert la["settings"]["lr"] == 0.002 and la["settings"]["tau"] == 1.5
    assert ce["settings"]["lr"] == 0.002 and "tau" not in ce["settings"]  # CE has no prior to scale
    with pytest.raises(
        SystemExit,
        match=r"logit_adjusted_seed1.json was made with other settings .*settings.tau: 1.5 in "
        r"the run, 1.0 now",
    ):
        paper_table.main(common + ["--methods", "logit_adjusted", "--resume", "--baseline-set", "lr=0.002"])
    for bad, message in (
        ("tau", "is not FIELD=VALUE"),
        ("beta=1", "is not FIELD=VALUE"),
        ("lr=abc", "lr needs a number"),
        ("lr=0", "lr must be > 0"),
        ("tau=-1", "tau must be >= 0"),
    ):
        with pytest.raises(SystemExit, match=message):
            paper_table.main(common + ["--methods", "ce", "--baseline-set", bad])


def test_a_field_added_after_a_run_is_not_held_against_it_at_any_depth(paper_table):
    run = {"settings": {"recipe": {"lr": 1e-3, "epochs": 30}}, "dataset": "fashion"}
    newer = {"settings": {"recipe": {"lr": 1e-3, "epochs": 30, "swag_start": None}}, "dataset": "fashion"}
    assert paper_table.settings_differences(run, newer) == []
    changed = {"settings": {"recipe": {"lr": 2e-3, "epochs": 30, "swag_start": None}}, "dataset": "fashion"}
    assert paper_table.settings_differences(run, changed) == ["settings.recipe.lr: 0.001 in the run, 0.002 now"]
