"""Does DGC's synthetic minority data help a plain CNN? A three-arm comparison on one imbalanced subset.

Arms, all the same plain CNN (``dgc_pyro.baselines.fit_baseline("ce", ...)``, same seed, same epochs,
no validation-based model selection so that no arm selects on synthetic data):

  (a) the imbalanced training subset as is;
  (b) the subset plus DGC's synthetic minority examples (a DGC is fitted on the subset, then
      ``dgc_pyro.inference.augment``);
  (c) the subset plus SMOTE's synthetic examples (imblearn's SMOTE on flattened pixels, clipped to [0, 1]);
  (d) optional (``--arms ... ros``): the subset plus copies of its own images (imblearn's RandomOverSampler),
      the control that tells whether the generative model adds anything over repeating the minority images.

(b), (c) and (d) ask for the same number of examples per class (one imbalanced-learn sampling strategy), and
SMOTE and random over-sampling always add exactly that; with ``--filter-threshold`` DGC may add fewer (samples that
fail the filter are dropped). The run records what each arm actually added (``synthetic_added_per_class``) and
``--collect`` refuses runs in which an arm added other than the requested counts.
``--arms`` picks the arms; without ``dgc`` no DGC is fitted. On the CPU every arm is deterministic given the seed,
so runs of one configuration with different ``--arms`` can be pooled by ``--collect``, which checks that an arm
present in two runs of a seed has the same scores in both.
Every arm is scored on the full test split with ``dgc_pyro.metrics.imbalance_report``, using the
subset's training counts to name the minority (R_MI) and majority (P_MA) classes.

    python benchmarks/augmentation.py --dataset fashion --data-dir ../shared/data --seed 1 --quick
    python benchmarks/augmentation.py --dataset fashion --data-dir ../shared/data --seed 1 \\
        --dgc-epochs 10 --cnn-epochs 5 --out runs/augmentation.json --grid docs/images/augmentation_fashion.png
    python benchmarks/augmentation.py --collect runs/seed*.json --out runs/summary.json

``--collect`` reads finished runs of one configuration (different seeds) and prints, per seed and on average,
every arm's ACSA and R_MI, and the paired differences of (b) against (a) and (c): mean, 95% t-interval,
two-sided paired t-test and the number of seeds (b) wins.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.baselines import fit_baseline
from dgc_pyro.data import default_counts, load_imbalanced, parse_counts
from dgc_pyro.data.transforms import TRANSFORM_CHOICES, transform_option
from dgc_pyro.diagnostics.plots import save_image_grid
from dgc_pyro.experiment import default_recipe, evaluate_model, train
from dgc_pyro.inference import augment, resolve_device, synthetic_counts
from dgc_pyro.io import write_json
from dgc_pyro.metrics import format_comparison, format_paired, imbalance_report, paired_difference

METRICS = ("acsa", "gmean", "fmacro", "r_mi", "p_ma")
ARMS = ("imbalanced", "+DGC samples", "+SMOTE", "+random over-sampling")
ARM_KEYS = {"imbalanced": ARMS[0], "dgc": ARMS[1], "smote": ARMS[2], "ros": ARMS[3]}
# --quick: a tenth of the paper's counts (ratio still 100) and a few epochs: a couple of minutes on 2 cores.
QUICK = {"divide_counts": 10, "dgc_epochs": 4, "cnn_epochs": 3}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion")
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--seed", type=int, default=1, help="seed of the imbalanced subset, of every fit and of sampling")
    p.add_argument("--counts", type=parse_counts, default=None, help="per-class training counts (default: the paper's)")
    p.add_argument("--epochs", type=int, default=None, help="epochs of both the DGC and the CNNs")
    p.add_argument("--dgc-epochs", type=int, default=None, help="epochs of the DGC fit (default: the recipe's)")
    p.add_argument("--cnn-epochs", type=int, default=None, help="epochs of each CNN (default: 20)")
    p.add_argument("--cnn-batch-size", type=int, default=100)
    p.add_argument("--cnn-lr", type=float, default=1e-3)
    p.add_argument("--val-num-samples", type=int, default=2, help="latent draws per class when validating the DGC")
    p.add_argument(
        "--target-ratio",
        type=float,
        default=1.0,
        help="grow every class smaller than ratio * n_max to that size (1.0: imblearn's 'auto')",
    )
    p.add_argument("--filter-threshold", type=float, default=None, help="DGC posterior filter of the samples")
    p.add_argument("--perturbation-scale", type=float, default=1.0)
    p.add_argument(
        "--output",
        choices=("mean", "residual"),
        default="mean",
        help="augment's output: the decoded mean image, or the real image plus the decoded change",
    )
    p.add_argument(
        "--arms",
        nargs="+",
        choices=tuple(ARM_KEYS),
        default=["imbalanced", "dgc", "smote"],
        help="which arms to train (ros: random over-sampling, the copies-of-real-images control)",
    )
    p.add_argument(
        "--transform",
        choices=TRANSFORM_CHOICES,
        default="none",
        help="random training-time transform of the DGC fit and of every CNN arm alike",
    )
    p.add_argument(
        "--same-steps-control",
        action="store_true",
        help="add an arm (a'): the imbalanced subset trained for as many gradient steps as (b) and (c) "
        "(one such arm per distinct number of examples the over-sampled arms actually added)",
    )
    p.add_argument("--eval-dgc", action="store_true", help="also score the DGC itself as a classifier (slow on CPU)")
    p.add_argument("--quick", action="store_true", help=f"small, fast settings: {QUICK}")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--grid", default=None, help="write a PNG grid of real and DGC samples per class here")
    p.add_argument(
        "--collect",
        nargs="+",
        default=None,
        metavar="RUN_JSON",
        help="summarise finished runs (one per seed) instead of running; --out writes the summary",
    )
    return p


def _log(msg: str, t0: float) -> None:
    print(f"[{time.perf_counter() - t0:7.1f} s] {msg}", flush=True)


def _strategy(counts: np.ndarray, ratio: float) -> str | dict[int, int]:
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"--target-ratio must be in (0, 1], got {ratio}")
    if ratio == 1.0:
        return "auto"
    target = math.ceil(ratio * counts.max())
    return {c: max(int(n), target) for c, n in enumerate(counts)}


def _smote(x: torch.Tensor, y: torch.Tensor, strategy, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """SMOTE's synthetic examples only (imblearn appends them after the originals), clipped to [0, 1]."""
    from imblearn.over_sampling import SMOTE

    counts = np.bincount(y.numpy())
    k = int(min(5, counts[counts > 0].min() - 1))
    if k < 1:
        raise ValueError("SMOTE needs at least two examples in every class")
    flat = x.reshape(len(x), -1).numpy()
    xr, yr = SMOTE(sampling_strategy=strategy, k_neighbors=k, random_state=seed).fit_resample(flat, y.numpy())
    xs = np.clip(xr[len(x) :], 0.0, 1.0).astype(np.float32).reshape((-1, *x.shape[1:]))
    return torch.from_numpy(xs), torch.from_numpy(yr[len(x) :].astype(np.int64))


