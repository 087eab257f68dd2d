"""Candidate OOD scores of DGC, chosen on the dev set only (issue 22; nothing here reads the test split).

Fits the evidence protocol's ``dgc_elbo`` row and its ``logit_adjusted`` baseline (the settings of a registered
``benchmarks/evidence.py`` plan, ``--plan``) on one seed's imbalanced subset, then splits that seed's dev set
(official training images the subset left out) in two halves: the *reference* half fits what a score needs from
in-distribution data (typicality's centre, the latent class means and covariance come from the training images;
percentiles of combined scores come from the reference half), the *evaluation* half is the in-distribution side
of the AUROC, and the OOD sets of :func:`dgc_pyro.data.ood.ood_sets` are built from the evaluation half's images.

Scores (larger = more out of distribution):

- ``density`` -log p(x) (the importance-weighted bound of ``predict``), ``typicality`` |log p(x) - reference mean|;
- ``mahalanobis``: min over classes of the Mahalanobis distance of q's mean mu(x) to the class means of the
  training images' mu, with their pooled (Ledoit-Wolf) covariance (Lee et al. 2018 on DGC's latent space);
- ``kl``: KL(q(z | x) || N(0, I)), the latent part of the ELBO;
- ``entropy`` / ``maxprob`` of DGC's class posterior; the baseline's ``la_energy`` / ``la_maxprob``;
- combinations ``A+B``: the larger of the two scores' reference-half percentiles (the package's ``both`` rule).

    PYTHONPATH=. python benchmarks/ood_dev.py --data-dir ../shared/data --seed 31 --out benchmarks/results/ood_dev
    PYTHONPATH=. python benchmarks/ood_dev.py --smoke --out /tmp/ood_dev_smoke     # digits, seconds
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.covariance import LedoitWolf

sys.path.insert(0, str(Path(__file__).resolve().parent))
import evidence  # the sibling benchmark: its rows, fits and scores

from dgc_pyro.data.ood import ood_sets
from dgc_pyro.io import atomic_write_text, write_json
from dgc_pyro.metrics import ood_auroc
from dgc_pyro.models.dgc import DGC
from dgc_pyro.ood_detector import reference_percentile
from dgc_pyro.reproducibility import seed_everything

BASE_SCORES = ("density", "typicality", "mahalanobis", "kl", "entropy", "maxprob")
BASELINE_SCORES = ("la_energy", "la_maxprob")
#: pairs whose percentile maximum is scored (a density-based score with a class-posterior or latent one)
COMBINED = tuple(
    f"{a}+{b}" for a, b in itertools.product(("density", "typicality"), ("mahalanobis", "kl", "entropy", "maxprob"))
)


def latent_means(model: DGC, x: torch.Tensor, batch: int = 1000) -> torch.Tensor:
    """q(z | x)'s mean and scale of every image (label-free guide), in batches, on the CPU."""
    locs, scales = [], []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            loc, scale = model.encode(x[i : i + batch].to(model.device), None)
            locs.append(loc.cpu().double())
            scales.append(scale.cpu().double())
    return torch.cat(locs), torch.cat(scales)


class LatentGaussians:
    """Class means of the training images' latent means and their pooled Ledoit-Wolf covariance."""

    def __init__(self, mu: np.ndarray, y: np.ndarray, num_classes: int) -> None:
        self.means = np.stack([mu[y == c].mean(0) for c in range(num_classes)])
        centred = mu - self.means[y]
        self.precision = LedoitWolf().fit(centred).precision_

    def distance(self, mu: np.ndarray) -> np.ndarray:
        """min over classes of (mu - m_c)^T P (mu - m_c)."""
        d = mu[:, None, :] - self.means[None]
        return np.einsum("nck,kl,ncl->nc", d, self.precision, d).min(1)


def base_scores(
    fitted: evidence.Fitted, x: torch.Tensor, seed: int, gaussians: LatentGaussians, centre: float | None
) -> dict[str, np.ndarray]:
    """DGC's candidate scores of ``x`` (typicality needs the reference ``centre`` of log p(x))."""
    out = evidence.scored(fitted, x, seed)
    mu, sigma = latent_means(fitted.model, x)
    log_density = out["log_density"].numpy()
    kl = 0.5 * (mu.square() + sigma.square() - 1.0 - 2.0 * sigma.log()).sum(-1)
    scores = {
        "density": -log_density,
        "mahalanobis": gaussians.distance(mu.numpy()),
        "kl": kl.numpy(),
        "entropy": out["scores"]["entropy"].numpy(),
        "maxprob": out["scores"]["maxprob"].numpy(),
        "log_density": log_density,
    }
    if centre is not None:
        scores["typicality"] = np.abs(log_density - centre)
    return scores


