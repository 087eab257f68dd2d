"""The main job as one function: fit DGC (and a baseline) on an imbalanced split, evaluate on its test set.

The CLI, the notebooks and the benchmarks all call :func:`run_experiment`, so there is nothing only the
CLI can do.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.baselines import BASELINES, fit_baseline
from dgc_pyro.checkpoint import save_model
from dgc_pyro.data.splits import ImbalancedSplit
from dgc_pyro.inference.fit import History, fit
from dgc_pyro.inference.predict import Prediction, predict
from dgc_pyro.io import write_json
from dgc_pyro.metrics import expected_calibration_error, imbalance_report
from dgc_pyro.models.dgc import DGC
from dgc_pyro.reproducibility import seed_everything

METRIC_KEYS = ("acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc")


@dataclass(frozen=True)
class Recipe:
    """Model and optimisation settings of one DGC run."""

    epochs: int = 30
    batch_size: int = 100
    lr: float = 1e-3
    latent_dim: int = 64
    preset: str = "small"
    likelihood: str = "normal"
    obs_scale: float = 0.1
    label_weight: float = 1.0
    objective: str = "elbo"
    perturbation_rate: float = 0.6
    num_samples: int = 10
    val_fraction: float = 0.1


# Defaults per dataset: the embedded digits default must finish in well under 3 minutes on 2 CPU cores.
DEFAULT_RECIPES: dict[str, Recipe] = {
    "digits": Recipe(epochs=60, batch_size=32, lr=3e-3, latent_dim=16, objective="elbo-analytic"),
}


def default_recipe(dataset: str) -> Recipe:
    """The recipe the CLI uses for ``dataset`` when no option overrides it."""
    return DEFAULT_RECIPES.get(dataset, Recipe())


@dataclass
class ExperimentResult:
    """Metrics of DGC (and the baseline) on the test split, with the fitted model and its history."""

    metrics: dict[str, float]
    baseline_metrics: dict[str, float] | None
    model: DGC
    history: History
    prediction: Prediction
    config: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What ``metrics.json`` holds: DGC's metrics at the top level, then baseline, config, history."""
        out: dict[str, Any] = dict(self.metrics)
        out["baseline"] = self.baseline_metrics
        out["config"] = self.config
        out["seconds"] = self.seconds
        out["history"] = self.history.to_dict()
        return out


def evaluate_model(model: DGC, x: torch.Tensor, y: torch.Tensor, train_counts: np.ndarray, num_samples: int = 10) -> tuple[dict[str, float], Prediction]:
    """Imbalance metrics (and ECE) of ``model`` on ``(x, y)``."""
    pred = predict(model, x, num_samples)
    report = imbalance_report(y, pred.labels.cpu(), num_classes=model.num_classes, train_counts=train_counts)
    report["ece"] = expected_calibration_error(y, pred.proba.cpu())
    return report, pred


def run_experiment(
    split: ImbalancedSplit,
    recipe: Recipe,
    *,
    seed: int = 0,
    device: str = "auto",
    baseline: str | None = "ce",
    out_dir: str | Path | None = None,
    progress: bool = True,
    data_config: dict[str, Any] | None = None,
) -> ExperimentResult:
    """Fit DGC with ``recipe`` on ``split``'s training data, evaluate on its test data, optionally beside a baseline.

    With ``out_dir`` it writes ``metrics.json`` and ``model.safetensors`` there (atomically).
    """
    if baseline is not None and baseline not in BASELINES:
        raise ValueError(f"unknown baseline {baseline!r}; choose from {BASELINES} or none")
    seed_everything(seed)  # the initial weights are part of what the seed fixes
    model = DGC(
        split.input_shape,
        split.num_classes,
        latent_dim=recipe.latent_dim,
        preset=recipe.preset,
        likelihood=recipe.likelihood,
        obs_scale=recipe.obs_scale,
        label_weight=recipe.label_weight,
    )
    t0 = time.perf_counter()
    history = fit(
        model, split.x_train, split.y_train,
        epochs=recipe.epochs, batch_size=recipe.batch_size, lr=recipe.lr, objective=recipe.objective,
        device=device, seed=seed, progress=progress, val_fraction=recipe.val_fraction,
        perturbation_rate=recipe.perturbation_rate, val_num_samples=recipe.num_samples,
    )
    t1 = time.perf_counter()
    metrics, pred = evaluate_model(model, split.x_test, split.y_test, split.train_counts, recipe.num_samples)
    t2 = time.perf_counter()
    seconds = {"dgc_fit": t1 - t0, "dgc_predict": t2 - t1}
    baseline_metrics = None
    if baseline is not None:
        fitted = fit_baseline(
            baseline, split.x_train, split.y_train, num_classes=split.num_classes, preset=recipe.preset,
            epochs=recipe.epochs, batch_size=recipe.batch_size, lr=min(recipe.lr, 1e-3), device=device, seed=seed,
            val_fraction=recipe.val_fraction, progress=progress,
        )
        proba = fitted.predict_proba(split.x_test)
        baseline_metrics = imbalance_report(split.y_test, proba.argmax(-1), num_classes=split.num_classes, train_counts=split.train_counts)
        baseline_metrics["ece"] = expected_calibration_error(split.y_test, proba)
        baseline_metrics["name"] = baseline
        seconds["baseline_fit"] = time.perf_counter() - t2
    config = {
        "dataset": split.name,
        "seed": seed,
        "device": history.config.get("device"),
        "train_counts": split.train_counts.tolist(),
        "test_size": int(len(split.y_test)),
        "recipe": recipe.__dict__,
        "baseline": baseline,
        **(data_config or {}),
    }
    result = ExperimentResult(metrics, baseline_metrics, model, history, pred, config, seconds)
    if out_dir is not None:
        out = Path(out_dir)
        save_model(out / "model.safetensors", model, {"config": config, "class_names": list(split.class_names)})
        write_json(out / "metrics.json", result.summary())
    return result
