"""Issue 21, mechanism 5: SWAG of the label head (``SwagCollector``, ``SwagHead``) and ``predict(..., swag=...)``.

Tiny models on sklearn's digits, CPU, one torch thread.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from dgc_pyro.inference import fit, predict
from dgc_pyro.inference.swag import SwagCollector, SwagHead, SwagMoments, head_vector
from dgc_pyro.models.dgc import DGC

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:validation ACSA is")]

FIT_KW = dict(epochs=4, batch_size=64, lr=3e-3, progress=False, val_num_samples=2, device="cpu", select_best=False)


def model_of(d, **kw) -> DGC:
    torch.manual_seed(0)
    return DGC(d.input_shape, 10, latent_dim=4, **kw)


@pytest.fixture(scope="module")
def fitted(digits):
    """A fitted paper-faithful model (q(z | x, y), mixture rule) and the SWAG collector of its last two epochs."""
    m = model_of(digits)
    snaps: dict[int, torch.Tensor] = {}
    collector = SwagCollector(start=0.5, max_rank=5)
    fit(
        m,
        digits.x_train,
        digits.y_train,
        callback=lambda e, r: snaps.__setitem__(e, head_vector(m)),
        callbacks=(collector,),
        **FIT_KW,
    )
    return m, collector, snaps


def test_moments_match_a_hand_computation():
    thetas = torch.tensor([[1.0, 2.0, 0.0], [3.0, 2.0, 1.0], [2.0, 5.0, -1.0]], dtype=torch.float64)
    mom = SwagMoments(max_rank=2)
    for t in thetas:
        mom.update(t)
    assert mom.count == 3
    assert torch.allclose(mom.mean, thetas.mean(0))
    assert torch.allclose(mom.sq_mean - mom.mean.square(), thetas.var(0, unbiased=False))
    # deviations from the running mean after each snapshot; the last two kept
    running = [thetas[: i + 1].mean(0) for i in range(3)]
    assert torch.allclose(mom.deviations, torch.stack([thetas[1] - running[1], thetas[2] - running[2]]))


def test_samples_have_the_swag_covariance(digits):
    m = model_of(digits)
    d = head_vector(m).numel()
    mean = torch.zeros(d, dtype=torch.float64)
    var = torch.full((d,), 0.04, dtype=torch.float64)
    dev = torch.zeros(3, d, dtype=torch.float64)
    dev[:, 0] = torch.tensor([1.0, -1.0, 0.0])
    head = SwagHead(m, mean, var, dev)
    draws = head.sample(20000, seed=3)
    # scale 0.5 * (Sigma_diag + D D^T / (K - 1)): coordinate 0 has 0.5 * (0.04 + 2 / 2), the others 0.5 * 0.04
    assert draws[:, 0].var().item() == pytest.approx(0.5 * 1.04, rel=0.05)
    assert draws[:, 1:].var(0).mean().item() == pytest.approx(0.02, rel=0.05)
    assert torch.equal(draws, head.sample(20000, seed=3)) and not torch.equal(draws, head.sample(20000, seed=4))
    diag = SwagHead(m, mean, var)  # diagonal only: the full variance
    assert diag.sample(20000, seed=0).var(0).mean().item() == pytest.approx(0.04, rel=0.05)


def test_collector_through_fit_collects_the_window(fitted):
    m, collector, snaps = fitted
    head = collector.head
    assert collector.first_epoch == 3 and head.count == 2  # epochs 3 and 4 of 4
    assert torch.allclose(head.mean, (snaps[3] + snaps[4]) / 2)
    assert torch.allclose(head.variance, ((snaps[3] - snaps[4]) / 2).square().clamp_min(1e-30))
    assert torch.equal(head_vector(m), snaps[4])  # collecting does not touch the weights


def test_zero_variance_reproduces_the_plain_prediction(fitted, digits):
    m, _, _ = fitted
    x = digits.x_test[:30]
    theta = head_vector(m)
    point = SwagHead(m, theta, torch.zeros_like(theta))
    torch.manual_seed(5)
    plain = predict(m, x, 3)
    torch.manual_seed(5)
    pred = predict(m, x, 3, swag=point, head_samples=4)
    assert pred.head_samples == 4 and pred.log_weights.shape[-1] == 4 * plain.log_weights.shape[-1]
    for name in ("proba", "entropy", "expected_entropy", "mutual_information", "log_density"):
        assert torch.allclose(getattr(pred, name), getattr(plain, name), atol=1e-5), name
    assert torch.equal(head_vector(m), theta)  # the head is restored


def test_head_draws_differ_and_add_to_the_epistemic_score(fitted, digits):
    m, collector, _ = fitted
    x = digits.x_test[:30]
    theta = head_vector(m)
    wide = SwagHead(m, theta, torch.full_like(theta, 0.25))
    draws = wide.sample(3)
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(5)
    plain = predict(m, x, 3)
    torch.manual_seed(5)
    pred = predict(m, x, 3, swag=wide, head_samples=6)
    blocks = pred.log_weights.reshape(30, 10, 6, -1)
    assert not torch.allclose(blocks[:, :, 0], blocks[:, :, 1])  # the head draws score the same latents differently
    assert torch.allclose(pred.proba.sum(1), torch.ones(30))
    assert pred.mutual_information.mean() > plain.mutual_information.mean()
    assert torch.isfinite(predict(m, x, 3, swag=collector.head, rule="latent").proba).all()


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(start=1.0), "start"),
        (dict(start=-0.1), "start"),
        (dict(max_rank=-1), "max_rank"),
        (dict(every_steps=0), "every_steps"),
        (dict(var_clamp=float("nan")), "var_clamp"),
    ],
)
def test_bad_collector_arguments(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        SwagCollector(**kw)
    assert "\n" not in str(e.value)


def test_bad_uses_are_one_line_errors(fitted, digits):
    m, collector, _ = fitted
    x = digits.x_test[:5]
    with pytest.raises(ValueError, match="head_samples needs swag"):
        predict(m, x, 2, head_samples=3)
    with pytest.raises(ValueError, match="head_samples must be"):
        predict(m, x, 2, swag=collector.head, head_samples=0)
    with pytest.raises(ValueError, match="has not run"):
        _ = SwagCollector().head
    other = DGC(digits.input_shape, 10, latent_dim=6)
    with pytest.raises(ValueError, match="head weights"):
        predict(other, x, 2, swag=collector.head)
    counts = torch.bincount(digits.y_train, minlength=10).tolist()
    cc = DGC(
        digits.input_shape,
        10,
        latent_dim=4,
        latent_prior="class_conditional",
        label_in_guide=False,
        class_counts=counts,
    )
    with pytest.raises(ValueError, match="label head"):
        fit(cc, digits.x_train, digits.y_train, perturbation_rate=0.0, callbacks=(SwagCollector(),), **FIT_KW)


def test_every_steps_collects_within_the_window_epochs(digits):
    m = model_of(digits)
    collector = SwagCollector(start=0.5, every_steps=2, max_rank=0)
    h = fit(m, digits.x_train, digits.y_train, callbacks=(collector,), **FIT_KW)
    steps = math.ceil(sum(h.train_counts) / FIT_KW["batch_size"])
    assert collector.head.count == 2 * (steps // 2) and collector.head.rank == 0  # epochs 3 and 4


def test_warns_when_select_best_hands_back_an_encoder_before_the_window(fitted):
    m, _, _ = fitted
    collector = SwagCollector(start=0.5)
    state = SimpleNamespace(model=m, best_epoch=1, best_model={"w": torch.zeros(1)})
    trainer = SimpleNamespace(state=state, plan=SimpleNamespace(epochs=4), last_epoch=4)
    collector.on_fit_start(trainer, 0)
    collector.on_epoch_end(trainer, 3, {})
    with pytest.warns(RuntimeWarning, match="before the SWAG window"):
        collector.on_fit_end(trainer)
    state.best_epoch = 3  # inside the window: no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        collector.on_fit_end(trainer)
