"""Learning-rate schedules: the factors, setting rates on torch and Pyro optimisers, fit and the baselines."""

from __future__ import annotations

import inspect
import math

import pyro
import pyro.optim
import pytest
import torch

from dgc_pyro.baselines import fit_baseline
from dgc_pyro.checkpoint import load_training_state, save_training_state, training_state_path
from dgc_pyro.experiment import Recipe
from dgc_pyro.inference import fit
from dgc_pyro.inference.engine import ENGINES, adam_kernel, make_step
from dgc_pyro.inference.objectives import get_objective
from dgc_pyro.inference.schedule import LR_SCHEDULES, check_lr_schedule, lr_factor, scheduled_lr, set_lr
from dgc_pyro.models import DGC

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cosine_factor_runs_from_one_to_zero_and_constant_stays_at_one():
    total = 10
    cosine = [lr_factor("cosine", t, total) for t in range(total + 1)]
    assert cosine[0] == 1.0 and cosine[5] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))  # strictly decreasing
    assert cosine[2] == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.2)))
    assert lr_factor("cosine", 12, total) == pytest.approx(0.0, abs=1e-12)  # past the end it stays at 0
    assert {lr_factor("constant", t, total) for t in range(total + 1)} == {1.0}


@pytest.mark.parametrize("bad", ["linear", None, 1, "Cosine"])
def test_unknown_schedules_are_named(bad):
    with pytest.raises(ValueError, match=f"lr_schedule must be one of \\('constant', 'cosine'\\), got {bad!r}"):
        check_lr_schedule(bad)
    assert check_lr_schedule("cosine") == "cosine" and LR_SCHEDULES == ("constant", "cosine")


def test_set_lr_on_a_torch_optimiser_and_a_pyro_optimiser_including_parameters_it_meets_later():
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([{"params": [a]}, {"params": [b]}], lr=1e-3)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.25]

    popt = pyro.optim.Adam({"lr": 1e-3})
    known = popt._get_optim(a)
    popt.optim_objs[a] = known
    set_lr(popt, 0.5)
    assert known.param_groups[0]["lr"] == 0.5
    assert popt._get_optim(b).param_groups[0]["lr"] == 0.5  # an optimiser created after the change

    with pytest.raises(TypeError, match="cannot set the learning rate of a dict"):
        set_lr({"lr": 1}, 0.1)
    with pytest.raises(TypeError, match="optim_args is a callable"):
        set_lr(pyro.optim.Adam(lambda name, param: {"lr": 1e-3}), 0.1)


def test_scheduled_lr_sets_the_rate_and_constant_leaves_the_optimiser_alone():
    a = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.Adam([a], lr=1e-3)
    assert scheduled_lr(opt, 2e-3, "cosine", 5, 10) == pytest.approx(1e-3)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)
    opt.param_groups[0]["lr"] = 7e-4  # a rate set by hand stays under the constant schedule
    assert scheduled_lr(opt, 2e-3, "constant", 5, 10) == 2e-3 and opt.param_groups[0]["lr"] == 7e-4
    # an optimiser that sets its own rates cannot be scheduled, but runs unscheduled
    assert scheduled_lr(pyro.optim.Adam(lambda name, param: {"lr": 1e-3}), 1e-3, "constant", 0, 10) == 1e-3


