"""The dgc-pyro command line, end to end on tiny settings."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys

import numpy as np
import pytest

from dgc_pyro.cli import main
from dgc_pyro.io import load_checkpoint

METRIC_KEYS = {"acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc"}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = main(["fit", "--epochs", "3", "--no-progress", "--out", str(out), "--seed", "2"])
    assert code == 0
    return out


def test_fit_writes_metrics_and_a_safe_checkpoint(digits_run, capsys):
    metrics = json.loads((digits_run / "metrics.json").read_text())
    assert set(metrics) >= METRIC_KEYS
    assert all(0.0 <= metrics[k] <= 1.0 for k in METRIC_KEYS)
    assert metrics["config"]["dataset"] == "digits" and metrics["config"]["seed"] == 2
    assert set(metrics["baseline"]) >= METRIC_KEYS
    assert len(metrics["history"]["epochs"]) == 3
    tensors, meta = load_checkpoint(digits_run / "model.safetensors")
    assert meta["model"]["input_shape"] == [1, 8, 8]
    assert any(k.startswith("encoder.") for k in tensors)


def test_fit_prints_dgc_beside_the_baseline(tmp_path, capsys):
    assert main(["fit", "--epochs", "1", "--no-progress", "--out", str(tmp_path), "--baseline", "logistic"]) == 0
    out = capsys.readouterr().out
    assert "DGC" in out and "baseline (logistic)" in out and "acsa" in out


def test_evaluate_reloads_the_checkpoint_and_reproduces_the_metrics(digits_run, tmp_path, capsys):
    code = main(["evaluate", "--checkpoint", str(digits_run / "model.safetensors"), "--out", str(tmp_path)])
    assert code == 0
    fitted = json.loads((digits_run / "metrics.json").read_text())
    again = json.loads((tmp_path / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert again[key] == pytest.approx(fitted[key])


def _toy_npz(path, counts):
    """Three separable classes of 6 features in [0, 1], the same arrays as train and test split."""
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], counts)
    x = np.clip(rng.normal(0.2 + 0.3 * y[:, None], 0.1, size=(len(y), 6)), 0, 1).astype(np.float32)
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)


def test_fit_on_arrays_from_an_npz_file(tmp_path):
    _toy_npz(tmp_path / "toy.npz", [30, 12, 6])
    out = tmp_path / "out"
    assert (
        main(
            [
                "fit",
                "--dataset",
                str(tmp_path / "toy.npz"),
                "--epochs",
                "2",
                "--no-progress",
                "--out",
                str(out),
                "--baseline",
                "none",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["baseline"] is None and metrics["config"]["train_counts"] == [30, 12, 6]


def test_evaluate_and_augment_take_an_npz_dataset_from_the_checkpoint(tmp_path, capsys, monkeypatch):
    _toy_npz(tmp_path / "toy.npz", [20, 10, 6])
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)  # trained from a relative path ...
    assert (
        main(["fit", "--dataset", "toy.npz", "--epochs", "1", "--no-progress", "--out", str(out), "--baseline", "none"])
        == 0
    )
    monkeypatch.chdir(out)  # ... evaluated from another folder
    fitted = json.loads((out / "metrics.json").read_text())
    # Without --dataset the checkpoint's --dataset argument (the .npz path) is used, not its short name "toy".
    assert main(["evaluate", "--checkpoint", str(out / "model.safetensors"), "--out", str(tmp_path / "eval")]) == 0
    again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert again[key] == pytest.approx(fitted[key])
    assert (
        main(
            [
                "augment",
                "--checkpoint",
                str(out / "model.safetensors"),
                "--out",
                str(tmp_path / "aug"),
                "--grid-per-class",
                "0",
            ]
        )
        == 0
    )
    assert (tmp_path / "aug" / "synthetic.npz").is_file()
    assert "error" not in capsys.readouterr().err


def test_fit_with_the_label_free_logit_adjusted_model_and_evaluate_reproduces_it(tmp_path):
    out = tmp_path / "la"
    assert (
        main(
            [
                "fit",
                "--epochs",
                "2",
                "--no-progress",
                "--out",
                str(out),
                "--baseline",
                "none",
                "--guide",
                "x",
                "--logit-adjustment",
                "1",
                "--label-weight",
                "20",
                "--obs-scale",
                "0.3",
                "--likelihood",
                "normal",
                "--perturbation-prior",
                "perturbed",
                "--lr-schedule",
                "cosine",
            ]
        )
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    recipe = metrics["config"]["recipe"]
    assert recipe["label_in_guide"] is False and recipe["logit_adjustment"] == 1.0 and recipe["obs_scale"] == 0.3
    assert (
        recipe["perturbation_prior"] == "perturbed"
        and metrics["history"]["config"]["perturbation_prior"] == "perturbed"
    )
    assert recipe["lr_schedule"] == "cosine" and metrics["history"]["config"]["lr_schedule"] == "cosine"
    lrs = [r["lr"] for r in metrics["history"]["epochs"]]
    # epoch 1 starts fit's learning-rate warm-up (on by default); epoch 2 is on the cosine, below the base rate
    assert lrs[0] == pytest.approx(recipe["lr"] / metrics["history"]["config"]["warmup_steps"])
    assert lrs[0] < lrs[1] < recipe["lr"]
    _, meta = load_checkpoint(out / "model.safetensors")
    assert meta["model"]["label_in_guide"] is False
    prior = np.array(meta["model"]["class_prior"])
    counts = np.array(metrics["config"]["train_counts"])
    assert np.allclose(prior, counts / counts.sum())
    again = tmp_path / "again"
    assert main(["evaluate", "--checkpoint", str(out / "model.safetensors"), "--out", str(again)]) == 0
    reloaded = json.loads((again / "metrics.json").read_text())
    for key in METRIC_KEYS:  # balanced prediction again (the class prior travels in the checkpoint)
        assert reloaded[key] == pytest.approx(metrics[key])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["fit", "--dataset", "mnist", "--data-dir", "{tmp}"], "download"),
        (["fit", "--counts", "500,10"], "counts|class"),
        (["fit", "--epochs", "0"], "epochs"),
        (["fit", "--logit-adjustment", "-1"], "logit_adjustment"),
        (["fit", "--label-weight", "0"], "label_weight"),
        (["evaluate", "--checkpoint", "{tmp}/missing.safetensors"], "missing.safetensors"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "never"
    code = main(argv + (["--out", str(out)] if argv[0] == "fit" else []))
    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not out.exists()


def test_console_script_runs_as_a_module():
    proc = subprocess.run(
        [sys.executable, "-m", "dgc_pyro.cli", "fit", "--help"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and "--dataset" in proc.stdout


def test_fashion_from_the_real_files(shared_data, tmp_path):
    out = tmp_path / "fashion"
    code = main(
        [
            "fit",
            "--dataset",
            "fashion",
            "--data-dir",
            str(shared_data),
            "--epochs",
            "1",
            "--preset",
            "small",
            "--device",
            "cpu",
            "--counts",
            "60,40,30,20,15,10,8,6,5,4",
            "--baseline",
            "none",
            "--no-progress",
            "--test-subset",
            "200",
            "--num-samples",
            "2",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["test_size"] == 200 and set(metrics) >= METRIC_KEYS


def test_fit_keep_last_keeps_the_last_epoch_for_dgc_and_the_baseline(tmp_path, capsys):
    out = tmp_path / "last"
    assert (
        main(["fit", "--epochs", "3", "--no-progress", "--out", str(out), "--keep", "last", "--lr-schedule", "cosine"])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["recipe"]["select_best"] is False
    history = metrics["history"]
    assert history["best_epoch"] == 3
    assert all("val_acsa" in r for r in history["epochs"])  # the validation split still monitors
    assert main(["fit", "--resume", str(out), "--keep", "best"]) != 0
    assert "drop --keep" in capsys.readouterr().err


def test_every_fit_option_is_either_taken_from_the_checkpoint_or_free_under_resume():
    # Generated, not hand-kept: each option carries its mark (a config field's from its metadata).
    from dgc_pyro import cli

    fit_parser = cli._options_of(cli.build_parser(), "fit")
    marks = {a.dest: getattr(a, "resume", "unmarked") for a in fit_parser._actions}
    del marks["help"], marks["out"], marks["resume"]
    assert set(marks.values()) == {"fixed", "free"}, marks
    resume_help = next(a.help for a in fit_parser._actions if a.dest == "resume")
    assert all(flag in resume_help for flag in cli.resume_free_flags(fit_parser))  # the help lists the free ones


def _options(command):
    from dgc_pyro import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


@pytest.mark.parametrize("command", ["fit", "evaluate", "augment"])
def test_every_option_says_its_default(command):
    parser = _options(command)
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or action.dest == "help" or action.required:
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert "default" in formatter._get_help_string(action), f"{command} {action.option_strings[0]}: {text!r}"
    shown = parser.format_help()
    assert "(default: None)" not in shown and "%(default)" not in shown


def test_fit_help_names_the_recipe_defaults():
    from dgc_pyro.experiment import DEFAULT_RECIPES

    shown = " ".join(_options("fit").format_help().split())
    assert (
        f"(default: {DEFAULT_RECIPES['digits'].epochs} (digits), {DEFAULT_RECIPES['mnist'].epochs} (mnist, fashion"
        in shown
    )
    assert "--device {auto,cpu,cuda} where to train and predict" in shown


def test_fit_closing_line_has_each_phase_and_the_total(tmp_path, capsys):
    assert main(["fit", "--epochs", "1", "--no-progress", "--out", str(tmp_path / "r"), "--num-samples", "2"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert re.fullmatch(
        r"fit \d+\.\d s, evaluation \d+\.\d s, baseline \d+\.\d s, total \d+\.\d s on cpu; wrote "
        + re.escape(str(tmp_path / "r" / "metrics.json")),
        last,
    ), last
    times = [float(t) for t in re.findall(r"(\d+\.\d) s", last)]
    assert times[-1] >= sum(times[:-1]) - 0.15  # the total covers the phases (each rounded to 0.1 s)


def test_evaluate_says_which_checkpoint_and_dataset(digits_run, capsys):
    assert main(["evaluate", "--checkpoint", str(digits_run / "model.safetensors"), "--no-progress"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[0] == f"checkpoint {digits_run / 'model.safetensors'}; dataset digits: 500 test examples, "
        "10 latent draws per class"
    )
    assert re.fullmatch(r"evaluation \d+\.\d s, total \d+\.\d s on cpu", lines[-1]), lines[-1]


def test_augment_leaves_nothing_when_a_write_fails_half_way(digits_run, tmp_path, capsys, monkeypatch):
    import dgc_pyro.cli as cli

    written = []
    real = cli.save_augmentation_grid

    def fill_the_disk(path, *args, **kwargs):  # the second PNG finds the disk full
        if written:
            raise OSError(28, "No space left on device", str(path))
        real(path, *args, **kwargs)
        written.append(path)

    monkeypatch.setattr(cli, "save_augmentation_grid", fill_the_disk)
    out = tmp_path / "aug"
    argv = [
        "augment",
        "--checkpoint",
        str(digits_run / "model.safetensors"),
        "--grid-per-class",
        "2",
        "--no-progress",
        "--out",
        str(out),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(
        r"dgc-pyro augment: error: \[Errno 28\] No space left on device: '"
        + re.escape(str(out))
        + r"/grid_class_\d\.png'\n",
        err,
    ), err
    assert written and not out.exists() and list(tmp_path.iterdir()) == []  # no synthetic.npz, no PNG, no temp folder
    out.mkdir()
    (out / "synthetic.npz").write_bytes(b"an earlier run's")
    assert main(argv) == 2
    assert [p.name for p in out.iterdir()] == ["synthetic.npz"] and (
        out / "synthetic.npz"
    ).read_bytes() == b"an earlier run's"
    monkeypatch.undo()
    capsys.readouterr()
    assert main(argv) == 0  # the same command without the fault writes the whole set
    assert (out / "synthetic.npz").read_bytes() != b"an earlier run's" and len(list(out.glob("grid_class_*.png"))) >= 2
    assert "augment " in capsys.readouterr().out.splitlines()[-1]


def test_the_calibration_note_explains_a_higher_ece_with_the_runs_numbers():
    from types import SimpleNamespace

    import torch

    from dgc_pyro.cli import _calibration_note

    proba = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.3, 0.7], [0.6, 0.4]])  # all right, with little confidence
    run = SimpleNamespace(
        prediction=SimpleNamespace(proba=proba, rule="mixture"),
        metrics={"acc": 1.0, "ece": 0.35},
        baseline_metrics={"ece": 0.05},
    )
    assert _calibration_note(run) == (
        "note: DGC's ECE (0.350) is above the baseline's (0.050) because its class posterior is underconfident: "
        "mean confidence 0.650, accuracy 1.000; its 'mixture' rule averages p(y | z) over the latent draws of every "
        "class hypothesis, which flattens it. ACSA and the other metrics depend only on which class scores highest "
        "(docs/cli.md)"
    )
    run.prediction.rule, run.metrics["acc"] = "latent", 0.25
    assert "overconfident: mean confidence 0.650, accuracy 0.250. ACSA" in _calibration_note(run)
    run.metrics["ece"] = 0.04  # calibrated better than the baseline: nothing to explain
    assert _calibration_note(run) is None
    run.metrics["ece"], run.baseline_metrics = 0.35, None  # no baseline to compare with
    assert _calibration_note(run) is None


def test_evaluate_shows_a_prediction_bar_on_stderr_unless_told_not_to(digits_run, capsys):
    checkpoint = str(digits_run / "model.safetensors")
    assert main(["evaluate", "--checkpoint", checkpoint]) == 0
    captured = capsys.readouterr()
    assert "predict" in captured.err and "chunk" in captured.err  # tqdm's bar, on stderr only
    assert "chunk" not in captured.out
    assert main(["evaluate", "--checkpoint", checkpoint, "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_an_npz_dataset_gets_the_recipe_of_its_image_shape():
    """`fit --dataset FILE.npz` trains 8x8 images with digits' recipe and 28x28 ones with Fashion-MNIST's (not the
    bare Recipe()), and an explicit option still wins."""
    from dgc_pyro.cli import _recipe_from_flags, build_parser
    from dgc_pyro.experiment import DEFAULT_RECIPES, Recipe

    args = build_parser().parse_args(["fit", "--dataset", "mine.npz"])
    assert _recipe_from_flags(args, "mine", (1, 8, 8)) == DEFAULT_RECIPES["digits"]
    assert _recipe_from_flags(args, "mine", (1, 28, 28)) == DEFAULT_RECIPES["fashion"]
    assert _recipe_from_flags(args, "mine", (6,)) == Recipe()
    args = build_parser().parse_args(["fit", "--dataset", "mine.npz", "--epochs", "3"])
    assert _recipe_from_flags(args, "mine", (1, 28, 28)).epochs == 3
