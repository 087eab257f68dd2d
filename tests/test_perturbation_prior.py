"""The perturbation step's logit adjustment: the training prior's offset or that of the re-drawn latents."""

from __future__ import annotations

import dataclasses
import inspect

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from dgc_pyro.checkpoint import load_training_state, save_training_state, training_state_path
from dgc_pyro.config import TrainConfig
from dgc_pyro.experiment import Recipe, recipe_overrides
from dgc_pyro.inference import fit
from dgc_pyro.inference.perturbation import perturbation_loss, perturbation_offset, repeat_counts
from dgc_pyro.models import DGC

COUNTS = np.array([40, 20, 10, 4])


def _model(prior=COUNTS, tau=1.0, seed=0) -> DGC:
    torch.manual_seed(seed)
    return DGC((6,), 4, latent_dim=3, preset="small", class_prior=prior, logit_adjustment=tau)


def test_offset_follows_the_perturbed_class_frequencies():
    model = _model(tau=0.5)
    reps = repeat_counts(COUNTS, 0.6)  # floor(1 + 0.6 (n_max - n_c) / n_c)
    assert reps.tolist() == [1, 1, 2, 6]
    offset = perturbation_offset(model, reps, "perturbed")
    seen = COUNTS * np.array([1, 1, 2, 6])
    expected = 0.5 * np.log(seen / seen.sum())
    assert offset.dtype == model.label_offset.dtype
    assert offset.numpy() == pytest.approx(expected, rel=1e-6)
    # The repeats bring the classes closer: the offsets span less than the training prior's.
    assert np.ptp(offset.numpy()) < np.ptp(model.label_offset.numpy())


def test_train_prior_and_unadjusted_models_keep_the_models_own_logits():
    reps = repeat_counts(COUNTS, 0.6)
    assert perturbation_offset(_model(), reps, "train") is None
    assert perturbation_offset(_model(prior=None), reps, "perturbed") is None
    with pytest.raises(ValueError, match="perturbation_prior must be one of"):
        perturbation_offset(_model(), reps, "balanced")


def test_loss_with_an_offset_replaces_the_class_prior_offset():
    model = _model()
    reps = repeat_counts(COUNTS, 0.6)
    offset = perturbation_offset(model, reps, "perturbed")
    loc, scale = torch.randn(5, 3), torch.rand(5, 3) + 0.1
    y = torch.tensor([0, 1, 2, 3, 3])
    noise = torch.randn(5, int(reps.max()), 3)
    got = perturbation_loss(model, loc, scale, y, reps, noise=noise, offset=offset)
    z = loc[:, None] + scale[:, None] * noise
    ce = F.cross_entropy(
        model.classifier(z.reshape(-1, 3)) + offset, y.repeat_interleave(noise.shape[1]), reduction="none"
    )
    keep = (torch.arange(noise.shape[1]) < reps[y][:, None]).reshape(-1)
    assert got.item() == pytest.approx((ce * keep).sum().item() / reps[y].sum().item(), rel=1e-5)
    default = perturbation_loss(model, loc, scale, y, reps, noise=noise)
    assert default.item() != pytest.approx(got.item(), rel=1e-3)
    assert model._offset_active  # the balanced_labels context was left


