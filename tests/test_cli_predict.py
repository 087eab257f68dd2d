"""``dgc-pyro predict`` and the OOD flag of ``fit``/``evaluate`` (issue 22), end to end on digits."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from dgc_pyro.checkpoint import load_model
from dgc_pyro.cli import main


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["fit", "--epochs", "2", "--no-progress", "--baseline", "none", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def images():
    from dgc_pyro.data import load_imbalanced

    return load_imbalanced("digits", seed=0).x_test[:40].numpy()


def _predict(run, path, out, *flags: str) -> int:
    """``dgc-pyro predict`` of the module's checkpoint on ``path`` into ``out``, without a progress bar."""
    return main(["predict", "--checkpoint", str(run), "--input", str(path), "--out", str(out), *flags, "--no-progress"])


def test_fit_calibrates_the_flag_and_evaluate_reports_its_rate(run, tmp_path, capsys):
    model = load_model(run / "model.safetensors")
    assert model.ood_detector is not None and model.ood_detector.false_alarm == 0.05
    fitted = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= fitted["ood_flag_rate"] <= 0.3
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(run / "model.safetensors"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "OOD flag (typicality score):" in out and "stated false-alarm rate 0.050" in out
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again["ood_flag_rate"] == pytest.approx(fitted["ood_flag_rate"])


def test_predict_writes_labels_probabilities_density_and_flags(run, images, tmp_path, capsys):
    noise = np.random.default_rng(0).random((10, 1, 8, 8)).round().astype(np.float32)
    np.savez(tmp_path / "new.npz", x=np.concatenate([images, noise]))
    out = tmp_path / "pred"
    assert _predict(run, tmp_path / "new.npz", out, "--reject", "both") == 0
    assert "predicted 50 examples" in capsys.readouterr().out
    with np.load(out / "predictions.npz") as z:
        assert z["proba"].shape == (50, 10) and np.allclose(z["proba"].sum(1), 1, atol=1e-5)
        assert z["label"].shape == z["log_density"].shape == z["ood"].shape == z["rejected"].shape == (50,)
        assert z["ood"][40:].mean() > 0.8  # the noise images are flagged
        assert (z["rejected"] >= z["ood"]).all()  # "both" rejects every flagged input
        labels = z["label"]
    rows = list(csv.DictReader((out / "predictions.csv").open()))
    assert len(rows) == 50 and {"label", "log_density", "ood", "rejected", "p_0", "p_9"} <= set(rows[0])
    assert [int(r["label"]) for r in rows] == labels.tolist()


@pytest.mark.parametrize(
    "case, message",
    [
        ("shape", "wrong shape: expected (n, 1, 8, 8)"),
        ("nan", "non-finite values"),
        ("empty", "is empty"),
        ("missing", "does not exist"),
        ("names", "must hold an array named 'x'"),
        ("text", "is not a valid .npz archive"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(run, tmp_path, capsys, case, message):
    path = tmp_path / "in.npz"
    if case == "shape":
        np.savez(path, x=np.zeros((3, 64), np.float32))
    elif case == "nan":
        np.savez(path, x=np.full((3, 1, 8, 8), np.nan, np.float32))
    elif case == "empty":
        np.savez(path, x=np.zeros((0, 1, 8, 8), np.float32))
    elif case == "names":
        np.savez(path, a=np.zeros((3, 1, 8, 8)), b=np.zeros(3))
    elif case == "text":
        path.write_text("not an archive")
    out = tmp_path / "pred"
    code = _predict(run, path, out)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (out / "predictions.npz").exists() and not (out / "predictions.csv").exists()


def test_rule_chooses_the_scoring_rule_and_a_rule_the_model_lacks_is_one_line(run, images, tmp_path, capsys):
    """--rule reaches predict (the default digits model scores with 'latent'; 'mixture' gives other probabilities),
    and the class-conditional 'bayes' rule is refused before any prediction for a model without class Gaussians."""
    np.savez(tmp_path / "new.npz", x=images)
    probas = {}
    for rule in ("latent", "mixture"):
        out = tmp_path / rule
        assert _predict(run, tmp_path / "new.npz", out, "--rule", rule) == 0
        with np.load(out / "predictions.npz") as z:
            probas[rule] = z["proba"]
    assert not np.allclose(probas["latent"], probas["mixture"])
    capsys.readouterr()
    code = main(["evaluate", "--checkpoint", str(run / "model.safetensors"), "--rule", "bayes", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "--rule bayes does not apply" in err and len(err.strip().splitlines()) == 1


def test_write_predictions_is_the_library_home_of_the_files(run, images, tmp_path):
    """The same files from a script: every column, the class names, and a refusal of a wrong number of names."""
    import torch

    from dgc_pyro.inference import predict
    from dgc_pyro.inference.export import prediction_columns, write_predictions

    model = load_model(run / "model.safetensors")
    pred = predict(model, torch.as_tensor(images), 3, reject="entropy")
    npz_path, csv_path = write_predictions(pred, tmp_path, [f"c{i}" for i in range(10)])
    with np.load(npz_path) as z:
        assert set(prediction_columns(pred)) | {"proba", "class_names"} == set(z.files)
        assert z["class_names"].tolist()[:2] == ["c0", "c1"] and z["rejected"].shape == (40,)
        np.testing.assert_array_equal(z["label"], pred.labels.numpy())
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 40 and "p_c9" in rows[0] and "rejected" in rows[0]
    with pytest.raises(ValueError, match="class_names has 3 names for 10 classes"):
        write_predictions(pred, tmp_path / "other", ["a", "b", "c"])
    assert not (tmp_path / "other").exists()