def run(args: argparse.Namespace) -> dict[str, Any]:
    plan = json.loads(Path(args.plan).read_text())
    ns = argparse.Namespace(epochs=plan["epochs"], smoke=args.smoke)
    recipe = evidence.base_recipe(ns)
    split = evidence.load_imbalanced(
        args.dataset,
        args.data_dir,
        counts=tuple(plan["counts"]),
        seed=args.seed,
        evaluate_on="dev",
        dev_per_class=plan["dev_per_class"],
    )
    device = "cpu"
    fits = {}
    for method in ("dgc_elbo", "logit_adjusted"):
        config, epochs = evidence.planned(method, plan)
        settings = evidence.run_settings(method, recipe, config, epochs)
        fits[method] = evidence.fit_row(method, split, settings, args.seed, device)
        print(f"{method}: fitted in {fits[method].fit_seconds:.0f} s", flush=True)
    dgc, la = fits["dgc_elbo"], fits["logit_adjusted"]
    # the two dev halves, stratified by taking alternate images of each class
    order = torch.argsort(split.y_test, stable=True)
    ref_idx, eval_idx = order[0::2], order[1::2]
    x_ref, x_eval = split.x_test[ref_idx], split.x_test[eval_idx]
    mu_train, _ = latent_means(dgc.model, split.x_train)
    gaussians = LatentGaussians(mu_train.numpy(), split.y_train.numpy(), split.num_classes)
    reference = base_scores(dgc, x_ref, args.seed, gaussians, None)
    centre = float(reference["log_density"].mean())
    reference["typicality"] = np.abs(reference["log_density"] - centre)
    sets = {"in": x_eval, **ood_sets(x_eval, seed=args.seed)}
    scores: dict[str, dict[str, np.ndarray]] = {}
    for name, x in sets.items():
        s = base_scores(dgc, x, args.seed, gaussians, centre)
        logits = la.baseline.logits(x).double()
        s["la_energy"] = (-torch.logsumexp(logits, -1)).numpy()
        s["la_maxprob"] = (1.0 - torch.softmax(logits, -1).max(-1).values).numpy()
        for pair in COMBINED:
            a, b = pair.split("+")
            s[pair] = np.maximum(reference_percentile(s[a], reference[a]), reference_percentile(s[b], reference[b]))
        scores[name] = s
    auroc = {
        score: {name: ood_auroc(scores["in"][score], scores[name][score]) for name in sets if name != "in"}
        for score in (*BASE_SCORES, *BASELINE_SCORES, *COMBINED)
    }
    ood_names = [name for name in sets if name != "in"]
    for cells in auroc.values():  # the worst set decides the "on each set" target
        cells["mean"] = float(np.mean([cells[s] for s in ood_names]))
    for cells in auroc.values():
        cells["min_margin_over_la_energy"] = float(min(cells[s] - auroc["la_energy"][s] for s in ood_names))
    return {
        "seed": args.seed,
        "dataset": args.dataset,
        "evaluated_on": f"dev halves: {len(ref_idx)} reference, {len(eval_idx)} evaluation",
        "plan": str(args.plan),
        "fit_seconds": {m: f.fit_seconds for m, f in fits.items()},
        "auroc": auroc,
        "environment": {
            "argv": sys.argv,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "node": platform.node(),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    }


def markdown(report: dict[str, Any]) -> str:
    sets = [k for k in next(iter(report["auroc"].values())) if k not in ("mean", "min_margin_over_la_energy")]
    lines = [
        f"### Candidate OOD scores on the dev set ({report['dataset']}, seed {report['seed']}; "
        f"{report['evaluated_on']})",
        "",
        "| score | " + " | ".join(sets) + " | mean | worst margin over LA energy |",
        "|---|" + "---|" * (len(sets) + 2),
    ]
    for score, cells in sorted(report["auroc"].items(), key=lambda kv: -kv[1]["min_margin_over_la_energy"]):
        row = [f"{cells[s]:.3f}" for s in sets] + [f"{cells['mean']:.3f}", f"{cells['min_margin_over_la_energy']:+.3f}"]
        lines.append(f"| {score} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion", choices=("fashion", "digits"))
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=31, help="a tune seed of the plan (its dev set; default 31)")
    p.add_argument("--plan", default="benchmarks/results/evidence/plan.json", help="the registered evidence plan")
    p.add_argument("--smoke", action="store_true", help="digits with a smoke plan made on the fly: seconds")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    if args.smoke:
        args.dataset = "digits"
        base = out / "smoke_plan"
        evidence.main(
            ["--phase", "tune", "--seeds", "1", "--write-plan", "--smoke", "--device", "cpu", "--out", str(base)]
        )
        args.plan = str(base / "plan.json")
    seed_everything(args.seed)
    report = run(args)
    write_json(out / f"ood_dev_seed{args.seed}.json", report)
    table = markdown(report)
    atomic_write_text(out / f"ood_dev_seed{args.seed}.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
