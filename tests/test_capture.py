"""engine="graph": the Pyro step captured once as an aten graph must compute exactly what the traced step does.

No timing here: ``benchmarks/speed.py`` measures the speed. These tests pin the semantics: the same losses,
parameters, BatchNorm statistics and random stream as ``engine="torch"``, one capture per batch shape, no host
synchronisation, and a clear error for steps that cannot be captured.

The step-level tests pin the CPU (``CPU`` below): exact equality of two engines' floating-point results is only
shown there. The fit-level test follows ``--device`` and compares with a tolerance.
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from sync_spy import SyncSpy
from torch import nn

from dgc_pyro.cli import main
from dgc_pyro.inference import fit
from dgc_pyro.inference.capture import CapturedGradients, GraphCaptureError
from dgc_pyro.inference.engine import ENGINES, make_step
from dgc_pyro.inference.objectives import get_objective
from dgc_pyro.inference.perturbation import perturbation_offset
from dgc_pyro.models import DGC

CPU = torch.device("cpu")


def _model(shape, latent_dim=8, **kwargs) -> DGC:
    torch.manual_seed(0)
    return DGC(shape, 10, latent_dim=latent_dim, preset="small", **kwargs)


def _batches(shape, sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.rand((n, *shape), generator=g), torch.randint(0, 10, (n,), generator=g)) for n in sizes]


def _run(model, engine, objective, batches, perturb=True, **options):
    reps = torch.arange(1, 11)
    step = make_step(model, get_objective(objective), engine, 1e-3, (0.9, 0.999), 1e-3, perturb, reps, CPU, **options)
    torch.manual_seed(1)
    with pyro.settings.context(module_local_params=True):
        losses = [float(t) for x, y in batches for t in step(x, y)]  # (loss, perturbation loss) per step
    return step, losses


@pytest.mark.parametrize(
    "shape, objective, kwargs",
    [
        ((1, 8, 8), "elbo", {"likelihood": "bernoulli"}),
        ((1, 28, 28), "elbo-analytic", {"likelihood": "normal", "obs_scale": 0.3}),  # conv nets with BatchNorm
        ((1, 28, 28), "wae-mmd", {"likelihood": "bernoulli"}),
        ((1, 8, 8), "elbo", {"label_in_guide": False, "class_prior": [0.3] + [0.7 / 9] * 9, "logit_adjustment": 1.0}),
    ],
)
def test_graph_engine_matches_the_torch_engine_step_for_step(shape, objective, kwargs):
    model = _model(shape, **kwargs)
    model.train()
    batches = _batches(shape, (32, 32, 20, 32))  # the short batch forces a second capture
    eager, graph = copy.deepcopy(model), copy.deepcopy(model)
    _, want = _run(eager, "torch", objective, batches)
    step, got = _run(graph, "graph", objective, batches)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert step.captured.num_graphs == 2
    a, b = eager.state_dict(), graph.state_dict()
    assert a.keys() == b.keys()
    for key in a:  # parameters, and the BatchNorm running statistics the capture must not disturb
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6, msg=key)


def test_graph_engine_captures_the_perturbation_steps_own_offset():
    shape = (1, 8, 8)
    model = _model(shape, label_in_guide=False, class_prior=[0.3] + [0.7 / 9] * 9, logit_adjustment=1.0)
    offset = perturbation_offset(model, torch.arange(1, 11), "perturbed")
    batches = _batches(shape, (32, 32))
    _, want = _run(copy.deepcopy(model), "torch", "elbo", batches, perturbation_offset=offset)
    _, got = _run(copy.deepcopy(model), "graph", "elbo", batches, perturbation_offset=offset)
    _, train_prior = _run(copy.deepcopy(model), "graph", "elbo", batches)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    assert got[1] != pytest.approx(train_prior[1], rel=1e-3)  # the first step's perturbation loss


def test_graph_engine_draws_fresh_noise_every_step():
    """The guide's noise is an operation of the graph, not a constant frozen at capture time."""
    model = _model((1, 8, 8))
    model.train()
    x, y = _batches((1, 8, 8), (16,))[0]
    reps = torch.ones(10, dtype=torch.long)
    step = make_step(model, get_objective("elbo"), "graph", 0.0, (0.9, 0.999), 0.0, False, reps, CPU)
    with pyro.settings.context(module_local_params=True):
        losses = {float(step(x, y)[0]) for _ in range(4)}  # lr 0: only the noise can change the loss
    assert len(losses) == 4


