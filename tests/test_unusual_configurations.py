"""Supported configurations off the default path: several ELBO particles, float64 models, a last batch of one,
a class prior without logit adjustment, a classifier with dropout, labels on a GPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dgc_pyro.baselines import fit_baseline
from dgc_pyro.inference import fit, predict
from dgc_pyro.inference.objectives import elbo_loss, mmd_imq
from dgc_pyro.inference.perturbation import guide_normal_params
from dgc_pyro.models import DGC

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n0: int = 30, n1: int = 10, d: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    y = torch.tensor([0] * n0 + [1] * n1)
    return torch.rand(len(y), d, generator=g) * 0.6 + y[:, None] * 0.4, y


@pytest.mark.parametrize("engine", ["torch", "svi"])
def test_a_multi_particle_elbo_trains_with_the_perturbation_step(engine):
    x, y = _data()
    model = DGC((8,), 2, latent_dim=3)
    history = fit(
        model,
        x,
        y,
        epochs=2,
        batch_size=10,
        objective=elbo_loss(num_particles=3),
        engine=engine,
        perturbation_rate=0.6,
        val_fraction=0,
        progress=False,
        device="cpu",
    )
    for record in history.epochs:
        assert torch.isfinite(torch.tensor([record["loss"], record["perturbation_loss"]])).all()
        assert record["perturbation_loss"] > 0


def test_guide_parameters_of_an_expanded_particle_trace_are_those_of_one_particle():
    model = DGC((8,), 2, latent_dim=3)
    x, y = _data(3, 2)
    loc, scale = model.encode(x, y)
    particle_trace = type("T", (), {"nodes": {"z": {"fn": torch.distributions.Normal(loc.expand(4, 5, 3), scale)}}})()
    got_loc, got_scale = guide_normal_params(particle_trace, model, x, y)
    assert got_loc.shape == got_scale.shape == (5, 3)
    assert torch.equal(got_loc, loc.detach()) and torch.equal(got_scale, scale.detach())


def test_wae_mmd_survives_a_last_batch_of_one_example():
    x, y = _data(15, 6)  # 21 examples in batches of 10
    history = fit(
        DGC((8,), 2, latent_dim=2),
        x,
        y,
        epochs=2,
        batch_size=10,
        objective="wae-mmd",
        val_fraction=0,
        progress=False,
        device="cpu",
    )
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in history.epochs)
    a, b = torch.zeros(1, 2), torch.ones(1, 2)
    assert float(mmd_imq(a, b, biased=True)) > 0 and float(mmd_imq(a, a, biased=True)) == 0
    with pytest.raises(ValueError, match="at least two samples"):
        mmd_imq(a, b)


def test_a_float64_model_fits_and_predicts_in_float64():
    x, y = _data()
    model = DGC((8,), 2, latent_dim=3).double()
    fit(model, x, y, epochs=1, batch_size=10, val_fraction=0.2, progress=False, device="cpu")
    assert model.dtype == torch.float64 and all(p.dtype == torch.float64 for p in model.parameters())
    pred = predict(model, x, 4)
    assert pred.proba.shape == (len(x), 2) and torch.isfinite(pred.proba).all()


def test_a_class_prior_without_logit_adjustment_is_balanced_by_dividing_out_p_y():
    torch.manual_seed(0)
    model = DGC((8,), 2, latent_dim=3, class_prior=[30, 10], logit_adjustment=0.0)
    assert not model.has_class_prior  # tau = 0: the offset is zero, the logits carry the prior themselves
    with torch.no_grad():
        model.classifier.net.bias.copy_(torch.tensor([3.0, -3.0]))  # a classifier that learnt a strong prior
    x, _ = _data()
    plain, balanced = predict(model, x, 4), predict(model, x, 4, balanced=True)
    assert plain.proba[:, 1].mean() < 0.05 and balanced.proba[:, 1].mean() > 0.2


def test_the_label_prior_is_computed_in_eval_mode_and_leaves_the_mode_alone():
    torch.manual_seed(0)
    classifier = nn.Sequential(nn.Linear(3, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    model = DGC((8,), 2, latent_dim=3, classifier=classifier)
    model.train()
    in_train = model.label_prior()
    assert model.training
    model.eval()
    assert torch.equal(model.label_prior(), in_train) and not model.training


def test_a_baseline_refuses_a_class_with_no_examples():
    x, y = _data()
    with pytest.raises(ValueError, match=r"classes \[1\] have no examples"):
        fit_baseline("ce", x, y * 2, num_classes=3, epochs=1, device="cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (labels already on the GPU)")
def test_data_already_on_the_gpu_fits_and_predicts():
    x, y = _data()
    model = DGC((8,), 2, latent_dim=3)
    fit(model, x.cuda(), y.cuda(), epochs=1, batch_size=10, val_fraction=0.2, progress=False, device="cuda")
    assert predict(model, x.cuda(), 4).proba.shape == (len(x), 2)
    assert fit_baseline("ce", x.cuda(), y.cuda(), epochs=1, device="cuda").predict_proba(x.cuda()).shape == (len(x), 2)


def test_a_seed_beyond_32_bits_seeds_every_generator():
    import numpy as np

    from dgc_pyro.reproducibility import seed_everything

    seed_everything(2**32 + 5)  # NumPy's legacy generator takes only 32 bits (pyro seeds it too): no error
    a = (np.random.rand(), torch.rand(()).item())
    seed_everything(2**32 + 5)
    assert (np.random.rand(), torch.rand(()).item()) == a
