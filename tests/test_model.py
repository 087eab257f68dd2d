"""The DGC model/guide pair: sites, shapes, networks and configuration."""

from __future__ import annotations

import pyro
import pytest
import torch
from pyro import poutine

from dgc_pyro.models import DGC, build_networks

SHAPES = [(64,), (1, 8, 8), (1, 28, 28), (3, 32, 32), (3, 64, 64)]


def _trace(model: DGC, x, y):
    with pyro.settings.context(module_local_params=True):
        guide_tr = poutine.trace(model.guide).get_trace(x, y)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x, y)
    return guide_tr, model_tr


@pytest.mark.parametrize("shape", SHAPES)
def test_trace_has_observed_x_y_and_latent_z(shape):
    model = DGC(shape, num_classes=5, latent_dim=8)
    x = torch.rand(3, *shape)
    y = torch.tensor([0, 4, 2])
    guide_tr, model_tr = _trace(model, x, y)
    sites = {n: s for n, s in model_tr.nodes.items() if s["type"] == "sample" and n != "data"}
    assert set(sites) == {"z", "x", "y"}
    assert sites["x"]["is_observed"] and sites["y"]["is_observed"]
    assert not sites["z"]["is_observed"]
    assert torch.equal(sites["x"]["value"], x) and torch.equal(sites["y"]["value"], y)
    assert sites["z"]["value"].shape == (3, 8)
    assert "z" in guide_tr.nodes and not guide_tr.nodes["z"]["is_observed"]
    # Every example is one event of the plate "data".
    model_tr.compute_log_prob()
    for name in ("x", "y", "z"):
        assert sites[name]["log_prob"].shape == (3,)
        assert torch.isfinite(sites[name]["log_prob"]).all()


def test_model_without_labels_samples_y_and_prior_predictive_samples_x():
    model = DGC((1, 8, 8), num_classes=4, latent_dim=4)
    x = torch.rand(6, 1, 8, 8)
    with pyro.settings.context(module_local_params=True):
        tr = poutine.trace(model.model).get_trace(x)
        assert not tr.nodes["y"]["is_observed"]
        y = tr.nodes["y"]["value"]
        assert y.shape == (6,) and y.min() >= 0 and y.max() < 4
        prior_tr = poutine.trace(model.model).get_trace(None, None, num_examples=5)
    assert prior_tr.nodes["x"]["value"].shape == (5, 1, 8, 8)
    assert not prior_tr.nodes["x"]["is_observed"]


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous_bernoulli", "normal"])
def test_likelihoods_give_finite_log_probs(likelihood):
    model = DGC((10,), num_classes=3, latent_dim=2, likelihood=likelihood)
    x = torch.rand(4, 10)
    _, tr = _trace(model, x, torch.tensor([0, 1, 2, 0]))
    tr.compute_log_prob()
    assert torch.isfinite(tr.nodes["x"]["log_prob"]).all()


def test_paper_networks_follow_the_reference_grid_sizes():
    enc, dec, cls = build_networks((1, 28, 28), 10, 64, "paper")
    # 28 -> 14 -> 7 -> 4 -> 2 with 1024 channels: 4096 features, as in the reference code.
    assert enc.feature_dim == 2 * 2 * 1024
    assert dec(torch.zeros(2, 64)).shape == (2, 1, 28, 28)
    assert cls(torch.zeros(2, 64)).shape == (2, 10)
    enc, dec, cls = build_networks((3, 64, 64), 5, 64, "paper")
    assert enc.feature_dim == 2 * 2 * 1024
    assert dec(torch.zeros(1, 64)).shape == (1, 3, 64, 64)


def test_custom_networks_replace_defaults_and_keep_sites():
    class TinyClassifier(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, z):
            return self.lin(z)

    model = DGC((5,), num_classes=2, latent_dim=3, classifier=TinyClassifier())
    assert isinstance(model.classifier, TinyClassifier)
    assert model.config["custom_networks"] == ["classifier"]
    _, tr = _trace(model, torch.rand(2, 5), torch.tensor([0, 1]))
    assert tr.nodes["y"]["fn"].logits.shape == (2, 2)
    with pytest.raises(ValueError, match="custom networks"):
        DGC.from_config(model.config)


def test_config_round_trip_rebuilds_the_same_architecture():
    model = DGC((1, 28, 28), 10, latent_dim=12, likelihood="normal", obs_scale=0.2, label_weight=3.0)
    clone = DGC.from_config(model.config)
    assert clone.config == model.config
    assert {k: v.shape for k, v in clone.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_shape=(), num_classes=3), "input_shape"),
        (dict(input_shape=(4,), num_classes=1), "num_classes"),
        (dict(input_shape=(4,), num_classes=3, latent_dim=0), "latent_dim"),
        (dict(input_shape=(4,), num_classes=3, preset="huge"), "preset"),
        (dict(input_shape=(4,), num_classes=3, likelihood="poisson"), "likelihood"),
        (dict(input_shape=(4,), num_classes=3, label_weight=0.0), "label_weight"),
    ],
)
def test_bad_constructor_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DGC(**kwargs)


def test_two_models_do_not_share_parameters_through_the_param_store():
    pyro.clear_param_store()
    a, b = DGC((4,), 2, latent_dim=2), DGC((4,), 2, latent_dim=2)
    x, y = torch.rand(3, 4), torch.tensor([0, 1, 0])
    with pyro.settings.context(module_local_params=True):
        tr_a = poutine.trace(a.guide).get_trace(x, y)
        tr_b = poutine.trace(b.guide).get_trace(x, y)
    la, lb = tr_a.nodes["z"]["fn"].base_dist.loc, tr_b.nodes["z"]["fn"].base_dist.loc
    assert not torch.allclose(la, lb)
    assert len(pyro.get_param_store()) == 0


