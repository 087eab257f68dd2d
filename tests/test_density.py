"""The density of x in every prediction, the calibrated OOD flag, the reject rules and the mixed-stream AURC."""

from __future__ import annotations

import math

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from dgc_pyro.checkpoint import load_model, save_model
from dgc_pyro.inference import fit, fit_ood_threshold, predict
from dgc_pyro.inference.density import OODDetector, complexity_nats
from dgc_pyro.metrics import aurc, risk_coverage_curve
from dgc_pyro.models.dgc import DGC


def _model(label_in_guide=True, cls=DGC) -> DGC:
    torch.manual_seed(0)
    return cls((1, 8, 8), 10, latent_dim=4, likelihood="normal", label_in_guide=label_in_guide).eval()


def _x(n=5, seed=1):
    return torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


def _prior_estimate(model, x, draws=20000):
    """log p(x) by simple Monte Carlo over the prior: unbiased in p, exact in the limit."""
    torch.manual_seed(5)
    with torch.no_grad():
        z = model.prior((draws,)).sample()
        lik = model.likelihood(z)
        return torch.stack([torch.logsumexp(lik.log_prob(xi.expand(draws, *xi.shape)), 0) for xi in x]) - math.log(
            draws
        )


@pytest.mark.parametrize("rule", ["mixture", "iw", "paper", "latent"])
def test_log_density_matches_a_brute_force_estimate(rule):
    model = _model(label_in_guide=rule != "latent")
    x = _x()
    torch.manual_seed(2)
    pred = predict(model, x, 64, rule=rule, density_samples=64)
    assert pred.log_density.shape == (5,) and pred.density_samples == 64
    assert not pred.log_density.requires_grad
    # Untrained 4-d latent models: the importance-weighted bound sits within a few nats of the prior estimate,
    # below it on average (a lower bound; the untrained q(z | x) is a poor proposal).
    reference = _prior_estimate(model, x)
    assert torch.allclose(pred.log_density, reference, atol=5.0)
    assert (pred.log_density - reference).mean() < 1.0


def test_density_is_free_for_the_mixture_rule_and_off_when_asked():
    model = _model()
    x = _x()
    torch.manual_seed(3)
    with_density = predict(model, x, 4)
    torch.manual_seed(3)
    without = predict(model, x, 4, density=False)
    assert torch.equal(with_density.log_weights, without.log_weights)  # the same draws, no extra randomness
    assert without.log_density is None and without.ood is None
    # mixture: log p(x) = logsumexp over classes and draws of the log weights, minus log D
    d = with_density.log_weights.shape[-1]
    expected = torch.logsumexp(with_density.log_weights.reshape(5, -1), -1) - math.log(d)
    assert torch.allclose(with_density.log_density, expected, atol=1e-4)


def test_latent_density_decodes_at_most_num_samples_and_leaves_the_draws_alone():
    model = _model(label_in_guide=False)
    x = _x()
    torch.manual_seed(4)
    a = predict(model, x, 3, density_samples=10)
    torch.manual_seed(4)
    b = predict(model, x, 3, density=False)
    assert a.density_samples == 3
    assert torch.equal(a.log_weights, b.log_weights)
    with pytest.raises(ValueError, match="density_samples"):
        predict(model, x, 3, density_samples=0)


def test_density_survives_draw_splitting():
    model = _model(label_in_guide=False)
    x = _x(n=1)
    torch.manual_seed(6)
    split = predict(model, x, 8, density_samples=8, max_rows=2)  # four passes of two draws
    torch.manual_seed(6)  # the same draws as four calls of two: the bound averages their weights
    parts = torch.stack([predict(model, x, 2, density_samples=2).log_density for _ in range(4)])
    assert torch.allclose(split.log_density, torch.logsumexp(parts, 0) - math.log(4), atol=1e-4)


class HeavyTailPrior(DGC):
    """A custom model (docs/extending.md): Student-t prior."""

    def prior(self, batch_shape):
        import pyro.distributions as dist

        loc = self._zero.new_zeros(tuple(batch_shape) + (self.latent_dim,))
        return dist.StudentT(3.0, loc, torch.ones_like(loc)).to_event(1)


def test_a_custom_prior_enters_the_density():
    base, custom = _model(label_in_guide=False), _model(label_in_guide=False, cls=HeavyTailPrior)
    custom.load_state_dict(base.state_dict())
    x = _x()
    torch.manual_seed(7)
    a = predict(base, x, 1, density_samples=1)
    torch.manual_seed(7)
    b = predict(custom, x, 1, density_samples=1)
    torch.manual_seed(7)  # the one draw both predictions took (the guides are the same)
    with pyro.plate("particles", 1, dim=-2), torch.no_grad():
        z = poutine.trace(custom.guide).get_trace(x, None).nodes["z"]["value"][0]
    # One draw: the bounds differ exactly by the log prior densities of that draw.
    expected = custom.prior((5,)).log_prob(z) - base.prior((5,)).log_prob(z)
    assert torch.allclose(b.log_density - a.log_density, expected, atol=1e-3)
    detector = fit_ood_threshold(custom, _x(40, seed=9), false_alarm=0.1, num_samples=4)
    assert predict(custom, x, 4).ood.shape == (5,) and detector.score == "typicality"


