"""Training objectives: the paper's WAE-MMD loss (Eq. 7-8) beside the ELBO, on the same model/guide."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from fixtures import load_benchmark
from pyro import poutine

from dgc_pyro.inference import OBJECTIVES, fit, get_objective
from dgc_pyro.inference.objectives import IMQ_SCALES, mmd_imq, wae_mmd_loss
from dgc_pyro.models import DGC


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _toy(n: int = 64, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = _gen(seed)
    y = torch.arange(n) % 2
    x = (0.25 + 0.5 * y[:, None] + 0.1 * torch.randn(n, d, generator=g)).clamp(0, 1)
    return x, y


# ----------------------------------------------------------------------------- mmd_imq
def test_mmd_of_identical_samples_is_zero():
    a = torch.randn(200, 8, generator=_gen())
    assert mmd_imq(a, a, biased=True).abs().item() < 1e-6
    # The U-statistic of a sample against itself is -O(1/n), not exactly 0.
    assert abs(mmd_imq(a, a).item()) < 2 * len(IMQ_SCALES) / 200


def test_mmd_same_distribution_small_and_grows_monotonically_with_a_mean_shift():
    a = torch.randn(300, 8, generator=_gen(1))
    b = torch.randn(300, 8, generator=_gen(2))
    same = mmd_imq(a, b).item()
    values = [mmd_imq(a, b + shift).item() for shift in (0.25, 0.5, 1.0, 2.0, 4.0)]
    assert abs(same) < 0.02
    assert values[0] > same
    assert all(u < v for u, v in zip(values, values[1:])), values
    assert values[-1] > 50 * max(abs(same), 1e-3)


def test_mmd_matches_the_kernel_definition():
    a, b = torch.randn(5, 3, generator=_gen(3)), torch.randn(4, 3, generator=_gen(4))

    def k(u, v, c):
        return c / (c + ((u - v) ** 2).sum())

    expected = 0.0
    for s in (0.5, 2.0):
        c = 2 * 3 * s
        kaa = sum(k(a[i], a[j], c) for i in range(5) for j in range(5) if i != j) / 20
        kbb = sum(k(b[i], b[j], c) for i in range(4) for j in range(4) if i != j) / 12
        kab = sum(k(a[i], b[j], c) for i in range(5) for j in range(4)) / 20
        expected += kaa + kbb - 2 * kab
    assert mmd_imq(a, b, scales=(0.5, 2.0)).item() == pytest.approx(float(expected), rel=1e-5)


def test_mmd_rejects_bad_shapes():
    with pytest.raises(ValueError):
        mmd_imq(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(ValueError):
        mmd_imq(torch.zeros(1, 2), torch.zeros(3, 2))


# ----------------------------------------------------------------------------- the loss callable
def test_registered_and_validated():
    assert "wae-mmd" in OBJECTIVES
    assert callable(get_objective("wae-mmd"))
    with pytest.raises(ValueError):
        wae_mmd_loss(reconstruction="l1")
    with pytest.raises(ValueError):
        wae_mmd_loss(lam=-1.0)


def _loss_value(loss, model, x, y, seed=0, scale=None):
    pyro.set_rng_seed(seed)
    m, g = model.model, model.guide
    if scale is not None:
        m, g = poutine.scale(m, scale=scale), poutine.scale(g, scale=scale)
    with pyro.settings.context(module_local_params=True):
        return loss(m, g, x, y)


def test_loss_respects_poutine_scale():
    x, y = _toy(32)
    model = DGC((6,), 2, latent_dim=3, likelihood="normal", obs_scale=0.3)
    loss = wae_mmd_loss(lam=10.0)
    full = _loss_value(loss, model, x, y)
    per_example = _loss_value(loss, model, x, y, scale=1.0 / 32)
    assert per_example.item() == pytest.approx(full.item() / 32, rel=1e-4)


def test_l2_reconstruction_is_half_squared_error_of_the_mean():
    # With a unit-variance Normal likelihood, -log p(x | z) = 0.5 ||x - x_hat||^2 + D/2 log(2 pi).
    x, y = _toy(16)
    model = DGC((6,), 2, latent_dim=3, likelihood="normal", obs_scale=1.0)
    lik = _loss_value(wae_mmd_loss(lam=0.0, reconstruction="likelihood"), model, x, y)
    l2 = _loss_value(wae_mmd_loss(lam=0.0, reconstruction="l2"), model, x, y)
    assert (lik - l2).item() == pytest.approx(16 * 6 * 0.5 * math.log(2 * math.pi), rel=1e-4)


def test_label_term_and_no_kl_term():
    x, y = _toy(16)
    model = DGC((6,), 2, latent_dim=3)
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        guide_tr = poutine.trace(model.guide).get_trace(x, y)
        model_tr = poutine.trace(poutine.replay(model.model, trace=guide_tr)).get_trace(x, y)
    model_tr.compute_log_prob()
    expected = -(model_tr.nodes["x"]["log_prob_sum"] + model_tr.nodes["y"]["log_prob_sum"])
    assert _loss_value(wae_mmd_loss(lam=0.0), model, x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_kl_weight_adds_the_analytic_elbo_kl():
    """wae-mmd-kl without the MMD is the negative ELBO with the closed-form KL, on the same draw of z."""
    x, y = _toy(16)
    model = DGC((6,), 2, latent_dim=3, likelihood="normal", obs_scale=0.3)
    with_kl = _loss_value(wae_mmd_loss(lam=0.0, kl_weight=1.0), model, x, y)
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        neg_elbo = get_objective("elbo-analytic")(model.model, model.guide, x, y)
    assert with_kl.item() == pytest.approx(neg_elbo.item(), rel=1e-5)
    without = _loss_value(wae_mmd_loss(lam=0.0), model, x, y)
    half = _loss_value(wae_mmd_loss(lam=0.0, kl_weight=0.5), model, x, y)
    assert (half - without).item() == pytest.approx(0.5 * (with_kl - without).item(), rel=1e-5)
    assert (with_kl - without).item() > 0
    # the registered objective: KL weight 1 and the paper's MMD penalty
    assert "kl_weight=1.0" in get_objective("wae-mmd-kl").__name__


def test_kl_term_falls_back_to_the_one_draw_estimate_without_a_closed_form():
    class MixturePrior(DGC):
        def prior(self, batch_shape):
            shape = tuple(batch_shape)
            mix = dist.Categorical(self._zero.new_ones(shape + (2,)))
            locs = torch.stack([self._zero.new_full(shape + (self.latent_dim,), v) for v in (-1.0, 1.0)], -2)
            comp = dist.Normal(locs, torch.ones_like(locs)).to_event(1)
            return dist.MixtureSameFamily(mix, comp)

    x, y = _toy(8)
    model = MixturePrior((6,), 2, latent_dim=3)
    with_kl = _loss_value(wae_mmd_loss(lam=0.0, kl_weight=1.0), model, x, y)
    pyro.set_rng_seed(0)
    with pyro.settings.context(module_local_params=True):
        neg_elbo = get_objective("elbo")(model.model, model.guide, x, y)  # Trace_ELBO: the same one-draw estimate
    assert with_kl.item() == pytest.approx(neg_elbo.item(), rel=1e-5)


@pytest.mark.parametrize("bad", [-0.1, float("nan"), float("inf")])
def test_kl_weight_is_validated(bad):
    with pytest.raises(ValueError, match="kl_weight must be a finite number >= 0"):
        wae_mmd_loss(kl_weight=bad)


class ShiftedPrior(DGC):
    def prior(self, batch_shape):
        loc = self._zero.new_full(tuple(batch_shape) + (self.latent_dim,), 6.0)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


def test_mmd_term_uses_the_models_own_prior():
    x, y = _toy(32)
    torch.manual_seed(0)
    standard = DGC((6,), 2, latent_dim=3)
    shifted = ShiftedPrior((6,), 2, latent_dim=3)
    shifted.load_state_dict(standard.state_dict())
    only_mmd = {}
    for name, model in (("standard", standard), ("shifted", shifted)):
        with_mmd = _loss_value(wae_mmd_loss(lam=1.0), model, x, y, scale=1.0 / 32)
        without = _loss_value(wae_mmd_loss(lam=0.0), model, x, y, scale=1.0 / 32)
        only_mmd[name] = (with_mmd - without).item()
    # Freshly initialised encoders put z near 0: far from N(6, I), close to N(0, I).
    assert only_mmd["shifted"] > 5 * abs(only_mmd["standard"])


def test_works_through_pyro_svi_and_decreases():
    x, y = _toy(64)
    pyro.set_rng_seed(0)
    model = DGC((6,), 2, latent_dim=3, likelihood="normal", obs_scale=0.3)
    model_fn = poutine.scale(model.model, scale=1.0 / 64)
    guide_fn = poutine.scale(model.guide, scale=1.0 / 64)
    svi = pyro.infer.SVI(model_fn, guide_fn, pyro.optim.Adam({"lr": 1e-2}), loss=wae_mmd_loss(lam=1.0))
    pyro.clear_param_store()
    losses = [svi.step(x, y) for _ in range(40)]  # plain SVI: the global param store
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-8:]) / 8 < sum(losses[:8]) / 8


def test_fit_with_wae_mmd(digits):
    pyro.set_rng_seed(0)
    x, y = digits.x_train, digits.y_train
    model = DGC(digits.input_shape, digits.num_classes, latent_dim=8, likelihood="normal")
    hist = fit(
        model,
        x,
        y,
        epochs=3,
        batch_size=64,
        lr=3e-3,
        objective="wae-mmd",
        device="cpu",
        progress=False,
        val_num_samples=2,
    )
    assert hist.config["objective"] == "wae-mmd"
    assert all(math.isfinite(v) for v in hist.losses)
    assert hist.losses[-1] < hist.losses[0]


def test_fit_with_pretraining_and_a_custom_wae_loss(digits, monkeypatch):
    import sys

    fit_module = sys.modules["dgc_pyro.inference.training"]  # where the single-process fit looks the name up
    pretrained = []

    def recording_pretrain(model, *args, **kwargs):
        before = [p.detach().clone() for p in model.encoder.parameters()]
        out = real_pretrain(model, *args, **kwargs)
        pretrained.append((args[2], any(not torch.equal(a, p) for a, p in zip(before, model.encoder.parameters()))))
        return out

    real_pretrain = fit_module.pretrain_encoder
    monkeypatch.setattr(fit_module, "pretrain_encoder", recording_pretrain)
    model = DGC(digits.input_shape, digits.num_classes, latent_dim=8, likelihood="normal")
    hist = fit(
        model,
        digits.x_train,
        digits.y_train,
        epochs=1,
        batch_size=64,
        objective=wae_mmd_loss(lam=10.0, reconstruction="l2"),
        device="cpu",
        progress=False,
        val_num_samples=2,
        pretrain_steps=5,
    )
    assert hist.config["pretrain_steps"] == 5
    assert math.isfinite(hist.losses[0])
    assert pretrained == [(5, True)]  # five pre-training steps ran and moved the encoder


pytestmark = pytest.mark.usefixtures("one_thread")


class _FixedEncoder:
    """Stands in for a fitted DGC: ``encode`` returns fixed codes (what latent_spread reads)."""

    label_in_guide = False

    def __init__(self, loc, scale):
        self.loc, self.scale = loc, scale

    def eval(self):
        return self

    def encode(self, x, y):
        return self.loc, self.scale


def test_latent_spread_reads_posterior_width_against_the_spread_of_the_codes():
    bench = load_benchmark("posterior_scale")
    y = torch.tensor([0, 0, 1, 1])
    loc = torch.tensor([[0.0, 0.0], [2.0, 2.0], [10.0, 10.0], [12.0, 12.0]])  # class means 1 and 11 in each dim
    scale = torch.full((4, 2), 0.25)
    s = bench.latent_spread(_FixedEncoder(loc, scale), torch.zeros(4, 1), y, num_classes=2)
    assert s["posterior_sd"] == pytest.approx(0.25)
    assert s["within_class_sd"] == pytest.approx(2.0**0.5)
    assert s["between_class_sd"] == pytest.approx(torch.tensor([1.0, 11.0]).std().item())


def test_posterior_scale_script_prints_a_row_per_objective(capsys):
    bench = load_benchmark("posterior_scale")
    assert (
        bench.main(
            [
                "--dataset",
                "digits",
                "--epochs",
                "1",
                "--objectives",
                "elbo-analytic",
                "wae-mmd",
                "--max-examples",
                "200",
            ]
        )
        == 0
    )
    rows = [
        line for line in capsys.readouterr().out.splitlines() if line.startswith("| elbo") or line.startswith("| wae")
    ]
    assert [r.split("|")[1].strip() for r in rows] == ["elbo-analytic", "wae-mmd"]
    assert all(float(r.split("|")[2]) > 0 for r in rows)


def test_the_kl_term_keeps_the_posterior_from_collapsing(digits):
    """The WAE-MMD collapse of benchmarks/posterior_scale.py, in small: the KL term keeps q(z | x) wide."""
    posterior_scale = load_benchmark("posterior_scale")
    sd = {}
    for objective in ("wae-mmd", "wae-mmd-kl"):
        torch.manual_seed(0)
        model = DGC(
            digits.input_shape,
            digits.num_classes,
            latent_dim=8,
            likelihood="normal",
            obs_scale=0.3,
            label_weight=10.0,
            label_in_guide=False,
        )
        fit(
            model,
            digits.x_train,
            digits.y_train,
            epochs=6,
            batch_size=32,
            lr=3e-3,
            objective=objective,
            device="cpu",
            progress=False,
            val_fraction=0,
            seed=0,
        )
        sd[objective] = posterior_scale.latent_spread(model, digits.x_train, digits.y_train, digits.num_classes)[
            "posterior_sd"
        ]
    assert sd["wae-mmd-kl"] > 3 * sd["wae-mmd"], sd