def test_graph_step_makes_no_host_sync():
    model = _model((1, 8, 8), likelihood="normal")
    model.train()
    ((x, y),) = _batches((1, 8, 8), (32,))
    reps = torch.tensor([1, 2, 3, 1, 1, 5, 1, 1, 2, 1])
    step = make_step(model, get_objective("elbo-analytic"), "graph", 1e-3, (0.9, 0.999), 1e-3, True, reps, CPU)
    with pyro.settings.context(module_local_params=True):
        step(x, y)  # capture, optimiser state
        with SyncSpy() as spy:
            loss, pert = step(x, y)
            step(x, y)
    assert spy.calls == []
    assert math.isfinite(loss.item()) and pert.item() > 0


def test_captured_gradients_equal_autograd_and_accumulate():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1), nn.Linear(1, 1))
    net[3].requires_grad_(False)  # frozen: receives no gradient
    unused = nn.Linear(2, 2)
    holder = nn.ModuleDict({"net": net, "unused": unused})
    x = torch.randn(9, 5)
    captured = CapturedGradients(holder, lambda x: ((holder["net"](x) ** 2).mean(), holder["net"][0](x)))
    loss, hidden = captured(x)
    want = (net(x) ** 2).mean()
    grads = torch.autograd.grad(want, [p for p in net.parameters() if p.requires_grad])
    assert loss.item() == pytest.approx(want.item(), rel=1e-6)
    assert not hidden.requires_grad and hidden.shape == (9, 7)
    trainable = [p for p in net.parameters() if p.requires_grad]
    for p, g in zip(trainable, grads):
        torch.testing.assert_close(p.grad, g)
    assert net[3].weight.grad is None and unused.weight.grad is None
    captured(x)  # a second call adds to .grad, as backward() does
    for p, g in zip(trainable, grads):
        torch.testing.assert_close(p.grad, 2 * g)
    assert captured.num_graphs == 1
    captured(torch.randn(4, 5))
    assert captured.num_graphs == 2
    captured.reset()
    assert captured.num_graphs == 0


def test_capture_of_a_data_dependent_step_fails_clearly():
    net = nn.Linear(3, 1)

    def branchy(x):
        out = net(x).sum()
        return (out * 2 if out.item() > 0 else out,)  # Python control flow on a value: not a static graph

    with pytest.raises(GraphCaptureError, match="static graph.*engine='torch'"):
        CapturedGradients(net, branchy)(torch.randn(4, 3))
    with pytest.raises(GraphCaptureError, match="scalar loss"):
        CapturedGradients(net, lambda x: net(x))(torch.randn(4, 3))


def test_a_custom_model_with_a_sync_in_the_step_fails_with_the_engine_named():
    class Syncing(DGC):
        def model(self, x=None, y=None, **kwargs):
            if x is not None and bool(x.max() > 2):  # a data check inside the model: a host sync
                raise ValueError("pixels out of range")
            return super().model(x, y, **kwargs)

    torch.manual_seed(0)
    model = Syncing((1, 8, 8), 10, latent_dim=4)
    ((x, y),) = _batches((1, 8, 8), (8,))
    with pytest.raises(GraphCaptureError, match="engine='torch'"):
        _run(model, "graph", "elbo", [(x, y)], perturb=False)
    _run(model, "torch", "elbo", [(x, y)], perturb=False)  # the traced engine runs it


def test_fit_falls_back_to_the_torch_engine_when_capture_fails():
    """A model whose Python control flow reads a data value cannot be captured: the graph engine (fit's default)
    warns in one line and the fit continues with the torch engine, with the torch engine's very numbers."""

    class Syncing(DGC):
        def model(self, x=None, y=None, **kwargs):
            if x is not None and bool(x.max() > 2):  # a data check inside the model: a host sync
                raise ValueError("pixels out of range")
            return super().model(x, y, **kwargs)

    g = torch.Generator().manual_seed(3)
    y = torch.arange(4).repeat_interleave(torch.tensor([12, 8, 6, 6]))
    x = torch.rand((len(y), 1, 8, 8), generator=g)
    results = {}
    for engine in (None, "torch"):
        torch.manual_seed(0)
        model = Syncing((1, 8, 8), 4, latent_dim=4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hist = fit(
                model,
                x,
                y,
                epochs=2,
                batch_size=16,
                progress=False,
                val_fraction=0,
                engine=engine,
                seed=5,
                device="cpu",
            )
        notices = [str(w.message) for w in caught if "falling back" in str(w.message)]
        results[engine] = (hist, notices, torch.cat([p.detach().flatten() for p in model.parameters()]))
    hist, notices, weights = results[None]
    assert len(notices) == 1 and "\n" not in notices[0]
    assert notices[0].startswith("engine='graph': the training step could not be captured as a static graph")
    assert hist.config["engine"] == "torch" and results["torch"][1] == []
    assert hist.losses == results["torch"][0].losses and torch.equal(weights, results["torch"][2])


def test_compiled_graph_runs_the_same_numbers_with_the_eager_backend():
    """compile=... hands the captured graph to torch.compile; the 'eager' backend keeps the test fast and
    exact (the default inductor backend generates code for minutes on a small shared CPU)."""
    import torch._dynamo

    torch._dynamo.reset()
    model = _model((1, 8, 8))
    batches = _batches((1, 8, 8), (16, 16))
    eager = copy.deepcopy(model)
    _, want = _run(eager, "torch", "elbo", batches)
    _, got = _run(model, "graph", "elbo", batches, compile={"backend": "eager"})
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)
    torch._dynamo.reset()


