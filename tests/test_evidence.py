"""benchmarks/evidence.py end to end in its smoke mode (digits, one epoch, a two-point grid): the plan, the runs,
the summary's shape and the ranges of its values, resuming, and the protocol's refusals."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import pytest
from fixtures import load_benchmark

from dgc_pyro.inference.callbacks import Callback, TrainingInterrupted

pytestmark = pytest.mark.usefixtures("one_thread")

REQUIRED_METHODS = (
    "dgc_elbo",
    "vib",
    "dgc_paper_guide",
    "ce",
    "logit_adjusted",
    "balanced_softmax",
    "logit_adjusted_matched",
    "balanced_softmax_matched",
)
REQUIRED_METRICS = (
    "acsa",
    "fmacro",
    "gmean",
    "r_mi",
    "ece",
    "ece_ts",
    "nll_ts",
    "aurc",
    "ood_auroc",
    "ood_auroc_digits",
    "ood_auroc_vflip",
    "ood_auroc_invert",
    "ood_auroc_noise",
)
UNIT_METRICS = {
    "acsa",
    "fmacro",
    "gmean",
    "r_mi",
    "p_ma",
    "acc",
    "ece",
    "ece_ts",
    "aurc",
    "aurc_entropy",
    "aurc_mi",
    "fpr95",
} | {m for m in REQUIRED_METRICS if m.startswith("ood_auroc")}


@pytest.fixture(scope="module")
def evidence():
    return load_benchmark("evidence")


@pytest.fixture(scope="module")
def smoke(evidence, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("evidence")
    common = ["--smoke", "--device", "cpu", "--out", str(out)]
    assert evidence.main(["--phase", "tune", "--seeds", "1", "--write-plan", *common]) == 0
    assert evidence.main(["--phase", "test", "--seeds", "2", "3", *common]) == 0
    return out


def test_the_plan_fixes_every_row_from_the_dev_set(evidence, smoke):
    plan = json.loads((smoke / "plan.json").read_text())
    assert set(plan["selected"]) == set(evidence.TUNED) and plan["tune_seeds"] == [1]
    for method, chosen in plan["selected"].items():
        configs = evidence.grid_of(method, evidence.SMOKE_GRID)
        assert {k: v for k, v in chosen.items() if k != "dev_acsa"} in configs
        scores = [
            json.loads((smoke / "tune" / f"{method}_{evidence.config_key(c)}_seed1.json").read_text())["acsa"]
            for c in configs
        ]
        assert chosen["dev_acsa"] == max(scores)  # the best dev ACSA wins
    assert set(plan["matched_epochs"]) == set(evidence.MATCHED)
    assert all(plan["epochs"] <= e <= evidence.SMOKE["max_matched_epochs"] for e in plan["matched_epochs"].values())


def test_summary_has_every_method_and_metric_in_range(smoke):
    summary = json.loads((smoke / "summary.json").read_text())
    assert summary["n_seeds"] == 2
    assert set(summary) == set(REQUIRED_METHODS) | {"n_seeds"}
    for method in REQUIRED_METHODS:
        for metric in REQUIRED_METRICS:
            cell = summary[method][metric]
            assert set(cell) == {"mean", "std"} and cell["std"] >= 0.0, (method, metric)
        for metric, cell in summary[method].items():
            assert math.isfinite(cell["mean"]), (method, metric)
            if metric in UNIT_METRICS:
                assert 0.0 <= cell["mean"] <= 1.0, (method, metric, cell)
        assert summary[method]["nll_ts"]["mean"] > 0 and summary[method]["temperature"]["mean"] > 0
    # each row has its own extra OOD scores: the baselines' energy, DGC's mutual information
    assert "ood_auroc_by_energy" in summary["ce"] and "ood_auroc_by_energy" not in summary["dgc_elbo"]
    assert "ood_auroc_by_mi" in summary["dgc_elbo"] and "aurc_mi" in summary["vib"]
    # the own OOD score fixed in advance: energy for a baseline
    assert summary["ce"]["ood_auroc_own"] == summary["ce"]["ood_auroc_by_energy"]


def test_runs_record_their_settings_and_the_table_is_written(smoke):
    vib = json.loads((smoke / "runs" / "vib_seed2.json").read_text())
    assert vib["settings"]["recipe"]["observe_x"] is False and vib["evaluated_on"] == "test"
    assert vib["ood_own_score"] == "maxprob"  # a model of y alone has no density score
    dgc = json.loads((smoke / "runs" / "dgc_elbo_seed2.json").read_text())
    assert "density" in dgc["ood"] and dgc["ood_own_score"] == "typicality"  # predict gives log_density
    plan = json.loads((smoke / "plan.json").read_text())
    matched = json.loads((smoke / "runs" / "logit_adjusted_matched_seed3.json").read_text())
    assert matched["settings"]["epochs"] == plan["matched_epochs"]["logit_adjusted_matched"]
    assert matched["settings"]["lr"] == plan["selected"]["logit_adjusted"]["lr"]
    table = (smoke / "table.md").read_text()
    assert "| Method | ACSA |" in table and "dgc_elbo - vib" in table and "±" in table
    pairs = json.loads((smoke / "paired.json").read_text())
    assert set(pairs) == {f"dgc_elbo - {m}" for m in REQUIRED_METHODS if m != "dgc_elbo"}


def test_a_rerun_skips_finished_runs_and_collect_fits_nothing(evidence, smoke):
    before = {p.name: p.read_text() for p in (smoke / "runs").glob("*.json")}
    assert (
        evidence.main(["--phase", "test", "--seeds", "2", "3", "--smoke", "--device", "cpu", "--out", str(smoke)]) == 0
    )
    assert {p.name: p.read_text() for p in (smoke / "runs").glob("*.json")} == before
    assert evidence.main(["--phase", "test", "--seeds", "2", "9", "--collect", "--smoke", "--out", str(smoke)]) == 0
    assert not (smoke / "runs" / "ce_seed9.json").exists()
    assert json.loads((smoke / "summary.json").read_text())["n_seeds"] == 1


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--phase", "test", "--seeds", "1"], "seeds \\[1\\] tuned the plan"),
        (["--phase", "test", "--seeds", "4", "--epochs", "2"], "the plan fixes 1 epochs"),
        (["--phase", "tune", "--methods", "logit_adjusted_matched"], "are not tuned"),
        (["--phase", "test", "--seeds", "4", "4"], "lists a seed twice"),
    ],
)
def test_protocol_refusals(evidence, smoke, argv, match):
    with pytest.raises(SystemExit, match=match):
        evidence.main([*argv, "--smoke", "--device", "cpu", "--out", str(smoke)])


def test_only_the_registering_call_writes_the_plan(evidence, smoke, tmp_path):
    """A tune call on part of the grid prints its selection but leaves plan.json alone (session 12 found such calls
    overwriting the plan), and a plan that already fixes test runs is never rewritten."""
    plan = (smoke / "plan.json").read_bytes()
    common = ["--phase", "tune", "--seeds", "1", "--smoke", "--device", "cpu", "--out", str(smoke), "--collect"]
    assert evidence.main([*common, "--grid-tau", "1.0"]) == 0
    assert (smoke / "plan.json").read_bytes() == plan
    with pytest.raises(SystemExit, match=r"already fixes \d+ test run"):
        evidence.main([*common, "--write-plan"])
    with pytest.raises(SystemExit, match="a subset of --methods"):
        evidence.main([*common, "--write-plan", "--methods", "ce"])
    assert (smoke / "plan.json").read_bytes() == plan


def test_the_test_phase_needs_a_plan(evidence, tmp_path):
    with pytest.raises(SystemExit, match="run --phase tune first"):
        evidence.main(["--phase", "test", "--smoke", "--out", str(tmp_path)])


def test_a_density_from_predict_gives_the_density_and_typicality_scores(evidence, monkeypatch):
    """The density and typicality scores and DGC's own OOD score, from a log_density faked so that the expected
    separation is known (a one-epoch model's real density ranks nothing reliably)."""
    from dgc_pyro.data import load_imbalanced
    from dgc_pyro.experiment import Recipe

    split = load_imbalanced("digits", counts=(12, 10, 8, 6, 5, 4, 4, 3, 3, 3), seed=1)
    dev = load_imbalanced("digits", counts=(12, 10, 8, 6, 5, 4, 4, 3, 3, 3), seed=1, evaluate_on="dev", dev_per_class=5)
    recipe = Recipe(latent_dim=4, num_samples=2, label_in_guide=False, logit_adjustment=1.0)
    model = recipe.build_model(split.input_shape, split.num_classes, split.train_counts)
    real = evidence.predict

    def with_density(model, x, *args, **kwargs):
        pred = real(model, x, *args, **kwargs)
        pred.log_density = -x.reshape(len(x), -1).sum(-1)  # brighter images are "less likely"
        return pred

    monkeypatch.setattr(evidence, "predict", with_density)
    fitted = evidence.Fitted("dgc_elbo", 0.0, model=model, recipe=recipe)
    run = evidence.evaluate_run(fitted, split, dev.x_test, dev.y_test, seed=0, ood_per_set=40)
    assert {"density", "typicality"} <= set(run["ood"]) and run["ood_own_score"] == "typicality"
    assert run["ood_auroc_own"] == run["ood_auroc_by_typicality"]
    # the inverted images are much brighter than digits: the fake density separates them perfectly
    assert run["ood"]["density"]["invert"]["auroc"] == 1.0
    assert 0.0 <= run["ood_auroc_by_typicality"] <= 1.0


def test_a_finished_run_of_other_settings_is_refused_not_pooled(evidence, smoke):
    common = ["--phase", "test", "--seeds", "2", "--smoke", "--methods", "ce", "--collect", "--out", str(smoke)]
    with pytest.raises(SystemExit, match="ood_per_set: 50 in the run, 40 now"):
        evidence.main([*common, "--ood-per-set", "40"])
    with pytest.raises(SystemExit, match="plan.json was made with dev_per_class 5, this command has 4"):
        evidence.main([*common, "--dev-per-class", "4"])


# ----------------------------------------------------------------------------- issue 21's variants
@pytest.fixture(scope="module")
def variants(evidence, tmp_path_factory) -> tuple[Path, Path]:
    """A 7-epoch smoke plan (so SWAG's window, the last 30%, holds two snapshots), a variants plan registered
    from it, and one test seed of the default DGC, the matched LA baseline and every variant."""
    base, out = tmp_path_factory.mktemp("base"), tmp_path_factory.mktemp("variants")
    common = ["--smoke", "--device", "cpu"]
    tune = ["--phase", "tune", "--seeds", "1", "--epochs", "7", "--write-plan", "--out", str(base)]
    assert evidence.main([*tune, *common]) == 0
    assert evidence.main(["--phase", "register", "--from", str(base / "plan.json"), "--out", str(out), *common]) == 0
    rows = ["dgc_swag", "dgc_elbo", "logit_adjusted_matched", *(v for v in evidence.VARIANTS if v != "dgc_swag")]
    assert evidence.main(["--phase", "test", "--seeds", "2", "--methods", *rows, "--out", str(out), *common]) == 0
    return base, out


def test_register_extends_the_plan_with_the_variants_settings(evidence, variants):
    base, plan = (json.loads((p / "plan.json").read_text()) for p in variants)
    assert plan["selected"] == base["selected"] and plan["matched_epochs"] == base["matched_epochs"]
    assert set(plan["variants"]) == set(evidence.VARIANTS)
    assert plan["variants"]["dgc_crt"]["changes"]["retrain_head_epochs"] == 1  # 20% of 7 epochs, rounded
    assert plan["registered_from"]["plan"] == str(variants[0] / "plan.json")


def test_each_variant_runs_its_base_rows_settings_with_its_changes(evidence, variants):
    out = variants[1]
    plan = json.loads((out / "plan.json").read_text())
    for name, variant in plan["variants"].items():
        run = json.loads((out / "runs" / f"{name}_seed2.json").read_text())
        recipe = run["settings"]["recipe"]
        assert recipe["lr"] == plan["selected"][variant["base"]]["lr"], name
        for key, value in variant["changes"].items():
            assert recipe[key] == value, (name, key)
        assert 0.0 <= run["dev_acsa"] <= 1.0
    assert json.loads((out / "runs" / "dgc_paper_iwae_cf_seed2.json").read_text())["settings"]["recipe"][
        "label_in_guide"
    ]


def test_the_swag_row_shares_the_default_rows_fit_and_averages_over_head_draws(variants):
    out = variants[1]
    swag, dgc = (json.loads((out / "runs" / f"{m}_seed2.json").read_text()) for m in ("dgc_swag", "dgc_elbo"))
    assert swag["settings"]["swag"] == {"start": 0.7, "head_samples": 10}
    assert swag["fit_seconds"] == dgc["fit_seconds"] and swag["history"] == dgc["history"]  # one fit
    assert swag["nll"] != dgc["nll"]  # the class posterior is averaged over 10 head draws


def test_every_dgc_row_is_paired_with_the_matched_baseline(evidence, variants):
    out = variants[1]
    pairs = json.loads((out / "paired_vs_baselines.json").read_text())
    for row in ("dgc_elbo", *evidence.VARIANTS):
        cell = pairs[f"{row} - logit_adjusted_matched"]
        assert set(cell) == set(evidence.VARIANT_PAIRED_METRICS)
        summary = json.loads((out / "summary.json").read_text())
        assert cell["acsa"]["mean"] == pytest.approx(
            summary[row]["acsa"]["mean"] - summary["logit_adjusted_matched"]["acsa"]["mean"]
        )
    assert "dgc_crt - logit_adjusted_matched" in (out / "table.md").read_text()


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--phase", "register"], "needs --from"),
        (["--phase", "tune", "--methods", "dgc_drw"], "register them"),
        (["--phase", "test", "--from", "x.json"], "--from belongs"),
    ],
)
def test_variant_refusals(evidence, tmp_path, argv, match):
    with pytest.raises(SystemExit, match=match):
        evidence.main([*argv, "--smoke", "--out", str(tmp_path)])


