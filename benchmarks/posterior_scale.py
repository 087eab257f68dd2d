"""How wide is q(z | x) next to the spread of the latent codes? One short fit per objective, printed side by side.

The paper's perturbation step re-draws minority latents from q(z | x, y). If the posterior scale is tiny next to
the within-class spread of the posterior means, those re-draws are copies of the same code.

    python benchmarks/posterior_scale.py --dataset fashion --data-dir ../shared/data --epochs 4 --transform shift-flip
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence

import torch

from dgc_pyro.data import DATASET_REGISTRY, load_imbalanced
from dgc_pyro.data.transforms import TRANSFORM_CHOICES, transform_option
from dgc_pyro.experiment import default_recipe, train
from dgc_pyro.inference.objectives import OBJECTIVES


def latent_spread(model, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Median posterior sd, and the medians over dimensions of the within- and between-class sd of the means."""
    model.eval()
    with torch.no_grad():
        loc, scale = model.encode(x, None if not model.label_in_guide else y)
    present = [c for c in range(num_classes) if int((y == c).sum()) > 1]
    within = torch.stack([loc[y == c].std(0) for c in present]).median(0).values.median()
    between = torch.stack([loc[y == c].mean(0) for c in present]).std(0).median()
    return {"posterior_sd": float(scale.median()), "within_class_sd": float(within), "between_class_sd": float(between)}


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", choices=DATASET_REGISTRY.names(), default="fashion")
    p.add_argument("--data-dir", default="data")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--objectives", nargs="+", choices=sorted(OBJECTIVES), default=["elbo-analytic", "wae-mmd"])
    p.add_argument("--transform", choices=TRANSFORM_CHOICES, default=None)
    p.add_argument("--max-examples", type=int, default=3000, help="training examples encoded for the statistics")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    split = load_imbalanced(args.dataset, args.data_dir, seed=args.seed)
    base = dataclasses.replace(
        default_recipe(args.dataset), epochs=args.epochs, transform=transform_option(args.transform)
    )
    print("| objective | posterior sd | within-class sd of the means | between-class sd | fit (s) |")
    print("|---|---|---|---|---|")
    for objective in args.objectives:
        recipe = dataclasses.replace(base, objective=objective)
        trained = train(recipe, split, args.seed, device="cpu", progress=False, val_num_samples=2)
        model, seconds = trained.model, trained.seconds
        n = min(args.max_examples, len(split.y_train))
        s = latent_spread(model, split.x_train[:n], split.y_train[:n], split.num_classes)
        print(
            f"| {objective} | {s['posterior_sd']:.3f} | {s['within_class_sd']:.3f} | {s['between_class_sd']:.3f} | {seconds:.0f} |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
