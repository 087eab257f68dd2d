"""Out-of-distribution detection and the reject option of DGC against a logit-adjusted CE baseline (issue 22).

Per seed it trains a default-recipe DGC (``run_experiment``, no baseline) and a logit-adjusted cross-entropy
network on the same backbone (``fit_baseline("logit_adjusted", ...)``, the recipe's protocol), both on the
paper's imbalanced subset; calibrates DGC's OOD flag on *dev* images (official training images the subset
left out: ``load_imbalanced(..., evaluate_on="dev")``) at ``--false-alarm``; and scores the official test split
against the OOD sets of :func:`dgc_pyro.data.ood.ood_sets` (digits upscaled, vertical flip, inverted, noise).

Reported per OOD set: AUROC and FPR95 (:func:`dgc_pyro.metrics.ood_auroc`, :func:`fpr_at_tpr`) of DGC's density
scores (``density`` = -log p(x), ``typicality`` = |log p(x) - dev median|, ``complexity`` = -(log p(x) + L(x)))
and of the baseline's max-softmax (1 - max p) and energy (-logsumexp of the logits), and the flag's rate. On a
mixed stream (the test split plus ``--stream-ood-share`` OOD inputs drawn evenly from the sets, which count as
errors when accepted): the AURC (:func:`dgc_pyro.metrics.aurc`) of each reject score: DGC ``entropy``,
``density`` (the flag's score), ``both`` (the larger dev percentile of the two) and the baseline's max-softmax.

Writes ``ood.json`` (every figure, per seed) and ``ood.md`` (means over seeds) under ``--out``.

    python benchmarks/ood.py --data-dir ../shared/data --seeds 1,2,3 --out benchmarks/results/ood_fashion
    python benchmarks/ood.py --smoke --out /tmp/ood_smoke      # digits, 1 epoch: a plumbing check in seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.baselines import fit_baseline
from dgc_pyro.data import load_imbalanced
from dgc_pyro.data.ood import ood_sets
from dgc_pyro.experiment import default_recipe, run_experiment
from dgc_pyro.inference.density import OOD_SCORES, fit_ood_threshold, ood_score
from dgc_pyro.inference.predict import predict
from dgc_pyro.io import atomic_write_text, write_json
from dgc_pyro.metrics import aurc, fpr_at_tpr, ood_auroc
from dgc_pyro.ood_detector import logit_scores
from dgc_pyro.reproducibility import seed_everything

DGC_SCORES = OOD_SCORES
BASELINE_SCORES = ("max_softmax", "energy")
REJECT_SCORES = ("entropy", "density", "both", "baseline_max_softmax")


def _dgc_outputs(model: Any, x: torch.Tensor, num_samples: int, seed: int) -> dict[str, torch.Tensor]:
    """Labels, entropy, log density and every density score of DGC on ``x`` (seeded draws)."""
    seed_everything(seed)
    pred = predict(model, x, num_samples, balanced=model.has_class_prior)
    det = model.ood_detector
    out = {
        "labels": pred.labels.cpu(),
        "entropy": pred.entropy.cpu(),
        "log_density": pred.log_density.cpu(),
        "ood": pred.ood.cpu(),
        "flag_score": pred.ood_score.cpu(),
    }
    for name in DGC_SCORES:
        out[name] = ood_score(pred.log_density, x if name == "complexity" else None, name, det.center)
    out["both"] = det.combined(pred.entropy, pred.ood_score)
    return out


def _baseline_outputs(fitted: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
    logits = fitted.logits(x)
    return {"labels": logits.argmax(-1), **logit_scores(logits)}


def run_seed(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    split = load_imbalanced(args.dataset, args.data_dir, seed=seed, counts=args.counts)
    dev = load_imbalanced(
        args.dataset, args.data_dir, seed=seed, counts=args.counts, evaluate_on="dev", dev_per_class=args.dev_per_class
    )
    recipe = default_recipe(split.name)
    if args.epochs is not None:
        recipe = dataclasses.replace(recipe, epochs=args.epochs)
    x_test, y_test = split.x_test, split.y_test
    if args.test_subset and args.test_subset < len(y_test):
        keep = torch.randperm(len(y_test), generator=torch.Generator().manual_seed(seed))[: args.test_subset]
        x_test, y_test = x_test[keep], y_test[keep]
    result = run_experiment(split, recipe, seed=seed, device=args.device, baseline=None, progress=args.progress)
    model = result.model
    detector = fit_ood_threshold(model, dev.x_test, args.false_alarm, num_samples=recipe.num_samples, seed=seed)
    fitted = fit_baseline(
        "logit_adjusted",
        split.x_train,
        split.y_train,
        num_classes=split.num_classes,
        **recipe.baseline_options(),
        lr=min(recipe.lr, 1e-3),
        device=args.device,
        seed=seed,
        progress=args.progress,
    )
    t_fit = time.perf_counter() - t0

    n_in = len(y_test)
    sets = ood_sets(x_test, seed=seed)
    dgc_in = _dgc_outputs(model, x_test, recipe.num_samples, seed)
    base_in = _baseline_outputs(fitted, x_test)
    record: dict[str, Any] = {
        "seed": seed,
        "epochs": recipe.epochs,
        "test_size": n_in,
        "dev_size": len(dev.y_test),
        "dgc_acc": float((dgc_in["labels"] == y_test).float().mean()),
        "baseline_acc": float((base_in["labels"] == y_test).float().mean()),
        "flag_rate_test": float(dgc_in["ood"].float().mean()),
        "flag_score": detector.score,
        "false_alarm": detector.false_alarm,
        "sets": {},
    }
    rng = np.random.default_rng(seed)
    per_set = round(args.stream_ood_share / (1 - args.stream_ood_share) * n_in / len(sets))
    stream_dgc = {k: [dgc_in[k]] for k in ("entropy", "flag_score", "both")}
    stream_base = [base_in["max_softmax"]]
    for name, x_out in sets.items():
        x_out = x_out[:n_in]  # at most as many OOD as in-distribution images (the digits set has 1,797)
        dgc_out = _dgc_outputs(model, x_out, recipe.num_samples, seed)
        base_out = _baseline_outputs(fitted, x_out)
        row: dict[str, Any] = {"size": len(x_out), "flag_rate": float(dgc_out["ood"].float().mean())}
        for score in DGC_SCORES:
            row[f"dgc_{score}_auroc"] = ood_auroc(dgc_in[score], dgc_out[score])
            row[f"dgc_{score}_fpr95"] = fpr_at_tpr(dgc_in[score], dgc_out[score])
        for score in BASELINE_SCORES:
            row[f"baseline_{score}_auroc"] = ood_auroc(base_in[score], base_out[score])
            row[f"baseline_{score}_fpr95"] = fpr_at_tpr(base_in[score], base_out[score])
        record["sets"][name] = row
        pick = torch.from_numpy(rng.choice(len(x_out), size=min(per_set, len(x_out)), replace=False))
        for k in stream_dgc:
            stream_dgc[k].append(dgc_out[k][pick])
        stream_base.append(base_out["max_softmax"][pick])
    n_out = sum(len(s) for s in stream_base[1:])
    correct_dgc = torch.cat([dgc_in["labels"] == y_test, torch.zeros(n_out, dtype=torch.bool)])
    correct_base = torch.cat([base_in["labels"] == y_test, torch.zeros(n_out, dtype=torch.bool)])
    record["stream"] = {
        "ood_share": n_out / (n_in + n_out),
        "size": n_in + n_out,
        "aurc_entropy": aurc(correct_dgc, torch.cat(stream_dgc["entropy"])),
        "aurc_density": aurc(correct_dgc, torch.cat(stream_dgc["flag_score"])),
        "aurc_both": aurc(correct_dgc, torch.cat(stream_dgc["both"])),
        "aurc_baseline_max_softmax": aurc(correct_base, torch.cat(stream_base)),
    }
    record["seconds"] = {"fit": round(t_fit, 1), "total": round(time.perf_counter() - t0, 1)}
    return record


def _mean(records: list[dict[str, Any]], get: Any) -> str:
    values = [get(r) for r in records]
    m = float(np.mean(values))
    return f"{m:.3f}" + (f" ± {float(np.std(values, ddof=1)):.3f}" if len(values) > 1 else "")


def markdown(report: dict[str, Any]) -> str:
    """The tables of ``ood.md``: means (± sd over seeds) of every figure."""
    recs = report["seeds"]
    lines = [
        f"# OOD detection and reject option: {report['dataset']}, seeds {report['seed_list']}, "
        f"{recs[0]['epochs']} epochs",
        "",
        f"{report['command']}  ",
        f"{report['machine']}, {report['date']}",
        "",
        f"DGC accuracy {_mean(recs, lambda r: r['dgc_acc'])}, baseline (logit-adjusted CE) "
        f"{_mean(recs, lambda r: r['baseline_acc'])}; OOD flag ({recs[0]['flag_score']}, stated false-alarm "
        f"{recs[0]['false_alarm']}) on the test split: {_mean(recs, lambda r: r['flag_rate_test'])}",
        "",
        "## AUROC (FPR95) per OOD set",
        "",
    ]
    cols = [f"dgc_{s}" for s in DGC_SCORES] + [f"baseline_{s}" for s in BASELINE_SCORES]
    lines += ["| set | flag rate | " + " | ".join(cols) + " |", "|---" * (len(cols) + 2) + "|"]
    for name in recs[0]["sets"]:
        cells = [
            _mean(recs, lambda r, c=c, name=name: r["sets"][name][f"{c}_auroc"])
            + " ("
            + _mean(recs, lambda r, c=c, name=name: r["sets"][name][f"{c}_fpr95"])
            + ")"
            for c in cols
        ]
        rate = _mean(recs, lambda r, name=name: r["sets"][name]["flag_rate"])
        lines.append(f"| {name} | {rate} | " + " | ".join(cells) + " |")
    share = recs[0]["stream"]["ood_share"]
    lines += [
        "",
        f"## AURC on the mixed stream ({share:.0%} OOD; lower is better)",
        "",
        "| " + " | ".join(REJECT_SCORES) + " |",
        "|---" * len(REJECT_SCORES) + "|",
        "| " + " | ".join(_mean(recs, lambda r, k=k: r["stream"][f"aurc_{k}"]) for k in REJECT_SCORES) + " |",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--counts", default=None, help="per-class training counts (default: the paper's)")
    parser.add_argument("--epochs", type=int, default=None, help="default: the dataset recipe's")
    parser.add_argument("--seeds", default="1", help="comma-separated, e.g. 1,2,3")
    parser.add_argument("--false-alarm", type=float, default=0.05)
    parser.add_argument("--dev-per-class", type=int, default=100, help="dev images per class for the flag")
    parser.add_argument("--stream-ood-share", type=float, default=0.2)
    parser.add_argument("--test-subset", type=int, default=None, help="score a random subset of the test split")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--smoke", action="store_true", help="digits, 1 epoch, small dev set: seconds")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.smoke:
        args.dataset, args.epochs, args.dev_per_class, args.data_dir = "digits", 1, 5, None
    if args.counts:
        from dgc_pyro.data import parse_counts

        args.counts = parse_counts(args.counts)
    seeds = [int(s) for s in args.seeds.split(",")]
    report = {
        "dataset": args.dataset,
        "seed_list": seeds,
        "command": "python benchmarks/ood.py " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.node()} ({platform.machine()}, {torch.get_num_threads()} torch threads)",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "seeds": [],
    }
    out = Path(args.out)
    for seed in seeds:
        report["seeds"].append(run_seed(args, seed))
        write_json(out / "ood.json", report)  # after every seed, so a cut-off run keeps what it finished
        print(f"seed {seed} done in {report['seeds'][-1]['seconds']['total']} s", file=sys.stderr)
    text = markdown(report)
    atomic_write_text(out / "ood.md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