def test_class_prior_shifts_the_label_logits_by_tau_log_pi():
    torch.manual_seed(0)
    model = DGC((4,), 3, latent_dim=2, class_prior=[6, 3, 1], logit_adjustment=0.5)
    z = torch.randn(5, 2)
    plain = model.classifier(z)
    expected = plain + 0.5 * torch.tensor([0.6, 0.3, 0.1]).log()
    assert torch.allclose(model.label_logits(z), expected, atol=1e-6)
    with model.balanced_labels():
        assert torch.allclose(model.label_logits(z), plain)
    assert torch.allclose(model.label_logits(z), expected, atol=1e-6)  # restored on exit
    assert model.has_class_prior and not DGC((4,), 3).has_class_prior


def test_class_prior_survives_the_config_and_stays_out_of_the_state_dict():
    model = DGC((4,), 3, latent_dim=2, class_prior=[2.0, 1.0, 1.0], logit_adjustment=1.0)
    clone = DGC.from_config(model.config)
    assert clone.config == model.config
    assert clone.class_prior == pytest.approx([0.5, 0.25, 0.25])
    assert torch.allclose(clone.label_offset, model.label_offset)
    assert "label_offset" not in model.state_dict()
    # a config written before class priors existed still loads, without one
    old = {k: v for k, v in model.config.items() if k not in ("class_prior", "logit_adjustment")}
    assert not DGC.from_config(old).has_class_prior


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(class_prior=[1.0, 2.0]), "one entry per class"),
        (dict(class_prior=[1.0, 0.0, 2.0]), "positive"),
        (dict(class_prior=[1.0, float("nan"), 2.0]), "positive and finite"),
        (dict(class_prior=[1.0, 1.0, 1.0], logit_adjustment=-1.0), "logit_adjustment"),
    ],
)
def test_bad_class_priors_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DGC((4,), 3, **kwargs)


def test_default_rule_follows_the_guide():
    assert DGC((4,), 3).default_rule == "mixture"
    assert DGC((4,), 3, label_in_guide=False).default_rule == "latent"


def test_log_variance_clamp_passes_gradients_outside_its_bounds():
    from dgc_pyro.models.networks import LOG_VAR_BOUNDS, clamp_log_var

    v = torch.tensor([-1e4, -31.0, 0.5, 25.0, 1e8], requires_grad=True)
    out = clamp_log_var(v)
    assert torch.equal(out, v.detach().clamp(*LOG_VAR_BOUNDS))  # the forward pass is exactly the clamp
    # KL(N(0, e^v) || N(0, 1)) per dimension: its gradient must reach v even where v is clipped, or a
    # dimension past the upper bound could never come back (it did, with the paper's networks)
    kl = 0.5 * (out.exp() - out - 1.0)
    kl.sum().backward()
    assert (v.grad[3:] > 0).all() and (v.grad[:2] < 0).all()


def test_observe_x_false_drops_the_x_site_and_round_trips(tmp_path):
    from dgc_pyro.checkpoint import load_model, save_model
    from dgc_pyro.experiment import Recipe
    from dgc_pyro.inference.objectives import get_objective

    model = DGC((1, 8, 8), num_classes=3, latent_dim=4, label_in_guide=False, observe_x=False)
    x, y = torch.rand(5, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1])
    guide_tr, model_tr = _trace(model, x, y)
    assert {n for n, s in model_tr.nodes.items() if s["type"] == "sample" and n != "data"} == {"z", "y"}
    # The ELBO of the default recipe runs without the site, and only the pixel-free terms reach the gradients.
    with pyro.settings.context(module_local_params=True):
        loss = get_objective("elbo-analytic")(model.model, model.guide, x, y)
    loss.backward()
    assert all(p.grad is None for p in model.decoder.parameters())
    assert model.encoder.parameters().__next__().grad is not None
    with pyro.settings.context(module_local_params=True), pytest.raises(ValueError, match="needs the site 'x'"):
        get_objective("wae-mmd")(model.model, model.guide, x, y)
    # Config, checkpoint and recipe keep the choice; an old config without the key is a DGC with the x site.
    assert DGC.from_config(model.config).observe_x is False
    save_model(tmp_path / "m.safetensors", model)
    assert load_model(tmp_path / "m.safetensors").observe_x is False
    old = {k: v for k, v in model.config.items() if k != "observe_x"} | {"label_in_guide": True}
    assert DGC.from_config(old).observe_x is True
    assert Recipe(label_in_guide=False, observe_x=False).build_model((1, 8, 8), 3).observe_x is False


def test_observe_x_false_needs_a_label_free_guide():
    with pytest.raises(ValueError, match="observe_x=False needs label_in_guide=False"):
        DGC((4,), num_classes=2, observe_x=False)
    with pytest.raises(ValueError, match="observe_x must be True or False"):
        DGC((4,), num_classes=2, label_in_guide=False, observe_x="no")


def test_run_experiment_fits_and_evaluates_a_model_without_the_x_site():
    from dgc_pyro.data import load_imbalanced
    from dgc_pyro.experiment import Recipe, run_experiment

    split = load_imbalanced("digits", seed=0)
    recipe = Recipe(
        epochs=1,
        batch_size=64,
        latent_dim=4,
        num_samples=2,
        label_in_guide=False,
        observe_x=False,
        logit_adjustment=1.0,
    )
    result = run_experiment(split, recipe, baseline=None, device="cpu", progress=False)
    assert 0.0 <= result.metrics["acsa"] <= 1.0 and result.prediction.log_density is None
    assert "ood_flag_rate" not in result.metrics  # no density, so no OOD flag was calibrated
