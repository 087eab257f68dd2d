"""Fast paths of issue 5: the sync-free training step, its honest hand-written reference, vectorised prediction.

No timing here (the machine is shared): the benchmark is ``benchmarks/speed.py``. These tests check that
the fast paths compute the same numbers as the slow ones, so that the benchmark compares like with like.
"""

from __future__ import annotations

import copy
import json
import math
import sys

import pyro
import pyro.distributions as dist
import pytest
import torch
from fixtures import load_benchmark
from pyro import poutine
from sync_spy import SyncSpy as _SyncSpy

from dgc_pyro.inference import fit, predict
from dgc_pyro.inference.engine import TracedELBO, compile_networks, make_step, traced_elbo_kind
from dgc_pyro.inference.objectives import get_objective
from dgc_pyro.inference.perturbation import perturbation_loss
from dgc_pyro.inference.predict import auto_max_rows, class_log_weights, posterior_from_log_weights
from dgc_pyro.models import DGC

speed = load_benchmark("speed")


def _model(shape=(1, 8, 8), likelihood="bernoulli", latent_dim=16, **kwargs) -> DGC:
    torch.manual_seed(0)
    return DGC(shape, 10, latent_dim=latent_dim, likelihood=likelihood, **kwargs)


def _batch(shape, n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)


def _per_example(fn):
    def wrapped(x, y):
        with poutine.scale(scale=1.0 / x.shape[0]):
            return fn(x, y)

    return wrapped


def _grads(loss, model):
    return torch.autograd.grad(loss, list(model.parameters()))


