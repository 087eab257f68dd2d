"""Prediction chunks by the rows each rule runs, splits draws when one example is too big, refuses what cannot fit."""

from __future__ import annotations

import importlib

import pytest
import torch

from dgc_pyro.inference.predict import chunk_plan, class_log_weights, predict, rows_per_example
from dgc_pyro.models.dgc import DGC

predict_module = importlib.import_module(
    "dgc_pyro.inference.predict"
)  # the package re-exports a function named predict


def _model(shape=(1, 8, 8), **kwargs) -> DGC:
    torch.manual_seed(0)
    return DGC(shape, 10, latent_dim=4, likelihood="normal", **kwargs).eval()


def _x(shape=(1, 8, 8), n=6):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(1))


def test_rows_per_example_follow_the_rule():
    assert rows_per_example("latent", 10, 7) == {"encoder": 1, "decoder": 0, "classifier": 7}
    for rule in ("mixture", "iw", "paper"):
        assert rows_per_example(rule, 10, 7) == {"encoder": 10, "decoder": 70, "classifier": 70}


def test_latent_rule_chunks_far_more_examples_than_the_decoding_rules():
    """The conv model's latent rule runs no decoder rows, so its chunks hold many examples, not one or two."""
    conv = _model((1, 28, 28), label_in_guide=False)
    latent_examples, latent_draws = chunk_plan(conv, "latent", 10)
    mixture_examples, _ = chunk_plan(conv, "mixture", 10)
    assert latent_draws == 10
    assert mixture_examples <= 4
    assert latent_examples >= 25 * mixture_examples


def test_explicit_max_rows_caps_the_busiest_network():
    model = _model()
    assert chunk_plan(model, "iw", 4, max_rows=40) == (1, 4)  # 10 classes x 4 draws: one example a pass
    assert chunk_plan(model, "iw", 4, max_rows=1200) == (30, 4)
    assert chunk_plan(model, "latent", 4, max_rows=40) == (10, 4)
    assert chunk_plan(model, "iw", 8, max_rows=20) == (1, 2)  # one example is too big: 2 draws per pass


@pytest.mark.parametrize("rule", ["iw", "mixture", "latent"])
def test_draw_blocks_come_back_in_the_order_of_separate_calls(rule):
    """When one example's draws are split over passes, the blocks are the draws of consecutive calls."""
    model = _model(label_in_guide=rule != "latent")
    x = _x(n=1)
    torch.manual_seed(3)
    blocked = class_log_weights(model, x, 8, rule=rule, max_rows=2 if rule == "latent" else 20)
    torch.manual_seed(3)
    by_hand = torch.cat([class_log_weights(model, x, 2, rule=rule) for _ in range(4)], dim=-1)
    assert blocked.shape == (1, 10, 80 if rule == "mixture" else 8)
    assert torch.equal(blocked, by_hand)


def test_automatic_plan_splits_draws_under_a_small_budget(monkeypatch):
    model = _model()
    monkeypatch.setattr(predict_module, "CPU_CHUNK_BYTES", 200_000)
    monkeypatch.setattr(predict_module, "_ROW_LIMITS", {"cpu": (1, 32768)})
    examples, draws = chunk_plan(model, "mixture", 64)
    assert examples == 1 and 1 <= draws < 64
    ws, _ = predict_module._example_bytes(model, "mixture", draws)
    assert ws <= 200_000 or draws == 1
    pred = predict(model, _x(n=2), 64)
    assert pred.log_weights.shape == (2, 10, 640)
    assert torch.allclose(pred.proba.sum(-1), torch.ones(2), atol=1e-5)


def test_a_result_that_cannot_fit_is_refused_before_any_work(monkeypatch):
    model = _model()
    calls = []
    monkeypatch.setattr(predict_module, "_log_weight_chunk", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match=r"num_samples=1000000000 is too many for 6 examples.*fewer draws"):
        predict(model, _x(), num_samples=10**9)
    assert calls == []


def test_progress_bar_on_stderr(capsys):
    model = _model()
    predict(model, _x(), 2, max_rows=40, progress=True)  # 2 examples per pass: 3 chunks
    err = capsys.readouterr().err
    assert "predict" in err and "/3 " in err  # three passes (tqdm redraws at most every 0.1 s)
    predict(model, _x(), 2, max_rows=40)
    assert capsys.readouterr().err == ""