@pytest.mark.parametrize("score", ["typicality", "density", "complexity"])
def test_the_flag_keeps_its_false_alarm_rate_and_catches_noise(score):
    model = _model(label_in_guide=False)
    torch.manual_seed(0)
    x_in = 0.5 + 0.05 * torch.randn(400, 1, 8, 8)  # in distribution: near-grey images
    detector = fit_ood_threshold(model, x_in[:200], false_alarm=0.1, score=score, num_samples=2)
    assert model.ood_detector is detector
    pred = predict(model, x_in[200:], 2)
    assert 0.02 <= pred.ood.float().mean().item() <= 0.2  # near the stated 10% on new in-distribution images
    far = predict(model, torch.rand(50, 1, 8, 8).round(), 2)  # black-and-white noise
    assert far.ood.float().mean().item() > 0.9
    assert (far.ood_score.mean() > pred.ood_score.mean()).item()


def test_fit_ood_threshold_refuses_bad_settings():
    model = _model(label_in_guide=False)
    with pytest.raises(ValueError, match="false_alarm"):
        fit_ood_threshold(model, _x(50), false_alarm=1.5)
    with pytest.raises(ValueError, match="at least 20 held-out"):
        fit_ood_threshold(model, _x(10), false_alarm=0.05)
    with pytest.raises(ValueError, match="score must be one of"):
        fit_ood_threshold(model, _x(50), score="energy")


def test_reject_rules():
    model = _model(label_in_guide=False)
    x = _x(30)
    with pytest.raises(ValueError, match="no OOD detector"):
        predict(model, x, 2, reject="density")
    with pytest.raises(ValueError, match="needs reject_threshold"):
        predict(model, x, 2, reject="entropy")
    with pytest.raises(ValueError, match="reject must be one of"):
        predict(model, x, 2, reject="energy")
    fit_ood_threshold(model, _x(60, seed=3), false_alarm=0.1, num_samples=2)
    torch.manual_seed(1)
    ent = predict(model, x, 2, reject="entropy")
    torch.manual_seed(1)
    dens = predict(model, x, 2, reject="density")
    torch.manual_seed(1)
    both = predict(model, x, 2, reject="both")
    assert torch.equal(ent.rejected, ent.entropy > model.ood_detector.entropy_threshold)
    assert torch.equal(dens.rejected, dens.ood)
    assert torch.equal(both.rejected, ent.rejected | dens.ood)
    assert (both.labels_with_reject[both.rejected] == -1).all()
    # the "both" ranking orders by the more unusual of the two dev percentiles
    assert both.reject_rank.shape == (30,)
    with pytest.raises(ValueError, match="switch it off"):
        predict(model, x, 2, reject="both", density=False)


def test_detector_is_saved_with_the_checkpoint(tmp_path):
    model = _model(label_in_guide=False)
    save_model(tmp_path / "old.safetensors", model)
    old = load_model(tmp_path / "old.safetensors")
    assert getattr(old, "ood_detector", None) is None  # checkpoints without a flag still load
    detector = fit_ood_threshold(model, _x(40), false_alarm=0.1, num_samples=2)
    save_model(tmp_path / "m.safetensors", model)
    loaded = load_model(tmp_path / "m.safetensors")
    meta = loaded.metadata
    assert loaded.ood_detector == detector
    assert OODDetector.from_dict(meta["ood_detector"]) == detector
    with pytest.raises(ValueError, match="unusable"):
        OODDetector.from_dict({**detector.to_dict(), "false_alarm": 2.0})


def test_complexity_of_a_flat_image_is_below_that_of_noise():
    flat, noise = torch.zeros(1, 1, 28, 28), torch.rand(1, 1, 28, 28)
    lengths = complexity_nats(torch.cat([flat, noise]))
    assert lengths[0] < 0.1 * lengths[1]


def test_risk_coverage_and_aurc_by_hand():
    correct = np.array([True, True, False, False])
    score = np.array([0.1, 0.2, 0.3, 0.4])  # a perfect ranking: errors rejected first
    curve = risk_coverage_curve(correct, score)
    assert np.allclose(curve["coverage"], [0.25, 0.5, 0.75, 1.0])
    assert np.allclose(curve["risk"], [0, 0, 1 / 3, 0.5])
    assert aurc(correct, score) == pytest.approx((0 + 0 + 1 / 3 + 0.5) / 4)
    assert aurc(correct, -score) > aurc(correct, score)
    assert aurc(correct, np.zeros(4)) == pytest.approx(0.5)  # all tied: one point at full coverage
    with pytest.raises(ValueError, match="one length"):
        aurc(correct, score[:2])


def test_a_refit_drops_the_flag_calibrated_on_the_old_weights(tmp_path):
    model = _model(label_in_guide=False)
    fit_ood_threshold(model, _x(40), false_alarm=0.1, num_samples=2)
    with pytest.warns(RuntimeWarning, match="no longer matches the weights"):
        fit(model, _x(40), torch.arange(40) % 10, epochs=1, batch_size=20, device="cpu", progress=False)
    assert model.ood_detector is None
    save_model(tmp_path / "m.safetensors", model)  # and the saved file has no stale threshold
    assert "ood_detector" not in load_model(tmp_path / "m.safetensors").metadata
