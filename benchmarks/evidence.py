"""The evidence table (issue 17): what DGC's generative part buys, every method under one protocol.

Two phases, both resumable (one JSON per run; a re-run skips the runs that are finished, and refuses to pool a
finished run made with other settings):

    # 1. tune: every method's grid of learning rate (and tau) on a dev set of unused training images; writes
    #    OUT/plan.json (the selected settings and the matched baselines' epochs)
    python benchmarks/evidence.py --phase tune --data-dir ../shared/data --seeds 31 32 --out benchmarks/results/evidence
    # 2. test: the planned settings on fresh seeds; each run touches the test split once
    python benchmarks/evidence.py --phase test --data-dir ../shared/data --seeds 51 52 53 54 55 --ood-per-set 2000 \
        --out benchmarks/results/evidence
    # the smoke mode of the tests (digits, one epoch, a two-point grid; seconds)
    python benchmarks/evidence.py --phase tune --smoke --seeds 1 --out /tmp/ev && python benchmarks/evidence.py --phase test --smoke --seeds 2 --out /tmp/ev

``--ood-per-set 2000`` bounds the OOD part of the evaluation (2,000 images a set, scored against the first 2,000
test images; the other metrics use the whole test split): the ``mixture`` rule of ``dgc_paper_guide`` scores every
class hypothesis through the decoder, and is the slowest part of a test run.

Per-seed processes may share OUT (``--methods``/``--seeds`` pick the runs); ``--collect`` fits nothing and only
summarises what exists. ``--checkpoint-dir DIR`` makes a DGC fit itself resumable: its training state is written
after every epoch and a re-run continues from it, so a killed hours-long fit (``dgc_paper_iwae_cf``'s) loses an
epoch rather than the fit. The plan pools the tune seeds of the call that completes it, so split the tune phase by
``--methods`` (each with every tune seed), or end it with ``--phase tune --collect`` over all of them.

Protocol (every method alike): the "small" conv networks, shift-flip training transform, cosine learning rate,
``--epochs`` (30) epochs, the last epoch's weights (the 10% validation split is still carved, as in
paper_table.py). Rows:

* ``dgc_elbo``: the default recipe (label-free q(z | x), logit-adjusted p(y | z) with tau, label weight 1000,
  Normal(0.3) pixels, closed-form-KL ELBO), scored with the ``latent`` rule;
* ``vib``: the same without the ``x`` site (``observe_x=False``): a variational information bottleneck;
* ``dgc_paper_guide``: the paper's structure, q(z | x, y) and plain p(y | z), scored with its ``mixture`` rule;
* ``ce``, ``logit_adjusted``, ``balanced_softmax``: the baselines on the same encoder body;
* ``logit_adjusted_matched``, ``balanced_softmax_matched``: the tuned baseline given DGC's wall time through more
  epochs, ``round(epochs * dgc_elbo's mean fit time / the baseline's)`` over the tune phase's runs (in the plan).

Tuning: ``TUNING_GRID`` (lr x tau; ``ce`` and ``dgc_paper_guide``, which have no tau, get the lr values only),
selected by the mean dev ACSA over the tune seeds. Test metrics per run: the imbalance metrics; ECE, NLL and
Brier raw and after a temperature fitted on the dev set (``dgc_pyro.calibration``; ``*_ts``); AURC and accuracy
at 80%/90% coverage for the max-probability score (``aurc``, ``acc_cov80``, ``acc_cov90``) and the entropy and
mutual-information scores (``aurc_entropy``, ``aurc_mi``); OOD AUROC and FPR95 on ``dgc_pyro.data.ood`` sets
built from the test images, for the max-probability score of every method (``ood_auroc``, the mean over sets,
``ood_auroc_<set>``, ``fpr95*``) and each method's other scores (``ood_auroc_by_<score>``: entropy, mi; energy,
-logsumexp of the logits, for the baselines; for DGC the density score -log p(x) and its typicality
|log p(x) - the dev set's mean|, when ``predict`` gives ``Prediction.log_density``); ``ood_auroc_own`` is each
row's own score fixed in advance (:data:`OWN_SCORE`: DGC's density typicality, the baselines' energy).

Writes (test phase) ``OUT/runs/<method>_seed<s>.json``, ``OUT/summary.json``
(``{method: {metric: {"mean", "std"}}, "n_seeds": n}``), ``OUT/paired.json`` (dgc_elbo minus each method,
95% intervals) and ``OUT/table.md``; (tune phase) ``OUT/tune/<method>_<config>_seed<s>.json``,
``OUT/tune/summary.json`` and ``OUT/plan.json``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import importlib.util
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.baselines import FittedBaseline, fit_baseline
from dgc_pyro.calibration import apply_temperature, temperature_scale
from dgc_pyro.config import LEGACY_NAMES, config_fields
from dgc_pyro.data import default_counts, load_imbalanced, parse_counts
from dgc_pyro.data.ood import OOD_SETS, ood_sets
from dgc_pyro.data.splits import ImbalancedSplit
from dgc_pyro.experiment import Recipe, default_recipe, train
from dgc_pyro.inference.callbacks import Checkpointing, TrainingInterrupted
from dgc_pyro.inference.device import DEVICE_CHOICES, resolve_device
from dgc_pyro.inference.predict import Prediction, predict
from dgc_pyro.inference.swag import SwagCollector, SwagHead
from dgc_pyro.io import CheckpointError, atomic_write_text, write_json
from dgc_pyro.metrics import (
    accuracy_at_coverage,
    aurc,
    brier_score,
    expected_calibration_error,
    format_paired,
    fpr_at_tpr,
    imbalance_report,
    negative_log_likelihood,
    ood_auroc,
)
from dgc_pyro.models.dgc import DGC
from dgc_pyro.ood_detector import logit_scores
from dgc_pyro.reproducibility import seed_everything


def _sibling(name: str) -> Any:
    """``benchmarks/<name>.py`` as a module (the scripts are not a package), to reuse its functions; the name is
    the one ``tests/fixtures.load_benchmark`` gives it, so a test session imports the script once."""
    module_name = f"dgc_benchmark_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, Path(__file__).resolve().parent / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # before executing, as load_benchmark does (dataclasses resolve it)
    spec.loader.exec_module(module)
    return module


paper_table = _sibling("paper_table")

DATASETS = ("fashion", "mnist", "digits")
DGC_ROWS = ("dgc_elbo", "vib", "dgc_paper_guide")
BASELINE_ROWS = ("ce", "logit_adjusted", "balanced_softmax")
#: matched row -> the tuned baseline it lengthens
MATCHED = {"logit_adjusted_matched": "logit_adjusted", "balanced_softmax_matched": "balanced_softmax"}
#: issue 21: DGC variants, each one mechanism on top of a tuned DGC row ("base") whose lr and tau it takes from the
#: plan, with recipe "changes" and, for mechanism 5, the options of a SWAG posterior of the label head. The settings
#: are the papers' defaults, fixed before the run (RESULTS.md section 3), not tuned: ``--phase register`` writes
#: them into a variants plan, which is what the test phase reads.
VARIANTS: dict[str, dict[str, Any]] = {
    # 1: p(z | y) = N(mu_y, Sigma), Bayes' rule; no label head, so no perturbation step
    "dgc_class_conditional": {
        "base": "dgc_elbo",
        "changes": {"latent_prior": "class_conditional", "perturbation_rate": 0.0},
    },
    # 2: deferred re-balancing, the perturbation step only in the last 30% of the epochs (DRW) ...
    "dgc_drw": {"base": "dgc_elbo", "changes": {"perturbation_start": 0.7}},
    # ... or a classifier re-training stage on frozen latents in the last 20% (cRT)
    "dgc_crt": {"base": "dgc_elbo", "changes": {"retrain_head_epochs": 0.2}},  # a share, in epochs at registration
    # 3: the perturbation step's tail latents re-drawn with the head classes' spread
    "dgc_head_noise": {"base": "dgc_elbo", "changes": {"perturbation_noise": "head"}},
    # 4: the paper-faithful model: q(z | x, y), the IWAE bound with counterfactual labels, mixture scoring
    "dgc_paper_iwae_cf": {"base": "dgc_paper_guide", "changes": {"objective": "iwae-cf"}},
    # 5: the class posterior averaged over SWAG draws of the head, from the same fit as dgc_elbo
    "dgc_swag": {"base": "dgc_elbo", "changes": {}, "swag": {"start": 0.7, "head_samples": 10}},
}
CORE_METHODS = DGC_ROWS + BASELINE_ROWS + tuple(MATCHED)
METHODS = CORE_METHODS + tuple(VARIANTS)
TUNED = DGC_ROWS + BASELINE_ROWS
#: rows whose tau is tuned: DGC's is its recipe's logit_adjustment, the baselines' the log-prior scale
HAS_TAU = ("dgc_elbo", "vib", "logit_adjusted", "balanced_softmax")
REFERENCE = "dgc_elbo"
#: the tuning budget: every row gets these learning rates, the rows with a tau every (lr, tau) pair
TUNING_GRID: dict[str, tuple[float, ...]] = {"lr": (3e-4, 1e-3, 3e-3), "tau": (0.5, 1.0, 1.5)}
SMOKE_GRID: dict[str, tuple[float, ...]] = {"lr": (3e-3,), "tau": (0.5, 1.0)}
#: the final protocol (RESULTS.md): every method alike
PROTOCOL: dict[str, Any] = {
    "preset": "small",
    "transform": "shift-flip",
    "lr_schedule": "cosine",
    "select_best": False,
    "epochs": 30,
}
#: latent draws per class of DGC's per-epoch validation scores (the record of the history; weights are the last)
VAL_NUM_SAMPLES = 2
SMOKE = {
    "dataset": "digits",
    "counts": (12, 10, 8, 6, 5, 4, 4, 3, 3, 3),
    "epochs": 1,
    "latent_dim": 8,
    "num_samples": 2,
    "dev_per_class": 5,
    "ood_per_set": 50,
    "max_matched_epochs": 3,
}
DEFAULT_SEEDS = {"tune": (31, 32), "test": (51, 52, 53, 54, 55)}
COVERAGES = (0.8, 0.9)
PRIMARY_SCORE = "maxprob"  # the OOD and reject score every method has
#: each row's own OOD score, fixed before any run (``ood_auroc_own``): for DGC the typicality of its density,
#: |log p(x) - the dev set's mean| (the package's OOD flag's default; the raw density ranks uniform noise as *more*
#: likely than the training images, Nalisnick et al. 2019's failure, already in the digits smoke run); the max
#: probability for ``vib``, which models no x; the baselines' energy
OWN_SCORE = {"dgc_elbo": "typicality", "dgc_paper_guide": "typicality", "vib": PRIMARY_SCORE}
SUMMARY_METRICS = (
    "acsa",
    "fmacro",
    "gmean",
    "r_mi",
    "p_ma",
    "acc",
    "ece",
    "nll",
    "brier",
    "temperature",
    "ece_ts",
    "nll_ts",
    "brier_ts",
    "aurc",
    "acc_cov80",
    "acc_cov90",
    "aurc_entropy",
    "acc_cov80_entropy",
    "acc_cov90_entropy",
    "aurc_mi",
    "acc_cov80_mi",
    "acc_cov90_mi",
    "ood_auroc",
    *(f"ood_auroc_{s}" for s in OOD_SETS),
    "fpr95",
    *(f"fpr95_{s}" for s in OOD_SETS),
    "ood_auroc_by_entropy",
    "ood_auroc_by_mi",
    "ood_auroc_by_energy",
    "ood_auroc_by_density",
    "ood_auroc_by_typicality",
    "ood_auroc_own",
    "dev_acsa",
    "epochs",
    "fit_seconds",
    "seconds",
)
TABLE_COLUMNS = (
    ("acsa", "ACSA"),
    ("fmacro", "F_macro"),
    ("gmean", "G_macro"),
    ("r_mi", "R_MI"),
    ("ece", "ECE"),
    ("ece_ts", "ECE (TS)"),
    ("nll_ts", "NLL (TS)"),
    ("aurc", "AURC"),
    ("ood_auroc", "OOD AUROC"),
)
PAIRED_METRICS = ("acsa", "fmacro", "ece", "ece_ts", "nll_ts", "aurc", "ood_auroc", "ood_auroc_own")
#: issue 21's target compares each DGC row with the compute-matched baselines on these (R_MI too)
VARIANT_PAIRED_METRICS = (*PAIRED_METRICS, "r_mi", "dev_acsa")
METHOD_LABELS = {
    "dgc_elbo": "DGC, default recipe (label-free q(z|x), tempered label likelihood)",
    "vib": "VIB control (the default recipe without p(x|z))",
    "dgc_paper_guide": "DGC, paper's q(z|x,y), mixture rule",
    "ce": "CE",
    "logit_adjusted": "Logit-adjusted CE",
    "balanced_softmax": "Balanced softmax",
    "logit_adjusted_matched": "Logit-adjusted CE, DGC's wall time",
    "balanced_softmax_matched": "Balanced softmax, DGC's wall time",
    "dgc_class_conditional": "DGC, class-conditional prior p(z|y), Bayes' rule (mechanism 1)",
    "dgc_drw": "DGC, perturbation step deferred to the last 30% (DRW, mechanism 2)",
    "dgc_crt": "DGC, head re-trained in the last 6 epochs (cRT, mechanism 2)",
    "dgc_head_noise": "DGC, tail latents re-drawn with the head classes' spread (mechanism 3)",
    "dgc_paper_iwae_cf": "DGC, paper's q(z|x,y), IWAE + counterfactual labels, mixture rule (mechanism 4)",
    "dgc_swag": "DGC, class posterior averaged over SWAG draws of the head (mechanism 5)",
}


# ----------------------------------------------------------------------------- settings of a row
def grid_of(method: str, grid: dict[str, tuple[float, ...]]) -> list[dict[str, float]]:
    """The (lr, tau) configurations ``method`` is tuned over (tau fixed at the row's own without one)."""
    taus = grid["tau"] if method in HAS_TAU else (None,)
    return [{"lr": float(lr), **({} if tau is None else {"tau": float(tau)})} for lr in grid["lr"] for tau in taus]


def config_key(config: dict[str, float]) -> str:
    """A file-name key of one configuration, e.g. ``lr0.001_tau1``."""
    return "_".join(f"{k}{config[k]:g}" for k in ("lr", "tau") if k in config)


def base_recipe(args: argparse.Namespace) -> Recipe:
    """The default recipe (fashion's, for every dataset: the row the issue prices) under the protocol."""
    changes: dict[str, Any] = {k: v for k, v in PROTOCOL.items()}
    changes["epochs"] = args.epochs
    if args.smoke:
        changes.update(latent_dim=SMOKE["latent_dim"], num_samples=SMOKE["num_samples"])
    return dataclasses.replace(default_recipe("fashion"), **changes)


def dgc_recipe(method: str, recipe: Recipe, config: dict[str, float], variant: dict[str, Any] | None = None) -> Recipe:
    """The recipe of DGC row ``method`` with ``config``'s learning rate (and tau, its logit adjustment); a
    ``variant`` (:data:`VARIANTS`) is its base row's recipe with the variant's changes."""
    if variant is not None:
        return dataclasses.replace(dgc_recipe(variant["base"], recipe, config), **variant["changes"])
    if method == "dgc_paper_guide":
        r = paper_table.method_recipe("dgc_elbo_paper_guide", recipe)
    else:
        r = paper_table.method_recipe("dgc_elbo", recipe)
        if method == "vib":
            r = dataclasses.replace(r, observe_x=False)
    changes: dict[str, Any] = {"lr": config["lr"]}
    if "tau" in config:
        changes["logit_adjustment"] = config["tau"]
    return dataclasses.replace(r, **changes)


def run_settings(
    method: str, recipe: Recipe, config: dict[str, float], epochs: int, variant: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What a run records about how it was made (compared on resume): the DGC recipe (and a variant's SWAG
    options) or the baseline options."""
    recipe = dataclasses.replace(recipe, epochs=epochs)
    if method in DGC_ROWS or variant is not None:
        swag = {"swag": variant["swag"]} if variant and variant.get("swag") else {}
        return paper_table._jsonable(
            {"recipe": dgc_recipe(method, recipe, config, variant).to_dict(include_run=False), **swag}
        )
    return paper_table._jsonable(
        {
            "baseline": MATCHED.get(method, method),
            **recipe.baseline_options(),
            "lr": config["lr"],
            "tau": config.get("tau", 1.0),
        }
    )


# ----------------------------------------------------------------------------- fitting and scoring
@dataclasses.dataclass
class Fitted:
    """A fitted row: a DGC (with its recipe) or a baseline, and its fit time."""

    method: str
    fit_seconds: float
    model: DGC | None = None
    recipe: Recipe | None = None
    baseline: FittedBaseline | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    swag: SwagHead | None = None
    head_samples: int | None = None
    #: the epoch of the checkpoint a resumed DGC fit started from (then ``fit_seconds`` counts only the rest)
    resumed_from: int | None = None


def fit_row(
    method: str,
    split: ImbalancedSplit,
    settings: dict[str, Any],
    seed: int,
    device: str,
    checkpoint: Path | None = None,
) -> Fitted:
    """Fit row ``method`` on ``split``'s training images with ``settings`` (:func:`run_settings`).

    With a ``checkpoint`` folder a DGC fit writes its training state there after every epoch and continues from the
    state it finds there (a killed run loses one epoch, not the fit; bit-identical to an uninterrupted fit on CPU).
    The baselines' fits, minutes long, have no checkpoints."""
    seed_everything(seed)
    t0 = time.perf_counter()
    if "recipe" in settings:
        fields = {f.name for f in config_fields()} | set(LEGACY_NAMES)
        recipe = Recipe.from_flat({k: v for k, v in settings["recipe"].items() if k in fields})
        swag = settings.get("swag")
        collector = SwagCollector(swag["start"]) if swag else None  # stateful: its moments are checkpointed too
        callbacks = tuple(c for c in (collector, checkpoint and Checkpointing(checkpoint)) if c)
        try:
            trained = train(
                recipe,
                split,
                seed,
                device=device,
                progress=False,
                val_num_samples=VAL_NUM_SAMPLES,
                callbacks=callbacks,
                resume=True if checkpoint else None,
            )
        except CheckpointError as e:
            raise SystemExit(f"{checkpoint}: {e}; delete the folder to fit {method} afresh") from None
        except TrainingInterrupted as e:  # Ctrl-C / SIGTERM of a checkpointed fit: say how to go on, no traceback
            raise SystemExit(
                f"{method} seed {seed}: {e} after epoch {e.epoch}; {checkpoint} holds it, the same command continues"
            ) from None
        return Fitted(
            method,
            time.perf_counter() - t0,
            model=trained.model,
            recipe=recipe,
            history=trained.history.epochs,
            swag=collector.head if collector else None,
            head_samples=swag["head_samples"] if swag else None,
            resumed_from=trained.history.resumed_from,
        )
    options = {k: v for k, v in settings.items() if k != "baseline"}
    fitted = fit_baseline(
        settings["baseline"],
        split.x_train,
        split.y_train,
        num_classes=split.num_classes,
        **options,
        device=device,
        seed=seed,
    )
    return Fitted(method, time.perf_counter() - t0, baseline=fitted, history=fitted.history)


def _checkpoint_folder(args: argparse.Namespace, run_name: str) -> Path | None:
    """Where the fit of one run keeps its training state (``--checkpoint-dir``; None without it)."""
    return None if args.checkpoint_dir is None else Path(args.checkpoint_dir) / run_name


def _resumed(fitted: Fitted) -> dict[str, int]:
    """The run's record of a resumed fit (nothing for a fit made in one go, so older runs compare alike)."""
    return {} if fitted.resumed_from is None else {"resumed_from": fitted.resumed_from}


def _drop_checkpoint(folder: Path | None) -> None:
    """Remove a run's checkpoint once its JSON is written: the run is the record, the weights are not kept."""
    if folder is not None:
        shutil.rmtree(folder, ignore_errors=True)


def _log_density(pred: Prediction) -> torch.Tensor | None:
    """DGC's density score, a lower bound on log p(x) per example (nats), where ``predict`` provides it."""
    value = getattr(pred, "log_density", None)
    return None if value is None else torch.as_tensor(value).detach().cpu().double()


def scored(fitted: Fitted, x: torch.Tensor, seed: int) -> dict[str, Any]:
    """``proba`` (N, C), ``log_scores`` (logits or log-probabilities, for the temperature) and the outlier
    scores of ``fitted`` on ``x`` (larger = less certain / more out of distribution)."""
    if fitted.model is not None:
        seed_everything(seed)  # the latent draws
        # The density score (log p(x)) needs the x site, which the vib row lacks.
        pred = predict(
            fitted.model,
            x,
            fitted.recipe.num_samples,
            balanced=fitted.recipe.balanced,
            density=fitted.model.observe_x,
            swag=fitted.swag,
            head_samples=fitted.head_samples,
            head_seed=seed,
        )
        proba = pred.proba.detach().cpu().double()
        out: dict[str, Any] = {
            "proba": proba,
            "log_scores": proba.clamp_min(1e-45).log(),
            "scores": {
                "maxprob": 1.0 - proba.max(1).values,
                "entropy": pred.entropy.detach().cpu().double(),
                "mi": pred.mutual_information.detach().cpu().double(),
            },
        }
        density = _log_density(pred)
        if density is not None:
            out["log_density"] = density
            out["scores"]["density"] = -density
        return out
    logits = fitted.baseline.logits(x).double()
    proba = torch.softmax(logits, -1)
    entropy = -(proba * proba.clamp_min(1e-300).log()).sum(-1)
    base = logit_scores(logits)
    return {
        "proba": proba,
        "log_scores": logits,
        "scores": {"maxprob": base["max_softmax"], "entropy": entropy, "energy": base["energy"]},
    }


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def evaluate_run(
    fitted: Fitted, split: ImbalancedSplit, dev_x: torch.Tensor, dev_y: torch.Tensor, seed: int, ood_per_set: int | None
) -> dict[str, Any]:
    """Every test metric of one fitted row: imbalance, calibration raw and temperature-scaled (T fitted on the dev
    set), selective prediction and OOD detection (sets built from the test images)."""
    t0 = time.perf_counter()
    dev = scored(fitted, dev_x, seed)
    test = scored(fitted, split.x_test, seed)
    y = split.y_test
    out: dict[str, Any] = imbalance_report(
        y, test["proba"].argmax(-1), num_classes=split.num_classes, train_counts=split.train_counts
    )
    temperature = temperature_scale(dev["log_scores"], dev_y)
    calibrated = apply_temperature(test["log_scores"], temperature).double()
    for suffix, p in (("", test["proba"]), ("_ts", calibrated)):
        out[f"ece{suffix}"] = expected_calibration_error(y, p)
        out[f"nll{suffix}"] = negative_log_likelihood(y, p)
        out[f"brier{suffix}"] = brier_score(y, p)
    out["temperature"] = temperature
    # the dev set's ACSA: what the best variant is chosen by (issue 21), never the test split's
    out["dev_acsa"] = imbalance_report(
        dev_y, dev["proba"].argmax(-1), num_classes=split.num_classes, train_counts=split.train_counts
    )["acsa"]
    correct = _np(test["proba"].argmax(-1) == y)
    for score in ("maxprob", "entropy", "mi"):
        if score not in test["scores"]:
            continue
        suffix = "" if score == PRIMARY_SCORE else f"_{score}"
        unc = _np(test["scores"][score])
        out[f"aurc{suffix}"] = aurc(correct, unc)
        for c in COVERAGES:
            out[f"acc_cov{round(100 * c)}{suffix}"] = accuracy_at_coverage(correct, unc, c)
    if "log_density" in dev:  # typicality: distance of log p(x) from its typical (dev-set) value
        typical = float(dev["log_density"].mean())
        test["scores"]["typicality"] = (test["log_density"] - typical).abs()
    ood: dict[str, dict[str, dict[str, float]]] = {}
    images = split.x_test if ood_per_set is None else split.x_test[:ood_per_set]
    for name, x_out in ood_sets(images, seed=seed).items():
        if ood_per_set is not None:
            x_out = x_out[:ood_per_set]
        s_out = scored(fitted, x_out, seed)
        if "typicality" in test["scores"]:
            s_out["scores"]["typicality"] = (s_out["log_density"] - typical).abs()
        for score, s_in in test["scores"].items():
            s_in = s_in if ood_per_set is None else s_in[:ood_per_set]
            ood.setdefault(score, {})[name] = {
                "auroc": ood_auroc(_np(s_in), _np(s_out["scores"][score])),
                "fpr95": fpr_at_tpr(_np(s_in), _np(s_out["scores"][score])),
            }
    out["ood"] = ood
    for name, cell in ood[PRIMARY_SCORE].items():
        out[f"ood_auroc_{name}"], out[f"fpr95_{name}"] = cell["auroc"], cell["fpr95"]
    out["ood_auroc"] = float(np.mean([c["auroc"] for c in ood[PRIMARY_SCORE].values()]))
    out["fpr95"] = float(np.mean([c["fpr95"] for c in ood[PRIMARY_SCORE].values()]))
    for score, cells in ood.items():
        if score != PRIMARY_SCORE:
            out[f"ood_auroc_by_{score}"] = float(np.mean([c["auroc"] for c in cells.values()]))
    own = OWN_SCORE.get(fitted.method, "energy")
    out["ood_own_score"] = own if own in ood else PRIMARY_SCORE
    out["ood_auroc_own"] = float(np.mean([c["auroc"] for c in ood[out["ood_own_score"]].values()]))
    out["evaluate_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- the two phases
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--phase",
        required=True,
        choices=("tune", "register", "test"),
        help="tune: the dev-set grid (and, with --write-plan, the plan); register: a variants plan in --out, the "
        "plan --from names plus issue 21's DGC variants (--methods: which; default all); test: the fresh seeds",
    )
    p.add_argument(
        "--from",
        dest="base_plan",
        default=None,
        metavar="PLAN",
        help="register phase: the registered plan.json whose tuned settings the variants and the other rows take",
    )
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: fashion (digits with --smoke)")
    p.add_argument("--data-dir", default="data", help="root of the torchvision datasets (ignored for digits)")
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=None,
        help=f"imbalanced subsets and training seeds (default: tune {list(DEFAULT_SEEDS['tune'])}, "
        f"test {list(DEFAULT_SEEDS['test'])}; test seeds must be fresh)",
    )
    p.add_argument(
        "--methods",
        nargs="+",
        choices=METHODS,
        default=None,
        help="rows to run (default: every row of the phase; the tune phase tunes the rows without '_matched')",
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"epochs of every row (default: {PROTOCOL['epochs']}, 1 with --smoke; the test phase takes the plan's)",
    )
    p.add_argument(
        "--grid-lr",
        type=float,
        nargs="+",
        default=None,
        metavar="LR",
        help=f"tune phase: the learning rates of the grid (default: {list(TUNING_GRID['lr'])})",
    )
    p.add_argument(
        "--grid-tau",
        type=float,
        nargs="+",
        default=None,
        metavar="TAU",
        help=f"tune phase: the taus of the grid (default: {list(TUNING_GRID['tau'])})",
    )
    p.add_argument(
        "--counts", type=parse_counts, default=None, help="per-class training counts (default: paper Table 1)"
    )
    p.add_argument("--dev-per-class", type=int, default=None, help="images a class in the dev set (default: 1000)")
    p.add_argument(
        "--ood-per-set",
        type=int,
        default=None,
        help="images of each OOD set and of the in-distribution side of the OOD scores (default: all)",
    )
    p.add_argument(
        "--smoke",
        action="store_true",
        help="seconds-long end-to-end check: digits, one epoch, a two-point grid, tiny networks",
    )
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    p.add_argument("--collect", action="store_true", help="fit nothing: summarise the finished runs")
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="DGC fits write their training state into a folder per run here after every epoch, and a re-run "
        "continues an unfinished fit from it (bit-identical on CPU); a run's folder is removed once its JSON is "
        "written. Default: no checkpoints (a killed run starts its fit again)",
    )
    p.add_argument(
        "--write-plan",
        action="store_true",
        help="tune phase: register the test plan (plan.json) from this call's grid; needs every tuned row "
        "and every grid point finished, and refuses once test runs exist. Without it a tune call "
        "only prints the selection, so a call on part of the grid cannot register a partial plan",
    )
    p.add_argument("--out", required=True, help="output folder (the plan, tune/ and runs/ live there)")
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    if args.smoke:
        if args.dataset not in (None, SMOKE["dataset"]):
            raise SystemExit(f"--smoke runs on {SMOKE['dataset']}; it takes no --dataset {args.dataset}")
        args.dataset = SMOKE["dataset"]
        args.counts = args.counts or SMOKE["counts"]
        args.dev_per_class = args.dev_per_class or SMOKE["dev_per_class"]
        args.ood_per_set = args.ood_per_set or SMOKE["ood_per_set"]
    args.dataset = args.dataset or "fashion"
    args.counts = tuple(args.counts or default_counts(args.dataset))
    args.dev_per_class = args.dev_per_class or 1000
    if args.phase == "register":
        if args.base_plan is None:
            raise SystemExit("--phase register needs --from PLAN (the registered plan whose settings it extends)")
        if args.seeds:
            raise SystemExit("--phase register fits nothing; it takes no --seeds")
        unknown = [m for m in args.methods or () if m not in VARIANTS]
        if unknown:
            raise SystemExit(f"--phase register registers variants ({', '.join(VARIANTS)}), not {', '.join(unknown)}")
        args.methods = list(args.methods or VARIANTS)
        args.grid = {}
        return args
    if args.base_plan is not None:
        raise SystemExit("--from belongs to --phase register")
    args.seeds = list(args.seeds or DEFAULT_SEEDS[args.phase])
    if len(set(args.seeds)) != len(args.seeds):
        raise SystemExit("--seeds lists a seed twice")
    for name in ("epochs", "dev_per_class", "ood_per_set", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be at least 1")
    if args.methods is None and args.phase == "tune":
        args.methods = list(TUNED)  # the test phase's default (the plan's rows) needs the plan: run_test sets it
    if args.phase == "tune" and (variants := [m for m in args.methods if m in VARIANTS]):
        raise SystemExit(f"{', '.join(variants)} take a tuned row's settings: register them with --phase register")
    if args.phase == "tune" and (matched := [m for m in args.methods if m in MATCHED]):
        raise SystemExit(
            f"{', '.join(matched)} are not tuned: they take their baseline's settings with DGC's wall time"
        )
    if args.write_plan and (args.phase != "tune" or set(args.methods) != set(TUNED)):
        raise SystemExit(
            "--write-plan registers the plan from a tune call over every tuned row "
            f"({', '.join(TUNED)}); this call has {'--phase test' if args.phase != 'tune' else 'a subset of --methods'}"
        )
    if args.phase == "test" and (args.grid_lr or args.grid_tau):
        raise SystemExit("--grid-lr/--grid-tau shape the tune phase; the test phase takes the plan's settings")
    grid = dict(SMOKE_GRID if args.smoke else TUNING_GRID)
    for key, values in (("lr", args.grid_lr), ("tau", args.grid_tau)):
        if values:
            if any(not math.isfinite(v) or v < 0 or (key == "lr" and v == 0) for v in values) or len(set(values)) < len(
                values
            ):
                raise SystemExit(f"--grid-{key} needs distinct finite values, {'> 0' if key == 'lr' else '>= 0'}")
            grid[key] = tuple(values)
    args.grid = grid
    return args


def _reuse(path: Path, settings: dict[str, Any], args: argparse.Namespace, **extra: Any) -> dict[str, Any] | None:
    """The finished run at ``path`` if there is one; refuses one made with other settings or data (dataset,
    counts, dev set, smoke mode, and ``extra``)."""
    if not path.is_file():
        return None
    run = json.loads(path.read_text())
    diffs = paper_table.settings_differences(run, {"settings": settings, **_common(args), **extra})
    if diffs:
        raise SystemExit(
            f"{path} was made with other settings than this command's ({'; '.join(diffs[:4])}); "
            "use another --out or remove the run"
        )
    return run


def _load(args: argparse.Namespace, seed: int, evaluate_on: str) -> ImbalancedSplit:
    return load_imbalanced(
        args.dataset,
        args.data_dir,
        counts=args.counts,
        seed=seed,
        evaluate_on=evaluate_on,
        dev_per_class=args.dev_per_class,
    )


def _common(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "dataset": args.dataset,
        "counts": list(args.counts),
        "dev_per_class": args.dev_per_class,
        "smoke": args.smoke,
    }


def _environment(args: argparse.Namespace, argv: Sequence[str] | None, device: str) -> dict[str, Any]:
    return {
        "argv": list(sys.argv if argv is None else argv),
        "device": device,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "node": platform.node(),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def run_tune(args: argparse.Namespace, argv: Sequence[str] | None, device: str) -> int:
    """Fit every row's grid on the tune seeds, score on the dev set; write the plan when every row is complete."""
    out = Path(args.out)
    grid = args.grid
    epochs = args.epochs or (SMOKE["epochs"] if args.smoke else PROTOCOL["epochs"])
    args.epochs = epochs
    recipe = base_recipe(args)
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for seed in args.seeds:
        split = None
        for method in args.methods:
            for config in grid_of(method, grid):
                key = config_key(config)
                path = out / "tune" / f"{method}_{key}_seed{seed}.json"
                settings = run_settings(method, recipe, config, epochs)
                run = _reuse(path, settings, args)
                if run is None and not args.collect:
                    if split is None:
                        split = _load(args, seed, "dev")
                    folder = _checkpoint_folder(args, f"{method}_{key}_seed{seed}")
                    fitted = fit_row(method, split, settings, seed, device, folder)
                    seed_everything(seed)
                    proba = scored(fitted, split.x_test, seed)["proba"]
                    run = imbalance_report(
                        split.y_test, proba.argmax(-1), num_classes=split.num_classes, train_counts=split.train_counts
                    )
                    run.update(
                        method=method,
                        seed=seed,
                        config=config,
                        settings=settings,
                        phase="tune",
                        evaluated_on=f"dev:{args.dev_per_class}",
                        fit_seconds=fitted.fit_seconds,
                        history=fitted.history,
                        **_resumed(fitted),
                        **_common(args),
                    )
                    write_json(path, run)
                    _drop_checkpoint(folder)
                    print(
                        f"tune seed {seed} {method:>16} {key:>16}: dev acsa {run['acsa']:.4f} "
                        f"({fitted.fit_seconds:.0f} s)",
                        flush=True,
                    )
                if run is not None:
                    results.setdefault(method, {}).setdefault(key, []).append(run)
    summary = {
        m: {
            k: {
                "dev_acsa": float(np.mean([r["acsa"] for r in rs])),
                "n": len(rs),
                "fit_seconds": float(np.mean([r["fit_seconds"] for r in rs])),
            }
            for k, rs in cfgs.items()
        }
        for m, cfgs in results.items()
    }
    write_json(out / "tune" / "summary.json", summary)
    plan = make_plan(out, args, grid, epochs, recipe)
    if plan is None:
        return 0
    print(f"plan: {json.dumps(plan['selected'])}; matched epochs {plan['matched_epochs']}", flush=True)
    if not args.write_plan:
        print("plan.json not written (pass --write-plan on the call that registers the full grid)", flush=True)
        return 0
    if (done := sorted((out / "runs").glob("*.json"))) and (out / "plan.json").is_file():
        raise SystemExit(
            f"{out / 'plan.json'} already fixes {len(done)} test run(s) under {out / 'runs'}; "
            "a registered plan is not rewritten (use another --out)"
        )
    write_json(out / "plan.json", {**plan, "environment": _environment(args, argv, device)})
    return 0


def make_plan(
    out: Path, args: argparse.Namespace, grid: dict[str, tuple[float, ...]], epochs: int, recipe: Recipe
) -> dict[str, Any] | None:
    """The test plan from every finished tune run under ``out/tune`` (None, with a message, while a row lacks one).

    Each row's configuration with the best mean dev ACSA over the tune seeds (ties: the first in grid order); the
    matched rows' epochs ``round(epochs * mean fit time of dgc_elbo / mean fit time of the baseline)``, at least
    ``epochs``, over all their tune runs.
    """
    selected: dict[str, dict[str, Any]] = {}
    fit_seconds: dict[str, float] = {}
    seeds = sorted(args.seeds)
    missing = []
    for method in TUNED:
        best = None
        times = []
        for config in grid_of(method, grid):
            runs = []
            for seed in seeds:
                path = out / "tune" / f"{method}_{config_key(config)}_seed{seed}.json"
                run = _reuse(path, run_settings(method, recipe, config, epochs), args)
                if run is None:
                    missing.append(path.name)
                else:
                    runs.append(run)
            if len(runs) == len(seeds):
                score = float(np.mean([r["acsa"] for r in runs]))
                times += [r["fit_seconds"] for r in runs]
                if best is None or score > best[0]:
                    best = (score, config)
        if best is not None:
            selected[method] = {**best[1], "dev_acsa": best[0]}
            fit_seconds[method] = float(np.mean(times))
    if missing:
        print(f"no plan yet: {len(missing)} tune run(s) missing, e.g. {', '.join(missing[:3])}", flush=True)
        return None
    matched = {
        m: max(epochs, round(epochs * fit_seconds[REFERENCE] / fit_seconds[base])) for m, base in MATCHED.items()
    }
    if args.smoke:  # a one-epoch smoke fit is start-up cost, not a wall-time ratio; keep the check seconds long
        matched = {m: min(e, SMOKE["max_matched_epochs"]) for m, e in matched.items()}
    return {
        **_common(args),
        "epochs": epochs,
        "grid": {k: list(v) for k, v in grid.items()},
        "tune_seeds": seeds,
        "protocol": {**PROTOCOL, "epochs": epochs},
        "selected": selected,
        "mean_fit_seconds": fit_seconds,
        "matched_epochs": matched,
        "selection": "best mean dev ACSA over the tune seeds",
    }


def variant_for(name: str, epochs: int) -> dict[str, Any]:
    """:data:`VARIANTS`' entry ``name`` for a plan of ``epochs`` epochs: cRT's share of the epochs in whole epochs
    (at least one)."""
    variant = copy.deepcopy(VARIANTS[name])
    if "retrain_head_epochs" in variant["changes"]:
        variant["changes"]["retrain_head_epochs"] = max(1, round(variant["changes"]["retrain_head_epochs"] * epochs))
    return variant


def run_register(args: argparse.Namespace, argv: Sequence[str] | None, device: str) -> int:
    """Write ``--out``/plan.json: the plan ``--from`` names (its tuned settings and matched epochs, unchanged) with
    the chosen :data:`VARIANTS`; refuses to overwrite a plan."""
    out, source = Path(args.out), Path(args.base_plan)
    if not source.is_file():
        raise SystemExit(f"--from {source}: no such plan")
    if (out / "plan.json").exists():
        raise SystemExit(f"{out / 'plan.json'} exists; a registered plan is not rewritten (use another --out)")
    base = json.loads(source.read_text())
    if base.get("variants"):
        raise SystemExit(f"{source} already registers variants; register from the plan it was made from")
    for key, value in _common(args).items():
        if base.get(key) != value:
            raise SystemExit(f"{source} was made with {key} {base.get(key)!r}, this command has {value!r}")
    missing = sorted({VARIANTS[m]["base"] for m in args.methods} - set(base["selected"]))
    if missing:
        raise SystemExit(f"{source} tunes no {', '.join(missing)}, the base row of a chosen variant")
    plan = {
        **{k: v for k, v in base.items() if k != "environment"},
        "variants": {m: variant_for(m, int(base["epochs"])) for m in args.methods},
        "registered_from": {"plan": str(source), "environment": base.get("environment")},
        "environment": _environment(args, argv, device),
    }
    write_json(out / "plan.json", plan)
    print(f"registered {out / 'plan.json'}: {', '.join(args.methods)} on the settings of {source}", flush=True)
    return 0


def planned(method: str, plan: dict[str, Any]) -> tuple[dict[str, float], int]:
    """The configuration and epochs of ``method`` in the plan (a matched row: its baseline's, with more epochs; a
    variant: its base row's)."""
    base = plan.get("variants", {}).get(method, {}).get("base") or MATCHED.get(method, method)
    config = {k: v for k, v in plan["selected"][base].items() if k in ("lr", "tau")}
    return config, int(plan["matched_epochs"][method]) if method in MATCHED else int(plan["epochs"])


def run_test(args: argparse.Namespace, argv: Sequence[str] | None, device: str) -> int:
    """Fit every row with the planned settings on each (fresh) seed and score it on the test split once."""
    out = Path(args.out)
    plan_path = out / "plan.json"
    if not plan_path.is_file():
        raise SystemExit(f"no {plan_path}: run --phase tune first (every row's settings come from the plan)")
    plan = json.loads(plan_path.read_text())
    for key, value in _common(args).items():
        if plan.get(key) != value:
            raise SystemExit(f"{plan_path} was made with {key} {plan.get(key)!r}, this command has {value!r}")
    if args.epochs is not None and args.epochs != plan["epochs"]:
        raise SystemExit(f"the plan fixes {plan['epochs']} epochs; --epochs {args.epochs} would change it")
    args.epochs = plan["epochs"]
    variants = plan.get("variants", {})
    if args.methods is None:
        args.methods = list(CORE_METHODS) + list(variants)
    if unregistered := [m for m in args.methods if m in VARIANTS and m not in variants]:
        raise SystemExit(f"{plan_path} registers no {', '.join(unregistered)} (see --phase register)")
    reused_seeds = sorted(set(args.seeds) & set(plan["tune_seeds"]))
    if reused_seeds:
        raise SystemExit(f"seeds {reused_seeds} tuned the plan; the test phase needs fresh seeds")
    recipe = base_recipe(args)
    runs: dict[str, list[dict[str, Any]]] = {m: [] for m in args.methods}
    started = time.perf_counter()
    for seed in args.seeds:
        split = dev = None
        swag_fits: dict[str, Fitted] = {}  # a SWAG row's fit, by recipe: the same recipe's row without SWAG reuses it
        for method in args.methods:
            config, epochs = planned(method, plan)
            settings = run_settings(method, recipe, config, epochs, variants.get(method))
            path = out / "runs" / f"{method}_seed{seed}.json"
            run = _reuse(path, settings, args, ood_per_set=args.ood_per_set or "all")
            if run is None and not args.collect:
                if split is None:
                    split, dev = _load(args, seed, "test"), _load(args, seed, "dev")
                    if not torch.equal(split.y_train, dev.y_train):  # one training subset for both
                        raise SystemExit(f"seed {seed}: the dev and test loads drew different training subsets")
                key = json.dumps(settings.get("recipe"), sort_keys=True)
                folder = None
                if "recipe" in settings and "swag" not in settings and key in swag_fits:
                    # SWAG only reads the head's weights, so its fit is this row's fit bit for bit
                    fitted = dataclasses.replace(swag_fits[key], method=method, swag=None, head_samples=None)
                else:
                    folder = _checkpoint_folder(args, f"{method}_seed{seed}")
                    fitted = fit_row(method, split, settings, seed, device, folder)
                    if "swag" in settings:
                        swag_fits[key] = fitted
                run = evaluate_run(fitted, split, dev.x_test, dev.y_test, seed, args.ood_per_set)
                run.update(
                    method=method,
                    seed=seed,
                    config=config,
                    epochs=epochs,
                    settings=settings,
                    phase="test",
                    fit_seconds=fitted.fit_seconds,
                    seconds=fitted.fit_seconds + run["evaluate_seconds"],
                    train_counts=split.train_counts.tolist(),
                    test_size=len(split.y_test),
                    dev_size=len(dev.y_test),
                    evaluated_on="test",
                    ood_per_set=args.ood_per_set or "all",
                    history=fitted.history,
                    **_resumed(fitted),
                    **_common(args),
                )
                write_json(path, run)
                _drop_checkpoint(folder)
                print(
                    f"test seed {seed} {method:>24}: acsa {run['acsa']:.4f} ece {run['ece']:.4f} -> "
                    f"{run['ece_ts']:.4f} (T {run['temperature']:.2f}) aurc {run['aurc']:.4f} "
                    f"ood {run['ood_auroc']:.3f} ({run['seconds']:.0f} s)",
                    flush=True,
                )
            if run is not None:
                runs[method].append(run)
    runs = {m: r for m, r in runs.items() if r}
    pooled = sorted({int(r["seed"]) for rs in runs.values() for r in rs})
    summary: dict[str, Any] = paper_table.summarise(runs, SUMMARY_METRICS)
    summary["n_seeds"] = len(pooled)
    write_json(out / "summary.json", summary)
    if variants:
        row_seeds = {m: [int(r["seed"]) for r in rs] for m, rs in runs.items()}
        record_variant_rows(plan, out / "plan.json", summary, pooled, row_seeds)
    pairs = (
        paper_table.paired_comparisons(runs, reference=REFERENCE, metrics=PAIRED_METRICS) if REFERENCE in runs else {}
    )
    write_json(out / "paired.json", pairs)
    against = variant_comparisons(runs) if variants else {}
    if against:
        write_json(out / "paired_vs_baselines.json", against)
    table = render_table(summary, pooled, {m: len(r) for m, r in runs.items()}, plan, args)
    if pairs:
        table += (
            "\nPaired over seeds (the default DGC minus each row; positive ACSA / F_macro / AUROC and negative "
            "ECE / NLL / AURC favour DGC):\n\n" + format_paired(pairs)
        )
    if against:
        table += (
            "\nPaired over seeds, each DGC row minus each compute-matched baseline (issue 21's target):\n\n"
            + format_paired(against)
        )
    table += f"\n{'Collected' if args.collect else f'Wall time of this call {time.perf_counter() - started:.0f} s'}.\n"
    atomic_write_text(out / "table.md", table)
    print(table)
    return 0


def record_variant_rows(
    plan: dict[str, Any],
    plan_path: Path,
    summary: dict[str, Any],
    seeds: Sequence[int],
    row_seeds: dict[str, Sequence[int]] | None = None,
) -> Path | None:
    """Copy a variants run's rows into the ``summary.json`` beside the plan it was registered from (issue 21 asks
    for every variant's row there), under the key ``"variants"`` with their seeds, so that plan's own rows, made on
    other seeds, are left as they were. ``row_seeds``: the seeds each row pooled, recorded as ``"row_seeds"`` for
    the rows that lack some of ``seeds`` (a row still being completed). Returns the file written; None (and a note)
    when the source plan is not found from here (its path is relative to where ``--phase register`` ran)."""
    source = Path(plan.get("registered_from", {}).get("plan", ""))
    if not source.is_file():
        print(f"note: the source plan {str(source)!r} is not found from here; its summary.json is not updated")
        return None
    path = source.parent / "summary.json"
    merged = json.loads(path.read_text()) if path.exists() else {}
    merged["variants"] = {
        "plan": str(plan_path),
        "seeds": list(seeds),
        "rows": {m: summary[m] for m in (REFERENCE, *VARIANTS, *MATCHED) if m in summary},
    }
    rows = merged["variants"]["rows"]
    partial = {m: sorted(s) for m, s in (row_seeds or {}).items() if m in rows and sorted(s) != sorted(seeds)}
    if partial:
        merged["variants"]["row_seeds"] = partial
    write_json(path, merged)
    return path


def variant_comparisons(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{"<DGC row> - <matched baseline>": {metric: paired cell}}`` for every DGC row (the default and each
    variant) against every compute-matched baseline that ran, on :data:`VARIANT_PAIRED_METRICS`."""
    pairs: dict[str, dict[str, dict[str, Any]]] = {}
    for row in (REFERENCE, *VARIANTS):
        for baseline in MATCHED:
            if row in runs and baseline in runs:
                pairs.update(
                    paper_table.paired_comparisons(
                        {row: runs[row], baseline: runs[baseline]}, reference=row, metrics=VARIANT_PAIRED_METRICS
                    )
                )
    return pairs


def render_table(
    summary: dict[str, Any],
    seeds: Sequence[int],
    counts: dict[str, int],
    plan: dict[str, Any],
    args: argparse.Namespace,
) -> str:
    """The markdown table: one row per method, the headline columns, then OOD AUROC per set."""
    lines = [
        f"### Evidence table ({args.dataset}{', SMOKE' if args.smoke else ''}): mean ± std over seeds "
        f"{', '.join(map(str, seeds))}",
        "",
        f"Protocol: {plan['protocol']}; settings tuned on the dev set (seeds {plan['tune_seeds']}, "
        f"{plan['selection']}); matched epochs {plan['matched_epochs']}; temperature fitted on "
        f"{args.dev_per_class} dev images a class; OOD score: 1 - max probability.",
        "",
    ]
    head = [label for _, label in TABLE_COLUMNS] + [f"AUROC {s}" for s in OOD_SETS] + ["Wall time (s)"]
    lines += ["| Method | " + " | ".join(head) + " |", "|" + "---|" * (len(head) + 1)]
    for method, metrics in summary.items():
        if method == "n_seeds":
            continue
        cells = [paper_table._pm(metrics.get(k)) for k, _ in TABLE_COLUMNS]
        cells += [paper_table._pm(metrics.get(f"ood_auroc_{s}")) for s in OOD_SETS]
        t = metrics.get("seconds")
        n = counts.get(method, len(seeds))
        label = METHOD_LABELS.get(method, method) + (f" ({n} of {len(seeds)} seeds)" if n < len(seeds) else "")
        lines.append(f"| {label} | " + " | ".join(cells) + (f" | {t['mean']:.0f} |" if t else " | — |"))
    other = [
        (m, k) for m, metrics in summary.items() if m != "n_seeds" for k in metrics if k.startswith("ood_auroc_by_")
    ]
    if other:
        lines += ["", "OOD AUROC (mean over sets) with each row's other scores:", ""]
        lines += [
            f"- {METHOD_LABELS.get(m, m)}, {k.removeprefix('ood_auroc_by_')}: {paper_table._pm(summary[m][k])}"
            for m, k in other
        ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = _resolve(build_parser().parse_args(argv))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    phase = {"tune": run_tune, "register": run_register, "test": run_test}[args.phase]
    return phase(args, argv, device)


if __name__ == "__main__":
    raise SystemExit(main())
