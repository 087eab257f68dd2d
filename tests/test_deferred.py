"""Deferred re-balancing (perturbation_start, retrain_head_epochs) and head-borrowed tail noise (perturbation_noise).

Tiny model on sklearn's digits (464 training examples, 8x8), 4 epochs of 7 steps, one torch thread, CPU: the
comparisons below are float-for-float, as in tests/test_resume.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgc_pyro.checkpoint import load_training_state
from dgc_pyro.data import load_imbalanced
from dgc_pyro.experiment import Recipe, recipe_overrides
from dgc_pyro.inference.deferred import balanced_order, balanced_weights, first_perturbation_epoch
from dgc_pyro.inference.fit import TrainingDivergedError, TrainingInterrupted, fit
from dgc_pyro.inference.perturbation import borrowed_scale, head_classes, perturbation_loss, repeat_counts
from dgc_pyro.io import CheckpointError
from dgc_pyro.models.dgc import DGC

FIT_KW = dict(epochs=4, batch_size=64, lr=3e-3, progress=False, val_num_samples=2, device="cpu", select_best=False)

# 4 epochs of a 4-d latent model are often near chance on validation: these tests check the mechanics, not accuracy.
pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:validation ACSA is")]


@pytest.fixture(scope="module")
def digits():
    return load_imbalanced("digits")


def new_model(d) -> DGC:
    torch.manual_seed(0)
    return DGC(d.input_shape, 10, latent_dim=4)


def run(d, model=None, **kw):
    """Fit (a fresh model unless given); returns the model and its history."""
    m = new_model(d) if model is None else model
    return m, fit(m, d.x_train, d.y_train, **{**FIT_KW, **kw})


def same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def snapshots(model: torch.nn.Module, store: dict[int, dict[str, torch.Tensor]]):
    def callback(epoch, record):
        store[epoch] = {k: v.detach().clone() for k, v in model.state_dict().items()}

    return callback


def interrupted_then_resumed(d, folder, stop_after: int, **kw):
    """A fit stopped by Ctrl-C after epoch ``stop_after`` (its checkpoint), then resumed in a fresh model."""

    def ctrl_c(epoch, record):
        if epoch == stop_after + 1:
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted):
        run(d, callback=ctrl_c, checkpoint_dir=folder, **kw)
    assert load_training_state(folder).epoch == stop_after
    return run(d, model=DGC(d.input_shape, 10, latent_dim=4), checkpoint_dir=folder, resume=True, **kw)


# ---------------------------------------------------------------------------------------------- perturbation_start


def test_first_perturbation_epoch():
    assert first_perturbation_epoch(0.0, 30) == 1  # the default: every epoch
    assert first_perturbation_epoch(0.7, 30) == 22  # the last 30% (epochs 22..30)
    assert first_perturbation_epoch(0.7, 4) == 4  # ceil(2.8) + 1


def test_deferred_perturbation_is_plain_svi_before_its_start(digits):
    _, plain = run(digits, perturbation_rate=0.0)
    m, late = run(digits, perturbation_start=0.5)  # the perturbation step from epoch 3 on
    _, always = run(digits)
    assert [r["perturbation_loss"] for r in late.epochs[:2]] == [0.0, 0.0]
    assert all(r["perturbation_loss"] > 0 for r in late.epochs[2:])
    assert late.epochs[:2] == plain.epochs[:2]  # float for float: the first two epochs are the rate-0 fit
    assert late.epochs[2]["loss"] != always.epochs[2]["loss"]
    assert late.config["perturbation_start"] == 0.5


@pytest.mark.parametrize("stop_after", [1, 3], ids=["before-the-stage", "inside-the-stage"])
def test_resume_across_the_perturbation_switch_is_bit_identical(digits, tmp_path, stop_after):
    ref, h_ref = run(digits, perturbation_start=0.5)
    m, h = interrupted_then_resumed(digits, tmp_path, stop_after, perturbation_start=0.5)
    assert h.resumed_from == stop_after and h.epochs == h_ref.epochs
    assert same(m, ref)


def test_graph_engine_equals_torch_engine_across_the_switch(digits):
    g, h_g = run(digits, perturbation_start=0.5, engine="graph")
    t, h_t = run(digits, perturbation_start=0.5, engine="torch")
    assert h_g.config["engine"] == "graph"  # no fallback: the captured graph ran both before and after the switch
    assert h_g.epochs == h_t.epochs and same(g, t)


def test_resume_keeps_the_deferred_stages_epochs(digits, tmp_path):
    run(digits, epochs=2, perturbation_start=0.5, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="deferred_epochs=2 in the checkpoint, 4 now"):
        run(digits, perturbation_start=0.5, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="perturbation_start=0.5 in the checkpoint, 0.0 now"):
        run(digits, epochs=2, checkpoint_dir=tmp_path, resume=True)


# ---------------------------------------------------------------------------------------------- retrain_head_epochs


def test_balanced_order_draws_every_class_equally_often():
    y = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    counts = np.bincount(y.numpy())
    order = balanced_order(balanced_weights(y, counts), torch.Generator().manual_seed(0))
    assert order.shape == (1000,)
    share = np.bincount(y[order].numpy(), minlength=3) / 1000
    assert share == pytest.approx([1 / 3] * 3, abs=0.05)  # the natural order would give 0.90 / 0.09 / 0.01


def test_head_retraining_trains_the_label_head_alone(digits):
    store: dict[int, dict[str, torch.Tensor]] = {}
    m = new_model(digits)
    _, h = run(digits, model=m, retrain_head_epochs=2, callback=snapshots(m, store))
    for key, value in store[4].items():
        frozen = not key.startswith("classifier.")
        assert torch.equal(value, store[2][key]) is frozen, key  # encoder and decoder as after epoch 2
    assert [r["perturbation_loss"] for r in h.epochs[2:]] == [0.0, 0.0]
    assert h.epochs[2]["loss"] < 5  # a cross-entropy over 10 classes, not the negative ELBO (about 30 here)
    assert h.config["retrain_head_epochs"] == 2
    _, plain = run(digits, epochs=2)
    assert h.epochs[:2] == plain.epochs[:2]  # the stages before the re-training are today's fit


def test_divergence_inside_the_head_retraining_is_replayed_with_the_head_step(digits):
    m = new_model(digits)

    def poison(epoch, record):
        if epoch == 3:
            with torch.no_grad():
                m.classifier.net.weight[0, 0] = float("nan")

    with pytest.raises(TrainingDivergedError) as info:
        run(digits, model=m, retrain_head_epochs=1, callback=poison)
    e = info.value
    assert (e.epoch, e.step) == (4, 1) and "replaying the step" not in str(e)
    assert e.nonfinite_parameters == ["classifier.net.weight"]


@pytest.mark.parametrize("stop_after", [2, 3], ids=["before-the-stage", "inside-the-stage"])
def test_resume_across_the_head_retraining_is_bit_identical(digits, tmp_path, stop_after):
    kw = dict(retrain_head_epochs=2, perturbation_start=0.25)
    ref, h_ref = run(digits, **kw)
    m, h = interrupted_then_resumed(digits, tmp_path, stop_after, **kw)
    assert h.epochs == h_ref.epochs and same(m, ref)


def test_graph_engine_equals_torch_engine_with_head_retraining(digits):
    g, h_g = run(digits, retrain_head_epochs=1, engine="graph")
    t, h_t = run(digits, retrain_head_epochs=1, engine="torch")
    assert h_g.config["engine"] == "graph" and h_g.epochs == h_t.epochs and same(g, t)


def test_recipe_fields_reach_fit():
    recipe = Recipe(perturbation_start=0.7, retrain_head_epochs=3, perturbation_noise="head")
    options = recipe.fit_options()
    assert (options["perturbation_start"], options["retrain_head_epochs"], options["perturbation_noise"]) == (
        0.7,
        3,
        "head",
    )
    defaults = Recipe().fit_options()
    assert (defaults["perturbation_start"], defaults["retrain_head_epochs"], defaults["perturbation_noise"]) == (
        0.0,
        0,
        "own",
    )
    changes = recipe_overrides(["perturbation_start=0.8", "retrain_head_epochs=5", "perturbation_noise=head"])
    assert changes == {"perturbation_start": 0.8, "retrain_head_epochs": 5, "perturbation_noise": "head"}
    assert isinstance(changes["retrain_head_epochs"], int)


# ---------------------------------------------------------------------------------------------- perturbation_noise


def _latents(n_per_class=(60, 50, 6, 4), k=3, seed=0):
    """loc/scale of a batch: class c's locations spread by (c + 1) / 2 around its mean, q's scales about 0.3."""
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    spread = (y[:, None].double() + 1) / 2
    loc = 3.0 * y[:, None].double() + spread * torch.randn(len(y), k, generator=g, dtype=torch.float64)
    scale = 0.2 + 0.2 * torch.rand(len(y), k, generator=g, dtype=torch.float64)
    return loc, scale, y, np.array(n_per_class)


def test_head_noise_gives_tail_draws_the_head_classes_within_class_variance():
    loc, scale, y, counts = _latents()
    reps = repeat_counts(counts, 0.6)
    head = head_classes(reps)
    assert head.tolist() == [True, True, False, False]  # classes 2 and 3 are repeated: the tail
    # The head's pooled within-class variance of z ~ q(z | x), computed here independently (law of total variance).
    locs, scales, ys = loc.numpy(), scale.numpy(), y.numpy()
    pooled = sum(((locs[ys == c] - locs[ys == c].mean(0)) ** 2).sum(0) for c in (0, 1)) / (110 - 2)
    expected = pooled + (scales[ys < 2] ** 2).mean(0)

    model = DGC((6,), 4, latent_dim=3, preset="small").double()
    seen = []
    hook = model.classifier.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    torch.manual_seed(0)
    draws = 4000
    noise = torch.randn(len(y), draws, 3, dtype=torch.float64)
    perturbation_loss(model, loc, borrowed_scale(loc, scale, y, head), y, torch.full((4,), draws), noise=noise)
    hook.remove()
    z = seen[0].reshape(len(y), draws, 3)  # what p(y | z) was given
    offsets = (z - loc[:, None]).numpy()
    tail_var = offsets[ys >= 2].reshape(-1, 3).var(0)
    assert tail_var == pytest.approx(expected, rel=0.05)
    # Head draws keep q's own sigma, and the tail's own sigma (about 0.3) is far from the borrowed one.
    head_var = (offsets[ys < 2] / scales[ys < 2, None]).reshape(-1, 3).var(0)
    assert head_var == pytest.approx([1.0] * 3, rel=0.05)
    assert (scales[ys >= 2] ** 2).mean(0).max() < 0.2 * expected.min()


def test_head_noise_without_head_examples_in_the_batch_keeps_q_sigma():
    loc, scale, y, _ = _latents()
    tail_only = y >= 2
    head = torch.tensor([True, True, False, False])
    got = borrowed_scale(loc[tail_only], scale[tail_only], y[tail_only], head)
    assert torch.equal(got, scale[tail_only])


def test_head_noise_reaches_the_fit_and_the_default_is_unchanged(digits):
    m_own, h_own = run(digits, epochs=2)
    m_head, h_head = run(digits, epochs=2, perturbation_noise="head")
    assert h_own.config["perturbation_noise"] == "own" and h_head.config["perturbation_noise"] == "head"
    assert h_head.epochs[0]["perturbation_loss"] != h_own.epochs[0]["perturbation_loss"]
    assert not same(m_own, m_head)
    # With no tail class (rate 0.01 repeats nothing here) "head" has nothing to borrow for: the same fit.
    assert int(repeat_counts(np.bincount(digits.y_train.numpy()), 0.01).max()) == 1
    m_a, h_a = run(digits, epochs=2, perturbation_rate=0.01)
    m_b, h_b = run(digits, epochs=2, perturbation_rate=0.01, perturbation_noise="head")
    assert h_a.epochs == h_b.epochs and same(m_a, m_b)


def test_graph_engine_equals_torch_engine_with_head_noise(digits):
    g, h_g = run(digits, epochs=2, perturbation_noise="head", engine="graph")
    t, h_t = run(digits, epochs=2, perturbation_noise="head", engine="torch")
    assert h_g.config["engine"] == "graph" and h_g.epochs == h_t.epochs and same(g, t)


def test_resume_refuses_a_changed_perturbation_noise(digits, tmp_path):
    run(digits, epochs=1, perturbation_noise="head", checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="perturbation_noise='head' in the checkpoint, 'own' now"):
        run(digits, epochs=2, checkpoint_dir=tmp_path, resume=True)
    _, h = run(digits, epochs=2, perturbation_noise="head", checkpoint_dir=tmp_path, resume=True)
    assert h.resumed_from == 1
