"""The digits demo recipe (``make demo``): fit time, ACSA, ECE and validation stability of candidate recipes.

Issue 19 asks for a demo fit of at most 60 s on a 2-core CPU at the same ACSA (>= .83), and a model pick that
does not ride on the validation ACSA's swings. Recipes are scored on the digits *dev* set (official training
images the imbalanced subset left out, ``load_imbalanced(..., evaluate_on="dev")``), never on the test split.
Digits leaves only 8 unused images of class 0, so the dev set is 8 per class (80 images) per seed; several
seeds (different subsets and dev sets) are pooled.

Per run it records the DGC fit's wall time (``ExperimentResult.seconds["dgc_fit"]``, validation included),
dev ACSA and ECE, the CE baseline's dev ACSA and ECE, and the largest epoch-to-epoch change of the
validation ACSA. Prints one line per recipe (means over seeds) and writes all runs as JSON.

The runs behind the digits recipe (one thread, as ``dgc-pyro fit`` runs digits; 2-core shared CPU, 2026-12-04)::

    .venv/bin/python benchmarks/demo_recipe.py --seeds 1 2 3 4 5 --recipes current val20 val20_e90 val20_lw10 \
        val20_latent32 --json benchmarks/results/demo_recipe/runs_t1_s1_5.json
    .venv/bin/python benchmarks/demo_recipe.py --seeds 1 2 3 4 5 --recipes lw10 val20_lw30 val20_lw100 \
        val20_lw10_cosine_last --json benchmarks/results/demo_recipe/runs_t1_lw_s1_5.json

(``runs_s1_2.json`` and ``runs_val_s1_3.json`` are earlier, two-thread runs of the cosine and validation-size
candidates; their ``settings`` record each recipe in full.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from dgc_pyro.data import load_imbalanced
from dgc_pyro.experiment import DEFAULT_RECIPES, Recipe, run_experiment

#: candidates: today's recipe, and shorter cosine-decayed fits whose last epoch is kept (no noisy pick)
CANDIDATES: dict[str, dict] = {
    "current": {"val_fraction": 0.1, "label_weight": 1.0},  # the recipe before issue 19
    "e30_cosine_last": {"epochs": 30, "lr_schedule": "cosine", "select_best": False},
    "e30_cosine_best": {"epochs": 30, "lr_schedule": "cosine"},
    "e40_cosine_last": {"epochs": 40, "lr_schedule": "cosine", "select_best": False},
    "e15_cosine_last": {"epochs": 15, "lr_schedule": "cosine", "select_best": False},
    "e30_val20_best": {"epochs": 30, "val_fraction": 0.2},
    "val20": {"val_fraction": 0.2},
    "val25": {"val_fraction": 0.25},
    "val20_e90": {"val_fraction": 0.2, "epochs": 90},
    "val20_lw10": {"val_fraction": 0.2, "label_weight": 10.0},
    "val20_latent32": {"val_fraction": 0.2, "latent_dim": 32},
    "lw10": {"val_fraction": 0.1, "label_weight": 10.0},
    "val20_lw30": {"val_fraction": 0.2, "label_weight": 30.0},
    "val20_lw100": {"val_fraction": 0.2, "label_weight": 100.0},
    "val20_lw10_cosine_last": {
        "val_fraction": 0.2,
        "label_weight": 10.0,
        "lr_schedule": "cosine",
        "select_best": False,
    },
}


def run(name: str, recipe: Recipe, seed: int, engine: str) -> dict:
    split = load_imbalanced("digits", seed=seed, evaluate_on="dev", dev_per_class=8)
    t0, cpu0 = time.perf_counter(), time.process_time()
    result = run_experiment(
        split, recipe, seed=seed, device="cpu", baseline="ce", progress=False, fit_options={"engine": engine}
    )
    total, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    val = [r["val_acsa"] for r in result.history.to_dict()["epochs"] if r.get("val_acsa") is not None]
    swing = max((abs(b - a) for a, b in zip(val, val[1:])), default=0.0)
    return {
        "recipe": name,
        "seed": seed,
        "engine": engine,
        "fit_s": result.seconds["dgc_fit"],
        "total_s": total,
        "cpu_s": cpu,
        "dev_acsa": result.metrics["acsa"],
        "dev_ece": result.metrics["ece"],
        "ce_dev_acsa": result.baseline_metrics["acsa"],
        "ce_dev_ece": result.baseline_metrics["ece"],
        "val_swing": swing,
        "val_min": min(val, default=None),
        "val_max": max(val, default=None),
        "settings": recipe.to_dict(),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--recipes", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    p.add_argument("--engine", default="torch", choices=("torch", "graph"))
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (dgc-pyro fit's default for digits: 1)")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    base = DEFAULT_RECIPES["digits"]
    runs = []
    for name in args.recipes:
        recipe = dataclasses.replace(base, **CANDIDATES[name])
        rows = [run(name, recipe, s, args.engine) for s in args.seeds]
        runs += rows
        mean = {
            k: statistics.fmean(r[k] for r in rows)
            for k in ("fit_s", "cpu_s", "dev_acsa", "dev_ece", "ce_dev_acsa", "ce_dev_ece", "val_swing")
        }
        print(
            f"{name:<22} fit {mean['fit_s']:6.1f} s (run CPU {mean['cpu_s']:6.1f} s)  dev ACSA {mean['dev_acsa']:.3f}  ECE {mean['dev_ece']:.3f}  "
            f"| CE ACSA {mean['ce_dev_acsa']:.3f} ECE {mean['ce_dev_ece']:.3f}  | val swing {mean['val_swing']:.2f}",
            flush=True,
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        meta = {
            "machine": platform.platform(),
            "processor": platform.processor(),
            "threads": args.threads,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__,
        }
        args.json.write_text(json.dumps({"meta": meta, "runs": runs}, indent=2) + "\n")


if __name__ == "__main__":
    main()
