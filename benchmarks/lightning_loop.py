"""The training loop's own cost: dgc_pyro's Trainer against a Lightning loop doing the same SVI steps (issue 20).

Issue 20 asks to prefer Lightning's loop unless it breaks a promise of the package (bit-identical resume on CPU, the
graph engine's speed), and to measure both sides. This script fits the same digits DGC (the digits recipe's model,
the plain ELBO, no perturbation step, no validation split, constant rate) for the same epochs and batch size:

- ``dgc_pyro``, ``engine="torch"``: the package's Trainer, one eager autograd step a batch;
- ``dgc_pyro``, ``engine="graph"``: the same Trainer replaying the captured step;
- ``lightning``: a ``LightningModule`` with manual optimisation whose ``training_step`` takes the same loss
  callable and ``torch.optim.Adam`` step, under ``lightning.Trainer`` (no logger, checkpointing or progress bar).

Each loop fits twice, for ``--epochs`` and for 1 epoch; the difference over ``epochs - 1`` is the cost of an
epoch, the rest the start-up (the graph engine's capture, Lightning's set-up). It reports medians over the rounds
(runs interleaved, so a change of load hits all alike), after one untimed 1-epoch fit of each loop.
Lightning is not a dependency: run it where ``import lightning`` works, e.g.
``pip install --target /tmp/lt --no-deps lightning lightning-utilities torchmetrics fsspec pyyaml`` and

    PYTHONPATH=.:/tmp/lt .venv/bin/python benchmarks/lightning_loop.py --epochs 5 --rounds 3 --out benchmarks/results/lightning_loop.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from typing import Any

import torch

from dgc_pyro.data import load_imbalanced
from dgc_pyro.experiment import DEFAULT_RECIPES
from dgc_pyro.inference import fit
from dgc_pyro.inference.objectives import get_objective
from dgc_pyro.io import write_json
from dgc_pyro.reproducibility import seed_everything


def _lightning_fit(model: Any, x: torch.Tensor, y: torch.Tensor, epochs: int, batch_size: int, lr: float) -> float:
    """Fit ``model`` with a Lightning manual-optimisation loop; returns the wall seconds of ``trainer.fit``."""
    import lightning as L

    loss_fn = get_objective("elbo")

    class SviModule(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.dgc = model
            self.automatic_optimization = False  # the SVI step owns its optimiser, as in dgc_pyro's engines

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            opt = self.optimizers()
            opt.zero_grad()
            loss = loss_fn(self.dgc.model, self.dgc.guide, *batch)
            self.manual_backward(loss)
            opt.step()
            return loss.detach()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.dgc.parameters(), lr=lr)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size, shuffle=True)
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    started = time.perf_counter()
    trainer.fit(SviModule(), loader)
    return time.perf_counter() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the timings here as JSON")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split = load_imbalanced("digits", seed=1)
    recipe = DEFAULT_RECIPES["digits"]
    options = dict(
        epochs=args.epochs,
        batch_size=recipe.batch_size,
        lr=recipe.lr,
        objective="elbo",
        perturbation_rate=0.0,
        val_fraction=0.0,
        select_best=False,
    )
    if args.epochs < 2:
        raise SystemExit("--epochs must be at least 2 (the per-epoch cost is the difference to a 1-epoch fit)")

    def run(name: str, epochs: int) -> float:
        seed_everything(1)
        model = recipe.build_model(split.input_shape, split.num_classes, split.train_counts)
        if name == "lightning":
            return _lightning_fit(model, split.x_train, split.y_train, epochs, recipe.batch_size, recipe.lr)
        started = time.perf_counter()
        fit(
            model,
            split.x_train,
            split.y_train,
            device="cpu",
            seed=1,
            progress=False,
            engine=name.split()[1],
            **{**options, "epochs": epochs},
        )
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"dgc_pyro torch": [], "dgc_pyro graph": [], "lightning": []}
    startup: dict[str, list[float]] = {k: [] for k in times}
    for name in times:  # untimed: the process's first fit pays one-off costs (lazy imports and kernel set-up),
        run(name, 1)  # which a timed first fit would book as that loop's per-epoch cost (a negative start-up)
    for _ in range(args.rounds):
        for name in times:
            long, short = run(name, args.epochs), run(name, 1)
            per_epoch = (long - short) / (args.epochs - 1)
            times[name].append(per_epoch)
            startup[name].append(short - per_epoch)
    steps = -(-len(split.y_train) // recipe.batch_size)
    report = {
        "command": "benchmarks/lightning_loop.py " + " ".join(f"--{k} {v}" for k, v in vars(args).items() if v),
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": os.getloadavg()[0],
        "steps_per_epoch": steps,
        "seconds_per_epoch": {k: {"median": statistics.median(v), "runs": v} for k, v in times.items()},
        "startup_seconds": {k: {"median": statistics.median(v), "runs": v} for k, v in startup.items()},
    }
    for name, t in report["seconds_per_epoch"].items():
        print(
            f"{name:>15}: {t['median']:.3f} s/epoch ({1000 * t['median'] / steps:.2f} ms/step), start-up "
            f"{report['startup_seconds'][name]['median']:.2f} s"
        )
    if args.out:
        write_json(args.out, report)


if __name__ == "__main__":
    main()
