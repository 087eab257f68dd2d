"""The registries of scoring rules, baselines and datasets: a user's entry works end to end on tiny data, unknown names
get the one-line error, and registered names reach the CLI choices."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from fixtures import load_benchmark
from torch.nn import functional as F

from dgc_pyro.baselines import (
    BASELINE_REGISTRY,
    BaselineSpec,
    baseline_loss,
    fit_baseline,
)
from dgc_pyro.cli import build_parser, main
from dgc_pyro.data import (
    DATASET_REGISTRY,
    DatasetSpec,
    ImageSource,
    default_counts,
    load_imbalanced,
    open_source,
)
from dgc_pyro.inference.predict import (
    SCORING_RULE_REGISTRY,
    SCORING_RULES,
    ScoringRuleSpec,
    predict,
    rows_per_example,
    scoring_rules_for,
)
from dgc_pyro.models.dgc import DGC
from dgc_pyro.registry import Registry


def _option(parser: argparse.ArgumentParser, dest: str, command: str | None = None) -> argparse.Action:
    """The action of option ``dest`` (of sub-command ``command``) of an argparse parser."""
    if command is not None:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[command]
    return next(a for a in parser._actions if a.dest == dest)


@pytest.fixture
def registered():
    """Register entries for one test and remove them afterwards, so no test sees another's."""
    added: list[tuple[Registry, str]] = []

    def add(registry: Registry, name: str, entry):
        registry.register(name, entry)
        added.append((registry, name))
        return entry

    yield add
    for registry, name in reversed(added):
        registry.unregister(name)


# ----------------------------------------------------------------------------- the generic registry
def test_registry_registers_looks_up_and_refuses_in_one_line():
    reg: Registry[int] = Registry("widget")
    reg.register("a", 1)

    @reg.register("b", aliases=("bee",))
    def b() -> int:
        return 2

    assert reg.names() == ("a", "b") and len(reg) == 2 and list(reg) == ["a", "b"]
    assert reg.get("bee") is b and reg.canonical("bee") == "b" and "bee" in reg and ["x"] not in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.register("a", 3)
    reg.register("a", 3, replace=True)
    assert reg.get("a") == 3
    with pytest.raises(ValueError) as info:
        reg.get("c")
    assert type(info.value) is ValueError
    assert str(info.value) == "unknown widget 'c'; choose one of a, b"
    reg.unregister("bee")
    assert reg.names() == ("a",) and "bee" not in reg


def test_built_in_names_are_unchanged():
    assert SCORING_RULES == SCORING_RULE_REGISTRY.names() == ("mixture", "iw", "paper", "latent", "bayes")
    assert BASELINE_REGISTRY.names() == ("ce", "logit_adjusted", "balanced_softmax", "cb_focal", "ldam_drw", "logistic")
    assert DATASET_REGISTRY.names() == ("mnist", "fashion", "svhn", "celeba", "digits")
    spec = BASELINE_REGISTRY.get("ldam_drw")
    assert spec.deferred_reweighting and spec.cosine_head and not spec.takes_tau
    assert [n for n, s in BASELINE_REGISTRY.items() if s.takes_tau] == ["logit_adjusted", "balanced_softmax"]


# ----------------------------------------------------------------------------- scoring rules
def _label_head_at_the_mean(model: DGC, x: torch.Tensor, num_samples: int, density_draws: int):
    """A custom rule: the label head at the guide's mean, one "draw" (D = 1), no density."""
    loc, _ = model.encode(x, None)
    return torch.log_softmax(model.label_logits(loc), dim=-1)[:, :, None], None


MEAN_RULE = ScoringRuleSpec(_label_head_at_the_mean, rows=lambda c, s, d: {"encoder": 1, "decoder": 0, "classifier": 1})


