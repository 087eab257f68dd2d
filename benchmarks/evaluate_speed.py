"""Wall time of ``dgc-pyro evaluate`` on the 10,000 Fashion-MNIST test images (issue 18, item 4).

A freshly initialised model of the default fashion recipe (0 epochs: prediction costs the same whatever the
weights), with an OOD flag calibrated on 500 of its training images (for timing only: ``fit`` uses its held-out
validation images), is saved as a checkpoint the way ``dgc-pyro fit`` saves one; the script then times, in this
process,

- ``evaluate``: the whole command (``dgc_pyro.cli.main(["evaluate", ...])``: loading the checkpoint and the
  dataset, predicting, the metrics), ``--repeats`` times;
- ``predict``: :func:`dgc_pyro.inference.predict` alone on the same images, with and without the density score.

Example (the figures of RESULTS.md; from the repository root)::

    PYTHONPATH=. .venv/bin/python benchmarks/evaluate_speed.py --data-dir ../shared/data --json benchmarks/results/evaluate_speed.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from dgc_pyro.checkpoint import save_model
from dgc_pyro.data import load_imbalanced
from dgc_pyro.experiment import default_recipe
from dgc_pyro.inference.density import fit_ood_threshold
from dgc_pyro.inference.predict import predict
from dgc_pyro.io import write_json
from dgc_pyro.reproducibility import seed_everything


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--repeats", type=int, default=2, help="runs of the whole evaluate command")
    parser.add_argument("--test-subset", type=int, default=None, help="time a stratified subset (quick checks)")
    parser.add_argument("--skip-predict", action="store_true", help="time only the evaluate command")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    from dgc_pyro.cli import main as cli_main

    seed_everything(0)
    split = load_imbalanced(args.dataset, args.data_dir)
    recipe = default_recipe(split.name)
    model = recipe.build_model(split.input_shape, split.num_classes, split.train_counts)
    fit_ood_threshold(model, split.x_train[:500], num_samples=recipe.num_samples)
    config = {
        "dataset": split.name,
        "seed": 0,
        "train_counts": split.train_counts.tolist(),
        "recipe": recipe.to_dict(),
        "data_dir": str(Path(args.data_dir).resolve()),
        "dataset_arg": split.name,
    }
    results: dict = {
        "dataset": split.name,
        "test_size": args.test_subset or len(split.y_test),
        "recipe_rule": model.default_rule,
        "num_samples": recipe.num_samples,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "evaluate_s": [],
    }
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "model.safetensors"
        save_model(ckpt, model, {"config": config, "class_names": list(split.class_names)})
        command = ["evaluate", "--checkpoint", str(ckpt), "--device", "cpu"]
        if args.test_subset:
            command += ["--test-subset", str(args.test_subset)]
        for _ in range(args.repeats):
            out = io.StringIO()
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(out):
                rc = cli_main(command)
            results["evaluate_s"].append(round(time.perf_counter() - t0, 2))
            if rc != 0:
                print(out.getvalue(), file=sys.stderr)
                raise SystemExit(f"evaluate exited with {rc}")
    if not args.skip_predict:
        x = split.x_test[: args.test_subset] if args.test_subset else split.x_test
        for name, options in _predict_variants().items():
            seed_everything(0)
            t0 = time.perf_counter()
            predict(model, x, recipe.num_samples, balanced=model.has_class_prior, **options)
            results[f"predict_{name}_s"] = round(time.perf_counter() - t0, 2)
    for key, value in results.items():
        print(f"{key}: {value}")
    if args.json:
        write_json(args.json, results)
    return 0


def _predict_variants() -> dict[str, dict]:
    """The ``predict`` options timed beside the command: the default, and without the density score where the
    installed version has one."""
    import inspect

    if "density" in inspect.signature(predict).parameters:
        return {"default": {}, "no_density": {"density": False}}
    return {"default": {}}


if __name__ == "__main__":
    sys.exit(main())
