"""Command line interface: ``dgc-pyro fit`` and ``dgc-pyro evaluate``.

A thin layer over :mod:`dgc_pyro.experiment`; every error a user can cause ends in a one-line message
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Sequence

import numpy as np

from dgc_pyro.baselines import BASELINES
from dgc_pyro.data import DATASETS, load_imbalanced, parse_counts, split_from_arrays
from dgc_pyro.data.splits import ImbalancedSplit
from dgc_pyro.inference.device import DEVICE_CHOICES
from dgc_pyro.inference.objectives import OBJECTIVES
from dgc_pyro.io import CheckpointError
from dgc_pyro.models.likelihoods import LIKELIHOODS
from dgc_pyro.models.networks import PRESETS

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


def _add_data_args(p: argparse.ArgumentParser, dataset_default: str | None) -> None:
    p.add_argument("--dataset", default=dataset_default,
                   help=f"one of {', '.join(DATASETS)}, or an .npz file with x_train, y_train[, x_test, y_test]")
    p.add_argument("--data-dir", default="data", help="root folder of the torchvision datasets (default: ./data)")
    p.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    p.add_argument("--counts", type=parse_counts, default=None,
                   help="per-class training counts, e.g. 4000,2000,1000 (default: the paper's Table 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of the imbalanced subset and of training")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--num-samples", type=int, default=None, help="latent draws per class when predicting")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dgc-pyro``."""
    parser = argparse.ArgumentParser(prog="dgc-pyro", description="Deep generative classification for imbalanced data (Pyro).")
    sub = parser.add_subparsers(dest="command")

    f = sub.add_parser("fit", help="fit DGC (and a baseline) on an imbalanced dataset and evaluate it")
    _add_data_args(f, "digits")
    f.add_argument("--epochs", type=int, default=None)
    f.add_argument("--batch-size", type=int, default=None)
    f.add_argument("--lr", type=float, default=None)
    f.add_argument("--latent-dim", type=int, default=None)
    f.add_argument("--preset", choices=PRESETS, default=None)
    f.add_argument("--likelihood", choices=tuple(LIKELIHOODS), default=None)
    f.add_argument("--objective", choices=sorted(OBJECTIVES), default=None)
    f.add_argument("--perturbation-rate", type=float, default=None, help="the paper's r (0 disables the step)")
    f.add_argument("--baseline", choices=BASELINES + ("none",), default="ce",
                   help="discriminative baseline fitted on the same split (default: ce on the same encoder)")
    f.add_argument("--out", default="runs/latest", help="output folder for metrics.json and model.safetensors")
    f.add_argument("--no-progress", action="store_true")

    e = sub.add_parser("evaluate", help="evaluate a saved model on a dataset's test split")
    e.add_argument("--checkpoint", required=True, help="model.safetensors written by 'dgc-pyro fit'")
    _add_data_args(e, None)
    e.add_argument("--out", default=None, help="write metrics.json here")
    return parser


def _load_split(args: argparse.Namespace) -> ImbalancedSplit:
    name = args.dataset
    if name.endswith(".npz"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        try:
            with np.load(path, allow_pickle=False) as arrays:
                data = {k: arrays[k] for k in arrays.files}
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path} as an .npz archive: {e}") from None
        if "x_train" not in data or "y_train" not in data:
            raise UserError(f"{path} must contain arrays x_train and y_train (found {sorted(data)})")
        return split_from_arrays(data["x_train"], data["y_train"], data.get("x_test"), data.get("y_test"), name=path.stem)
    return load_imbalanced(name, args.data_dir, counts=args.counts, seed=args.seed, download=args.download)


def _cmd_fit(args: argparse.Namespace) -> int:
    from dgc_pyro.experiment import default_recipe, run_experiment
    from dgc_pyro.metrics import format_comparison

    split = _load_split(args)
    base = default_recipe(split.name)
    overrides = {
        "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr, "latent_dim": args.latent_dim,
        "preset": args.preset, "likelihood": args.likelihood, "objective": args.objective,
        "perturbation_rate": args.perturbation_rate, "num_samples": args.num_samples,
    }
    recipe = dataclasses.replace(base, **{k: v for k, v in overrides.items() if v is not None})
    for key in ("epochs", "batch_size", "num_samples", "latent_dim"):
        if getattr(recipe, key) < 1:
            raise UserError(f"--{key.replace('_', '-')} must be at least 1")
    counts = ", ".join(str(c) for c in split.train_counts)
    print(f"dataset {split.name}: {len(split.y_train)} training examples (per class: {counts}), {len(split.y_test)} test")
    baseline = None if args.baseline == "none" else args.baseline
    result = run_experiment(
        split, recipe, seed=args.seed, device=args.device, baseline=baseline, out_dir=args.out,
        progress=not args.no_progress, data_config={"data_dir": args.data_dir, "counts": args.counts},
    )
    reports = {"DGC": result.metrics}
    if result.baseline_metrics is not None:
        reports[f"baseline ({baseline})"] = result.baseline_metrics
    print(format_comparison(reports, metrics=("acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc", "ece")))
    print(f"fit {result.seconds['dgc_fit']:.1f} s on {result.config['device']}; wrote {Path(args.out) / 'metrics.json'}")
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dgc_pyro.checkpoint import load_model
    from dgc_pyro.experiment import evaluate_model
    from dgc_pyro.inference.device import resolve_device
    from dgc_pyro.io import write_json
    from dgc_pyro.metrics import format_comparison

    model, meta = load_model(args.checkpoint, map_location=resolve_device(args.device))
    saved = meta.get("config", {})
    if args.dataset is None:
        args.dataset = saved.get("dataset")
        if args.dataset is None:
            raise UserError("--dataset is required: the checkpoint does not name its dataset")
    if args.counts is None and saved.get("counts"):
        args.counts = tuple(saved["counts"])
    split = _load_split(args)
    if tuple(split.input_shape) != tuple(model.input_shape) or split.num_classes != model.num_classes:
        raise UserError(
            f"the checkpoint is for inputs {tuple(model.input_shape)} with {model.num_classes} classes, "
            f"but {split.name} has {tuple(split.input_shape)} with {split.num_classes}"
        )
    train_counts = np.asarray(saved.get("train_counts", split.train_counts))
    num_samples = args.num_samples or saved.get("recipe", {}).get("num_samples", 10)
    report, _ = evaluate_model(model, split.x_test, split.y_test, train_counts, num_samples)
    print(format_comparison({"DGC": report}, metrics=("acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc", "ece")))
    if args.out:
        write_json(Path(args.out) / "metrics.json", {**report, "checkpoint": str(args.checkpoint), "dataset": split.name})
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dgc-pyro`` console script."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["fit"]  # no arguments: the embedded digits default
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return _cmd_fit(args) if args.command == "fit" else _cmd_evaluate(args)
    except (UserError, ValueError, FileNotFoundError, CheckpointError, FloatingPointError) as e:
        print(f"dgc-pyro {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"dgc-pyro {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
