"""Issue 21, mechanism 4: the importance-weighted bound (``"iwae"``) and its counterfactual-label term (``"iwae-cf"``).

Tiny models on sklearn's digits, CPU, one torch thread; every comparison of two losses draws with the same seed.
"""

from __future__ import annotations

import pyro
import pyro.infer
import pytest
import torch
from pyro import poutine

from dgc_pyro.inference import OBJECTIVES, fit, get_objective, predict
from dgc_pyro.inference.objectives import elbo_loss, iwae_loss
from dgc_pyro.models.dgc import DGC

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore:validation ACSA is")]


@pytest.fixture(autouse=True)
def _local_params():
    with pyro.settings.context(module_local_params=True):
        yield


def batch(d, n=32):
    return d.x_train[:n].float(), d.y_train[:n]


def model_of(d, **kw) -> DGC:
    torch.manual_seed(0)
    return DGC(d.input_shape, 10, latent_dim=4, **kw)


def seeded(loss, m, *args, seed=1):
    torch.manual_seed(seed)
    return loss(m.model, m.guide, *args)


def test_one_particle_is_the_elbo_estimate(digits):
    m, (x, y) = model_of(digits, label_weight=3.0), batch(digits)
    assert torch.allclose(seeded(iwae_loss(1), m, x, y), seeded(elbo_loss(), m, x, y), rtol=1e-6)
    # under the engines' per-example scale too
    scaled = poutine.scale(scale=1 / len(x))
    assert torch.allclose(
        seeded(lambda mo, gu, *a: iwae_loss(1)(scaled(mo), scaled(gu), *a), m, x, y),
        seeded(lambda mo, gu, *a: elbo_loss()(scaled(mo), scaled(gu), *a), m, x, y),
        rtol=1e-6,
    )


def test_matches_renyi_alpha_zero_without_scaling(digits):
    m, (x, y) = model_of(digits, label_weight=3.0), batch(digits)
    renyi = pyro.infer.RenyiELBO(alpha=0, num_particles=7, vectorize_particles=True, max_plate_nesting=1)
    torch.manual_seed(1)
    expected = renyi.loss(m.model, m.guide, x, y)
    assert seeded(iwae_loss(7), m, x, y).item() == pytest.approx(expected, rel=1e-6)


def test_the_bound_does_not_depend_on_the_batch_scaling(digits):
    # Pyro scales log-densities inside the weight: under scale(1/B) RenyiELBO would average w^(1/B), not w.
    m, (x, y) = model_of(digits), batch(digits)
    s = poutine.scale(scale=1 / len(x))
    plain = seeded(iwae_loss(5), m, x, y)
    scaled = seeded(lambda mo, gu, *a: iwae_loss(5)(s(mo), s(gu), *a), m, x, y)
    assert torch.allclose(scaled, plain / len(x), rtol=1e-5)


def test_the_bound_tightens_with_particles_in_expectation(digits):
    m, (x, y) = model_of(digits), batch(digits)
    torch.manual_seed(2)
    with torch.no_grad():
        mean = {
            k: torch.stack([iwae_loss(k)(m.model, m.guide, x, y) for _ in range(40)]).mean().item() for k in (1, 5, 20)
        }
    assert mean[1] > mean[5] > mean[20]  # the loss is minus the bound


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_gradients_flow_to_every_network(digits, weight):
    m, (x, y) = model_of(digits), batch(digits)
    seeded(iwae_loss(5, counterfactual_weight=weight), m, x, y).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_counterfactual_weight_zero_is_the_plain_bound_bit_for_bit(digits):
    m, (x, y) = model_of(digits), batch(digits)
    plain = seeded(iwae_loss(5), m, x, y)
    plain_rng = torch.get_rng_state()
    zero = seeded(iwae_loss(5, counterfactual_weight=0.0), m, x, y)
    assert torch.equal(plain, zero) and torch.equal(plain_rng, torch.get_rng_state())  # no extra draws either


def label_columns_grad(m, loss, x, y):
    m.zero_grad(set_to_none=True)
    seeded(loss, m, x, y).backward()
    enc = m.encoder
    return enc.joint[0].weight.grad[:, enc.feature_dim :].clone(), [p.grad.clone() for p in m.classifier.parameters()]