def test_a_plan_is_registered_once_and_variants_need_it(evidence, variants, smoke):
    base, out = variants
    with pytest.raises(SystemExit, match="not rewritten"):
        evidence.main(["--phase", "register", "--from", str(base / "plan.json"), "--smoke", "--out", str(out)])
    with pytest.raises(SystemExit, match="registers no dgc_drw"):
        evidence.main(["--phase", "test", "--seeds", "2", "--methods", "dgc_drw", "--smoke", "--out", str(smoke)])


def test_the_variant_rows_are_copied_into_the_source_plans_summary(evidence, variants):
    base, out = variants
    summary = json.loads((out / "summary.json").read_text())
    recorded = json.loads((base / "summary.json").read_text())["variants"]
    assert recorded["seeds"] == [2] and recorded["plan"] == str(out / "plan.json")
    assert set(recorded["rows"]) == {"dgc_elbo", "logit_adjusted_matched", *evidence.VARIANTS}
    for row, cell in recorded["rows"].items():
        assert cell == summary[row], row
    assert "row_seeds" not in recorded  # every row has the run's one seed


def test_a_row_still_being_completed_is_recorded_with_its_own_seeds(evidence, tmp_path):
    source = tmp_path / "evidence" / "plan.json"
    source.parent.mkdir()
    source.write_text("{}")
    (source.parent / "summary.json").write_text(json.dumps({"ce": {"acsa": {"mean": 0.8, "std": 0.0}}}))
    cell = {"acsa": {"mean": 0.9, "std": 0.01}}
    summary = {"dgc_elbo": cell, "dgc_paper_iwae_cf": cell, "ce": cell}
    plan = {"registered_from": {"plan": str(source)}}
    row_seeds = {"dgc_elbo": [71, 72, 73], "dgc_paper_iwae_cf": [72, 71], "ce": [71]}
    path = evidence.record_variant_rows(plan, tmp_path / "variants.json", summary, [71, 72, 73], row_seeds)
    merged = json.loads(path.read_text())
    assert merged["ce"] == {"acsa": {"mean": 0.8, "std": 0.0}}  # the source plan's own row is left alone
    assert set(merged["variants"]["rows"]) == {"dgc_elbo", "dgc_paper_iwae_cf"}
    assert merged["variants"]["row_seeds"] == {"dgc_paper_iwae_cf": [71, 72]}


