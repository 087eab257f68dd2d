"""Ablation of the DGC recipe on real Fashion-MNIST (paper protocol, seed 1), sized for a shared 2-core CPU.

Each configuration trains one DGC on the paper's imbalanced subset (validation split carved from it) and
scores one fixed, class-balanced evaluation set with every scoring rule (mixture, iw, paper), so the rules are
compared on the same fitted model.

The evaluation set is, by default (``--evaluate-on dev``, since session 10), ``--dev-per-class`` official training
images of each class that the subset left out (``load_imbalanced(..., evaluate_on="dev")``): the configurations
here are recipe choices, and choices must not be made on the test split. ``--evaluate-on test`` scores a fixed
stratified subsample of the official test split (``--test-per-class`` a class) as the session-1 ablation did, only
to reproduce those records (``benchmarks/results/fashion/ablation*.json``); do not choose anything from it.

Results are keyed ``"phase N: name"`` (a configuration may be re-run in a later phase) under ``"results"``, beside
``"evaluation"``, which says what was scored; appending to an ``--out`` written with another evaluation set, or by
the session-1 version of this script, is refused.

    python benchmarks/fashion_ablation.py --data-dir ../shared/data --phase 1 --out benchmarks/results/fashion_ablation_dev/ablation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.data import load_imbalanced, parse_counts
from dgc_pyro.inference.fit import fit
from dgc_pyro.inference.objectives import wae_mmd_loss
from dgc_pyro.inference.predict import posterior_from_log_weights, predict, scoring_rules_for
from dgc_pyro.io import write_json
from dgc_pyro.metrics import expected_calibration_error, imbalance_report
from dgc_pyro.models.dgc import DGC
from dgc_pyro.reproducibility import seed_everything


@dataclasses.dataclass(frozen=True)
class Config:
    name: str
    objective: str = "elbo-analytic"
    likelihood: str = "normal"
    obs_scale: float = 0.1
    label_weight: float = 1.0
    perturbation_rate: float = 0.6
    epochs: int = 8
    lr: float = 1e-3
    latent_dim: int = 64
    pretrain_steps: int = 0
    label_in_guide: bool = True


PHASES = {
    1: [
        Config("naive (elbo, normal .1, lw 1)"),
        Config("bernoulli likelihood", likelihood="bernoulli"),
        Config("label_weight 10", label_weight=10.0),
        Config("label_weight 100", label_weight=100.0),
        Config("perturbation off", perturbation_rate=0.0),
        Config("wae-mmd (likelihood, lw 1)", objective="wae-mmd"),
        Config("wae-mmd as coded (l2, lw 100)", objective="wae-mmd-l2", label_weight=100.0),
    ],
    2: [
        Config("label_weight 100, lr 3e-3", label_weight=100.0, lr=3e-3),
    ],
    3: [
        Config("label_weight 100, 12 epochs", label_weight=100.0, epochs=12),
    ],
    4: [
        Config("label_weight 100", label_weight=100.0),
        Config("label-free guide, label_weight 100", label_weight=100.0, label_in_guide=False),
        Config("label-free guide, label_weight 10", label_weight=10.0, label_in_guide=False),
    ],
}


def objective_of(name: str):
    if name == "wae-mmd-l2":
        return wae_mmd_loss(reconstruction="l2")
    return name


def stratified_test(y: torch.Tensor, per_class: int, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yn = y.numpy()
    idx = np.concatenate([rng.choice(np.flatnonzero(yn == c), per_class, replace=False) for c in np.unique(yn)])
    return torch.from_numpy(np.sort(idx))


def run(cfg: Config, split, x_tr, x_ev, y_ev, seed: int, num_samples: int) -> dict:
    seed_everything(seed)
    model = DGC(
        (x_tr.shape[1],),
        split.num_classes,
        cfg.latent_dim,
        "small",
        likelihood=cfg.likelihood,
        obs_scale=cfg.obs_scale,
        label_weight=cfg.label_weight,
        label_in_guide=cfg.label_in_guide,
    )
    kwargs = {"pretrain_steps": cfg.pretrain_steps} if cfg.pretrain_steps else {}
    t0 = time.perf_counter()
    hist = fit(
        model,
        x_tr,
        split.y_train,
        epochs=cfg.epochs,
        lr=cfg.lr,
        objective=objective_of(cfg.objective),
        device="cpu",
        seed=seed,
        progress=False,
        perturbation_rate=cfg.perturbation_rate,
        val_num_samples=3,
        **kwargs,
    )
    fit_s = time.perf_counter() - t0
    out = {
        "config": dataclasses.asdict(cfg),
        "fit_seconds": fit_s,
        "best_epoch": hist.best_epoch,
        "val_acsa": [e.get("val_acsa") for e in hist.epochs],
        "rules": {},
    }
    for rule in scoring_rules_for(model):
        t1 = time.perf_counter()
        pred = predict(model, x_ev, num_samples, rule=rule)
        rep = imbalance_report(y_ev, pred.labels, num_classes=split.num_classes, train_counts=split.train_counts)
        rep["ece"] = expected_calibration_error(y_ev, pred.proba)
        rep["seconds"] = time.perf_counter() - t1
        out["rules"][rule] = rep
        pred = posterior_from_log_weights(pred.log_weights - model.label_prior().log()[None, :, None])
        rep = imbalance_report(y_ev, pred.labels, num_classes=split.num_classes, train_counts=split.train_counts)
        rep["ece"] = expected_calibration_error(y_ev, pred.proba)
        out["rules"][rule + "+balanced"] = rep
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--counts", type=parse_counts, default=None, help="per-class training counts (default: the paper's)")
    p.add_argument("--phase", type=int, choices=sorted(PHASES), default=1)
    p.add_argument("--only", nargs="*", default=None, help="names of configurations to run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument(
        "--evaluate-on",
        choices=("dev", "test"),
        default="dev",
        help="dev: unused training images (the default; for choices); test: a subsample of the test "
        "split, only to reproduce the session-1 records",
    )
    p.add_argument(
        "--dev-per-class",
        type=int,
        default=None,
        help="images a class of the dev set (default 100; --evaluate-on dev only)",
    )
    p.add_argument(
        "--test-per-class",
        type=int,
        default=None,
        help="test images a class of the subsample (default 100; --evaluate-on test only)",
    )
    p.add_argument("--num-samples", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/fashion_ablation_dev/ablation.json")
    return p


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = build_parser()
    args = p.parse_args(argv)
    # Each size belongs to one evaluation set; the other set's size would be ignored, yet look as if it applied.
    if args.evaluate_on == "dev" and args.test_per_class is not None:
        p.error("--test-per-class applies to --evaluate-on test only; the dev set's size is --dev-per-class")
    if args.evaluate_on == "test" and args.dev_per_class is not None:
        p.error("--dev-per-class applies to --evaluate-on dev only; the test subsample's size is --test-per-class")
    if args.only:
        unknown = sorted(set(args.only) - {cfg.name for cfg in PHASES[args.phase]})
        if unknown:
            p.error(f"--only: no configuration {unknown} in phase {args.phase}")
    torch.set_num_threads(args.threads)
    if args.evaluate_on == "dev":
        per_class = args.dev_per_class or 100
        split = load_imbalanced(
            args.dataset, args.data_dir, counts=args.counts, seed=args.seed, evaluate_on="dev", dev_per_class=per_class
        )
        x_ev, y_ev = split.x_test, split.y_test  # the dev set, in the test split's place
    else:
        per_class = args.test_per_class or 100
        split = load_imbalanced(args.dataset, args.data_dir, counts=args.counts, seed=args.seed)
        sel = stratified_test(split.y_test, per_class)
        x_ev, y_ev = split.x_test[sel], split.y_test[sel]
    evaluation = {
        "evaluate_on": args.evaluate_on,
        "per_class": per_class,
        "size": len(y_ev),
        "dataset": split.name,
        "seed": args.seed,
        "train_counts": split.train_counts.tolist(),
    }
    x_tr = split.x_train.reshape(len(split.x_train), -1)
    x_ev = x_ev.reshape(len(x_ev), -1)
    out_path = Path(args.out)
    saved = json.loads(out_path.read_text()) if out_path.exists() else {"evaluation": evaluation, "results": {}}
    if saved.get("evaluation") != evaluation:
        # Never mix scores of different evaluation sets (or the session-1 test-split records) in one file.
        p.error(
            f"{out_path} holds results of another evaluation ({saved.get('evaluation', 'session-1 format, test split')}"
            f" vs {evaluation}); choose another --out"
        )
    for cfg in PHASES[args.phase]:
        if args.only and cfg.name not in args.only:
            continue
        r = run(cfg, split, x_tr, x_ev, y_ev, args.seed, args.num_samples)
        r["phase"] = args.phase
        r["evaluate_on"] = args.evaluate_on
        saved["results"][f"phase {args.phase}: {cfg.name}"] = r
        write_json(out_path, saved)
        print(
            cfg.name,
            f"fit {r['fit_seconds']:.0f}s best_epoch {r['best_epoch']}",
            " ".join(f"{k}: acsa {v['acsa']:.4f} ece {v['ece']:.3f}" for k, v in r["rules"].items()),
            flush=True,
        )
    return saved


if __name__ == "__main__":
    main()
