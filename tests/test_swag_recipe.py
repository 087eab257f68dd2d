"""SWAG of the label head as a recipe option (issue 21, mechanism 5): ``swag_start`` / ``swag_rank`` /
``swag_samples``, the head in ``model.swag``, its tensors in the model file, its moments in the training state,
and ``dgc-pyro fit/evaluate/predict``.

Tiny models on sklearn's digits, one torch thread. The fits follow ``--device``, except the resume tests, which
compare a resumed fit with an uninterrupted one bit for bit: that holds on CPU, so they pin it.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist

from dgc_pyro.checkpoint import load_model, load_training_state, save_model
from dgc_pyro.cli import main
from dgc_pyro.config import Recipe, TrainConfig
from dgc_pyro.inference import fit, fit_ood_threshold, predict
from dgc_pyro.inference.callbacks import Callback
from dgc_pyro.inference.swag import SwagCollector, SwagHead, head_vector
from dgc_pyro.io import CheckpointError, load_checkpoint, save_checkpoint
from dgc_pyro.models.dgc import DGC
from dgc_pyro.ood_detector import OODDetector
from dgc_pyro.reproducibility import seed_everything

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:validation ACSA is")]

# 4 epochs, swag_start=0.5: the window is epochs 3 and 4
FIT_KW = dict(
    epochs=4, batch_size=64, lr=3e-3, progress=False, val_num_samples=2, select_best=False, swag_start=0.5, swag_rank=5
)


def model_of(d) -> DGC:
    torch.manual_seed(0)
    return DGC(d.input_shape, 10, latent_dim=4)


class StopAfter(Callback):
    """End the fit after ``epoch`` (the checkpoint of a stopped fit is written then)."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_epoch_end(self, trainer, epoch, record) -> None:
        trainer.should_stop = epoch == self.epoch


@pytest.fixture(scope="module")
def fitted(digits):
    """A 4-epoch CPU fit with swag_start=0.5 and the head vector after every epoch, read by a callback."""
    model = model_of(digits)
    snaps: dict[int, torch.Tensor] = {}
    history = fit(
        model,
        digits.x_train,
        digits.y_train,
        callback=lambda epoch, record: snaps.__setitem__(epoch, head_vector(model)),
        device="cpu",
        **FIT_KW,
    )
    return model, history, snaps


@pytest.fixture(scope="module")
def stopped(digits, tmp_path_factory):
    """The same fit, checkpointed and stopped after epoch 3: inside the window, one snapshot collected."""
    folder = tmp_path_factory.mktemp("stopped")
    fit(
        model_of(digits),
        digits.x_train,
        digits.y_train,
        checkpoint_dir=folder,
        callbacks=(StopAfter(3),),
        device="cpu",
        **FIT_KW,
    )
    return folder


def _assert_same_head(a: SwagHead, b: SwagHead) -> None:
    assert a.count == b.count and a.var_clamp == b.var_clamp
    for name in ("mean", "variance", "deviations"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


# ----------------------------------------------------------------------------- the recipe's fields
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TrainConfig(swag_start=1.0), "swag_start must be in [0, 1), got 1.0"),
        (
            lambda: TrainConfig(epochs=4, swag_start=0.8),
            "swag_start=0.8 starts the SWAG window at epoch 5, after the last epoch (4): it would collect nothing",
        ),
        (lambda: TrainConfig(swag_rank=-1), "swag_rank must be a non-negative integer, got -1"),
        (lambda: TrainConfig(swag_samples=0), "swag_samples must be positive and finite, got 0"),
        (
            lambda: TrainConfig(swag_start=0.5, swag_every_steps=0),
            "swag_every_steps must be positive and finite, got 0",
        ),
        (lambda: TrainConfig(swag_every_steps=3), "swag_every_steps=3 needs a SWAG window: set swag_start too"),
        (
            lambda: Recipe(
                latent_prior="class_conditional", label_in_guide=False, perturbation_rate=0.0, swag_start=0.5
            ),
            "swag_start=0.5 needs a label head p(y | z), which a model with latent_prior='class_conditional' does not",
        ),
    ],
)
def test_bad_swag_options_are_one_line_errors(make, message):
    with pytest.raises(ValueError) as info:
        make()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_fit_refuses_swag_for_a_model_without_a_label_head(digits):
    counts = torch.bincount(digits.y_train, minlength=10).tolist()
    model = DGC(
        digits.input_shape,
        10,
        latent_dim=4,
        latent_prior="class_conditional",
        label_in_guide=False,
        class_counts=counts,
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"^swag_start=0\.5 needs a label head"):
        fit(model, digits.x_train, digits.y_train, perturbation_rate=0.0, **FIT_KW)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # refused before any step