# ----------------------------------------------------------------------------- the hand-written reference
@pytest.mark.parametrize(
    "shape,likelihood",
    [((1, 28, 28), "bernoulli"), ((1, 8, 8), "normal"), ((1, 8, 8), "continuous_bernoulli")],
)
def test_handwritten_loss_equals_pyro_trace_elbo(shape, likelihood):
    """The benchmark's pure-PyTorch loss is Pyro's Trace_ELBO of the model/guide, value and gradients."""
    model = _model(shape, likelihood, label_weight=2.0)
    x, y = _batch(shape, 20)
    with pyro.settings.context(module_local_params=True):
        torch.manual_seed(5)
        pyro_loss = pyro.infer.Trace_ELBO().differentiable_loss(
            _per_example(model.model), _per_example(model.guide), x, y
        )
        pyro_grads = _grads(pyro_loss, model)
    torch.manual_seed(5)  # the same eps: the guide's rsample and the reference draw the same numbers
    hand = speed.handwritten_loss(model, x, y)
    hand_grads = _grads(hand, model)
    assert hand.item() == pytest.approx(pyro_loss.item(), rel=1e-5)
    for a, b in zip(pyro_grads, hand_grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_engine_step_and_handwritten_step_make_the_same_update():
    """One step of the engine and of the hand-written step (same seed, batch, Adam) give the same weights."""
    base = _model()
    x, y = _batch((1, 8, 8), 32)
    ours, hand = copy.deepcopy(base), copy.deepcopy(base)
    ones = torch.ones(10, dtype=torch.long)
    step = make_step(ours, get_objective("elbo"), "torch", 1e-3, (0.9, 0.999), 1e-3, False, ones, torch.device("cpu"))
    ref = speed.make_handwritten_step(hand, lr=1e-3)
    with pyro.settings.context(module_local_params=True):
        for seed in (3, 4):
            torch.manual_seed(seed)
            loss, pert = step(x, y)
            torch.manual_seed(seed)
            ref_loss = ref(x, y)
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
            assert pert.item() == 0.0
    for a, b in zip(ours.parameters(), hand.parameters()):
        assert torch.allclose(a, b, atol=1e-6)


# ----------------------------------------------------------------------------- the sync-free ELBO
@pytest.mark.parametrize("objective,kind", [("elbo", "mc"), ("elbo-analytic", "analytic")])
def test_traced_elbo_equals_pyro_objective(objective, kind):
    model = _model()
    x, y = _batch((1, 8, 8))
    loss_fn = get_objective(objective)
    assert traced_elbo_kind(loss_fn) == kind
    with pyro.settings.context(module_local_params=True):
        torch.manual_seed(7)
        expected = loss_fn(_per_example(model.model), _per_example(model.guide), x, y)
        expected_grads = _grads(expected, model)
        torch.manual_seed(7)
        got, guide_tr = TracedELBO(_per_example(model.model), _per_example(model.guide), kind)(x, y)
        got_grads = _grads(got, model)
    assert "z" in guide_tr.nodes
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    for a, b in zip(expected_grads, got_grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_traced_elbo_kind_is_none_for_other_objectives():
    assert traced_elbo_kind(get_objective("wae-mmd")) is None
    assert traced_elbo_kind(pyro.infer.Trace_ELBO(num_particles=2).differentiable_loss) is None
    assert traced_elbo_kind(pyro.infer.JitTrace_ELBO().differentiable_loss) is None

    class Custom(pyro.infer.Trace_ELBO):  # a subclass may change the estimator: not recognised
        pass

    assert traced_elbo_kind(Custom().differentiable_loss) is None


def test_traced_elbo_hands_non_reparameterised_guides_to_pyro():
    """A discrete latent needs the score-function estimator: the surrogate must match Trace_ELBO's."""
    p = torch.tensor(0.3, requires_grad=True)

    def model():
        z = pyro.sample("z", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.tensor(0.7))

    def guide():
        pyro.sample("z", dist.Bernoulli(p))

    torch.manual_seed(0)
    expected = pyro.infer.Trace_ELBO().differentiable_loss(model, guide)
    (g_expected,) = torch.autograd.grad(expected, [p])
    torch.manual_seed(0)
    got, _ = TracedELBO(model, guide, "mc")()
    (g_got,) = torch.autograd.grad(got, [p])
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)
    assert g_got.item() == pytest.approx(g_expected.item(), rel=1e-6)


@pytest.mark.parametrize("objective", ["elbo", "elbo-analytic"])
def test_torch_step_makes_no_host_sync(objective):
    """Neither the loss, the backward pass nor the perturbation step reads a tensor back to the host."""
    model = _model(likelihood="normal")
    x, y = _batch((1, 8, 8), 32)
    reps = torch.tensor([1, 2, 3, 1, 1, 5, 1, 1, 2, 1])
    step = make_step(
        model, get_objective(objective), "torch", 1e-3, (0.9, 0.999), 1e-3, True, reps, torch.device("cpu")
    )
    with pyro.settings.context(module_local_params=True):
        step(x, y)  # first step: optimiser state creation
        with _SyncSpy() as spy:
            loss, pert = step(x, y)
            step(x, y)
    assert spy.calls == []
    assert loss.dim() == 0 and pert.dim() == 0 and math.isfinite(loss.item()) and pert.item() > 0


def test_validation_is_off_inside_the_torch_step_only():
    seen = []
    elbo = pyro.infer.Trace_ELBO()

    def objective(model_fn, guide_fn, x, y):
        seen.append((pyro.infer.util.is_validation_enabled(), torch.distributions.Distribution._validate_args))
        return elbo.differentiable_loss(model_fn, guide_fn, x, y)

    model = _model()
    x, y = _batch((1, 8, 8))
    ones = torch.ones(10, dtype=torch.long)
    step = make_step(model, objective, "torch", 1e-3, (0.9, 0.999), 1e-3, False, ones, torch.device("cpu"))
    before = (pyro.infer.util.is_validation_enabled(), torch.distributions.Distribution._validate_args)
    with pyro.settings.context(module_local_params=True):
        step(x, y)
    assert seen == [(False, False)]
    assert (pyro.infer.util.is_validation_enabled(), torch.distributions.Distribution._validate_args) == before


def test_masked_perturbation_loss_equals_repeat_interleave_reference():
    model = _model()
    torch.manual_seed(0)
    loc, scale = torch.randn(6, 16), torch.rand(6, 16) + 0.1
    y = torch.tensor([0, 3, 3, 9, 1, 0])
    reps_per_class = torch.tensor([1, 2, 1, 4, 1, 1, 1, 1, 1, 3])
    noise = torch.randn(6, 4, 16)
    got = perturbation_loss(model, loc, scale, y, reps_per_class, max_reps=4, noise=noise)
    # Reference: example i repeated reps[y_i] times with noise rows 0..reps-1, mean cross-entropy.
    reps = reps_per_class[y]
    rows = torch.cat([loc[i] + scale[i] * noise[i, : reps[i]] for i in range(6)])
    labels = y.repeat_interleave(reps)
    expected = torch.nn.functional.cross_entropy(model.label_logits(rows), labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


# ----------------------------------------------------------------------------- prediction
@pytest.mark.parametrize("rule", ["mixture", "iw", "paper"])
def test_vectorised_prediction_matches_the_loop(rule):
    """One vectorised pass and the Python loop over draws and classes give the same log weights and proba."""
    model = _model(likelihood="normal").eval()
    x, _ = _batch((1, 8, 8), 7)
    torch.manual_seed(11)
    vec = class_log_weights(model, x, 3, rule=rule)
    torch.manual_seed(11)
    loop = speed.predict_loop(model, x, 3, rule=rule)
    assert vec.shape == loop.shape == (7, 10, 30 if rule == "mixture" else 3)
    assert torch.allclose(vec, loop, rtol=1e-5, atol=1e-3)
    p_vec, p_loop = posterior_from_log_weights(vec).proba, posterior_from_log_weights(loop).proba
    assert torch.allclose(p_vec, p_loop, atol=1e-4)


def test_automatic_chunk_size_follows_the_model_size():
    small, conv = _model(), _model((1, 28, 28), latent_dim=64)
    rows_small, rows_conv = auto_max_rows(small), auto_max_rows(conv)
    assert 64 <= rows_conv < rows_small <= 32768
    x, _ = _batch((1, 8, 8), 5)
    pred = predict(small, x, 2)  # max_rows=None: automatic
    assert torch.allclose(pred.proba.sum(-1), torch.ones(5), atol=1e-5)


def test_bf16_autocast_and_channels_last_run_and_stay_close():
    model = _model((1, 28, 28), latent_dim=16).eval()
    x, _ = _batch((1, 28, 28), 4)
    torch.manual_seed(2)
    exact = class_log_weights(model, x, 2, channels_last=False)
    torch.manual_seed(2)
    cl = class_log_weights(model, x, 2)  # the CPU default: channels-last convolution weights
    torch.manual_seed(2)
    bf16 = class_log_weights(model, x, 2, autocast="bf16")
    assert cl.dtype == bf16.dtype == torch.float32
    assert torch.allclose(cl, exact, rtol=1e-4, atol=1e-2)
    # bfloat16 networks: log weights of hundreds of nats agree to a fraction of a percent.
    assert ((bf16 - exact).abs() <= 0.02 * exact.abs() + 1.0).all()
    assert all(p.is_contiguous() for p in model.parameters())  # channels-last was undone
    with pytest.raises(ValueError, match="autocast"):
        predict(model, x, 2, autocast="fp8")
    with pytest.raises(ValueError, match="max_rows"):
        predict(model, x, 2, max_rows=0)


# ----------------------------------------------------------------------------- torch.compile
def _compile_works() -> str | None:
    try:
        import torch._dynamo  # noqa: F401
    except Exception as e:
        return f"torch.compile unavailable: {type(e).__name__}: {e}"
    if sys.version_info >= (3, 14):
        return "torch.compile does not support this Python"
    return None


@pytest.mark.skipif(_compile_works() is not None, reason=str(_compile_works()))
def test_compiled_networks_fit_a_tiny_model():
    """fit(compile=...) runs on CPU; the 'eager' backend (graph capture without code generation) keeps the
    test fast, the default inductor backend takes minutes to compile on a small shared CPU."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _model(latent_dim=4, likelihood="normal")
    x, y = _batch((1, 8, 8), 40)
    y[:10] = torch.arange(10)
    keys = set(model.state_dict())
    hist = fit(model, x, y, epochs=1, batch_size=20, progress=False, val_fraction=0, compile={"backend": "eager"})
    assert math.isfinite(hist.losses[0])
    assert set(model.state_dict()) == keys  # in-place compile: checkpoints are unaffected
    assert compile_networks(_model(), {"backend": "eager"}) is not None
    torch._dynamo.reset()


def test_speed_benchmark_runs_end_to_end(tmp_path, capsys):
    """The benchmark's plumbing (every contender, the JSON figures), at a size that times nothing meaningful."""
    out = tmp_path / "speed.json"
    assert (
        speed.main(
            [
                "--shape",
                "1,8,8",
                "--repeats",
                "2",
                "--steps",
                "1",
                "--warmup",
                "2",
                "--predict-examples",
                "6",
                "--predict-repeats",
                "1",
                "--samples",
                "1,10",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    figures = json.loads(out.read_text())
    for key in (
        "train_ratio",
        "train_ratio_torch_engine",
        "train_ratio_svi",
        "predict_speedup_s10",
        "train_first_step_s_graph",
        "peak_rss_mib",
    ):
        assert figures[key] > 0, key
    assert "train (a)  ours, engine='graph'" in capsys.readouterr().out


def test_speed_benchmark_refuses_compile_mode_without_compile(tmp_path, capsys):
    out = tmp_path / "speed.json"
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--shape", "1,8,8", "--compile-mode", "reduce-overhead", "--json", str(out)])
    assert exit_info.value.code == 2
    assert "--compile-mode has no effect without --compile" in capsys.readouterr().err
    assert not out.exists()
