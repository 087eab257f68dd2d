"""Training cost of the objectives of the paper-structured DGC (issue 21, mechanism 4): one epoch each.

The evidence protocol's ``dgc_paper_guide`` recipe (q(z | x, y), the small preset, Fashion's 1 x 28 x 28 shape) is
fitted for one epoch on ``--n`` random images with each objective in turn, one thread, no progress bar; the wall
time of each ``fit`` is printed and written. Random images suffice: an epoch costs the same whatever the pixels.
The figures price the registered ``dgc_paper_iwae_cf`` row (K = 5 draws, and a second bound under a wrong label)
against the ELBO the paper guide is tuned with.

    PYTHONPATH=. .venv/bin/python benchmarks/objective_cost.py --json benchmarks/results/objective_cost.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_table  # the sibling benchmark: the paper-guide recipe

from dgc_pyro.experiment import default_recipe
from dgc_pyro.inference import fit
from dgc_pyro.inference.objectives import OBJECTIVES
from dgc_pyro.io import write_json
from dgc_pyro.reproducibility import seed_everything

SHAPE = (1, 28, 28)
NUM_CLASSES = 10


def epoch_seconds(objective: str, n: int, seed: int = 0) -> float:
    """Wall time of one ``fit`` epoch of the paper-guide recipe with ``objective`` on ``n`` random images."""
    base = dataclasses.replace(default_recipe("fashion"), epochs=1, preset="small")
    recipe = dataclasses.replace(paper_table.method_recipe("dgc_elbo_paper_guide", base), objective=objective)
    seed_everything(seed)
    x = torch.rand(n, *SHAPE)
    y = torch.arange(n) % NUM_CLASSES
    model = recipe.build_model(SHAPE, NUM_CLASSES, torch.bincount(y, minlength=NUM_CLASSES).tolist())
    t0 = time.perf_counter()
    fit(model, x, y, recipe.train, device="cpu", seed=seed, progress=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objectives", nargs="+", default=["elbo", "iwae", "iwae-cf"], choices=sorted(OBJECTIVES))
    p.add_argument("--n", type=int, default=2048, help="random training images (default 2048)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="write the figures here")
    args = p.parse_args(argv)
    if args.n < 2 * NUM_CLASSES:
        raise SystemExit(f"--n must be at least {2 * NUM_CLASSES} (two images a class), got {args.n}")
    torch.set_num_threads(args.threads)
    seconds = {name: epoch_seconds(name, args.n) for name in args.objectives}
    reference = seconds.get("elbo")
    for name, s in seconds.items():
        ratio = f" ({s / reference:.2f}x the ELBO)" if reference else ""
        print(f"{name:>10}: {s:6.1f} s for one epoch of {args.n} images{ratio}")
    if args.json:
        write_json(
            Path(args.json),
            {
                "seconds": seconds,
                "n": args.n,
                "environment": {
                    "argv": list(sys.argv if argv is None else argv),
                    "threads": torch.get_num_threads(),
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "machine": platform.machine(),
                    "node": platform.node(),
                    "date": datetime.datetime.now().isoformat(timespec="seconds"),
                },
            },
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