def _variants_plan_copy(variants: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """An output folder holding a copy of the variants fixture's plan (without its source, so that runs there do not
    write into the fixture's source summary), and a checkpoint folder beside it."""
    out, ckpt = tmp_path / "out", tmp_path / "ckpt"
    out.mkdir()
    plan = json.loads((variants[1] / "plan.json").read_text())
    plan.pop("registered_from")
    (out / "plan.json").write_text(json.dumps(plan))
    return out, ckpt


class _Killed(RuntimeError):
    pass


def _fits_also_run(evidence, monkeypatch, callback: Callback) -> None:
    """Every fit of ``evidence`` gets ``callback`` after its own callbacks (a stand-in for a kill or a signal)."""
    real_train = evidence.train
    monkeypatch.setattr(
        evidence, "train", lambda *a, callbacks=(), **k: real_train(*a, callbacks=(*callbacks, callback), **k)
    )


def test_a_killed_fit_resumes_from_its_checkpoint_and_scores_as_an_uninterrupted_one(
    evidence, variants, tmp_path, monkeypatch
):
    """--checkpoint-dir: the SWAG row's fit (stateful: its moments are part of the checkpoint) is killed after epoch
    6 of 7, inside the SWAG window; the re-run continues from epoch 6 and its run equals the fixture's, made in one
    go; the checkpoint folder is gone once the run is written."""
    done = variants[1]
    out, ckpt = _variants_plan_copy(variants, tmp_path)
    argv = ["--phase", "test", "--seeds", "2", "--methods", "dgc_swag", "--smoke", "--device", "cpu"]
    argv += ["--out", str(out), "--checkpoint-dir", str(ckpt)]

    class KillAtLastEpoch(Callback):
        def on_epoch_end(self, trainer, epoch, record):
            if epoch == 7:
                raise _Killed

    with monkeypatch.context() as patch:
        _fits_also_run(evidence, patch, KillAtLastEpoch())
        with pytest.raises(_Killed):
            evidence.main(argv)
    assert (ckpt / "dgc_swag_seed2" / "training_state.safetensors").is_file()
    assert not (out / "runs" / "dgc_swag_seed2.json").exists()
    assert evidence.main(argv) == 0
    resumed = json.loads((out / "runs" / "dgc_swag_seed2.json").read_text())
    whole = json.loads((done / "runs" / "dgc_swag_seed2.json").read_text())
    assert resumed["resumed_from"] == 6 and "resumed_from" not in whole
    assert resumed["history"] == whole["history"]
    for metric in ("acsa", "ece", "nll", "aurc", "aurc_mi", "ood_auroc"):
        assert resumed[metric] == whole[metric], metric
    assert not (ckpt / "dgc_swag_seed2").exists()


def test_an_interrupted_checkpointed_fit_ends_in_one_line_that_says_how_to_go_on(
    evidence, variants, tmp_path, monkeypatch
):
    out, ckpt = _variants_plan_copy(variants, tmp_path)

    class Sigterm(Callback):  # what InterruptHandler raises on SIGTERM, after the state is written
        def on_epoch_end(self, trainer, epoch, record):
            if epoch == 3:
                raise TrainingInterrupted(signal.SIGTERM)

    _fits_also_run(evidence, monkeypatch, Sigterm())
    argv = ["--phase", "test", "--seeds", "2", "--methods", "dgc_elbo", "--smoke", "--device", "cpu"]
    with pytest.raises(SystemExit, match=r"dgc_elbo seed 2: SIGTERM after epoch 2; .*dgc_elbo_seed2 holds it"):
        evidence.main([*argv, "--out", str(out), "--checkpoint-dir", str(ckpt)])
    assert (ckpt / "dgc_elbo_seed2" / "training_state.safetensors").is_file()


def test_a_checkpoint_of_other_settings_is_refused_in_one_line(evidence, variants, tmp_path):
    out, ckpt = _variants_plan_copy(variants, tmp_path)
    (ckpt / "dgc_elbo_seed2").mkdir(parents=True)
    (ckpt / "dgc_elbo_seed2" / "training_state.safetensors").write_bytes(b"not a checkpoint")
    argv = ["--phase", "test", "--seeds", "2", "--methods", "dgc_elbo", "--smoke", "--device", "cpu"]
    with pytest.raises(SystemExit, match="dgc_elbo_seed2: .*delete the folder to fit dgc_elbo afresh"):
        evidence.main([*argv, "--out", str(out), "--checkpoint-dir", str(ckpt)])
