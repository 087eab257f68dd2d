"""The main job as one function: fit DGC (and a baseline) on an imbalanced split, evaluate on its test set.

:func:`train` is the training sequence (seed, build the recipe's model, fit it with the recipe's options) that
:func:`run_experiment` (the CLI's ``fit``), :class:`~dgc_pyro.DGCSampler` and the benchmarks share, so the same
recipe and seed give the same model everywhere and there is nothing only the CLI can do.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.baselines import BASELINE_REGISTRY, fit_baseline
from dgc_pyro.checkpoint import save_model
from dgc_pyro.config import ModelConfig, Recipe, TrainConfig, parse_overrides  # noqa: F401  (Recipe's home; re-exported)
from dgc_pyro.data.splits import ImbalancedSplit, stratified_holdout
from dgc_pyro.inference.callbacks import Checkpointing
from dgc_pyro.inference.density import fit_ood_threshold
from dgc_pyro.inference.fit import History, fit
from dgc_pyro.inference.predict import Prediction, predict
from dgc_pyro.io import write_json
from dgc_pyro.metrics import expected_calibration_error, imbalance_report
from dgc_pyro.models.dgc import DGC
from dgc_pyro.reproducibility import seed_everything

METRIC_KEYS = ("acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc")


# Defaults per dataset: the embedded digits default must finish in well under a minute on 2 CPU cores. Chosen on
# the digits dev sets (benchmarks/demo_recipe.py, seeds 1-5, never the test split): the label term up-weighted 10x
# and a 20% validation split (with 10% the smallest classes have one validation image each) raised the dev ACSA
# from .840 (seeds ranging .787-.900) to .907 (.887-.938) and lowered its ECE from .149 to .127.
# mnist/fashion: the Fashion-MNIST ablations' best on the validation split (benchmarks/RESULTS.md,
# docs/paper_fidelity.md): a label-free guide q(z | x) (the paper's q(z | x, y) lets z carry the given label, so
# p(y | z) never learns to read the class from x), the logit-adjusted label likelihood with the label term
# up-weighted 1000x against Normal(0.3) pixels, the data-perturbation step on, and the closed-form-KL ELBO.
_IMAGE_28 = Recipe(
    epochs=30,
    batch_size=100,
    lr=1e-3,
    latent_dim=64,
    preset="small",
    likelihood="normal",
    obs_scale=0.3,
    label_weight=1000.0,
    objective="elbo-analytic",
    perturbation_rate=0.6,
    logit_adjustment=1.0,
    label_in_guide=False,
)
#: The paper's model structure (q(z | x, y), no logit adjustment) with the first ablation's settings.
PAPER_GUIDE_28 = Recipe(
    epochs=30,
    batch_size=100,
    lr=1e-3,
    latent_dim=64,
    preset="small",
    likelihood="normal",
    obs_scale=0.1,
    label_weight=100.0,
    objective="elbo-analytic",
    perturbation_rate=0.6,
)
#: Issue 21's class-conditional latent prior on the default recipe: p(z | y) = N(mu_y, Sigma) with the label-free guide,
#: scored by Bayes' rule, the data-perturbation step off (the model has no label head for it to train). The starting
#: point of its dev-set runs, not a measured default.
CLASS_CONDITIONAL_28 = dataclasses.replace(_IMAGE_28, latent_prior="class_conditional", perturbation_rate=0.0)
DEFAULT_RECIPES: dict[str, Recipe] = {
    "digits": Recipe(
        epochs=60, batch_size=32, lr=3e-3, latent_dim=16, objective="elbo-analytic", label_weight=10.0, val_fraction=0.2
    ),
    "mnist": _IMAGE_28,
    "fashion": _IMAGE_28,
}

# The reference code's settings (DGC_METHOD.md), for fidelity runs (GPU-sized): WAE-MMD with the 0.5 ||x - x_hat||^2
# cost, the label cross-entropy summed over the batch (label_weight = batch size), reconstruction scored with unit
# variance, Adam(beta1 = 0.5), 200 encoder pre-training steps. Its defects are not copied: the validation split
# replaces test-set selection, and no MMD scalar is added to the class scores (docs/paper_fidelity.md).
PAPER_RECIPES: dict[str, Recipe] = {
    "mnist": Recipe(
        epochs=50,
        batch_size=100,
        lr=1e-5,
        latent_dim=64,
        preset="paper",
        likelihood="normal",
        obs_scale=1.0,
        label_weight=100.0,
        objective="wae-mmd-l2",
        perturbation_rate=0.6,
        betas=(0.5, 0.999),
        pretrain_steps=200,
    ),
    "celeba": Recipe(
        epochs=30,
        batch_size=25,
        lr=5e-5,
        latent_dim=64,
        preset="paper",
        likelihood="normal",
        obs_scale=1.0,
        label_weight=25.0,
        objective="wae-mmd-l2",
        perturbation_rate=0.6,
        betas=(0.5, 0.999),
        pretrain_steps=200,
    ),
}
PAPER_RECIPES["fashion"] = PAPER_RECIPES["mnist"]  # the reference code has no fashion config (it crashes)


#: What a network preset changes in a dataset's recipe. The paper networks (deeper, convolutional) diverged with the
#: dataset recipes' lr 1e-3 (Fashion-MNIST on an H200: loss 3.8e6 in epoch 1, test ACSA .37-.47 on 3 seeds) and
#: trained at 3e-4 (test ACSA .871-.880 on 5 seeds) and 1e-4 (.865, .878): benchmarks/paper_table.py --preset paper
#: --recipe-set lr=... on one H200, 2026-12-04 (the GPU measurements of issue 18).
PRESET_CHANGES: dict[str, dict[str, Any]] = {
    "small": {},
    "paper": {"lr": 3e-4},
}


#: The input shape of each dataset of :data:`DEFAULT_RECIPES`, for data that comes without a dataset name.
DATASET_SHAPES: dict[str, tuple[int, ...]] = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "fashion": (1, 28, 28)}


def default_recipe(
    dataset: str | None = None, preset: str | None = None, *, input_shape: Sequence[int] | None = None
) -> Recipe:
    """The recipe the CLI uses for ``dataset`` with the networks of ``preset`` (None: the dataset's own preset).

    A dataset without a recipe of its own (None, or a name not in :data:`DEFAULT_RECIPES`) gets the recipe of the
    built-in dataset whose images have ``input_shape`` (:data:`DATASET_SHAPES`: ``(1, 8, 8)`` is digits',
    ``(1, 28, 28)`` MNIST's and Fashion-MNIST's), else ``Recipe()``. A preset brings its own optimisation
    settings (:data:`PRESET_CHANGES`), so that every preset trains with the recipe it is given; options given
    explicitly (``--lr``) are applied afterwards and win.
    """
    recipe = DEFAULT_RECIPES.get(dataset) if dataset is not None else None
    if recipe is None and input_shape is not None:
        shape = tuple(int(s) for s in input_shape)
        recipe = next((DEFAULT_RECIPES[name] for name, s in DATASET_SHAPES.items() if s == shape), None)
    recipe = Recipe() if recipe is None else recipe
    if preset is None or preset == recipe.preset:
        return recipe
    if preset not in PRESET_CHANGES:
        raise ValueError(f"preset must be one of {tuple(PRESET_CHANGES)}, got {preset!r}")
    return dataclasses.replace(recipe, preset=preset, **PRESET_CHANGES[preset])


def recipe_overrides(items: Sequence[str]) -> dict[str, Any]:
    """Parse ``FIELD=VALUE`` strings into flat :class:`Recipe` changes (:func:`dgc_pyro.config.parse_overrides`:
    each value converted as its field's CLI flag converts it; unknown fields and bad values raise ValueError)."""
    return parse_overrides(items)


@dataclass
class Trained:
    """A DGC fitted by :func:`train`, with the recipe and seed that made it and the fit's wall time (seconds)."""

    model: DGC
    history: History
    recipe: Recipe
    seed: int
    seconds: float


def train(
    recipe: Recipe,
    split: ImbalancedSplit,
    seed: int = 0,
    *,
    device: str | torch.device = "auto",
    progress: bool = True,
    val_num_samples: int | None = None,
    on_build: Callable[[DGC], Any] | None = None,
    **fit_options: Any,
) -> Trained:
    """Fit the DGC that ``recipe`` describes on ``split``'s training data: seed everything with ``seed`` (the
    initial weights are part of what it fixes), build ``recipe.build_model(...)`` for the split, and
    :func:`~dgc_pyro.inference.fit` it with ``recipe.train``.

    ``val_num_samples`` (default: the recipe's) are the latent draws of the validation score; ``on_build(model)`` is
    called with the model before it is fitted (e.g. to hand it to a ``callback``); further keyword arguments go to
    ``fit``: how the run executes (the ``role="run"`` options: ``engine``, ``deterministic``, ``devices``, ...) and
    its other arguments (``callbacks``, ``resume``, ``checkpoint_dir``, ``callback``, ...), but not what the recipe
    sets: change the recipe for those (``dataclasses.replace``).
    """
    clash = [name for name in fit_options if name in recipe.fit_options()]
    if clash:
        raise ValueError(
            f"train: {', '.join(clash)} {'is' if len(clash) == 1 else 'are'} set by the recipe; pass "
            f"dataclasses.replace(recipe, {clash[0]}=...) instead"
        )
    config = recipe.train if val_num_samples is None else recipe.train.replace(val_num_samples=val_num_samples)
    seed_everything(seed)
    model = recipe.build_model(split.input_shape, split.num_classes, split.train_counts)
    if on_build is not None:
        on_build(model)
    t0 = time.perf_counter()
    history = fit(
        model, split.x_train, split.y_train, config, device=device, seed=seed, progress=progress, **fit_options
    )
    return Trained(model, history, recipe, seed, time.perf_counter() - t0)


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


def evaluate_model(
    model: DGC,
    x: torch.Tensor,
    y: torch.Tensor,
    train_counts: np.ndarray,
    num_samples: int = 10,
    seed: int = 0,
    balanced: bool | None = None,
    progress: bool = False,
    rule: str | None = None,
    swag: Any = None,
    head_samples: int | None = None,
) -> tuple[dict[str, float], Prediction]:
    """Imbalance metrics (and ECE) of ``model`` on ``(x, y)``; the latent draws are seeded, so a reloaded
    checkpoint reproduces the metrics of the run that wrote it. ``balanced`` (default: whether the model
    carries a class prior), ``rule`` (default: the model's), ``progress`` (a bar on stderr) and ``swag`` /
    ``head_samples`` (the class posterior averaged over SWAG head draws, seeded with ``seed`` too) are passed to
    :func:`predict`."""
    seed_everything(seed)
    # A model without the x site (observe_x=False) has no density score, hence no OOD flag.
    pred = predict(
        model,
        x,
        num_samples,
        balanced=model.has_class_prior if balanced is None else balanced,
        density=model.observe_x,
        progress=progress,
        rule=rule,
        swag=swag,
        head_samples=head_samples,
        head_seed=seed,
    )
    report = imbalance_report(y, pred.labels.cpu(), num_classes=model.num_classes, train_counts=train_counts)
    report["ece"] = expected_calibration_error(y, pred.proba.cpu())
    if pred.head_samples is not None:  # the class posterior averaged over this many SWAG head draws
        report["head_samples"] = pred.head_samples
    if pred.ood is not None:  # the calibrated OOD flag's rate on these (in-distribution) examples
        report["ood_flag_rate"] = float(pred.ood.float().mean())
    return report, pred


#: The false-alarm rate of the OOD flag that run_experiment calibrates on the validation split.
OOD_FALSE_ALARM = 0.05


def calibrate_ood_flag(
    model: DGC, split: ImbalancedSplit, recipe: Recipe, seed: int = 0, false_alarm: float = OOD_FALSE_ALARM
) -> bool:
    """Calibrate ``model``'s OOD flag (:func:`~dgc_pyro.inference.density.fit_ood_threshold`) on the validation
    images that ``fit`` held out of ``split``'s training data (the same stratified hold-out, rebuilt from
    ``recipe.val_fraction`` and ``seed``): images the model never trained on, scored as the recipe predicts (over
    ``recipe.swag_samples`` draws of the model's SWAG head when it has one). Returns False, leaving the model
    without a flag, when that hold-out is too small for ``false_alarm`` or there is none, or when the model has no
    density to flag (``observe_x=False``)."""
    if recipe.val_fraction <= 0 or not model.observe_x:
        return False
    _, val_idx = stratified_holdout(split.y_train.numpy(), recipe.val_fraction, seed)
    if len(val_idx) < math.ceil(1.0 / false_alarm):
        return False
    fit_ood_threshold(
        model,
        split.x_train[torch.as_tensor(val_idx)],
        false_alarm,
        num_samples=recipe.num_samples,
        seed=seed,
        **swag_options(model, recipe.swag_samples),
    )
    return True


def swag_options(model: DGC, head_samples: int) -> dict[str, Any]:
    """``predict``'s SWAG keywords for ``model``: its SWAG head (``model.swag``) with ``head_samples`` draws, or
    none when it has no head."""
    head = getattr(model, "swag", None)
    return {"swag": head, "head_samples": int(head_samples)} if head is not None else {}


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
    checkpoint_dir: str | Path | None = None,
    resume: bool = False,
    deterministic: bool = False,
    fit_options: dict[str, Any] | None = None,
) -> ExperimentResult:
    """Fit DGC with ``recipe`` on ``split``'s training data, evaluate on its test data, optionally beside a baseline.

    With ``out_dir`` it writes ``metrics.json`` and ``model.safetensors`` there (atomically). With
    ``checkpoint_dir`` the DGC fit writes resumable checkpoints there (the run's settings included, see
    ``dgc-pyro fit --resume``); ``resume=True`` continues from them. ``deterministic`` is passed to fit,
    and so are ``fit_options`` (further keyword arguments of :func:`~dgc_pyro.inference.fit`, e.g.
    ``{"devices": 2, "strategy": "ddp"}``).
    """
    if baseline is not None and baseline not in BASELINE_REGISTRY:
        raise ValueError(f"unknown baseline {baseline!r}; choose one of {', '.join(BASELINE_REGISTRY.names())} or none")
    metadata = {
        "run": {
            "dataset": split.name,
            "seed": seed,
            "recipe": recipe.to_dict(),
            "baseline": baseline,
            **(data_config or {}),
        }
    }
    checkpointing = Checkpointing(checkpoint_dir, metadata=metadata) if checkpoint_dir is not None else None
    trained = train(
        recipe,
        split,
        seed,
        device=device,
        progress=progress,
        resume=bool(resume),
        callbacks=(checkpointing,) if checkpointing else (),
        **({"deterministic": True} if deterministic else {}),
        **(fit_options or {}),
    )
    model, history = trained.model, trained.history
    t1 = time.perf_counter()
    calibrate_ood_flag(model, split, recipe, seed)
    metrics, pred = evaluate_model(
        model,
        split.x_test,
        split.y_test,
        split.train_counts,
        recipe.num_samples,
        seed,
        progress=progress,
        **swag_options(model, recipe.swag_samples),
    )
    t2 = time.perf_counter()
    seconds = {"dgc_fit": trained.seconds, "dgc_predict": t2 - t1}
    baseline_metrics = None
    if baseline is not None:
        fitted = fit_baseline(
            baseline,
            split.x_train,
            split.y_train,
            num_classes=split.num_classes,
            **recipe.baseline_options(),
            lr=min(recipe.lr, 1e-3),
            device=device,
            seed=seed,
            progress=progress,
        )
        proba = fitted.predict_proba(split.x_test)
        baseline_metrics = imbalance_report(
            split.y_test, proba.argmax(-1), num_classes=split.num_classes, train_counts=split.train_counts
        )
        baseline_metrics["ece"] = expected_calibration_error(split.y_test, proba)
        baseline_metrics["name"] = baseline
        seconds["baseline_fit"] = time.perf_counter() - t2
    config = {
        "dataset": split.name,
        "seed": seed,
        "device": history.config.get("device"),
        "train_counts": split.train_counts.tolist(),
        "test_size": len(split.y_test),
        "recipe": recipe.to_dict(),
        "baseline": baseline,
        **(data_config or {}),
    }
    result = ExperimentResult(metrics, baseline_metrics, model, history, pred, config, seconds)
    if out_dir is not None:
        out = Path(out_dir)
        save_model(out / "model.safetensors", model, {"config": config, "class_names": list(split.class_names)})
        write_json(out / "metrics.json", result.summary())
    return result