def test_swag_samples_is_free_on_resume_and_the_window_is_fixed():
    from dgc_pyro import cli

    fit_parser = cli._options_of(cli.build_parser(), "fit")
    free = cli.resume_free_flags(fit_parser)
    assert "--swag-samples" in free and not {"--swag-start", "--swag-rank", "--swag-every-steps"} & set(free)
    args = cli.build_parser().parse_args(["fit", "--swag-start", "0.75", "--swag-samples", "4"])
    recipe = cli._recipe_from_flags(args, "digits")
    assert (recipe.swag_start, recipe.swag_samples, recipe.swag_rank, recipe.swag_every_steps) == (0.75, 4, 20, None)
    args = cli.build_parser().parse_args(["fit", "--swag-start", "0.75", "--swag-every-steps", "5"])
    assert cli._recipe_from_flags(args, "digits").swag_every_steps == 5
    assert cli._recipe_from_flags(cli.build_parser().parse_args(["fit"]), "digits").swag_start is None


# ----------------------------------------------------------------------------- fit
def test_fit_leaves_the_head_of_the_window_on_the_model(fitted):
    model, history, snaps = fitted
    head = model.swag
    assert isinstance(head, SwagHead) and head.count == 2  # epochs 3 and 4
    window = torch.stack([snaps[3], snaps[4]])
    assert torch.allclose(head.mean, window.mean(0))
    assert torch.allclose(head.variance, window.var(0, unbiased=False).clamp_min(1e-30))
    # the deviations from the running mean after each snapshot: 0 after the first, half the step after the second
    assert torch.allclose(head.deviations, torch.stack([torch.zeros_like(snaps[3]), (snaps[4] - snaps[3]) / 2]))
    assert torch.equal(head_vector(model), snaps[4])  # the fit leaves the last epoch's weights
    assert (history.config["swag_start"], history.config["swag_rank"], history.config["swag_samples"]) == (0.5, 5, 10)


class HeadAtSteps(Callback):
    """The head vector after every ``k``-th step of the epochs from ``first`` on (what ``swag_every_steps=k``
    should collect), and the number of steps an epoch has."""

    def __init__(self, k: int, first: int) -> None:
        self.k, self.first, self.snaps, self.steps = k, first, [], 0

    def on_batch_end(self, trainer, epoch, batch) -> None:
        self.steps = max(self.steps, batch + 1)
        if epoch >= self.first and (batch + 1) % self.k == 0:
            self.snaps.append(head_vector(trainer.state.model))


def test_swag_every_steps_collects_a_snapshot_every_k_steps_of_the_window(digits, device):
    model = model_of(digits)
    steps = HeadAtSteps(3, first=3)
    history = fit(
        model, digits.x_train, digits.y_train, callbacks=(steps,), device=device, **FIT_KW, swag_every_steps=3
    )
    window = torch.stack(steps.snaps).double()
    assert model.swag.count == len(steps.snaps) == 2 * (steps.steps // 3) > 2  # more than one per epoch
    assert torch.allclose(model.swag.mean, window.mean(0), atol=1e-6)
    running_mean = window.cumsum(0) / torch.arange(1, len(window) + 1, dtype=window.dtype).unsqueeze(1)
    assert torch.allclose(model.swag.deviations, (window - running_mean)[-5:], atol=1e-6)  # max_rank=5, oldest first
    assert history.config["swag_every_steps"] == 3


def test_swag_every_steps_beyond_an_epoch_is_refused_before_the_first_step(digits):
    model = model_of(digits)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError) as info:
        fit(model, digits.x_train, digits.y_train, device="cpu", **FIT_KW, swag_every_steps=10_000)
    assert re.fullmatch(
        r"SwagCollector: every_steps=10000 \(a recipe's swag_every_steps\) is more than the \d+ steps of an epoch, "
        r"so the SWAG window would collect nothing",
        str(info.value),
    )
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_fit_without_the_option_clears_an_earlier_head(digits, fitted, device):
    model = model_of(digits)
    model.swag = fitted[0].swag  # a head of another fit
    fit(model, digits.x_train, digits.y_train, device=device, **{**FIT_KW, "epochs": 1, "swag_start": None})
    assert model.swag is None


