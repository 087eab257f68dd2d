"""Reproduce the shape of the DGC paper's Tables 2-3: DGC (both objectives) against modern baselines.

Every method is trained on the paper's imbalanced subset of ``--dataset`` for each seed
(``load_imbalanced(..., seed=s)``), selects its model on a stratified validation split carved from that
training subset (never the test set), and is evaluated on the full official test split.

    python benchmarks/paper_table.py --dataset fashion --data-dir ../shared/data --seeds 1 2 3 4 5 --out benchmarks/results/fashion
    python benchmarks/paper_table.py --dataset fashion --data-dir ../shared/data --seeds 1 2 3 --quick --out /tmp/fashion_quick

Writes ``OUT/runs/<method>_seed<s>.json`` (one per run), ``OUT/summary.json``
(``{method: {metric: {"mean": .., "std": ..}}}``, std over seeds with ddof=1, 0 for one seed),
``OUT/config.json`` (the command's settings) and ``OUT/table.md``.

``--evaluate-on dev`` scores every run on a class-balanced set of the training images that the subset left out
(``--dev-per-class`` a class) instead of the test split: the place to compare recipe choices before a table on
fresh seeds is run on the test split.

``--quick`` is the CPU preset: the "small" networks on flattened pixels (MLP backbone, for DGC and the
baselines alike), few epochs (digits keeps its recipe's 60: they take seconds) and few latent draws, so a 3-seed
Fashion table fits in minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.baselines import BASELINE_LOSSES, BASELINE_REGISTRY, fit_baseline
from dgc_pyro.config import LEGACY_NAMES
from dgc_pyro.data import DATASET_REGISTRY, EVALUATION_SETS, default_counts, load_imbalanced, parse_counts
from dgc_pyro.data.splits import ImbalancedSplit
from dgc_pyro.data.transforms import TRANSFORM_CHOICES, transform_option
from dgc_pyro.experiment import PAPER_GUIDE_28, Recipe, default_recipe, recipe_overrides, train
from dgc_pyro.inference.device import DEVICE_CHOICES, resolve_device
from dgc_pyro.inference.predict import SCORING_RULE_REGISTRY, predict
from dgc_pyro.inference.resume import copy_tree
from dgc_pyro.inference.schedule import LR_SCHEDULES
from dgc_pyro.io import write_json
from dgc_pyro.metrics import expected_calibration_error, format_paired, imbalance_report, paired_difference
from dgc_pyro.reproducibility import seed_everything

#: DGC rows: the objective family of each, and recipe changes on top of the dataset's recipe (for
#: fashion/mnist: label-free q(z | x), logit-adjusted p(y | z), label_weight 1000, Normal(0.3) pixels).
#: ``dgc_wae_mmd_kl`` adds the KL term to the paper's objective (see ``dgc_pyro.inference.objectives``).
#: ``dgc_elbo_paper_guide`` is the paper's structure: q(z | x, y), plain p(y | z), the first ablation's weights.
PAPER_GUIDE = {
    f: getattr(PAPER_GUIDE_28, f) for f in ("label_in_guide", "logit_adjustment", "label_weight", "obs_scale")
}
DGC_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "dgc_elbo": ("elbo", {}),
    "dgc_wae_mmd": ("wae-mmd", {}),
    "dgc_wae_mmd_kl": ("wae-mmd-kl", {}),
    "dgc_elbo_paper_guide": ("elbo", PAPER_GUIDE),
    "dgc_elbo_paper_guide_la": ("elbo", {**PAPER_GUIDE, "logit_adjustment": 1.0}),
    # issue 21, mechanism 1: p(z | y) = N(mu_y, Sigma) scored by Bayes' rule; no label head, so no perturbation step
    "dgc_class_conditional": (
        "elbo",
        {"latent_prior": "class_conditional", "label_in_guide": False, "perturbation_rate": 0.0},
    ),
}
DGC_METHODS = tuple(DGC_VARIANTS)
METHODS = DGC_METHODS + BASELINE_LOSSES
SUMMARY_METRICS = ("acsa", "fmacro", "gmean", "r_mi", "p_ma", "ece", "acc", "val_acsa", "seconds")
TABLE_COLUMNS = (
    ("acsa", "ACSA"),
    ("fmacro", "F_macro"),
    ("gmean", "G_macro"),
    ("r_mi", "R_MI"),
    ("p_ma", "P_MA"),
    ("ece", "ECE"),
)

#: DGC's published results (paper Tables 2-3; DGC_METHOD.md), and the paper's strongest baseline ACSA.
PAPER_DGC: dict[str, dict[str, float]] = {
    "mnist": {"acsa": 0.9480, "fmacro": 0.9474, "gmean": 0.9704, "r_mi": 0.8276, "p_ma": 0.9270},
    "fashion": {"acsa": 0.8364, "fmacro": 0.8314, "gmean": 0.9010, "r_mi": 0.8864, "p_ma": 0.6900},
    "svhn": {"acsa": 0.7493, "fmacro": 0.7535, "gmean": 0.8501, "r_mi": 0.4882, "p_ma": 0.5348},
    "celeba": {"acsa": 0.6755, "fmacro": 0.6454, "gmean": 0.7779, "r_mi": 0.2987, "p_ma": 0.7603},
}
PAPER_BEST_BASELINE: dict[str, tuple[str, float]] = {
    "mnist": ("BayesCNN", 0.9158),
    "fashion": ("mmDGMs", 0.8091),
    "svhn": ("mmDGMs", 0.7220),
    "celeba": ("GAMO", 0.6409),
}

#: Adam's rate for every baseline (DGC's is its recipe's), unless ``--baseline-set lr=...``
BASELINE_LR = 1e-3
#: the baseline settings ``--baseline-set`` may change, with their defaults (tau: the logit-adjusted losses' prior scale)
BASELINE_SETTINGS: dict[str, float] = {"lr": BASELINE_LR, "tau": 1.0}
#: The ``--quick`` preset (CPU): MLP backbone on flattened pixels, few epochs and latent draws.
QUICK = {"epochs": 6, "latent_dim": 32, "num_samples": 4, "val_num_samples": 2}
#: Datasets whose recipe is already CPU-sized: ``--quick`` keeps their epochs. Six epochs of the 464-image digits
#: subset are 90 steps, which leave DGC (the paper's weak label term) at chance; its 60 take seconds.
QUICK_KEEPS_EPOCHS = ("digits",)
METHOD_LABELS = {
    "dgc_elbo": "DGC, ELBO (ours)",
    "dgc_wae_mmd": "DGC, WAE-MMD (ours)",
    "dgc_wae_mmd_kl": "DGC, WAE-MMD + KL (ours)",
    "dgc_elbo_paper_guide": "DGC, ELBO, paper's q(z|x,y) (ours)",
    "dgc_elbo_paper_guide_la": "DGC, ELBO, paper's q(z|x,y) + logit-adjusted p(y|z) (ours)",
    "dgc_class_conditional": "DGC, ELBO, class-conditional p(z|y), Bayes' rule (ours)",
    "ce": "CE",
    "logit_adjusted": "Logit-adjusted CE",
    "balanced_softmax": "Balanced softmax",
    "cb_focal": "CB focal",
    "ldam_drw": "LDAM-DRW",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--dataset", required=True, choices=DATASET_REGISTRY.names())
    p.add_argument("--data-dir", default="data", help="root of the torchvision datasets (ignored for digits)")
    p.add_argument(
        "--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="imbalanced subsets (and training seeds)"
    )
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--quick", action="store_true", help="CPU preset: MLP backbone, few epochs, few latent draws")
    p.add_argument(
        "--counts", type=parse_counts, default=None, help="per-class training counts (default: paper Table 1)"
    )
    p.add_argument("--epochs", type=int, default=None, help="epochs of every method (default: the recipe's)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--num-samples", type=int, default=None, help="latent draws per class when DGC predicts")
    p.add_argument(
        "--rule",
        choices=SCORING_RULE_REGISTRY.names(),
        default=None,
        help="DGC's scoring rule on the evaluation split (default: the model's, mixture for q(z|x,y) and "
        "latent for q(z|x)); the validation scores that pick the epoch always use the model's",
    )
    p.add_argument(
        "--backbone",
        choices=("auto", "conv", "mlp"),
        default="auto",
        help="conv: the preset's image networks; mlp: flattened pixels (default: mlp with --quick)",
    )
    p.add_argument(
        "--preset",
        choices=("small", "paper"),
        default=None,
        help="network preset of DGC and every baseline (default: the recipe's; 'small' with --quick)",
    )
    p.add_argument(
        "--val-num-samples",
        type=int,
        default=None,
        help="latent draws per class when DGC scores its validation split each epoch (default: --num-samples)",
    )
    p.add_argument(
        "--transform",
        choices=TRANSFORM_CHOICES,
        default=None,
        help="random training-time transform of every batch, for DGC and every baseline alike",
    )
    p.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=None,
        help="learning-rate schedule of DGC and every baseline alike (default: the recipe's, constant)",
    )
    p.add_argument(
        "--recipe-set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help="change fields of the DGC recipe (dgc_pyro.experiment.Recipe), e.g. perturbation_rate=0; a DGC "
        "row's own changes win, and the fields the baselines share (epochs, batch_size, preset, "
        "val_fraction, transform, lr_schedule) change them too",
    )
    p.add_argument(
        "--baseline-set",
        nargs="+",
        default=[],
        metavar="FIELD=VALUE",
        help=f"baseline settings for this call ({', '.join(f'{k} (default {v})' for k, v in BASELINE_SETTINGS.items())}); "
        "tau applies to logit_adjusted and balanced_softmax only",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument(
        "--collect",
        action="store_true",
        help="fit nothing: summarise the OUT/runs/*.json that exist (e.g. after per-seed processes)",
    )
    p.add_argument("--resume", action="store_true", help="reuse OUT/runs/*.json written by an earlier call")
    p.add_argument(
        "--collect-from",
        nargs="+",
        default=[],
        metavar="DIR",
        help="with --collect: also read DIR/runs/*.json for the runs OUT lacks (pool seeds of several tables)",
    )
    p.add_argument(
        "--reference",
        choices=METHODS,
        default=None,
        help="the row that the paired comparisons subtract every other method from (default: dgc_elbo)",
    )
    p.add_argument(
        "--evaluate-on",
        choices=EVALUATION_SETS,
        default="test",
        help="score every run on the official test split (default) or on a class-balanced dev set of "
        "training images outside the subset (for recipe choices; never decide on the test split)",
    )
    p.add_argument(
        "--dev-per-class",
        type=int,
        default=1000,
        help="with --evaluate-on dev: images of each class in the dev set (default: 1000)",
    )
    p.add_argument(
        "--also-last",
        action="store_true",
        help="also score each method's last-epoch weights on the evaluation split (run['last_epoch']) and add the "
        "paired last-minus-selected comparison to the table (from the same fits)",
    )
    p.add_argument("--out", required=True, help="output folder")
    return p


def recipe_for(dataset: str, args: argparse.Namespace) -> Recipe:
    """The DGC recipe of ``dataset`` (for ``--preset``'s networks) with the command's overrides (``--quick``,
    ``--epochs``, ``--num-samples``)."""
    recipe = default_recipe(dataset, args.preset)
    changes: dict[str, Any] = {}
    if args.quick:
        changes.update(
            latent_dim=min(recipe.latent_dim, QUICK["latent_dim"]), num_samples=QUICK["num_samples"], preset="small"
        )
        if dataset not in QUICK_KEEPS_EPOCHS:
            changes["epochs"] = min(recipe.epochs, QUICK["epochs"])
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.num_samples is not None:
        changes["num_samples"] = args.num_samples
    if args.preset is not None:
        changes["preset"] = args.preset
    if args.transform is not None:
        changes["transform"] = transform_option(args.transform)
    if args.lr_schedule is not None:
        changes["lr_schedule"] = args.lr_schedule
    try:
        changes.update(recipe_overrides(args.recipe_set))
    except ValueError as err:
        raise SystemExit(f"--recipe-set: {err}") from None
    return dataclasses.replace(recipe, **changes)


def baseline_settings(items: Sequence[str]) -> dict[str, float]:
    """:data:`BASELINE_SETTINGS` with ``FIELD=VALUE`` changes (``--baseline-set``); a bad item is a one-line error."""
    settings = dict(BASELINE_SETTINGS)
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or key not in BASELINE_SETTINGS:
            raise SystemExit(
                f"--baseline-set: {item!r} is not FIELD=VALUE with FIELD one of {sorted(BASELINE_SETTINGS)}"
            )
        try:
            value = float(text)
        except ValueError:
            raise SystemExit(f"--baseline-set: {key} needs a number, got {text!r}") from None
        if not math.isfinite(value) or value < 0 or (key == "lr" and value == 0):
            raise SystemExit(f"--baseline-set: {key} must be {'> 0' if key == 'lr' else '>= 0'}, got {text}")
        settings[key] = value
    return settings


def _flat(split: ImbalancedSplit) -> ImbalancedSplit:
    return dataclasses.replace(
        split,
        x_train=split.x_train.reshape(len(split.x_train), -1),
        x_test=split.x_test.reshape(len(split.x_test), -1),
        input_shape=(int(np.prod(split.input_shape)),),
    )


def _report(split: ImbalancedSplit, proba: torch.Tensor) -> dict[str, float]:
    proba = proba.detach().cpu().float()
    report = imbalance_report(
        split.y_test, proba.argmax(-1), num_classes=split.num_classes, train_counts=split.train_counts
    )
    report["ece"] = expected_calibration_error(split.y_test, proba)
    return report


def method_recipe(method: str, recipe: Recipe) -> Recipe:
    """The recipe of DGC row ``method``: the command's recipe with the row's objective family and changes."""
    family, changes = DGC_VARIANTS[method]
    objective = recipe.objective if recipe.objective.startswith(family) else family
    return dataclasses.replace(recipe, objective=objective, **changes)


def run_dgc(
    method: str,
    split: ImbalancedSplit,
    recipe: Recipe,
    seed: int,
    device: str,
    rule: str | None,
    val_num_samples: int,
    also_last: bool = False,
) -> dict[str, Any]:
    """Fit and evaluate one DGC row of :data:`DGC_VARIANTS` (objective family and recipe changes).

    With ``also_last`` the weights of the last epoch are kept by a callback and scored too (``out["last_epoch"]``).
    """
    recipe = method_recipe(method, recipe)
    built: dict[str, Any] = {}  # the model, for keep_last
    last: dict[str, torch.Tensor] = {}

    def keep_last(epoch: int, record: dict[str, float]) -> None:
        if epoch == recipe.epochs:
            last.update(copy_tree(built["model"].state_dict()))

    trained = train(
        recipe,
        split,
        seed,
        device=device,
        progress=False,
        val_num_samples=val_num_samples,
        on_build=lambda m: built.update(model=m),
        callback=keep_last if also_last else None,
    )
    model, history = trained.model, trained.history
    t1 = time.perf_counter()
    pred = predict(model, split.x_test, recipe.num_samples, rule=rule, balanced=recipe.balanced)
    t2 = time.perf_counter()
    out = _report(split, pred.proba)
    if also_last:
        if history.best_epoch == recipe.epochs:  # the selected weights are the last ones: score them once
            last_proba = pred.proba
        else:
            model.load_state_dict(last)
            model.eval()
            last_proba = predict(model, split.x_test, recipe.num_samples, rule=rule, balanced=recipe.balanced).proba
        out["last_epoch"] = {**_report(split, last_proba), "epoch": recipe.epochs}
    val = [r["val_acsa"] for r in history.epochs if "val_acsa" in r]
    out.update(
        seconds=trained.seconds + t2 - t1,
        fit_seconds=trained.seconds,
        predict_seconds=t2 - t1,
        best_epoch=history.best_epoch,
        val_acsa=max(val) if val else None,
        recipe=recipe.to_dict(),
        rule=pred.rule,
        history=history.epochs,
    )
    return out


def _baseline_knobs(method: str, settings: dict[str, float] | None) -> dict[str, float]:
    """The ``fit_baseline`` keywords of ``settings`` that ``method`` takes (tau only for the logit-adjusted losses)."""
    settings = dict(BASELINE_SETTINGS if settings is None else settings)
    if not BASELINE_REGISTRY.get(method).takes_tau:
        settings.pop("tau")
    return settings


def run_baseline(
    method: str,
    split: ImbalancedSplit,
    recipe: Recipe,
    seed: int,
    device: str,
    also_last: bool = False,
    settings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Fit and evaluate one baseline on the DGC recipe's backbone preset, epochs and batch size.

    With ``also_last`` the last epoch's weights are kept by the same fit and scored too (``out["last_epoch"]``).
    ``settings`` are the ``--baseline-set`` values (:data:`BASELINE_SETTINGS` by default).
    """
    options = recipe.baseline_options()
    knobs = _baseline_knobs(method, settings)
    t0 = time.perf_counter()
    fitted = fit_baseline(
        method,
        split.x_train,
        split.y_train,
        num_classes=split.num_classes,
        **options,
        **knobs,
        device=device,
        seed=seed,
        keep_last_state=also_last,
    )
    t1 = time.perf_counter()
    proba = fitted.predict_proba(split.x_test)
    t2 = time.perf_counter()
    out = _report(split, proba)
    out.update(
        seconds=t2 - t0,
        fit_seconds=t1 - t0,
        predict_seconds=t2 - t1,
        val_acsa=fitted.val_acsa,
        best_epoch=fitted.best_epoch,
        history=fitted.history,
        settings={**options, **knobs},
    )
    if also_last:
        if fitted.best_epoch == options["epochs"]:
            last_proba = proba
        else:
            last_fit = copy.deepcopy(fitted)
            last_fit.module.load_state_dict(fitted.last_state)
            last_proba = last_fit.predict_proba(split.x_test)
        out["last_epoch"] = {**_report(split, last_proba), "epoch": options["epochs"]}
    return out


def summarise(
    runs: dict[str, list[dict[str, Any]]], metrics: Sequence[str] = SUMMARY_METRICS
) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {metric: {"mean", "std"}}}`` over seeds (std with ddof=1; 0 for a single seed); a metric no run
    of a method has is left out of its row."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method, results in runs.items():
        summary[method] = {}
        for metric in metrics:
            values = np.array([r[metric] for r in results if r.get(metric) is not None], dtype=float)
            if len(values) == 0:
                continue
            summary[method][metric] = {
                "mean": float(values.mean()),
                "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            }
    return summary


#: metrics of the paired comparison of the DGC row with every other method
PAIRED_METRICS = ("acsa", "ece")


def paired_comparisons(
    runs: dict[str, list[dict[str, Any]]], reference: str = "dgc_elbo", metrics: Sequence[str] = PAIRED_METRICS
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"<reference> - <method>": {metric: paired_difference cell}}`` over the seeds both methods ran.

    Empty when ``reference`` has no runs. A method that shares no seed with it is left out.
    """
    ref = {int(r["seed"]): r for r in runs.get(reference, [])}
    pairs: dict[str, dict[str, dict[str, Any]]] = {}
    for method, results in runs.items():
        if method == reference:
            continue
        common = sorted(set(ref) & {int(r["seed"]) for r in results})
        if not common:
            continue
        other = {int(r["seed"]): r for r in results}
        pairs[f"{reference} - {method}"] = {
            m: paired_difference([ref[s][m] for s in common], [other[s][m] for s in common]) for m in metrics
        }
    return pairs


def last_epoch_comparisons(
    runs: dict[str, list[dict[str, Any]]], metrics: Sequence[str] = PAIRED_METRICS
) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"<method>: last - selected": {metric: paired_difference cell}}`` for the runs scored with ``--also-last``."""
    pairs: dict[str, dict[str, dict[str, Any]]] = {}
    for method, results in runs.items():
        scored = [r for r in results if "last_epoch" in r]
        if scored:
            pairs[f"{method}: last - selected"] = {
                m: paired_difference([r["last_epoch"][m] for r in scored], [r[m] for r in scored]) for m in metrics
            }
    return pairs


def _pm(cell: dict[str, float] | None) -> str:
    if not cell or cell.get("mean") is None or not math.isfinite(cell["mean"]):
        return "—"
    return f"{cell['mean']:.4f} ± {cell['std']:.4f}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value))


def expected_settings(
    method: str,
    recipe: Recipe,
    backbone: str,
    rule: str | None,
    evaluated_on: str,
    train_counts: Sequence[int] | None,
    baseline: dict[str, float] | None = None,
) -> dict[str, Any]:
    """What a run of ``method`` made by this call records about how it was made (see :func:`check_reused_runs`)."""
    out: dict[str, Any] = {"backbone": backbone, "evaluated_on": evaluated_on}
    if train_counts is not None:
        out["train_counts"] = list(train_counts)
    if method in DGC_METHODS:
        out["recipe"] = _jsonable(method_recipe(method, recipe).to_dict(include_run=False))
        if rule is not None:
            out["rule"] = rule
    else:
        out["settings"] = _jsonable({**recipe.baseline_options(), **_baseline_knobs(method, baseline)})
    return out


def settings_differences(run: dict[str, Any], expected: dict[str, Any], prefix: str = "") -> list[str]:
    """The settings in which a finished ``run`` differs from ``expected``, as ``"key: run value, expected"``.

    A run predating a field has no record of it and is not held against it (the field then had one value), at
    every depth: a recipe field added since the run (``settings.recipe.swag_start``) is skipped, the others compared.
    """
    diffs = []
    for key, want in expected.items():
        got = run.get(key, "test" if key == "evaluated_on" and not prefix else None)
        if got is None:
            continue
        if key == "recipe" and isinstance(got, dict):  # older runs wrote some fields under their old names
            got = {LEGACY_NAMES.get(k, k): v for k, v in got.items()}
        if isinstance(want, dict) and isinstance(got, dict):
            diffs += settings_differences(got, want, f"{prefix}{key}.")
        elif got != want:
            diffs.append(f"{prefix}{key}: {got!r} in the run, {want!r} now")
    return diffs


def check_reused_runs(
    reused: dict[tuple[str, int], tuple[Path, dict[str, Any]]], expected: dict[str, dict[str, Any]]
) -> None:
    """Refuse (before anything is written) to pool a finished run made with other settings than this call's.

    ``reused`` maps ``(method, seed)`` to the file and the run this call would reuse, ``expected`` each method to
    :func:`expected_settings`. Averaging runs of different backbones, recipes or evaluation sets into one row
    would make the table's note, which describes this call's settings, false.
    """
    for (method, _), (path, run) in reused.items():
        diffs = settings_differences(run, expected[method])
        if diffs:
            raise SystemExit(
                f"{path} was made with other settings than this command's ({'; '.join(diffs[:4])}"
                f"{'; ...' if len(diffs) > 4 else ''}); runs with different settings cannot share "
                "a table"
            )


def render_table(
    dataset: str,
    summary: dict[str, dict[str, dict[str, float]]],
    seeds: Sequence[int],
    note: str = "",
    runs_per_method: dict[str, int] | None = None,
) -> str:
    """Markdown table in the shape of the paper's Tables 2-3, with the published DGC row beside ours.

    ``seeds`` are the seeds the table pools; a method with fewer runs (``runs_per_method``) says how many.
    """
    head = "| Method | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | Wall time (s) |"
    lines = [f"### {dataset}: mean ± std over seeds {', '.join(map(str, seeds))}", ""]
    if note:
        lines += [note, ""]
    lines += [head, "|" + "---|" * (len(TABLE_COLUMNS) + 2)]
    if dataset in PAPER_DGC:
        paper = PAPER_DGC[dataset]
        cells = [f"{paper[k]:.4f}" if k in paper else "—" for k, _ in TABLE_COLUMNS]
        lines.append("| DGC (paper, published) | " + " | ".join(cells) + " | — |")
    for method, metrics in summary.items():
        cells = [_pm(metrics.get(k)) for k, _ in TABLE_COLUMNS]
        t = metrics.get("seconds")
        wall = f"{t['mean']:.0f}" if t else "—"
        n = (runs_per_method or {}).get(method, len(seeds))
        label = METHOD_LABELS.get(method, method) + (f" ({n} of {len(seeds)} seeds)" if n < len(seeds) else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {wall} |")
    if dataset in PAPER_BEST_BASELINE:
        name, acsa = PAPER_BEST_BASELINE[dataset]
        lines += ["", f"Paper's strongest baseline on {dataset}: {name}, ACSA {acsa:.4f}."]
    return "\n".join(lines) + "\n"


def _run_path(out: Path, args: argparse.Namespace, method: str, seed: int) -> Path:
    """Where the run of ``method`` on ``seed`` is (OUT/runs, else with --collect the first --collect-from
    folder that has it), or would be written (OUT/runs)."""
    name = f"{method}_seed{seed}.json"
    path = out / "runs" / name
    if args.collect and not path.is_file():
        path = next((p for p in (Path(d) / "runs" / name for d in args.collect_from) if p.is_file()), path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.epochs is not None and args.epochs < 1:
        raise SystemExit("--epochs must be at least 1")
    if args.reference is not None and args.reference not in args.methods:
        raise SystemExit(f"--reference {args.reference} is not among --methods")
    reference = args.reference or "dgc_elbo"
    if args.dev_per_class < 1:
        raise SystemExit("--dev-per-class must be at least 1")
    if args.dev_per_class != 1000 and args.evaluate_on != "dev":
        raise SystemExit("--dev-per-class sizes the dev set; it needs --evaluate-on dev")
    evaluated_on = args.evaluate_on if args.evaluate_on == "test" else f"dev:{args.dev_per_class}"
    if args.collect_from and not args.collect:
        raise SystemExit("--collect-from pools finished runs; it needs --collect")
    missing = [d for d in args.collect_from if not (Path(d) / "runs").is_dir()]
    if missing:
        raise SystemExit(f"--collect-from: no runs/ folder in {', '.join(missing)}")
    device = str(resolve_device(args.device))
    out = Path(args.out)
    recipe = recipe_for(args.dataset, args)
    baseline = baseline_settings(args.baseline_set)
    backbone = args.backbone if args.backbone != "auto" else ("mlp" if args.quick else "conv")
    if recipe.transform is not None and backbone == "mlp":
        raise SystemExit(f"--transform {recipe.transform} shifts image pixels; it needs --backbone conv")
    started = time.perf_counter()
    config = {
        "argv": list(sys.argv if argv is None else argv),
        "dataset": args.dataset,
        "seeds": args.seeds,
        "methods": args.methods,
        "quick": args.quick,
        "backbone": backbone,
        "rule": args.rule,
        "device": device,
        "recipe": recipe.to_dict(),
        "baseline_settings": baseline,
        "counts": args.counts,
        "evaluated_on": evaluated_on,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    # The finished runs this call pools, read once and checked before anything is written.
    reused: dict[tuple[str, int], tuple[Path, dict[str, Any]]] = {}
    if args.resume or args.collect:
        reused = {
            (m, s): (p, json.loads(p.read_text()))
            for m in args.methods
            for s in args.seeds
            if (p := _run_path(out, args, m, s)).is_file()
        }
        counts = args.counts or default_counts(args.dataset)
        expected = {
            m: expected_settings(m, recipe, backbone, args.rule, evaluated_on, counts, baseline) for m in args.methods
        }
        check_reused_runs(reused, expected)
    write_json(out / "config.json", config)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    for seed in args.seeds:
        split = None
        for method in args.methods:
            path = _run_path(out, args, method, seed)
            if (method, seed) in reused:
                runs[method].append(reused[method, seed][1])
                continue
            if args.collect:
                print(f"seed {seed} {method}: no {path}, left out", flush=True)
                continue
            if split is None:
                split = load_imbalanced(
                    args.dataset,
                    args.data_dir,
                    counts=args.counts,
                    seed=seed,
                    evaluate_on=args.evaluate_on,
                    dev_per_class=args.dev_per_class,
                )
                if backbone == "mlp":
                    split = _flat(split)
            seed_everything(seed)
            if method in DGC_METHODS:
                val_s = args.val_num_samples or (QUICK["val_num_samples"] if args.quick else recipe.num_samples)
                result = run_dgc(method, split, recipe, seed, device, args.rule, val_s, also_last=args.also_last)
            else:
                result = run_baseline(method, split, recipe, seed, device, also_last=args.also_last, settings=baseline)
            result.update(
                method=method,
                seed=seed,
                dataset=args.dataset,
                backbone=backbone,
                train_counts=split.train_counts.tolist(),
                test_size=len(split.y_test),
                evaluated_on=evaluated_on,
            )
            write_json(path, result)
            runs[method].append(result)
            print(
                f"seed {seed} {method:>16}: acsa {result['acsa']:.4f} fmacro {result['fmacro']:.4f} "
                f"ece {result['ece']:.4f} ({result['seconds']:.0f} s)",
                flush=True,
            )
    runs = {m: r for m, r in runs.items() if r}
    summary = summarise(runs)
    write_json(out / "summary.json", summary)
    note = (
        f"Backbone: {backbone} ({recipe.preset} preset){' — quick CPU preset' if args.quick else ''}; "
        f"DGC: {recipe.epochs} epochs, lr {recipe.lr}, {recipe.likelihood} likelihood (σ={recipe.obs_scale}), "
        f"label_weight {recipe.label_weight}, perturbation r={recipe.perturbation_rate}, rule {args.rule or 'the model default'}, "
        f"{recipe.num_samples} draws/class; training transform {recipe.transform or 'none'}, "
        f"{recipe.lr_schedule} learning rate (every method); "
        f"weights of {'the epoch with the best validation ACSA' if recipe.select_best else 'the last epoch'} "
        "(every method); "
        + (
            "scored on the official test split; "
            if args.evaluate_on == "test"
            else f"scored on a dev set of {args.dev_per_class} unused training images a class, NOT the test split; "
        )
        + (
            "collected from per-seed runs."
            if args.collect
            else f"total wall time {time.perf_counter() - started:.0f} s."
        )
    )
    from dgc_pyro.io import atomic_write_text

    pooled = sorted({int(r["seed"]) for results in runs.values() for r in results})
    table = render_table(args.dataset, summary, pooled, note, {m: len(r) for m, r in runs.items()})
    pairs = paired_comparisons(runs, reference=reference)
    write_json(out / "paired.json", pairs)
    if pairs:
        table += (
            f"\nPaired over seeds ({METHOD_LABELS.get(reference, reference)} minus each method; positive ACSA "
            "and negative ECE favour it):\n\n" + format_paired(pairs)
        )
    last_pairs = last_epoch_comparisons(runs)
    if last_pairs:
        write_json(out / "paired_last_epoch.json", last_pairs)
        table += (
            f"\nLast epoch minus the epoch selected on validation, paired over seeds ({args.evaluate_on} split):\n\n"
            + format_paired(last_pairs)
        )
    atomic_write_text(out / "table.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
