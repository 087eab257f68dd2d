"""Wall and CPU time of the digits DGC fit with 1 and 2 torch threads, interleaved (issue 19: ``--threads``).

The digits networks are MLPs whose matrix products are too small to share out between threads; on a machine whose
cores other programs also use, the threads wait for each other. Runs alternate between the thread counts, so a
change of load hits both alike. The fit is the digits recipe (``DEFAULT_RECIPES["digits"]``) on its dev split.

    .venv/bin/python benchmarks/threads.py --epochs 10 --rounds 2
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time

import torch

from dgc_pyro.data import load_imbalanced
from dgc_pyro.experiment import DEFAULT_RECIPES, train


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    args = p.parse_args()
    split = load_imbalanced("digits", seed=1, evaluate_on="dev", dev_per_class=8)
    recipe = dataclasses.replace(DEFAULT_RECIPES["digits"], epochs=args.epochs)
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {platform.platform()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    for _ in range(args.rounds):
        for threads in args.threads:
            torch.set_num_threads(threads)
            wall, cpu = time.perf_counter(), time.process_time()
            train(recipe, split, 1, device="cpu", progress=False)
            print(
                f"{threads} thread(s): {args.epochs} epochs in {time.perf_counter() - wall:.1f} s wall, "
                f"{time.process_time() - cpu:.1f} s CPU (load average {os.getloadavg()[0]:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