def test_a_fit_that_stops_before_the_window_warns_and_has_no_head(digits, device):
    model = model_of(digits)
    with pytest.warns(RuntimeWarning, match=r"stopped after epoch 1, before the SWAG window \(from epoch 3\)"):
        fit(model, digits.x_train, digits.y_train, callbacks=(StopAfter(1),), device=device, **FIT_KW)
    assert model.swag is None


# ----------------------------------------------------------------------------- the model file
def test_save_and_load_give_the_same_head_and_the_same_prediction(fitted, digits, tmp_path):
    model, _, _ = fitted
    save_model(tmp_path / "m.safetensors", model)
    tensors, meta = load_checkpoint(tmp_path / "m.safetensors")
    assert {"swag/mean", "swag/variance", "swag/deviations"} <= set(tensors)
    assert meta["swag"] == {"count": 2, "var_clamp": 1e-30}
    loaded = load_model(tmp_path / "m.safetensors")
    _assert_same_head(loaded.swag, model.swag)
    x = digits.x_test[:30]
    runs = []
    for m in (model, loaded):
        torch.manual_seed(4)
        runs.append(predict(m, x, 3, swag=m.swag, head_samples=4, head_seed=2))
    for name in ("proba", "entropy", "mutual_information", "log_density"):
        assert torch.equal(getattr(runs[0], name), getattr(runs[1], name)), name
    torch.manual_seed(4)
    plain = predict(loaded, x, 3)
    assert not torch.allclose(plain.proba, runs[1].proba)  # the head draws change the class posterior


def test_a_checkpoint_without_a_head_loads_without_one(fitted, digits, tmp_path):
    model, _, _ = fitted
    plain = model_of(digits)
    save_model(tmp_path / "plain.safetensors", plain)
    assert not any(k.startswith("swag/") for k in load_checkpoint(tmp_path / "plain.safetensors")[0])
    assert load_model(tmp_path / "plain.safetensors").swag is None
    # a file as save_model wrote it before SWAG existed: the weights and the model config only
    save_checkpoint(tmp_path / "old.safetensors", plain.state_dict(), {"model": plain.config})
    into = model_of(digits)
    into.swag = model.swag  # loading into a model replaces whatever head it had
    loaded = load_model(tmp_path / "old.safetensors", model=into)
    assert loaded.swag is None and torch.equal(head_vector(loaded), head_vector(plain))


@pytest.mark.parametrize("damage", ["no_record", "no_tensors", "short_mean", "negative_variance", "bad_count"])
def test_a_damaged_head_is_refused_in_one_line(fitted, tmp_path, damage):
    model, _, _ = fitted
    save_model(tmp_path / "m.safetensors", model)
    tensors, meta = load_checkpoint(tmp_path / "m.safetensors")
    if damage == "no_record":
        del meta["swag"]
    elif damage == "no_tensors":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("swag/")}
    elif damage == "short_mean":
        tensors["swag/mean"] = tensors["swag/mean"][:-1]
    elif damage == "negative_variance":
        tensors["swag/variance"] = -tensors["swag/variance"]
    else:
        meta["swag"]["count"] = 0
    save_checkpoint(tmp_path / "bad.safetensors", tensors, meta)
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "bad.safetensors")
    assert "SWAG head" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- resume
def test_the_training_state_carries_the_moments(stopped, fitted):
    state = load_training_state(stopped)
    assert state.epoch == 3
    ((key, moments),) = state.callbacks.items()
    assert key == "SwagCollector(start=0.5, max_rank=5, every_steps=None)"
    assert moments["count"] == 1 and moments["max_rank"] == 5
    assert torch.equal(moments["mean"], fitted[2][3])  # the one snapshot so far: epoch 3's head