def test_fit_with_the_graph_engine_reproduces_the_torch_engine():
    g = torch.Generator().manual_seed(3)
    y = torch.arange(10).repeat_interleave(torch.tensor([12, 10, 8, 8, 6, 6, 5, 5, 4, 4]))
    x = torch.rand((len(y), 1, 8, 8), generator=g)
    results = {}
    for engine in ("torch", "graph"):
        model = _model((1, 8, 8), latent_dim=4)
        hist = fit(
            model,
            x,
            y,
            epochs=2,
            batch_size=16,
            progress=False,
            val_fraction=0.2,
            val_num_samples=2,
            engine=engine,
            seed=5,
        )
        results[engine] = (hist.losses, {k: v.clone() for k, v in model.state_dict().items()})
    assert results["graph"][0] == pytest.approx(results["torch"][0], rel=1e-6)
    for key, value in results["torch"][1].items():
        torch.testing.assert_close(results["graph"][1][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_graph_engine_is_single_process_only():
    assert "graph" in ENGINES
    x, y = torch.rand(20, 1, 8, 8), torch.arange(20) % 10
    with pytest.raises(ValueError, match="engine='graph'"):
        fit(_model((1, 8, 8)), x, y, epochs=1, engine="graph", devices=2, progress=False)


def test_cli_fit_with_the_graph_engine_writes_the_same_metrics(tmp_path):
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1, 2], [30, 12, 6])
    x = np.clip(rng.normal(0.2 + 0.3 * y[:, None], 0.1, size=(len(y), 6)), 0, 1).astype(np.float32)
    np.savez(tmp_path / "toy.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    metrics = {}
    for engine in ("torch", "graph"):
        out = tmp_path / engine
        assert (
            main(
                [
                    "fit",
                    "--dataset",
                    str(tmp_path / "toy.npz"),
                    "--epochs",
                    "2",
                    "--no-progress",
                    "--out",
                    str(out),
                    "--baseline",
                    "none",
                    "--engine",
                    engine,
                ]
            )
            == 0
        )
        metrics[engine] = json.loads((out / "metrics.json").read_text())
    for key in ("acsa", "gmean", "fmacro", "ece"):
        assert metrics["graph"][key] == pytest.approx(metrics["torch"][key], abs=1e-6)


def test_prior_sites_with_expand_are_captured():
    """A custom prior (a learnable-scale Normal expanded over the batch) captures like the built-in one."""

    class WidePrior(DGC):
        def prior(self, batch_shape):
            return (
                dist.Normal(self._zero, 2.0 * torch.ones_like(self._zero))
                .expand(tuple(batch_shape) + (self.latent_dim,))
                .to_event(1)
            )

    torch.manual_seed(0)
    base = WidePrior((1, 8, 8), 10, latent_dim=4)
    batches = _batches((1, 8, 8), (16, 16))
    eager = copy.deepcopy(base)
    _, want = _run(eager, "torch", "elbo", batches)
    _, got = _run(base, "graph", "elbo", batches)
    assert got == pytest.approx(want, rel=1e-6, abs=1e-6)


def test_a_replay_reads_the_module_s_current_buffers():
    """A buffer replaced after capture (as ``.to(...)`` may do) is the one the next replay uses."""
    holder = nn.Module()
    holder.lin = nn.Linear(3, 1)
    holder.register_buffer("shift", torch.tensor(0.0))
    captured = CapturedGradients(holder, lambda x: (((holder.lin(x) + holder.shift) ** 2).mean(),))
    x = torch.randn(5, 3)
    captured(x)
    holder.shift = torch.tensor(5.0)
    (loss,) = captured(x)
    with torch.no_grad():
        assert loss.item() == pytest.approx(((holder.lin(x) + 5.0) ** 2).mean().item(), rel=1e-6)
