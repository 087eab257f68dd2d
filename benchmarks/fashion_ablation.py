"""Ablation of the DGC recipe on real Fashion-MNIST (paper protocol, seed 1), sized for a shared 2-core CPU.

Each configuration trains one DGC on the paper's imbalanced subset (validation split carved from it) and
scores one fixed, stratified subsample of the official test split (``--test-per-class`` a class) with every
scoring rule (mixture, iw, paper), so the rules are compared on the same fitted model.

    python benchmarks/fashion_ablation.py --data-dir ../shared/data --phase 1 --out benchmarks/results/fashion/ablation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

from dgc_pyro.data import load_imbalanced
from dgc_pyro.inference.fit import fit
from dgc_pyro.inference.objectives import wae_mmd_loss
from dgc_pyro.inference.predict import SCORING_RULES, posterior_from_log_weights, predict
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


def run(cfg: Config, split, x_tr, x_te, y_te, seed: int, num_samples: int) -> dict:
    seed_everything(seed)
    model = DGC((x_tr.shape[1],), split.num_classes, cfg.latent_dim, "small", likelihood=cfg.likelihood,
                obs_scale=cfg.obs_scale, label_weight=cfg.label_weight, label_in_guide=cfg.label_in_guide)
    kwargs = {"pretrain_steps": cfg.pretrain_steps} if cfg.pretrain_steps else {}
    t0 = time.perf_counter()
    hist = fit(model, x_tr, split.y_train, epochs=cfg.epochs, lr=cfg.lr, objective=objective_of(cfg.objective),
               device="cpu", seed=seed, progress=False, perturbation_rate=cfg.perturbation_rate,
               val_num_samples=3, **kwargs)
    fit_s = time.perf_counter() - t0
    out = {"config": dataclasses.asdict(cfg), "fit_seconds": fit_s, "best_epoch": hist.best_epoch,
           "val_acsa": [e.get("val_acsa") for e in hist.epochs], "rules": {}}
    for rule in SCORING_RULES:
        t1 = time.perf_counter()
        pred = predict(model, x_te, num_samples, rule=rule)
        rep = imbalance_report(y_te, pred.labels, num_classes=split.num_classes, train_counts=split.train_counts)
        rep["ece"] = expected_calibration_error(y_te, pred.proba)
        rep["seconds"] = time.perf_counter() - t1
        out["rules"][rule] = rep
        pred = posterior_from_log_weights(pred.log_weights - model.label_prior().log()[None, :, None])
        rep = imbalance_report(y_te, pred.labels, num_classes=split.num_classes, train_counts=split.train_counts)
        rep["ece"] = expected_calibration_error(y_te, pred.proba)
        out["rules"][rule + "+balanced"] = rep
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--phase", type=int, default=1)
    p.add_argument("--only", nargs="*", default=None, help="names of configurations to run")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--test-per-class", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="benchmarks/results/fashion/ablation.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split = load_imbalanced("fashion", args.data_dir, seed=args.seed)
    x_tr = split.x_train.reshape(len(split.x_train), -1)
    sel = stratified_test(split.y_test, args.test_per_class)
    x_te, y_te = split.x_test[sel].reshape(len(sel), -1), split.y_test[sel]
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for cfg in PHASES[args.phase]:
        if args.only and cfg.name not in args.only:
            continue
        r = run(cfg, split, x_tr, x_te, y_te, args.seed, args.num_samples)
        r["phase"] = args.phase
        results[cfg.name] = r
        write_json(out_path, results)
        print(cfg.name, f"fit {r['fit_seconds']:.0f}s best_epoch {r['best_epoch']}",
              " ".join(f"{k}: acsa {v['acsa']:.4f} ece {v['ece']:.3f}" for k, v in r["rules"].items()), flush=True)


if __name__ == "__main__":
    main()