def _data(n_per_class=(24, 12, 8, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.cat([torch.full((n,), c) for c, n in enumerate(n_per_class)])
    x = (torch.rand(len(y), 6, generator=g) * 0.3 + F.one_hot(y, 6)[:, :6].float() * 0.6).clamp(0, 1)
    return x, y


def _fit(prior, perturbation_prior, **kw):
    x, y = _data()
    model = _model(prior=prior)
    history = fit(
        model,
        x,
        y,
        epochs=2,
        batch_size=16,
        lr=1e-2,
        progress=False,
        val_fraction=0,
        seed=1,
        perturbation_rate=0.6,
        perturbation_prior=perturbation_prior,
        objective="elbo-analytic",
        **kw,
    )
    return history, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fit_uses_the_perturbed_prior_only_where_the_model_has_a_prior():
    counts = np.array([24, 12, 8, 4])
    h_train, w_train = _fit(counts, "train")
    h_pert, w_pert = _fit(counts, "perturbed")
    assert h_pert.config["perturbation_prior"] == "perturbed" and h_train.config["perturbation_prior"] == "train"
    assert not torch.allclose(w_train, w_pert)
    # The main step's losses agree on the first step only; the perturbation losses differ from the start.
    assert h_pert.epochs[0]["perturbation_loss"] != pytest.approx(h_train.epochs[0]["perturbation_loss"], rel=1e-4)
    _, a = _fit(None, "train")
    _, b = _fit(None, "perturbed")
    assert torch.equal(a, b)


def test_fit_rejects_an_unknown_perturbation_prior():
    with pytest.raises(ValueError, match="perturbation_prior must be one of \\('train', 'perturbed'\\), got 'uniform'"):
        _fit(COUNTS, "uniform")


def test_resume_refuses_a_changed_perturbation_prior(tmp_path):
    counts = np.array([24, 12, 8, 4])
    _fit(counts, "perturbed", checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="perturbation_prior"):
        _fit(counts, "train", checkpoint_dir=tmp_path, resume=True)
    history, _ = _fit(counts, "perturbed", checkpoint_dir=tmp_path, resume=True)
    assert history.resumed_from == 2


def test_a_checkpoint_written_before_the_option_resumes_with_the_training_prior(tmp_path):
    counts = np.array([24, 12, 8, 4])
    _fit(counts, "train", checkpoint_dir=tmp_path)
    path = training_state_path(tmp_path)
    state = load_training_state(path)
    assert state.config.pop("perturbation_prior") == "train"
    save_training_state(path, state)  # as an older dgc_pyro wrote it: no perturbation_prior setting
    history, _ = _fit(counts, "train", checkpoint_dir=tmp_path, resume=True)
    assert history.resumed_from == 2
    with pytest.raises(ValueError, match="perturbation_prior='train' in the checkpoint, 'perturbed' now"):
        _fit(counts, "perturbed", checkpoint_dir=tmp_path, resume=True)


def test_recipe_fit_options_are_fit_arguments_and_follow_the_recipe():
    recipe = Recipe(perturbation_prior="perturbed", transform="shift", betas=(0.5, 0.999))
    options = recipe.fit_options()
    # fit takes its options as TrainConfig fields (fit(model, x, y, config, **options))
    assert set(options) <= set(inspect.signature(fit).parameters) | {f.name for f in dataclasses.fields(TrainConfig)}
    assert options["perturbation_prior"] == "perturbed" and options["transform"] == "shift"
    assert options["betas"] == (0.5, 0.999) and options["epochs"] == recipe.epochs


def test_recipe_overrides_convert_to_the_field_types():
    changes = recipe_overrides(
        [
            "label_weight=300",
            "perturbation_rate=0",
            "epochs=3",
            "perturbation_prior=perturbed",
            "transform=none",
            "label_in_guide=false",
            "betas=0.5,0.999",
        ]
    )
    assert changes == {
        "label_weight": 300.0,
        "perturbation_rate": 0.0,
        "epochs": 3,
        "perturbation_prior": "perturbed",
        "transform": None,
        "label_in_guide": False,
        "betas": (0.5, 0.999),
    }
    assert isinstance(changes["epochs"], int) and isinstance(changes["label_weight"], float)


@pytest.mark.parametrize(
    "item, message",
    [
        ("foo=1", "no field 'foo'"),
        ("epochs=x", "'epochs=x'"),
        ("label_weight", "is not FIELD=VALUE"),
        ("label_weight=nan", "must be finite"),
        ("betas=0.5", "expected 2 comma-separated numbers"),
        ("label_in_guide=maybe", "expected true or false"),
    ],
)
def test_recipe_overrides_name_the_bad_item(item, message):
    with pytest.raises(ValueError, match=message):
        recipe_overrides([item])