def test_a_fit_resumed_inside_the_window_ends_with_the_uninterrupted_head(digits, fitted, stopped, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(stopped, folder)
    model = DGC(digits.input_shape, 10, latent_dim=4)  # differently initialised: everything comes from the checkpoint
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no "the checkpoint holds no moments" warning
        history = fit(model, digits.x_train, digits.y_train, checkpoint_dir=folder, resume=True, device="cpu", **FIT_KW)
    assert history.resumed_from == 3
    reference, ref_history, _ = fitted
    assert history.epochs == ref_history.epochs
    _assert_same_head(model.swag, reference.swag)
    assert load_training_state(folder).callbacks[next(iter(load_training_state(folder).callbacks))]["count"] == 2


def test_a_resume_must_keep_the_window(digits, stopped, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(stopped, folder)
    for changes, named in (
        (dict(swag_start=0.25), "swag_start=0.5 in the checkpoint, 0.25 now"),
        (dict(epochs=6), "deferred_epochs=4"),
    ):
        with pytest.raises(CheckpointError, match=named):
            fit(model_of(digits), digits.x_train, digits.y_train, resume=folder, device="cpu", **{**FIT_KW, **changes})


def test_a_collector_whose_moments_the_checkpoint_lacks_warns(digits, stopped, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(stopped, folder)
    other = SwagCollector(start=0.5, max_rank=2)  # other settings: the checkpoint holds no moments of its own
    with pytest.warns(RuntimeWarning, match="holds no moments of this collector's settings"):
        fit(model_of(digits), digits.x_train, digits.y_train, resume=folder, callbacks=(other,), device="cpu", **FIT_KW)
    assert other.head.count == 1  # epoch 4 only


# ----------------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """``dgc-pyro fit --swag-start 0.3`` for 3 epochs: the window is epochs 2 and 3; 3 head draws per prediction."""
    out = tmp_path_factory.mktemp("cli")
    common = ["--epochs", "3", "--keep", "last", "--baseline", "none", "--no-progress", "--num-samples", "2"]
    assert main(["fit", *common, "--swag-start", "0.3", "--swag-samples", "3", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def cli_images(tmp_path_factory):
    from dgc_pyro.data import load_imbalanced

    path = tmp_path_factory.mktemp("images") / "new.npz"
    np.savez(path, x=load_imbalanced("digits", seed=0).x_test[:30].numpy())
    return path


def _predicted(checkpoint, images, out, *flags) -> np.ndarray:
    args = ["predict", "--checkpoint", str(checkpoint), "--input", str(images), "--out", str(out), "--no-progress"]
    assert main([*args, *flags]) == 0
    with np.load(out / "predictions.npz") as z:
        return z["proba"]


def test_cli_fit_saves_the_head_and_evaluates_with_it(cli_run, capsys):
    model = load_model(cli_run / "model.safetensors")
    assert model.swag is not None and model.swag.count == 2
    metrics = json.loads((cli_run / "metrics.json").read_text())
    assert metrics["head_samples"] == 3 and metrics["config"]["recipe"]["swag_start"] == 0.3
    capsys.readouterr()
    assert main(["evaluate", "--checkpoint", str(cli_run / "model.safetensors"), "--no-progress"]) == 0
    assert "2 latent draws per class, averaged over 3 SWAG head draws" in capsys.readouterr().out


def test_cli_evaluate_reproduces_the_fit_and_head_samples_0_switches_it_off(cli_run, tmp_path):
    fitted = json.loads((cli_run / "metrics.json").read_text())
    checkpoint = str(cli_run / "model.safetensors")
    assert main(["evaluate", "--checkpoint", checkpoint, "--out", str(tmp_path / "a"), "--no-progress"]) == 0
    again = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert again["head_samples"] == 3
    for key in ("acsa", "gmean", "acc", "ece"):
        assert again[key] == pytest.approx(fitted[key])
    flags = ["--out", str(tmp_path / "b"), "--no-progress", "--head-samples", "0"]
    assert main(["evaluate", "--checkpoint", checkpoint, *flags]) == 0
    plain = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert "head_samples" not in plain and plain["ece"] != again["ece"]


def test_cli_predict_uses_the_head_unless_told(cli_run, cli_images, tmp_path, capsys, device):
    default = _predicted(cli_run, cli_images, tmp_path / "default")
    assert "averaged over 3 SWAG head draws" in capsys.readouterr().out
    same = _predicted(cli_run, cli_images, tmp_path / "three", "--head-samples", "3")
    more = _predicted(cli_run, cli_images, tmp_path / "five", "--head-samples", "5")
    off = _predicted(cli_run, cli_images, tmp_path / "off", "--head-samples", "0")
    assert np.array_equal(default, same) and not np.allclose(default, more) and not np.allclose(default, off)
    model = load_model(cli_run / "model.safetensors", map_location=device)
    seed_everything(0)  # what predict --seed 0 does
    by_hand = predict(model, torch.as_tensor(np.load(cli_images)["x"]), 2, swag=model.swag, head_samples=3)
    assert np.allclose(default, by_hand.proba.cpu().numpy(), atol=1e-6)  # the CLI's is the library's prediction


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_cli_head_samples_errors_are_one_line(cli_run, cli_images, tmp_path, capsys, command):
    model = load_model(cli_run / "model.safetensors")
    model.swag = None
    save_model(tmp_path / "plain.safetensors", model, model.metadata)  # the reloaded record of the head is dropped
    args = {
        "predict": ["predict", "--input", str(cli_images), "--out", str(tmp_path / "p")],
        "evaluate": ["evaluate"],
    }[command]
    for checkpoint, n, message in (
        (tmp_path / "plain.safetensors", "2", "--head-samples 2 needs a SWAG head, and"),
        (cli_run / "model.safetensors", "-1", "--head-samples must be at least 0"),
    ):
        capsys.readouterr()
        code = main([*args, "--checkpoint", str(checkpoint), "--head-samples", n, "--no-progress"])
        err = capsys.readouterr().err
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "p" / "predictions.npz").exists()
    if command == "predict":  # without a head and without the flag: the plain prediction, no error
        assert _predicted(tmp_path / "plain.safetensors", cli_images, tmp_path / "q").shape == (30, 10)


# ----------------------------------------------------------------------------- data-parallel
@pytest.mark.slow
@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs torch.distributed with gloo")
def test_two_processes_collect_the_single_process_head(digits):
    """2 spawned gloo ranks on the CPU: the head rank 0 sends back is the single-process fit's."""
    x, y = digits.x_train[:130], digits.y_train[:130]
    kw = dict(FIT_KW, epochs=2, batch_size=50, swag_start=0.0, val_fraction=0, seed=3, device="cpu")
    reference = model_of(digits)
    fit(reference, x, y, **kw)
    model = model_of(digits)
    fit(model, x, y, devices=2, strategy="ddp", **kw)
    assert model.swag is not None and model.swag.count == reference.swag.count == 2
    assert torch.allclose(model.swag.mean, reference.swag.mean, atol=1e-5)
    assert torch.allclose(model.swag.deviations, reference.swag.deviations, atol=1e-5)


def test_the_ood_flag_records_the_head_draws_it_was_calibrated_with(fitted, digits):
    model = copy.deepcopy(fitted[0])
    x_dev, x = digits.x_test[:40], digits.x_test[40:60]
    detector = fit_ood_threshold(model, x_dev, 0.1, num_samples=2, swag=model.swag, head_samples=3)
    assert detector.head_samples == 3 and OODDetector.from_dict(detector.to_dict()) == detector
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # predicting as calibrated: no warning
        assert predict(model, x, 2, swag=model.swag, head_samples=3).ood.shape == (20,)
    with pytest.warns(
        RuntimeWarning, match="calibrated on predictions averaged over 3 SWAG head draws, this one is of"
    ):
        predict(model, x, 2)
    with pytest.warns(RuntimeWarning, match="this one is averaged over 5 SWAG head draws"):
        predict(model, x, 2, swag=model.swag, head_samples=5)
    old_record = {k: v for k, v in detector.to_dict().items() if k != "head_samples"}
    assert OODDetector.from_dict(old_record).head_samples == 0  # files saved before the field: the plain head