def _random_oversampling(x: torch.Tensor, y: torch.Tensor, strategy, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The copies imblearn's RandomOverSampler adds (appended after the originals), as images."""
    from imblearn.over_sampling import RandomOverSampler

    sampler = RandomOverSampler(sampling_strategy=strategy, random_state=seed)
    sampler.fit_resample(np.zeros((len(y), 1)), y.numpy())
    extra = torch.from_numpy(sampler.sample_indices_[len(y) :].astype(np.int64))
    return x[extra].clone(), y[extra].clone()


def save_class_grid(
    path: str | Path, split, x_syn: torch.Tensor, y_syn: torch.Tensor, n_real: int = 2, n_syn: int = 8
) -> None:
    """One row per augmented class: ``n_real`` real examples, a gap, then ``n_syn`` DGC samples."""
    classes = [c for c in range(split.num_classes) if (y_syn == c).any()]
    if not classes:
        raise ValueError("no synthetic samples to show in a grid")
    rows = [
        (
            str(split.class_names[c])[:10],
            [*split.x_train[split.y_train == c][:n_real].numpy(), None, *x_syn[y_syn == c][:n_syn].numpy()],
        )
        for c in classes
    ]
    save_image_grid(
        path,
        rows,
        title=f"{split.name}: real (left) and DGC samples (right), per augmented class",
        ncols=n_real + 1 + n_syn,
        cell=0.62,
        dpi=72,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = args.counts
    dgc_epochs, cnn_epochs = args.dgc_epochs, args.cnn_epochs
    if args.quick:
        if counts is None:
            base = default_counts(args.dataset)
            counts = tuple(max(4, n // QUICK["divide_counts"]) for n in base)
        dgc_epochs = dgc_epochs or args.epochs or QUICK["dgc_epochs"]
        cnn_epochs = cnn_epochs or args.epochs or QUICK["cnn_epochs"]
    recipe = default_recipe(args.dataset)
    dgc_epochs = dgc_epochs or args.epochs or recipe.epochs
    cnn_epochs = cnn_epochs or args.epochs or 20
    transform = transform_option(args.transform)
    recipe = dataclasses.replace(recipe, epochs=dgc_epochs, transform=transform)

    split = load_imbalanced(args.dataset, args.data_dir, counts=counts, seed=args.seed)
    train_counts = split.train_counts
    strategy = _strategy(train_counts, args.target_ratio)
    wanted = synthetic_counts(split.y_train, strategy)
    _log(
        f"{split.name}: train counts {train_counts.tolist()}, test {len(split.y_test)}; "
        f"synthetic per class requested {wanted} (strategy {strategy!r})",
        t0,
    )

    seconds: dict[str, float] = {}
    extra: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # arm -> the examples it adds to the subset
    history = None
    if "dgc" in args.arms:
        # (b) fit a DGC on the subset and decode synthetic minority examples from it.
        t = time.perf_counter()
        trained = train(
            recipe,
            split,
            args.seed,
            device=args.device,
            progress=False,
            val_num_samples=args.val_num_samples,
            callback=lambda e, r: _log(
                f"DGC epoch {e}: loss {r['loss']:.1f}, val ACSA {r.get('val_acsa', float('nan')):.3f}", t0
            ),
        )
        model, history = trained.model, trained.history
        seconds["dgc_fit"] = time.perf_counter() - t
        t = time.perf_counter()
        x_dgc, y_dgc = augment(
            model,
            split.x_train,
            split.y_train,
            strategy,
            perturbation_scale=args.perturbation_scale,
            filter_threshold=args.filter_threshold,
            seed=args.seed,
            output=args.output,
        )
        seconds["dgc_augment"] = time.perf_counter() - t
        extra[ARM_KEYS["dgc"]] = (x_dgc, y_dgc)
        _log(f"DGC: {len(y_dgc)} synthetic examples (best epoch {history.best_epoch})", t0)
        if args.grid and len(y_dgc):
            save_class_grid(args.grid, split, x_dgc, y_dgc)
            _log(f"wrote {args.grid}", t0)
        elif args.grid:
            _log(f"no DGC samples passed the filter: no grid written to {args.grid}", t0)
    for key, sampler in (("smote", _smote), ("ros", _random_oversampling)):
        # (c), (d): the same strategy, from imbalanced-learn
        if key in args.arms:
            t = time.perf_counter()
            extra[ARM_KEYS[key]] = sampler(split.x_train, split.y_train, strategy, args.seed)
            seconds[key] = time.perf_counter() - t

    # What each over-sampled arm really added: DGC's filter can fall short of the quota, and a claim that the arms
    # add the same numbers must rest on the counts, not on the request.
    added = {
        name: {
            int(c): int(n)
            for c, n in enumerate(np.bincount(y_add.numpy(), minlength=split.num_classes))
            if n or int(c) in wanted
        }
        for name, (_, y_add) in extra.items()
    }
    requested = {int(c): int(n) for c, n in wanted.items()}
    short_arms = sorted(name for name, got in added.items() if got != requested)
    for name in short_arms:
        _log(
            f"WARNING: arm {name!r} added {added[name]} instead of the requested {requested}; "
            "the over-sampled arms are not of equal size",
            t0,
        )

    arms: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for name in ARMS:
        if name == ARMS[0] and "imbalanced" in args.arms:
            arms[name] = (split.x_train, split.y_train, cnn_epochs)
        elif name in extra:
            x_add, y_add = extra[name]
            arms[name] = (torch.cat([split.x_train, x_add]), torch.cat([split.y_train, y_add]), cnn_epochs)
    same_steps: dict[str, str] = {}  # over-sampled arm -> the control arm with as many gradient steps
    if args.same_steps_control:
        # Over-sampled arms take more gradient steps per epoch; the control takes as many on the real data alone.
        # Sized from what each arm actually added, so an arm short of its quota gets its own, shorter control.
        for name in extra:
            same = max(1, round(cnn_epochs * (len(split.y_train) + sum(added[name].values())) / len(split.y_train)))
            control = f"imbalanced, {same} epochs"
            arms[control] = (split.x_train, split.y_train, same)
            same_steps[name] = control
    reports: dict[str, dict[str, float]] = {}
    for name, (x, y, epochs) in arms.items():
        t = time.perf_counter()
        fitted = fit_baseline(
            "ce",
            x,
            y,
            num_classes=split.num_classes,
            preset=recipe.preset,
            epochs=epochs,
            batch_size=args.cnn_batch_size,
            lr=args.cnn_lr,
            device=args.device,
            seed=args.seed,
            val_fraction=0.0,
            transform=transform,
        )
        pred = fitted.predict_proba(split.x_test).argmax(-1)
        reports[f"CNN {name}"] = imbalance_report(
            split.y_test, pred, num_classes=split.num_classes, train_counts=train_counts
        )
        seconds[f"cnn {name}"] = time.perf_counter() - t
        _log(f"CNN {name}: {len(y)} training examples, ACSA {reports[f'CNN {name}']['acsa']:.4f}", t0)
    if args.eval_dgc and history is not None:
        t = time.perf_counter()
        reports["DGC itself"], _ = evaluate_model(model, split.x_test, split.y_test, train_counts, recipe.num_samples)
        seconds["dgc_evaluate"] = time.perf_counter() - t

    seconds["total"] = time.perf_counter() - t0
    print(format_comparison(reports, metrics=METRICS), flush=True)
    result = {
        "command": " ".join(["python", "benchmarks/augmentation.py", *sys.argv[1:]])
        if args.argv is None
        else args.argv,
        "dataset": split.name,
        "seed": args.seed,
        "train_counts": train_counts.tolist(),
        "test_size": len(split.y_test),
        "sampling_strategy": strategy,
        "synthetic_per_class": wanted,
        "synthetic_added_per_class": added,
        "arms_short_of_request": short_arms,
        **({"same_steps_control": same_steps} if args.same_steps_control else {}),
        "arms": list(args.arms),
        "dgc": {
            "recipe": recipe.to_dict(),
            "val_num_samples": args.val_num_samples,
            "best_epoch": history.best_epoch if history else None,
            "history": history.epochs if history else [],
            "filter_threshold": args.filter_threshold,
            "perturbation_scale": args.perturbation_scale,
            "output": args.output,
        },
        "cnn": {
            "epochs": cnn_epochs,
            "batch_size": args.cnn_batch_size,
            "lr": args.cnn_lr,
            "val_fraction": 0.0,
            **({"transform": transform} if transform else {}),
        },
        "reports": reports,
        "seconds": seconds,
        "machine": {
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
            "device": str(resolve_device(args.device)),
        },
    }
    if args.out:
        write_json(args.out, result)
        _log(f"wrote {args.out}", t0)
    return result


# What may differ between runs that --collect pools: the seed and where the outputs went.
_PER_RUN_KEYS = {
    "seed",
    "arms",
    "command",
    "train_counts",
    "seconds",
    "machine",
    "reports",
    "synthetic_per_class",
    "synthetic_added_per_class",
    "arms_short_of_request",
    "same_steps_control",
    "added_not_recorded",
}
_PER_RUN_DGC_KEYS = {"best_epoch", "history"}


def _configuration(result: Mapping[str, Any]) -> dict[str, Any]:
    config = {k: v for k, v in result.items() if k not in _PER_RUN_KEYS}
    config["dgc"] = {k: v for k, v in result.get("dgc", {}).items() if k not in _PER_RUN_DGC_KEYS}
    if isinstance(config["dgc"].get("recipe"), dict) and config["dgc"]["recipe"].get("transform") is None:
        # runs written before Recipe had a transform field are the same configuration as transform=None
        config["dgc"]["recipe"] = {k: v for k, v in config["dgc"]["recipe"].items() if k != "transform"}
    return config


def _check_one_configuration(results: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """The shared configuration of ``results``; ``ValueError`` naming the first field where one differs."""
    reference = _configuration(results[0])
    for name, r in zip(names, results):
        config = _configuration(r)
        for key in sorted(set(reference) | set(config)):
            if config.get(key) != reference.get(key):
                raise ValueError(
                    f"{name} differs from {names[0]} in {key!r}: {config.get(key)!r} vs {reference.get(key)!r}"
                )
    return reference


def _check_added_counts(results: Sequence[Mapping[str, Any]], seeds: Sequence[int], arms: Sequence[str]) -> None:
    """``ValueError`` if a compared over-sampled arm of some run added other than the requested counts.

    Pooling such runs would compare arms of different sizes under the claim that they add the same numbers.
    Runs that predate ``synthetic_added_per_class`` pass (``collect`` reports them as unrecorded).
    """
    for seed, result in zip(seeds, results):
        added = result.get("synthetic_added_per_class")
        if not added:
            continue
        requested = {str(c): int(n) for c, n in result["synthetic_per_class"].items()}
        for name in arms:
            arm = name.removeprefix("CNN ")
            if arm not in added:
                continue
            got = {str(c): int(n) for c, n in added[arm].items()}
            if got != requested:
                raise ValueError(
                    f"run of seed {seed}: arm {name!r} added {got} synthetic examples per class instead "
                    f"of the requested {requested} (the DGC filter fell short?); its arms are not of "
                    "equal size and are not pooled"
                )


def compare_seeds(
    results: Sequence[Mapping[str, Any]],
    arm: str = "CNN " + ARMS[1],
    against: Sequence[str] | None = None,
    metrics: Sequence[str] = ("acsa", "r_mi"),
) -> dict[str, Any]:
    """Pool runs of one configuration over seeds: per-arm mean ± std and paired differences of ``arm``.

    Every run must share the configuration (dataset, recipe, CNN settings, filter, ...) and have a distinct
    seed; a mismatch raises ``ValueError`` naming the field, so runs of different settings are never averaged.
    ``against`` defaults to every other arm that all runs have.
    """
    if not results:
        raise ValueError("no runs to collect")
    seeds = [int(r["seed"]) for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"duplicate seeds among the runs: {sorted(seeds)}")
    reference = _check_one_configuration(results, [f"run of seed {seed}" for seed in seeds])
    order = np.argsort(seeds)
    results = [results[i] for i in order]
    seeds = [seeds[i] for i in order]
    if against is None:
        against = [
            name for name in (f"CNN {a}" for a in ARMS) if name != arm and all(name in r["reports"] for r in results)
        ]
    arms = [arm, *against]
    for name in arms:
        missing = [s for s, r in zip(seeds, results) if name not in r["reports"]]
        if missing:
            raise ValueError(f"arm {name!r} missing from the runs of seeds {missing}")
    _check_added_counts(results, seeds, arms)
    values = {
        name: {m: np.array([r["reports"][name][m] for r in results], dtype=float) for m in metrics} for name in arms
    }
    n = len(results)
    summary: dict[str, Any] = {"seeds": seeds, "configuration": reference, "arms": {}, "paired": {}}
    for name in arms:
        summary["arms"][name] = {
            m: {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if n > 1 else None, "per_seed": v.tolist()}
            for m, v in values[name].items()
        }
    for other in against:
        cells = {m: paired_difference(values[arm][m], values[other][m]) for m in metrics}
        summary["paired"][f"{arm} - {other}"] = cells
    return summary


def render_comparison(summary: Mapping[str, Any]) -> str:
    """Markdown: one row per arm (per-seed ``metric`` pairs and means), then the paired differences."""
    seeds = summary["seeds"]
    metrics = list(next(iter(summary["arms"].values())))
    label = " / ".join(metrics)
    lines = [
        f"| arm ({label}) | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |",
        "|---|" + "---|" * (len(seeds) + 1),
    ]
    for name, cells in summary["arms"].items():
        per_seed = [" / ".join(f"{cells[m]['per_seed'][i]:.4f}" for m in metrics) for i in range(len(seeds))]
        mean = " / ".join(f"{cells[m]['mean']:.4f}" for m in metrics)
        lines.append(f"| {name} | " + " | ".join(per_seed) + f" | {mean} |")
    return "\n".join(lines) + "\n\n" + format_paired(summary["paired"])


def merge_runs(results: Sequence[Mapping[str, Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    """One result per seed: runs of a seed with different ``--arms`` are joined into one.

    An arm present in two runs of a seed must have the same scores in both: the pairing of arms across runs
    rests on every arm being deterministic given the seed, and this is where that is checked.
    """
    if results:
        _check_one_configuration(results, names)
    merged: dict[int, dict[str, Any]] = {}
    source: dict[tuple[int, str], str] = {}
    for name, result in zip(names, results):
        seed = int(result["seed"])
        into = merged.setdefault(seed, {**result, "reports": {}, "synthetic_added_per_class": {}})
        if "synthetic_added_per_class" not in result:
            into["added_not_recorded"] = [*into.get("added_not_recorded", []), name]
        into["synthetic_added_per_class"].update(result.get("synthetic_added_per_class", {}))
        for arm, report in result["reports"].items():
            if arm in into["reports"] and into["reports"][arm] != report:
                raise ValueError(
                    f"seed {seed}: arm {arm!r} scores differently in {source[seed, arm]} and {name} "
                    f"(ACSA {into['reports'][arm].get('acsa')} vs {report.get('acsa')}); "
                    "the runs are not of one configuration, or not deterministic"
                )
            into["reports"][arm] = report
            source[seed, arm] = name
    return list(merged.values())


def collect(paths: Sequence[str | Path], out: str | Path | None = None) -> dict[str, Any]:
    """Read run JSONs, compare them over seeds, print the markdown and optionally write the summary JSON."""
    import json

    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read run {path}: {err}") from err
        if "reports" not in results[-1] or "seed" not in results[-1]:
            raise ValueError(f"{path} is not an augmentation.py run (no 'reports' or 'seed')")
    merged = merge_runs(results, [str(p) for p in paths])
    summary = compare_seeds(merged)
    summary["runs"] = [str(p) for p in paths]
    unrecorded = sorted({name for r in merged for name in r.get("added_not_recorded", [])})
    if unrecorded:
        # Runs written before the counts were recorded: what their arms added is unknown, and the summary says so.
        summary["added_counts_not_recorded"] = unrecorded
    print(render_comparison(summary), flush=True)
    if unrecorded:
        print(
            f"note: {len(unrecorded)} run(s) do not record how many examples each arm added "
            f"(written before synthetic_added_per_class): {', '.join(unrecorded)}",
            flush=True,
        )
    if out:
        write_json(out, summary)
    return summary


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; returns the result dict (also written to ``--out``)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.collect:
        try:
            return collect(args.collect, args.out)
        except ValueError as err:
            parser.error(str(err))
    if "dgc" not in args.arms:
        # Both act on the fitted DGC, which is only fitted for the dgc arm; running without it would drop them silently.
        ignored = [opt for opt, given in (("--eval-dgc", args.eval_dgc), ("--grid", args.grid)) if given]
        if ignored:
            parser.error(
                f"{' and '.join(ignored)} need(s) a fitted DGC: add 'dgc' to --arms (got --arms {' '.join(args.arms)})"
            )
    args.argv = None if argv is None else " ".join(["python", "benchmarks/augmentation.py", *argv])
    return run(args)


if __name__ == "__main__":
    main()
