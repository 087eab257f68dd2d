"""What the posterior filter of ``augment`` costs when the model can barely pass it, with and without the early stop.

A DGC trained for ``--epochs`` (1 by default: a model that few of its own samples convince) balances the paper's
imbalanced subset with ``augment(..., filter_threshold=0.9, output="residual")``. The same call runs twice, side by
side: once as shipped, and once with the per-class early stop switched off (every class keeps drawing for all
``max_rounds`` rounds, as before the stop existed). Both use the same seed, so the classes that never give up draw
the same samples.

    python benchmarks/augment_filter_cost.py --dataset fashion --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from collections.abc import Sequence

import numpy as np
import torch

from dgc_pyro.data import DATASET_REGISTRY, load_imbalanced
from dgc_pyro.experiment import default_recipe, train
from dgc_pyro.inference import augment

augment_module = sys.modules["dgc_pyro.inference.augment"]


def run_filter(model, x, y, threshold: float, seed: int, early_stop: bool) -> dict:
    """One filtered ``augment`` call; returns seconds, rounds, draws scored, samples kept and the warning."""
    scored: list[int] = []
    real_proba, real_hopeless = augment_module.predict_proba, augment_module._hopeless

    def counting(m, xs, *args, **kwargs):
        scored.append(len(xs))
        return real_proba(m, xs, *args, **kwargs)

    augment_module.predict_proba = counting
    if not early_stop:
        augment_module._hopeless = lambda *args: False
    try:
        t = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _, ys = augment(model, x, y, "auto", filter_threshold=threshold, output="residual", seed=seed)
        seconds = time.perf_counter() - t
    finally:
        augment_module.predict_proba, augment_module._hopeless = real_proba, real_hopeless
    return {
        "seconds": seconds,
        "rounds": len(scored),
        "scored": sum(scored),
        "kept": len(ys),
        "per_class": np.bincount(ys.numpy(), minlength=int(y.max()) + 1).tolist(),
        "warning": str(caught[-1].message) if caught else "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASET_REGISTRY.names(), default="fashion")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = load_imbalanced(args.dataset, args.data_dir, seed=args.seed)
    recipe = dataclasses.replace(default_recipe(args.dataset), epochs=args.epochs)
    model = train(recipe, split, args.seed, device="cpu", progress=False, val_num_samples=2).model
    print("| filter | seconds | rounds | draws scored | samples kept |")
    print("|---|---|---|---|---|")
    results = {}
    for name, early in (("with the early stop", True), ("without it", False)):
        r = results[name] = run_filter(model, split.x_train, split.y_train, args.threshold, args.seed, early)
        print(f"| {name} | {r['seconds']:.0f} | {r['rounds']} | {r['scored']} | {r['kept']} |", flush=True)
    for name, r in results.items():
        print(f"{name}: kept per class {r['per_class']}; {r['warning']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