def test_counterfactual_term_trains_the_label_input_and_spares_the_head(digits):
    m = model_of(digits)
    x, y = digits.x_train[digits.y_train == 0][:20].float(), digits.y_train[digits.y_train == 0][:20]
    cols0, head0 = label_columns_grad(m, iwae_loss(5), x, y)
    cols1, head1 = label_columns_grad(m, iwae_loss(5, counterfactual_weight=1.0), x, y)
    # every observed label is 0: without the term the other classes' label inputs get no gradient ...
    assert torch.all(cols0[:, 1:] == 0) and cols0[:, 0].abs().sum() > 0
    # ... with it they do (wrong labels c != 0 were fed to q(z | x, c)), and class 0's column is unchanged
    assert (cols1[:, 1:].abs().sum(0) > 0).sum() >= 5 and torch.equal(cols1[:, 0], cols0[:, 0])
    # the label head never sees a wrong label: its gradient is the plain bound's, bit for bit
    assert all(torch.equal(a, b) for a, b in zip(head0, head1))


def test_the_recorded_guide_trace_is_the_observed_labels(digits):
    # the engines read q(z | x, y) for the perturbation step from the guide they pass (a trace recorder)
    m, (x, y) = model_of(digits), batch(digits)
    recorder = poutine.trace(m.guide)
    seeded(lambda mo, gu, *a: iwae_loss(5, counterfactual_weight=1.0)(mo, recorder, *a), m, x, y)
    loc, _ = m.encode(x, y)
    q = recorder.trace.nodes["z"]["fn"].base_dist
    assert torch.allclose(q.loc.expand(5, *loc.shape)[0], loc)


def test_a_class_conditional_model_with_its_global_shrinkage_term(digits):
    counts = torch.bincount(digits.y_train, minlength=10).tolist()
    m, (x, y) = (
        model_of(digits, latent_prior="class_conditional", label_in_guide=False, class_counts=counts),
        batch(digits),
    )
    assert torch.allclose(seeded(iwae_loss(1), m, x, y), seeded(elbo_loss(), m, x, y), rtol=1e-6)
    assert torch.isfinite(seeded(iwae_loss(5), m, x, y))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(num_particles=0), "num_particles"),
        (dict(num_particles=2.5), "num_particles"),
        (dict(counterfactual_weight=-1.0), "counterfactual_weight"),
        (dict(counterfactual_weight=float("nan")), "counterfactual_weight"),
        (dict(max_plate_nesting=-1), "max_plate"),
    ],
)
def test_bad_arguments_are_one_line_errors(kw, match):
    with pytest.raises(ValueError, match=match) as e:
        iwae_loss(**kw)
    assert "\n" not in str(e.value)


def test_registered_by_name():
    assert {"iwae", "iwae-cf"} <= set(OBJECTIVES)
    assert get_objective("iwae").__name__ == "iwae_loss(num_particles=5)"
    assert get_objective("iwae-cf").__name__ == "iwae_loss(num_particles=5, counterfactual_weight=1)"


def test_fit_on_digits_graph_equals_torch_and_mixture_predictions_are_finite(digits):
    """A smoke fit of the paper-faithful model (q(z | x, y), iwae-cf, mixture rule): the graph engine captures the
    step (no fallback) and gives the torch engine's weights bit for bit."""
    kw = dict(
        epochs=2,
        batch_size=64,
        lr=3e-3,
        progress=False,
        val_num_samples=2,
        device="cpu",
        select_best=False,
        objective="iwae-cf",
    )
    states = {}
    for engine in ("graph", "torch"):
        m = model_of(digits)
        h = fit(m, digits.x_train, digits.y_train, engine=engine, **kw)
        assert h.config["engine"] == engine and all(torch.isfinite(torch.tensor(r["loss"])) for r in h.epochs)
        states[engine] = m.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(states["graph"].values(), states["torch"].values()))
    pred = predict(m, digits.x_test[:40], 4, rule="mixture")
    assert m.default_rule == "mixture" and torch.isfinite(pred.proba).all() and torch.isfinite(pred.log_density).all()