def _data(n=60, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = (torch.rand(n, d, generator=g) * 0.4 + torch.nn.functional.one_hot(y, d).float() * 0.5).clamp(0, 1)
    return x, y


def _model(seed=0):
    torch.manual_seed(seed)
    return DGC((6,), 3, latent_dim=3, preset="small")


def _fit(engine="torch", epochs=3, **kw):
    x, y = _data()
    model = _model()
    # no warm-up unless a test asks: these tests check the schedules' own rates step by step
    kw = {"batch_size": 20, "lr": 1e-2, "progress": False, "val_fraction": 0, "seed": 1, "warmup_steps": 0, **kw}
    history = fit(model, x, y, epochs=epochs, engine=engine, **kw)
    return history, torch.cat([p.detach().flatten() for p in model.parameters()])


def test_fit_decays_both_optimisers_step_by_step(monkeypatch):
    seen: list[tuple[float, ...]] = []
    original = torch.optim.Adam.step

    def step(opt, *args, **kwargs):
        seen.append(tuple(g["lr"] for g in opt.param_groups))
        return original(opt, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    history, _ = _fit(epochs=3, classifier_lr=4e-2, lr_schedule="cosine")  # 60 examples / 20: 3 steps an epoch
    main, pert = [r[0] for r in seen[0::2]], [r[0] for r in seen[1::2]]  # main step, then the perturbation step
    total = 9
    assert main == pytest.approx([1e-2 * lr_factor("cosine", t, total) for t in range(total)])
    assert pert == pytest.approx([4e-2 * lr_factor("cosine", t, total) for t in range(total)])
    assert [r["lr"] for r in history.epochs] == pytest.approx(
        [1e-2, 1e-2 * lr_factor("cosine", 3, 9), 1e-2 * lr_factor("cosine", 6, 9)]
    )
    assert history.config["lr_schedule"] == "cosine"


def test_warm_up_ramps_both_optimisers_then_hands_over_to_the_schedule(monkeypatch):
    assert [lr_factor("constant", t, 9, 4) for t in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor("cosine", 1, 9, 4) == pytest.approx(0.5 * lr_factor("cosine", 1, 9))
    seen: list[tuple[float, ...]] = []
    original = torch.optim.Adam.step

    def step(opt, *args, **kwargs):
        seen.append(tuple(g["lr"] for g in opt.param_groups))
        return original(opt, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    for schedule in ("constant", "cosine"):
        seen.clear()
        history, _ = _fit(epochs=3, classifier_lr=4e-2, lr_schedule=schedule, warmup_steps=2)
        main, pert = [r[0] for r in seen[0::2]], [r[0] for r in seen[1::2]]
        assert main == pytest.approx([1e-2 * lr_factor(schedule, t, 9, 2) for t in range(9)])
        assert pert == pytest.approx([4e-2 * lr_factor(schedule, t, 9, 2) for t in range(9)])
        assert main[:3] == pytest.approx([5e-3, 1e-2 * lr_factor(schedule, 1, 9), 1e-2 * lr_factor(schedule, 2, 9)])
        assert history.config["warmup_steps"] == 2
    # the warm-up lasts at most one epoch (3 steps here), and is on by default
    assert _fit(epochs=1, warmup_steps=100)[0].config["warmup_steps"] == 3
    assert _fit(epochs=1, warmup_steps=None)[0].config["warmup_steps"] == 3
    with pytest.raises(ValueError, match="warmup_steps"):
        _fit(epochs=1, warmup_steps=-1)


def test_a_checkpoint_from_before_warm_ups_resumes_without_one(tmp_path):
    _fit(epochs=1, checkpoint_dir=tmp_path)
    path = training_state_path(tmp_path)
    state = load_training_state(path)
    assert state.config.pop("warmup_steps") == 0
    save_training_state(path, state)  # as an older dgc_pyro wrote it
    history, _ = _fit(epochs=2, checkpoint_dir=tmp_path, resume=True, warmup_steps=None)  # the default adopts it
    assert history.resumed_from == 1
    with pytest.raises(ValueError, match="warmup_steps=0 in the checkpoint, 5 now"):
        _fit(epochs=3, checkpoint_dir=tmp_path, resume=True, warmup_steps=5)


def test_constant_schedule_leaves_the_fit_unchanged_and_cosine_changes_it():
    h_default, w_default = _fit()
    h_constant, w_constant = _fit(lr_schedule="constant")
    assert torch.equal(w_default, w_constant) and h_default.losses == h_constant.losses
    assert [r["lr"] for r in h_constant.epochs] == [1e-2] * 3
    _, w_cosine = _fit(lr_schedule="cosine")
    assert not torch.allclose(w_default, w_cosine)


def test_every_engine_follows_the_same_schedule():
    # On the --device of the run (fit's "auto"). On CUDA this needs every engine on the same Adam kernel
    # (see test_every_engine_builds_adam_with_one_kernel): svi on foreach Adam left the fused torch engine.
    results = {engine: _fit(engine, lr_schedule="cosine", warmup_steps=2) for engine in ("torch", "graph", "svi")}
    _, want = results["torch"]
    for engine in ("graph", "svi"):
        torch.testing.assert_close(results[engine][1], want, rtol=1e-5, atol=1e-6, msg=engine)


def test_every_engine_builds_adam_with_one_kernel(device):
    """fused Adam on CUDA, foreach elsewhere, for all three engines; the torch device need not exist to be named."""
    assert adam_kernel(torch.device("cuda")) == {"foreach": False, "fused": True}
    assert adam_kernel(torch.device("cpu")) == {"foreach": True, "fused": None}
    x, y = (t.to(device) for t in _data(n=20))
    reps = torch.ones(3, dtype=torch.long, device=device)
    want = adam_kernel(device)
    for engine in ENGINES:
        model = _model().to(device)
        step = make_step(model, get_objective("elbo"), engine, 1e-2, (0.9, 0.999), 1e-2, True, reps, device)
        step(x, y)
        main, pert = step.optimizers["main"], step.optimizers["perturbation"]
        # pyro.optim.Adam builds one torch Adam per parameter, from its optim_args
        mains = list(main.optim_objs.values()) if engine == "svi" else [main]
        assert mains and all({k: o.defaults[k] for k in want} == want for o in mains + [pert]), engine


def test_a_cosine_fit_cannot_change_its_length_on_resume(tmp_path):
    _fit(epochs=2, lr_schedule="cosine", checkpoint_dir=tmp_path)
    state = load_training_state(training_state_path(tmp_path))
    assert state.config["lr_schedule"] == "cosine" and state.config["schedule_epochs"] == 2
    # every step's rate depends on the cosine's length, so more epochs would not continue the same fit
    with pytest.raises(ValueError, match="schedule_epochs=2 in the checkpoint, 4 now"):
        _fit(epochs=4, lr_schedule="cosine", checkpoint_dir=tmp_path, resume=True)


def test_resume_continues_the_cosine_from_the_global_step(tmp_path):
    """Stop a 4-epoch cosine fit after its epoch-1 checkpoint and continue it: the same weights, bit for bit."""
    _, straight = _fit(epochs=4, lr_schedule="cosine", checkpoint_dir=tmp_path / "full")

    class Stop(Exception):
        pass

    def stop_after_two(epoch, record):
        if epoch == 2:
            raise Stop

    with pytest.raises(Stop):
        _fit(
            epochs=4, lr_schedule="cosine", checkpoint_dir=tmp_path / "cut", checkpoint_every=1, callback=stop_after_two
        )
    cut = load_training_state(training_state_path(tmp_path / "cut"))
    assert cut.epoch == 1  # the callback raised before epoch 2's checkpoint
    history, resumed = _fit(epochs=4, lr_schedule="cosine", checkpoint_dir=tmp_path / "cut", resume=True)
    assert history.resumed_from == 1
    assert torch.equal(resumed, straight)


def test_a_checkpoint_from_before_schedules_resumes_as_constant(tmp_path):
    _fit(epochs=2, checkpoint_dir=tmp_path)
    path = training_state_path(tmp_path)
    state = load_training_state(path)
    assert state.config.pop("lr_schedule") == "constant" and state.config.pop("schedule_epochs") is None
    save_training_state(path, state)  # as an older dgc_pyro wrote it
    history, _ = _fit(epochs=3, checkpoint_dir=tmp_path, resume=True)
    assert history.resumed_from == 2
    with pytest.raises(ValueError, match="lr_schedule='constant' in the checkpoint, 'cosine' now"):
        _fit(epochs=3, lr_schedule="cosine", checkpoint_dir=tmp_path, resume=True)


def test_fit_rejects_an_unknown_schedule_before_training():
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        _fit(lr_schedule="step")


def test_baseline_decays_its_rate_and_keeps_a_history(monkeypatch):
    x, y = _data(n=90)
    seen: list[float] = []
    original = torch.optim.Adam.step

    def step(opt, *args, **kwargs):
        seen.append(opt.param_groups[0]["lr"])
        return original(opt, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", step)
    fitted = fit_baseline("logit_adjusted", x, y, epochs=3, batch_size=27, lr=1e-2, lr_schedule="cosine", seed=0)
    # 90 examples, 10% held out for validation: 81 train, 3 steps an epoch
    assert seen == pytest.approx([1e-2 * lr_factor("cosine", t, 9) for t in range(9)])
    assert [r["epoch"] for r in fitted.history] == [1, 2, 3]
    assert [r["lr"] for r in fitted.history] == pytest.approx([1e-2 * lr_factor("cosine", t, 9) for t in (0, 3, 6)])
    vals = [r["val_acsa"] for r in fitted.history]
    assert fitted.val_acsa == max(vals) and fitted.best_epoch == vals.index(max(vals)) + 1

    seen.clear()
    constant = fit_baseline("ce", x, y, epochs=2, batch_size=27, lr=1e-2, val_fraction=0, seed=0)
    assert set(seen) == {1e-2} and constant.best_epoch == 2 and "val_acsa" not in constant.history[0]
    with pytest.raises(ValueError, match="lr_schedule must be one of"):
        fit_baseline("ce", x, y, epochs=1, lr_schedule="exp")


def test_recipe_gives_the_schedule_to_dgc_and_the_baselines():
    recipe = Recipe(lr_schedule="cosine", transform="shift", epochs=7)
    assert recipe.fit_options()["lr_schedule"] == "cosine"
    options = recipe.baseline_options()
    assert options == {
        "preset": "small",
        "epochs": 7,
        "batch_size": 100,
        "val_fraction": 0.1,
        "transform": "shift",
        "lr_schedule": "cosine",
        "select_best": True,
    }
    assert set(options) <= set(inspect.signature(fit_baseline).parameters)