def test_a_registered_scoring_rule_predicts_end_to_end(registered):
    registered(SCORING_RULE_REGISTRY, "label_mean", MEAN_RULE)
    torch.manual_seed(0)
    model = DGC((1, 8, 8), 4, latent_dim=3, likelihood="normal", label_in_guide=False).eval()
    x = torch.rand(13, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert "label_mean" in scoring_rules_for(model)
    assert rows_per_example("label_mean", 4, 10) == {"encoder": 1, "decoder": 0, "classifier": 1}
    pred = predict(model, x, num_samples=5, rule="label_mean", max_rows=4)  # several chunks
    with torch.no_grad():
        expected = torch.softmax(model.label_logits(model.encode(x, None)[0]), -1)
    assert pred.rule == "label_mean" and pred.log_weights.shape == (13, 4, 1)
    assert torch.allclose(pred.proba, expected, atol=1e-5)
    assert torch.equal(pred.labels, expected.argmax(-1)) and pred.log_density is None


def test_an_unknown_scoring_rule_is_one_line_naming_the_known_ones(registered):
    registered(SCORING_RULE_REGISTRY, "label_mean", MEAN_RULE)
    model = DGC((1, 8, 8), 3, latent_dim=2).eval()
    with pytest.raises(ValueError) as info:
        predict(model, torch.rand(2, 1, 8, 8), rule="nope")
    assert str(info.value) == "unknown scoring rule 'nope'; choose one of mixture, iw, paper, latent, bayes, label_mean"


def test_predict_refuses_a_rule_that_does_not_apply_to_the_model():
    model = DGC((1, 8, 8), 3, latent_dim=2).eval()  # a label head: no class Gaussians for Bayes' rule
    assert "bayes" not in scoring_rules_for(model)
    with pytest.raises(ValueError) as info:
        predict(model, torch.rand(2, 1, 8, 8), rule="bayes")
    assert str(info.value) == (
        "rule='bayes' needs a model built with latent_prior='class_conditional' (a p(z | y) per class); "
        f"this model takes {', '.join(scoring_rules_for(model))}"
    )


def test_registered_scoring_rules_reach_the_benchmark_cli_choices(registered):
    registered(SCORING_RULE_REGISTRY, "label_mean", MEAN_RULE)
    choices = tuple(_option(load_benchmark("paper_table").build_parser(), "rule").choices)
    assert choices == SCORING_RULES + ("label_mean",)


# ----------------------------------------------------------------------------- baselines
def test_a_registered_baseline_loss_fits_end_to_end(registered, digits):
    calls: list[tuple[float, bool]] = []

    def smoothed(logits, y, counts, *, tau, drw_active):
        calls.append((tau, drw_active))
        return F.cross_entropy(logits, y, label_smoothing=0.1)

    registered(BASELINE_REGISTRY, "ce_smooth", BaselineSpec(smoothed, takes_tau=True, deferred_reweighting=True))
    fitted = fit_baseline(
        "ce_smooth",
        digits.x_train,
        digits.y_train,
        num_classes=10,
        epochs=5,
        batch_size=64,
        lr=3e-3,
        device="cpu",
        seed=0,
        tau=0.5,
    )
    proba = fitted.predict_proba(digits.x_test)
    assert proba.shape == (len(digits.y_test), 10)
    assert (proba.argmax(-1) == digits.y_test).float().mean() > 0.3
    steps = len(calls) // 5
    # tau is handed to the loss; deferred re-weighting is on from epoch int(0.8 * 5) + 1 = 5
    assert {t for t, _ in calls} == {0.5}
    assert [a for _, a in calls] == [False] * (4 * steps) + [True] * steps
    assert torch.isfinite(baseline_loss("ce_smooth", torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.ones(3)))


def test_a_baseline_without_tau_refuses_one(registered, digits):
    registered(BASELINE_REGISTRY, "plain", BaselineSpec(lambda logits, y, counts, **_: F.cross_entropy(logits, y)))
    with pytest.raises(ValueError, match="'plain' has none"):
        fit_baseline("plain", digits.x_train, digits.y_train, tau=2.0)
    with pytest.raises(ValueError, match="exactly one of"):
        BaselineSpec()


def test_an_unknown_baseline_is_one_line_naming_the_known_ones():
    with pytest.raises(ValueError) as info:
        fit_baseline("svm", torch.rand(4, 3), torch.tensor([0, 1, 0, 1]))
    assert str(info.value) == (
        "unknown baseline 'svm'; choose one of ce, logit_adjusted, balanced_softmax, cb_focal, ldam_drw, logistic"
    )


def test_registered_baselines_reach_the_cli_choices(registered):
    registered(BASELINE_REGISTRY, "plain", BaselineSpec(lambda logits, y, counts, **_: F.cross_entropy(logits, y)))
    assert tuple(_option(build_parser(), "baseline", "fit").choices) == BASELINE_REGISTRY.names() + ("none",)
    assert "plain" in BASELINE_REGISTRY.names()


# ----------------------------------------------------------------------------- datasets
def _tiny_opener(root, split, download):
    """Three classes of 8x8 images, brighter by class, in memory."""
    rng = np.random.default_rng(0 if split == "train" else 1)
    y = np.repeat(np.arange(3), 40 if split == "train" else 10)
    x = np.clip(rng.normal(0.2 + 0.3 * y[:, None, None, None], 0.1, size=(len(y), 1, 8, 8)), 0, 1)
    return ImageSource.from_arrays("tiny", split, torch.as_tensor(x, dtype=torch.float32), y, ["dim", "mid", "bright"])


TINY = DatasetSpec(_tiny_opener, (1, 8, 8), 3, (30, 15, 8), bundled=True)


def test_a_registered_dataset_loads_with_its_default_counts(registered):
    registered(DATASET_REGISTRY, "tiny", TINY)
    assert default_counts("tiny") == (30, 15, 8) and default_counts("TINY") == (30, 15, 8)
    split = load_imbalanced("tiny", seed=3)
    assert split.name == "tiny" and split.input_shape == (1, 8, 8) and split.class_names == ["dim", "mid", "bright"]
    assert split.train_counts.tolist() == [30, 15, 8] and len(split.y_test) == 30
    with pytest.raises(ValueError, match="split must be one of"):
        open_source("tiny", split="valid")


def test_a_reader_that_disagrees_with_its_entry_is_refused(registered):
    registered(DATASET_REGISTRY, "wrong", DatasetSpec(_tiny_opener, (1, 28, 28), 3, (1, 1, 1), bundled=True))
    with pytest.raises(ValueError, match=r"reader returned \(1, 8, 8\) images with 3 classes"):
        open_source("wrong")


def test_an_unknown_dataset_is_one_line_naming_the_known_ones(registered):
    registered(DATASET_REGISTRY, "tiny", TINY)
    with pytest.raises(ValueError) as info:
        open_source("Cifar")
    assert str(info.value) == "unknown dataset 'Cifar'; choose one of mnist, fashion, svhn, celeba, digits, tiny"


def test_a_registered_dataset_trains_from_the_cli(registered, tmp_path, capsys):
    registered(DATASET_REGISTRY, "tiny", TINY)
    assert "tiny" in _option(build_parser(), "dataset", "fit").help
    out = tmp_path / "run"
    assert (
        main(["fit", "--dataset", "tiny", "--epochs", "1", "--no-progress", "--baseline", "none", "--out", str(out)])
        == 0
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["dataset"] == "tiny" and metrics["config"]["train_counts"] == [30, 15, 8]
