"""Posterior and posterior predictive draws of the latents with pyro.infer.Predictive."""

from __future__ import annotations

import pytest
import torch

from dgc_pyro.inference import fit, posterior_log_densities, posterior_predictive, predict
from dgc_pyro.models import DGC

K = 4  # classes 0..3 of digits: a model learns them in a second


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(digits, one_thread, device):
    """The fitted model with test data on its device (``--device``), so the checks compare on one device."""
    tr, te = digits.y_train < K, digits.y_test < K
    torch.manual_seed(0)
    model = DGC(digits.input_shape, K, latent_dim=4, likelihood="normal", label_weight=20.0)
    fit(
        model,
        digits.x_train[tr],
        digits.y_train[tr],
        epochs=4,
        batch_size=64,
        lr=3e-3,
        progress=False,
        val_fraction=0,
        objective="elbo-analytic",
        perturbation_rate=0,
    )
    return model, digits.x_test[te][:30].to(device), digits.y_test[te][:30].to(device)


def test_draws_at_given_labels_have_the_documented_shapes(tiny):
    model, x, y = tiny
    out = posterior_predictive(model, x, y, num_samples=7, return_x=True)
    assert out["z"].shape == (7, 30, 4)
    assert out["y"].shape == (7, 30)
    assert out["x"].shape == (7, 30, 1, 8, 8)
    assert torch.equal(out["labels"], y)
    assert out["y"].dtype == torch.int64 and out["y"].min() >= 0 and out["y"].max() < K
    assert torch.isfinite(out["z"]).all()
    assert out["x"].min() >= 0 and out["x"].max() <= 1  # mean images of the normal(sigmoid) likelihood
    assert "x" not in posterior_predictive(model, x, y, num_samples=2)


def test_per_class_draws_are_conditioned_on_every_class(tiny):
    model, x, _ = tiny
    out = posterior_predictive(model, x, num_samples=5, per_class=True, return_x=True, max_rows=100)
    assert out["z"].shape == (5, K, 30, 4)
    assert out["y"].shape == (5, K, 30)
    assert out["x"].shape == (5, K, 30, 1, 8, 8)
    assert torch.equal(out["labels"], torch.arange(K, device=x.device)[:, None].expand(K, 30))
    # Hypothesis c must equal the draws made at label c for every example (same encoder input).
    loc_c = torch.stack([model.encode(x, torch.full((30,), c, device=x.device))[0] for c in range(K)]).detach()
    mean_z = out["z"].mean(0)
    assert (mean_z - loc_c).abs().mean() < (mean_z - loc_c.roll(1, 0)).abs().mean()


def test_unlabelled_draws_use_the_predicted_class_and_seed_is_reproducible(tiny):
    model, x, _ = tiny
    state = torch.get_rng_state()
    a = posterior_predictive(model, x, num_samples=4, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the seed does not touch global randomness
    b = posterior_predictive(model, x, num_samples=4, seed=3)
    assert torch.equal(a["z"], b["z"]) and torch.equal(a["labels"], b["labels"])
    assert a["labels"].shape == (30,)
    # Without y, q is conditioned on the class predict() gives under the same seed (10 draws by default).
    torch.manual_seed(3)
    assert torch.equal(a["labels"].cpu(), predict(model, x, 10).labels.cpu())
    assert len(a["labels"].unique()) > 1  # a model that predicts one class would make the check above weak


def test_chunking_does_not_change_shapes_or_order(tiny):
    model, x, y = tiny
    small = posterior_predictive(model, x, y, num_samples=3, max_rows=30, seed=0)  # 3 chunks
    assert small["z"].shape == (3, 30, 4)
    # Chunks follow the examples: the posterior mean of example i is close to its encoder mean.
    loc, _ = model.encode(x, y)
    big = posterior_predictive(model, x, y, num_samples=200, max_rows=2000, seed=0)
    assert torch.allclose(big["z"].mean(0), loc.detach(), atol=0.5)


def test_log_densities_match_the_networks(tiny):
    model, x, y = tiny
    z = posterior_predictive(model, x, y, num_samples=6, seed=1)["z"]
    dens = posterior_log_densities(model, x, y, z, max_rows=20)
    assert set(dens) == {"log_prior", "log_q", "log_lik_x", "log_lik_y"}
    assert all(v.shape == (6, 30) for v in dens.values())
    with torch.no_grad():
        loc, scale = model.encode(x, y)
        log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
        log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
        log_y = torch.log_softmax(model.label_logits(z), -1).gather(-1, y.expand(6, 30)[..., None]).squeeze(-1)
    assert torch.allclose(dens["log_q"], log_q, atol=1e-4)
    assert torch.allclose(dens["log_prior"], log_prior, atol=1e-4)
    assert torch.allclose(dens["log_lik_y"], log_y, atol=1e-4)
    assert torch.isfinite(dens["log_lik_x"]).all()


def test_bad_inputs_are_rejected(tiny):
    model, x, y = tiny
    with pytest.raises(ValueError, match="num_samples"):
        posterior_predictive(model, x, y, num_samples=0)
    with pytest.raises(ValueError, match="labels"):
        posterior_predictive(model, x, y[:5], num_samples=2)
    with pytest.raises(ValueError, match="shape"):
        posterior_log_densities(model, x, y, torch.zeros(2, 5, 4))
