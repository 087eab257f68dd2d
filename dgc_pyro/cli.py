"""Command line interface: ``dgc-pyro fit``, ``dgc-pyro evaluate``, ``dgc-pyro augment`` and ``dgc-pyro predict``.

A thin layer over :mod:`dgc_pyro.experiment`; every error a user can cause ends in a one-line message
and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dgc_pyro.baselines import BASELINE_REGISTRY
from dgc_pyro.config import FIXED, FREE, config_fields, parse_value
from dgc_pyro.data import (
    DATASET_REGISTRY,
    NPZ_DATASET_FORMAT,
    load_imbalanced,
    load_npz,
    load_npz_examples,
    parse_counts,
)
from dgc_pyro.data.splits import ImbalancedSplit, stratified_holdout
from dgc_pyro.data.transforms import TRANSFORM_CHOICES
from dgc_pyro.diagnostics.plots import save_augmentation_grid
from dgc_pyro.inference.augment import SAMPLING_STRATEGY_NAMES
from dgc_pyro.inference.device import DEVICE_CHOICES
from dgc_pyro.inference.objectives import OBJECTIVES
from dgc_pyro.io import CheckpointError, folder_problem, writable_problem

EXIT_USAGE = 2


class UserError(Exception):
    """A problem with the user's input, reported as one line."""


class _HelpFormatter(argparse.HelpFormatter):
    """Every option's help ends with its default: the value, "off" for a flag, or the help's own words (options
    whose default depends on the dataset or the checkpoint say so themselves; a test checks them all)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.required or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is not None:
            return f"{text} (default: %(default)s)"
        return text


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``dgc-pyro fit: error: ...``) like every other error."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _counts_arg(text: str) -> tuple[int, ...]:
    try:
        return parse_counts(text)
    except ValueError as e:  # argparse shows the message of ArgumentTypeError only
        raise argparse.ArgumentTypeError(str(e)) from None


#: Seeds go to NumPy's legacy generator and Pyro, which take 0..2**32 - 1.
SEED_MAX = 2**32 - 1


def _seed_arg(text: str) -> int:
    """``--seed``: refused by argparse, naming the option, instead of failing after the data is loaded."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to {SEED_MAX}, got {text!r}")
    return value


def _recipe_default(field: str, show: Any = str) -> str:
    """``default: 60 (digits), 30 (mnist, fashion, others)``: a Recipe field's value in each dataset's recipe."""
    from dgc_pyro.experiment import DEFAULT_RECIPES, Recipe

    by_value: dict[str, list[str]] = {}
    for name, recipe in DEFAULT_RECIPES.items():
        by_value.setdefault(show(getattr(recipe, field)), []).append(name)
    by_value.setdefault(show(getattr(Recipe(), field)), []).append("others")
    if len(by_value) == 1:
        return f"default: {next(iter(by_value))}"
    return "default: " + ", ".join(f"{value} ({', '.join(names)})" for value, names in by_value.items())


def _add_data_args(p: argparse.ArgumentParser, command: str) -> None:
    from dgc_pyro.data.protocol import DIGITS_COUNTS

    saved = command != "fit"  # evaluate and augment take what they are not given from the checkpoint
    p.add_argument(
        "--dataset",
        default="digits" if not saved else None,
        help=f"one of {', '.join(DATASET_REGISTRY.names())}, or an .npz file with x_train, y_train[, x_test, y_test] "
        f"(default: {'the checkpoint' + chr(39) + 's' if saved else 'digits'})",
    )
    # None means "not given": fit, evaluate and augment fill it in (from a checkpoint where there is one),
    # and an .npz dataset refuses it when given.
    p.add_argument(
        "--data-dir",
        default=None,
        help="root folder of the torchvision datasets (default: "
        + ("the checkpoint's, else ./data)" if saved else "./data)"),
    )
    p.add_argument("--download", action="store_true", help="download the dataset with torchvision if missing")
    p.add_argument(
        "--counts",
        type=_counts_arg,
        default=None,
        help="per-class training counts, e.g. 4000,2000,1000 (default: "
        + ("the checkpoint's, else " if saved else "")
        + f"the paper's Table 1; digits: {','.join(map(str, DIGITS_COUNTS))})",
    )
    p.add_argument(
        "--seed",
        type=_seed_arg,
        default=0,
        help=f"seed of the imbalanced subset and of training (0..{SEED_MAX}; default: "
        + ("the checkpoint's, else 0)" if command == "augment" else "0)"),
    )
    p.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help="where to train and predict: auto (the GPU if there is one, else the CPU), cpu or cuda",
    )
    if saved:  # fit's --num-samples is the recipe's val_num_samples (a generated flag)
        p.add_argument(
            "--num-samples",
            type=int,
            default=None,
            help="latent draws per class when predicting (default: the checkpoint's recipe, else 10)",
        )
    p.add_argument(
        "--test-subset",
        type=int,
        default=None,
        help="evaluate on a stratified subset of this many test examples (quick checks only; default: "
        "the whole test split)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads of torch (default: 1 for the MLP networks of digits and vector data, whose "
        "operations are too small to share out and slow down many times when other programs use "
        "the cores; else torch's default, one per core)",
    )


# ----------------------------------------------------------------------------- fit's flags, from the config fields
#: fit's data options that --resume takes from the checkpoint (a config field says so in its own metadata).
_DATA_OPTIONS_FIXED_ON_RESUME = ("dataset", "data_dir", "counts", "seed", "baseline")
#: Old spellings kept as aliases: flag -> (field, {text: value}); --num-samples is val_num_samples' second name.
_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {
    "--keep": ("select_best", {"best": True, "last": False}),
    "--guide": ("label_in_guide", {"xy": True, "x": False}),
}
_SECOND_NAMES = {"val_num_samples": "--num-samples"}


def _registry_choices(name: str) -> tuple[str, ...] | None:
    """The values of an option whose names are a registry above the configuration (dgc_pyro.config's docs)."""
    if name == "objective":
        return tuple(sorted(OBJECTIVES))
    if name == "transform":
        return TRANSFORM_CHOICES
    return None


class _MapChoice(argparse.Action):
    """An old spelling of a field's flag (``--keep best`` for ``--select-best``): a choice mapped to the value."""

    def __init__(
        self, option_strings: Sequence[str], dest: str, mapping: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        self.mapping = dict(mapping or {})
        super().__init__(option_strings, dest, choices=tuple(self.mapping), **kwargs)

    def __call__(self, parser: Any, namespace: Any, values: Any, option_string: str | None = None) -> None:
        setattr(namespace, self.dest, self.mapping[values])


def _text_type(f: dataclasses.Field) -> Any:
    """argparse's ``type`` for field ``f``: the builtin int/float where that is the field's (so that argparse names
    it in its message), else :func:`dgc_pyro.config.parse_value` with its error as the message."""
    if f.metadata["parse"] is None and type(f.default) in (int, float):
        return type(f.default)

    def convert(text: str) -> Any:
        try:
            return parse_value(f, text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    convert.__name__ = getattr(f.metadata["parse"], "__name__", f.name)
    return convert


def _show(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _add_config_args(p: argparse.ArgumentParser) -> None:
    """One flag per :class:`~dgc_pyro.config.ModelConfig` / :class:`~dgc_pyro.config.TrainConfig` field, from its
    metadata: ``--field-name``, its help and choices, and whether ``--resume`` takes it from the checkpoint (fixed)
    or lets it be given (free). Recipe fields default to None (the dataset's recipe decides); run fields (how this
    run executes) to the field's default."""
    for f in config_fields():
        meta = f.metadata
        flag = "--" + f.name.replace("_", "-")
        flags = [flag] + ([_SECOND_NAMES[f.name]] if f.name in _SECOND_NAMES else [])
        run = meta["role"] == "run"
        text = meta["help"] + ("; the baseline shares it" if meta["baseline"] else "")
        if "default" not in text:
            text += f" ({_recipe_default(f.name, _show)})"
        choices = _registry_choices(f.name) or meta["choices"]
        kwargs: dict[str, Any] = {"dest": f.name, "help": text, "default": f.default if run else None}
        if isinstance(f.default, bool):
            kwargs["action"] = argparse.BooleanOptionalAction
        elif choices is not None:
            kwargs["choices"] = tuple(c for c in choices if c is not None)
        else:
            kwargs["type"] = _text_type(f)
        action = p.add_argument(*flags, **kwargs)
        action.resume = meta["resume"]
        action.config_field = f
    for flag, (name, mapping) in _ALIASES.items():
        spelled = {v: k for k, v in mapping.items()}
        action = p.add_argument(
            flag,
            action=_MapChoice,
            mapping=mapping,
            dest=name,
            default=None,
            help=f"the old spelling of --{name.replace('_', '-')}: "
            + ", ".join(f"{k} for {_show(v)}" for k, v in mapping.items())
            + f" ({_recipe_default(name, spelled.get)})",
        )
        action.resume = next(f.metadata["resume"] for f in config_fields() if f.name == name)
        action.config_field = None


def _options_of(parser: argparse.ArgumentParser, command: str) -> argparse.ArgumentParser:
    """The sub-parser of ``command``."""
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def resume_free_flags(p: argparse.ArgumentParser) -> list[str]:
    """The flags of ``p`` that ``fit --resume`` lets be given (their ``resume`` mark is free)."""
    return [a.option_strings[0] for a in p._actions if getattr(a, "resume", None) == FREE]


def _config_changes(args: argparse.Namespace, *, resume: str | None = None) -> dict[str, Any]:
    """The config fields given on the command line (recipe fields not None; run fields always: the command line
    says how this run executes), as flat Recipe changes; ``resume``: only fields with this mark."""
    changes = {}
    for f in config_fields():
        if resume is not None and f.metadata["resume"] != resume:
            continue
        value = getattr(args, f.name, None)
        if f.metadata["role"] == "run" or value is not None:
            changes[f.name] = parse_value(f, value) if f.name == "transform" and value is not None else value
    return changes


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``dgc-pyro``."""
    parser = _Parser(prog="dgc-pyro", description="Deep generative classification for imbalanced data (Pyro).")
    sub = parser.add_subparsers(dest="command")

    f = sub.add_parser("fit", help="fit DGC (and a baseline) on an imbalanced dataset and evaluate it")
    _add_data_args(f, "fit")
    _add_config_args(f)
    f.add_argument(
        "--baseline",
        choices=BASELINE_REGISTRY.names() + ("none",),
        default="ce",
        help="discriminative baseline fitted on the same split (default: ce on the same encoder)",
    )
    f.add_argument(
        "--out",
        default=None,
        help="output folder for metrics.json, model.safetensors and checkpoint/ (default: runs/latest)",
    )
    f.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the finished (or interrupted) run in --out (default: refuse, naming the run)",
    )
    resume = f.add_argument("--resume", metavar="DIR", default=None)
    # Unset options are filled in by _cmd_fit, so that --resume can tell which ones were given.
    f.set_defaults(dataset=None, seed=None, data_dir=None, baseline=None)
    for action in f._actions:  # fit's own options (--out, --overwrite, --resume) are neither
        if not hasattr(action, "resume") and action.dest in _DATA_OPTIONS_FIXED_ON_RESUME:
            action.resume = FIXED
        elif not hasattr(action, "resume") and action.option_strings and action.dest != "help":
            action.resume = FREE if action.dest not in ("out", "resume") else None
    resume.help = (
        "continue the interrupted fit whose --out folder is DIR from DIR/checkpoint, with the dataset, "
        "counts, seed and recipe saved there (only "
        + ", ".join(resume_free_flags(f))
        + " may be given; default: a fresh fit)"
    )

    e = sub.add_parser("evaluate", help="evaluate a saved model on a dataset's test split")
    e.add_argument("--checkpoint", required=True, help="model.safetensors written by 'dgc-pyro fit'")
    _add_data_args(e, "evaluate")
    e.add_argument("--out", default=None, help="write metrics.json here (default: print only)")
    _add_rule_arg(e)
    _add_head_samples_arg(e)

    a = sub.add_parser("augment", help="generate synthetic minority examples with a saved model")
    a.add_argument("--checkpoint", required=True, help="model.safetensors written by 'dgc-pyro fit'")
    _add_data_args(a, "augment")
    # Unset split options fall back to the checkpoint's, so the same training split is rebuilt.
    a.set_defaults(seed=None, data_dir=None)
    a.add_argument("--out", required=True, help="output folder for synthetic.npz and grid_class_<c>.png")
    a.add_argument(
        "--sampling-strategy",
        type=_sampling_strategy_arg,
        default="auto",
        help="as imbalanced-learn: auto, minority, not minority, not majority, all, a float "
        "(binary only), or target counts such as 8:100,9:100 (default: auto)",
    )
    a.add_argument(
        "--filter-threshold",
        type=float,
        default=None,
        help="keep only samples whose class posterior under the model is at least this (default: no filter)",
    )
    a.add_argument(
        "--perturbation-scale",
        type=float,
        default=1.0,
        help="multiplies the posterior scale of the latent noise (default: 1)",
    )
    a.add_argument(
        "--output",
        choices=("mean", "residual"),
        default="mean",
        help="synthetic images: the decoded mean image, or the real source image plus the decoded "
        "change of its latent (keeps the source's detail)",
    )
    a.add_argument(
        "--grid-per-class", type=int, default=16, help="synthetic examples shown in each class's PNG grid (0: no grids)"
    )
    _add_predict_parser(sub)
    return parser


@dataclass(frozen=True)
class DataChoice:
    """The split a command builds: the data options it was given, with what it took from a checkpoint filled in."""

    dataset: str
    data_dir: str = "data"
    counts: tuple[int, ...] | None = None
    seed: int = 0
    download: bool = False
    test_subset: int | None = None
    #: the built-in-dataset flags given on the command line (an .npz file refuses them)
    builtin_flags: tuple[str, ...] = ()


def _load_split(data: DataChoice) -> ImbalancedSplit:
    split = _read_split(data)
    subset = data.test_subset
    if subset is not None:
        if subset < split.num_classes:
            raise UserError(f"--test-subset must be at least the number of classes ({split.num_classes})")
        if subset < len(split.y_test):
            _, keep = stratified_holdout(split.y_test.numpy(), subset / len(split.y_test), data.seed)
            split.x_test, split.y_test = split.x_test[keep], split.y_test[keep]
    return split


#: Options that choose and subsample a built-in dataset; an .npz file is used as it is.
_BUILTIN_DATA_OPTIONS = ("counts", "download", "data_dir")


def _given_data_options(args: argparse.Namespace) -> tuple[str, ...]:
    """The built-in-dataset options given on the command line (None/False: not given)."""
    return tuple(_flags(tuple(k for k in _BUILTIN_DATA_OPTIONS if getattr(args, k, None) not in (None, False))))


def _read_split(data: DataChoice) -> ImbalancedSplit:
    name = data.dataset
    if name.endswith(".npz"):
        given = data.builtin_flags
        if given:
            raise UserError(
                f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} only to the built-in datasets "
                f"({', '.join(DATASET_REGISTRY.names())}); {name} is used as it is: drop {'it' if len(given) == 1 else 'them'} "
                "(to train on a subset, write that subset to the .npz file)"
            )
        return load_npz(name)
    if Path(name).is_dir():
        raise UserError(
            f"--dataset {name} is a folder; give one of {', '.join(DATASET_REGISTRY.names())}, or {NPZ_DATASET_FORMAT}"
        )
    try:
        return load_imbalanced(name, data.data_dir, counts=data.counts, seed=data.seed, download=data.download)
    except RuntimeError as e:  # unreadable/corrupted dataset files, failed downloads
        raise UserError(str(e)) from None
    except ValueError as e:
        if str(e).startswith("unknown dataset"):
            raise UserError(f"{e}, or {NPZ_DATASET_FORMAT}") from None
        raise


def _check_out_folder(out: str | Path, need_bytes: int = 2**20) -> None:
    """Fail now, not after training or a long evaluation, when ``--out`` cannot become a folder, cannot be
    written to (a probe file is created and removed in it, or in the nearest existing folder above it), or its
    file system has less than ``need_bytes`` free."""
    path = Path(out)
    problem = folder_problem(path)
    if problem:
        hint = "; give a folder (it is created if missing)" if path.exists() else ""
        raise UserError(f"--out {path} {problem}{hint}")
    problem = writable_problem(path, need_bytes)
    if problem:
        raise UserError(f"--out {path} {problem}; give another folder")


def _check_fit_before_training(recipe: Any, split: ImbalancedSplit, out: str, device: str) -> None:
    """What would otherwise fail only after training: ``--out``'s room for the outputs (model.safetensors, and
    checkpoint/ with the weights, the best epoch's copy and Adam's two moments, each written beside the old file
    before the rename, hence twice that, and with ``--swag-start`` the head's float64 moments in both files) and
    the test prediction's memory (``--num-samples``, times ``--swag-samples`` with SWAG)."""
    from dgc_pyro.inference.device import resolve_device
    from dgc_pyro.inference.predict import check_prediction_size

    model = recipe.build_model(split.input_shape, split.num_classes, split.train_counts)
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    swag = 0
    if recipe.swag_start is not None:  # mean, second moment and swag_rank deviations of the head, in float64
        swag = (recipe.swag_rank + 2) * sum(p.numel() for p in model.classifier.parameters()) * 8
    _check_out_folder(out, 2 * (5 * weights + 2 * swag) + 2**20)
    # a SWAG evaluation holds the log weights of every head draw at once
    draws = recipe.num_samples * (recipe.swag_samples if recipe.swag_start is not None else 1)
    check_prediction_size(model.to(resolve_device(device)), len(split.y_test), draws)


def _describe_run(metrics: Path) -> str:
    """``runs/a/metrics.json: digits, seed 0, ACSA 0.851, written 2026-12-04 20:01 UTC`` (what can be read)."""
    parts = [str(metrics)]
    try:
        data = json.loads(metrics.read_text(encoding="utf-8"))
        config = data.get("config") or {}
        if config.get("dataset") is not None:
            parts.append(str(config["dataset"]))
        if config.get("seed") is not None:
            parts.append(f"seed {config['seed']}")
        if isinstance(data.get("acsa"), (int, float)):
            parts.append(f"ACSA {data['acsa']:.3f}")
    except (OSError, ValueError, AttributeError):
        pass  # an unreadable metrics.json is still a run's
    with contextlib.suppress(OSError):
        parts.append("written " + time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(metrics.stat().st_mtime)))
    return f"{parts[0]}: {', '.join(parts[1:])}" if len(parts) > 1 else parts[0]


def _refuse_to_replace_a_finished_run(out: str | Path) -> None:
    """A fresh fit would replace ``out``'s model.safetensors and metrics.json; refuse unless --overwrite."""
    metrics = Path(out) / "metrics.json"
    if metrics.is_file() or (Path(out) / "model.safetensors").is_file():
        what = _describe_run(metrics) if metrics.is_file() else str(Path(out) / "model.safetensors")
        raise UserError(f"--out {out} holds a finished run ({what}); give --overwrite to replace it, or another --out")


def _refuse_to_overwrite_an_interrupted_fit(out: str | Path) -> None:
    """A fresh fit would overwrite ``out``'s checkpoint; refuse when it belongs to an interrupted fit.

    A finished fit writes ``metrics.json`` after its last checkpoint, so a checkpoint newer than the
    metrics (or without any) is the only copy of an unfinished run's progress.
    """
    from dgc_pyro.checkpoint import TRAINING_STATE_FILE

    state, metrics = Path(out) / "checkpoint" / TRAINING_STATE_FILE, Path(out) / "metrics.json"
    if state.is_file() and (not metrics.is_file() or metrics.stat().st_mtime < state.stat().st_mtime):
        raise UserError(
            f"--out {out} holds an interrupted fit ({state} is newer than any metrics.json); continue it with "
            f"'dgc-pyro fit --resume {out}', or give another --out (or --overwrite) to start afresh"
        )


def _flags(dests: tuple[str, ...]) -> list[str]:
    return [f"--{d.replace('_', '-')}" for d in dests]


@dataclass(frozen=True)
class FitRun:
    """What ``dgc-pyro fit`` runs: the data, the recipe (None until the split is loaded, for a fresh fit: the
    dataset's recipe is chosen by the split's name), the baseline ("none" for none) and the output folder."""

    data: DataChoice
    recipe: Any
    baseline: str
    out: str


def _resumed_run(args: argparse.Namespace) -> FitRun:
    """The run of ``--resume DIR``, from the run configuration saved in DIR's checkpoint."""
    from dgc_pyro.checkpoint import check_run_config, load_training_state
    from dgc_pyro.experiment import Recipe

    out = Path(args.resume)
    if args.out is not None and Path(args.out) != out:
        raise UserError(f"--resume {out} continues the run in {out}; drop --out {args.out}")
    fit_parser = _options_of(build_parser(), "fit")
    typed = {t.split("=", 1)[0] for t in getattr(args, "argv", ()) if t.startswith("--")}
    given = [
        flag
        for a in fit_parser._actions
        if getattr(a, "resume", None) == FIXED
        for flag in a.option_strings
        if flag in typed
    ]
    if given:
        raise UserError(
            f"--resume takes the data and recipe from the checkpoint; drop {', '.join(dict.fromkeys(given))} "
            f"(only {', '.join(resume_free_flags(fit_parser))} may be given)"
        )
    if not out.is_dir():
        raise FileNotFoundError(
            f"--resume {out}: no such folder (give the --out folder of an interrupted dgc-pyro fit)"
        )
    source = out / "checkpoint"
    run = load_training_state(source).extra.get("run")
    if not isinstance(run, dict) or "recipe" not in run:
        raise UserError(f"{source} holds no run configuration; it was not written by dgc-pyro fit")
    run = check_run_config(run, source, required=("dataset", "seed"))
    try:
        recipe = Recipe.from_flat(run["recipe"]).replace(**_config_changes(args, resume=FREE))
    except (TypeError, ValueError) as e:
        raise UserError(f"{source} has an unusable run configuration ({type(e).__name__}: {e})") from None
    data = DataChoice(
        dataset=str(run.get("dataset_arg") or run["dataset"]),
        data_dir=str(run.get("data_dir") or "data"),
        counts=tuple(run["counts"]) if run.get("counts") else None,
        seed=run["seed"],
        download=args.download,
        test_subset=args.test_subset,
        builtin_flags=_given_data_options(args),
    )
    return FitRun(data, recipe, run.get("baseline") or "none", str(out))


def _fresh_run(args: argparse.Namespace) -> FitRun:
    """The run of a fresh ``dgc-pyro fit``: the options given, the defaults for the others (recipe: not yet)."""
    data = DataChoice(
        dataset="digits" if args.dataset is None else args.dataset,
        data_dir="data" if args.data_dir is None else args.data_dir,
        counts=args.counts,
        seed=0 if args.seed is None else args.seed,
        download=args.download,
        test_subset=args.test_subset,
        builtin_flags=_given_data_options(args),
    )
    return FitRun(
        data, None, "ce" if args.baseline is None else args.baseline, "runs/latest" if args.out is None else args.out
    )


def _recipe_from_flags(args: argparse.Namespace, dataset: str, input_shape: Sequence[int] | None = None) -> Any:
    """``dataset``'s recipe (an ``.npz`` file: the built-in recipe for its image shape) for ``--preset`` with the
    recipe options given on the command line applied."""
    from dgc_pyro.experiment import default_recipe

    _check_counts_given(args)
    return default_recipe(dataset, args.preset, input_shape=input_shape).replace(**_config_changes(args))


#: Options that count something: "must be at least 1" names the flag, before the recipe's own check.
_COUNTING = ("epochs", "batch_size", "val_num_samples", "latent_dim", "devices")


def _check_counts_given(args: argparse.Namespace) -> None:
    for name in _COUNTING:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            flag = _SECOND_NAMES.get(name, "--" + name.replace("_", "-"))
            raise UserError(f"{flag} must be at least 1")


def _cmd_fit(args: argparse.Namespace) -> int:
    from dgc_pyro.experiment import run_experiment
    from dgc_pyro.metrics import format_comparison

    started = time.perf_counter()
    resumed = args.resume is not None
    if resumed:
        run = _resumed_run(args)
        _check_out_folder(run.out)
        split = _load_split(run.data)
    else:
        run = _fresh_run(args)
        _check_out_folder(run.out)
        if not args.overwrite:
            _refuse_to_overwrite_an_interrupted_fit(run.out)
            _refuse_to_replace_a_finished_run(run.out)
        split = _load_split(run.data)
        run = dataclasses.replace(run, recipe=_recipe_from_flags(args, split.name, split.input_shape))
    recipe, data, out = run.recipe, run.data, run.out
    _set_threads(args.threads, split.input_shape, recipe.preset)
    if not 0.0 <= recipe.perturbation_rate <= 1.0:
        raise UserError(
            f"--perturbation-rate must be in [0, 1], got {recipe.perturbation_rate:g} (the paper's r: 0 turns "
            "the perturbation step off, 1 repeats each class's latents up to the majority's count)"
        )
    from dgc_pyro.inference.distributed import is_rank_zero

    rank0 = is_rank_zero()  # under torchrun only rank 0 reports and writes the outputs
    if rank0:
        _check_fit_before_training(recipe, split, out, args.device)
    counts = ", ".join(str(c) for c in split.train_counts)
    if rank0:
        print(
            f"dataset {split.name}: {len(split.y_train)} training examples (per class: {counts}), {len(split.y_test)} test"
        )
        _notice_batch_size(recipe, split, data.seed)
    baseline = None if run.baseline == "none" else run.baseline
    result = run_experiment(
        split,
        recipe,
        seed=data.seed,
        device=args.device,
        baseline=baseline if rank0 else None,
        out_dir=out if rank0 else None,
        progress=not args.no_progress and rank0,
        checkpoint_dir=Path(out) / "checkpoint",
        resume=resumed,
        # An .npz path is saved absolute, so evaluate/augment/--resume find it from any working folder.
        data_config={
            "data_dir": data.data_dir,
            "counts": data.counts,
            "dataset_arg": str(Path(data.dataset).resolve()) if data.dataset.endswith(".npz") else data.dataset,
        },
    )
    if not rank0:
        return 0
    reports = {"DGC": result.metrics}
    if result.baseline_metrics is not None:
        reports[f"baseline ({baseline})"] = result.baseline_metrics
    print(format_comparison(reports, metrics=("acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc", "ece")))
    note = _calibration_note(result)
    if note:
        print(note)
    head = result.model.swag
    if head is not None:
        print(
            f"SWAG head of p(y | z): {head.count} snapshots (rank {head.rank}); the evaluation averaged over "
            f"{recipe.swag_samples} head draws"
        )
    seconds = result.seconds
    phases = [("fit", seconds["dgc_fit"]), ("evaluation", seconds["dgc_predict"])]
    if "baseline_fit" in seconds:
        phases.append(("baseline", seconds["baseline_fit"]))
    print(f"{_phase_times(phases, started)} on {result.config['device']}; wrote {Path(out) / 'metrics.json'}")
    return 0


def _calibration_note(result: Any) -> str | None:
    """Why DGC's ECE is above the baseline's, when it is, with the run's own numbers: the gap between its mean
    confidence and its accuracy, and which way it goes."""
    base = result.baseline_metrics
    if base is None or not result.metrics["ece"] > base["ece"]:
        return None
    confidence = float(result.prediction.proba.max(-1).values.mean())
    accuracy = float(result.metrics["acc"])
    direction = "underconfident" if confidence < accuracy else "overconfident"
    why = ""
    if direction == "underconfident" and result.prediction.rule == "mixture":
        # measured on the digits demo: the label head alone, at q(z | x, c)'s mean, is more confident (.86 vs .69)
        why = (
            "; its 'mixture' rule averages p(y | z) over the latent draws of every class hypothesis, which flattens it"
        )
    return (
        f"note: DGC's ECE ({result.metrics['ece']:.3f}) is above the baseline's ({base['ece']:.3f}) because its class "
        f"posterior is {direction}: mean confidence {confidence:.3f}, accuracy {accuracy:.3f}{why}. ACSA and the other "
        "metrics depend only on which class scores highest (docs/cli.md)"
    )


def _set_threads(threads: int | None, input_shape: tuple[int, ...], preset: str) -> None:
    """``--threads``: as given, else 1 for MLP networks (tiny matrix products: on a busy 2-core machine a second
    thread made the digits fit 7-12x slower, benchmarks/threads.py), else torch's default."""
    import torch

    from dgc_pyro.models.networks import CONV_SPECS

    if threads is None and (tuple(input_shape), preset) not in CONV_SPECS:
        threads = 1
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be at least 1, got {threads}")
        torch.set_num_threads(threads)


def _phase_times(phases: list[tuple[str, float]], started: float) -> str:
    """``fit 12.3 s, evaluation 1.2 s, total 15.0 s``: the wall time of each phase and of the whole command."""
    return ", ".join(f"{name} {t:.1f} s" for name, t in phases) + f", total {time.perf_counter() - started:.1f} s"


def _notice_batch_size(recipe: Any, split: ImbalancedSplit, seed: int) -> None:
    """Say so when the batch size exceeds the examples a training step can draw from (after the validation
    split): every epoch is then one step on all of them, which is what the fit does."""
    n = len(split.y_train)
    if recipe.val_fraction > 0:
        n = len(stratified_holdout(split.y_train.numpy(), recipe.val_fraction, seed)[0])
    if recipe.batch_size > n:
        print(
            f"dgc-pyro fit: notice: the batch size {recipe.batch_size} is more than the {n} training examples "
            f"(after the validation split); every epoch is one batch of {n}",
            file=sys.stderr,
        )


def _checkpoint_and_split(args: argparse.Namespace) -> tuple[Any, dict[str, Any], ImbalancedSplit, DataChoice]:
    """Load ``--checkpoint``, its run configuration and the split it was trained on (with the data choice that
    built it); data options left out are taken from the run configuration."""
    from dgc_pyro.checkpoint import check_run_config, load_model
    from dgc_pyro.inference.device import resolve_device

    model = load_model(args.checkpoint, map_location=resolve_device(args.device))
    saved = check_run_config(model.metadata.get("config", {}), args.checkpoint)
    # dataset_arg is what was passed to --dataset (an .npz path); dataset is only its short name.
    dataset = args.dataset if args.dataset is not None else saved.get("dataset_arg") or saved.get("dataset")
    if dataset is None:
        raise UserError("--dataset is required: the checkpoint does not name its dataset")
    counts = args.counts
    if counts is None and saved.get("counts"):
        counts = tuple(saved["counts"])
    seed = args.seed
    if seed is None:
        seed = saved["seed"] if saved.get("seed") is not None else 0
    data = DataChoice(
        dataset=dataset,
        data_dir=(saved.get("data_dir") or "data") if args.data_dir is None else args.data_dir,
        counts=counts,
        seed=seed,
        download=args.download,
        test_subset=args.test_subset,
        builtin_flags=_given_data_options(args),
    )
    split = _load_split(data)
    if tuple(split.input_shape) != tuple(model.input_shape) or split.num_classes != model.num_classes:
        raise UserError(
            f"the checkpoint is for inputs {tuple(model.input_shape)} with {model.num_classes} classes, "
            f"but {split.name} has {tuple(split.input_shape)} with {split.num_classes}"
        )
    return model, saved, split, data


def _saved_num_samples(saved: dict[str, Any]) -> int:
    """The latent draws of a checkpoint's recipe (``val_num_samples``; ``num_samples`` in older runs), else 10."""
    recipe = saved.get("recipe") or {}
    return recipe.get("val_num_samples", recipe.get("num_samples", 10))


def _add_rule_arg(p: argparse.ArgumentParser) -> None:
    from dgc_pyro.inference.predict import SCORING_RULE_REGISTRY

    p.add_argument(
        "--rule",
        choices=SCORING_RULE_REGISTRY.names(),
        default=None,
        help="scoring rule of the class posterior (default: the model's own; dgc_pyro.inference.predict)",
    )


def _add_head_samples_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--head-samples",
        type=int,
        default=None,
        metavar="N",
        help="average the class posterior over N draws of the checkpoint's SWAG head of p(y | z) (fit --swag-start); "
        "0 predicts with the fitted head alone (default: the recipe's swag_samples when the checkpoint has a SWAG "
        "head, else 0)",
    )


def _head_posterior(model: Any, head_samples: int | None, saved: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """``predict``'s SWAG keywords for ``--head-samples``: the checkpoint's head with the asked (default: the
    recipe's) number of draws, or none; a one-line error for a negative count or a head the checkpoint lacks."""
    from dgc_pyro.config import DEFAULT_HEAD_SAMPLES
    from dgc_pyro.experiment import swag_options

    if head_samples is not None and head_samples < 0:
        raise UserError("--head-samples must be at least 0 (0: the fitted head alone)")
    if head_samples == 0:
        return {}
    if head_samples is not None and model.swag is None:
        raise UserError(
            f"--head-samples {head_samples} needs a SWAG head, and {checkpoint} has none (fit with --swag-start, "
            "or give --head-samples 0)"
        )
    if head_samples is None:
        head_samples = (saved.get("recipe") or {}).get("swag_samples", DEFAULT_HEAD_SAMPLES)
    return swag_options(model, head_samples)


def _check_rule(model: Any, rule: str | None, checkpoint: str) -> None:
    """Refuse, in one line, a --rule the checkpoint's model cannot be scored with (before the long prediction)."""
    from dgc_pyro.inference.predict import check_rule

    if rule is not None:
        try:
            check_rule(model, rule)  # predict's own check, run here before the long prediction
        except ValueError as e:
            raise UserError(f"--rule {rule} does not apply to the model in {checkpoint}: {e}") from None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from dgc_pyro.experiment import evaluate_model
    from dgc_pyro.io import write_json
    from dgc_pyro.metrics import format_comparison

    started = time.perf_counter()
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    if args.out:
        _check_out_folder(args.out)
    model, saved, split, data = _checkpoint_and_split(args)
    _set_threads(args.threads, model.input_shape, model.preset)
    train_counts = np.asarray(saved.get("train_counts") or split.train_counts)
    num_samples = args.num_samples or _saved_num_samples(saved)
    seed = saved["seed"] if saved.get("seed") is not None else data.seed
    swag = _head_posterior(model, args.head_samples, saved, args.checkpoint)
    print(
        f"checkpoint {args.checkpoint}; dataset {data.dataset}: {len(split.y_test)} test examples, "
        f"{num_samples} latent draws per class" + _head_draws_note(swag)
    )
    t0 = time.perf_counter()
    _check_rule(model, args.rule, args.checkpoint)
    report, _ = evaluate_model(
        model,
        split.x_test,
        split.y_test,
        train_counts,
        num_samples,
        seed,
        progress=not args.no_progress,
        rule=args.rule,
        **swag,
    )
    evaluated = time.perf_counter() - t0
    print(format_comparison({"DGC": report}, metrics=("acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc", "ece")))
    print(_ood_flag_line(model, report))
    wrote = ""
    if args.out:
        write_json(
            Path(args.out) / "metrics.json", {**report, "checkpoint": str(args.checkpoint), "dataset": split.name}
        )
        wrote = f"; wrote {Path(args.out) / 'metrics.json'}"
    print(f"{_phase_times([('evaluation', evaluated)], started)} on {model.device}{wrote}")
    return 0


def _head_draws_note(swag: dict[str, Any]) -> str:
    """``, averaged over 10 SWAG head draws`` when the prediction uses the checkpoint's SWAG head."""
    return f", averaged over {swag['head_samples']} SWAG head draws" if swag else ""


def _sampling_strategy_arg(text: str) -> str | float | dict[int, int]:
    """``--sampling-strategy``: a name, a float, or ``class:count`` pairs separated by commas."""
    text = text.strip()
    if text in SAMPLING_STRATEGY_NAMES:
        return text
    if ":" in text:
        out: dict[int, int] = {}
        for part in text.split(","):
            c, _, n = part.partition(":")
            try:
                out[int(c)] = int(n)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{part!r} is not class:count (e.g. 8:100,9:100)") from None
        return out
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not one of {', '.join(SAMPLING_STRATEGY_NAMES)}, a float, or class:count pairs"
        ) from None


def _cmd_augment(args: argparse.Namespace) -> int:
    import warnings
    from io import BytesIO

    from dgc_pyro.inference.augment import augment
    from dgc_pyro.io import atomic_write_bytes, staged_folder

    started = time.perf_counter()
    if args.grid_per_class < 0:
        raise UserError("--grid-per-class must be >= 0")
    if args.num_samples is not None and args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    _check_out_folder(args.out)
    model, saved, split, data = _checkpoint_and_split(args)
    _set_threads(args.threads, model.input_shape, model.preset)
    before = split.train_counts
    trained_on = saved.get("train_counts")
    if trained_on is not None and list(trained_on) != before.tolist():
        raise UserError(
            f"the rebuilt training split has per-class counts {before.tolist()}, but the model was trained on "
            f"{list(trained_on)}; pass the --counts and --seed of the fit"
        )
    from dgc_pyro.inference.augment import synthetic_counts

    # synthetic.npz holds float32 images; a PNG grid is well under 256 KiB
    need = sum(synthetic_counts(split.y_train, args.sampling_strategy).values()) * int(np.prod(split.input_shape)) * 4
    _check_out_folder(args.out, need + split.num_classes * 2**18 + 2**20)
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x_syn, y_syn = augment(
            model,
            split.x_train,
            split.y_train,
            args.sampling_strategy,
            perturbation_scale=args.perturbation_scale,
            filter_threshold=args.filter_threshold,
            num_samples_filter=args.num_samples or 10,
            seed=data.seed,
            output=args.output,
            progress=not args.no_progress,
        )
    augmented = time.perf_counter() - t0
    for w in caught:
        print(f"dgc-pyro augment: warning: {w.message}", file=sys.stderr)

    out = Path(args.out)
    added = np.bincount(y_syn.numpy(), minlength=split.num_classes)
    grids = []
    # The outputs are one set: written into a temporary folder that becomes --out only when all are there.
    with staged_folder(out) as stage:
        buf = BytesIO()
        np.savez_compressed(buf, x=x_syn.numpy(), y=y_syn.numpy())
        atomic_write_bytes(stage / "synthetic.npz", buf.getvalue())
        if args.grid_per_class > 0:
            x_real, y_real = split.x_train.numpy(), split.y_train.numpy()
            x_new, y_new = x_syn.numpy(), y_syn.numpy()
            for c in np.flatnonzero(added):
                path = stage / f"grid_class_{c}.png"
                save_augmentation_grid(
                    path,
                    x_real[y_real == c],
                    x_new[y_new == c][: args.grid_per_class],
                    title=f"class {c} ({split.class_names[c]}): real (top row) and DGC samples",
                )
                grids.append(path.name)
    print(f"{'class':>5}  {'name':<16}{'before':>8}{'synthetic':>11}{'after':>8}")
    for c in range(split.num_classes):
        print(f"{c:>5}  {str(split.class_names[c])[:15]:<16}{before[c]:>8}{added[c]:>11}{before[c] + added[c]:>8}")
    print(f"{'all':>5}  {'':<16}{before.sum():>8}{added.sum():>11}{before.sum() + added.sum():>8}")
    print(
        f"{_phase_times([('augment', augmented)], started)}; wrote {out / 'synthetic.npz'}"
        + (f" and {len(grids)} grids (grid_class_<c>.png)" if grids else "")
    )
    return 0


# ----------------------------------------------------------------------------- dgc-pyro predict (issue 22)
def _ood_flag_line(model: Any, report: dict[str, Any]) -> str:
    """``evaluate``'s line on the OOD flag: its rate on the test split against the stated false-alarm rate."""
    detector = getattr(model, "ood_detector", None)
    if detector is None or "ood_flag_rate" not in report:
        return "OOD flag: none in this checkpoint (fit it with dgc_pyro.inference.fit_ood_threshold, or refit with dgc-pyro fit)"
    return (
        f"OOD flag ({detector.score} score): {report['ood_flag_rate']:.3f} of the test split flagged "
        f"(stated false-alarm rate {detector.false_alarm:.3f}, calibrated on {detector.num_dev} held-out images)"
    )


def _add_predict_parser(sub: Any) -> None:
    p = sub.add_parser("predict", help="label new data with a saved model: classes, uncertainty, density, OOD flags")
    p.add_argument("--checkpoint", required=True, help="model.safetensors written by 'dgc-pyro fit'")
    p.add_argument(
        "--input",
        required=True,
        help="an .npz file whose array 'x' (or only array) holds the examples, shaped like the training data",
    )
    p.add_argument("--out", required=True, help="output folder for predictions.npz and predictions.csv")
    p.add_argument(
        "--num-samples",
        type=int,
        default=None,
        help="latent draws per class (default: the checkpoint's recipe, else 10)",
    )
    p.add_argument(
        "--reject",
        choices=("entropy", "density", "both"),
        default=None,
        help="also write the reject option's mask (entropy: above the held-out entropy quantile; density: "
        "the OOD flag; both: either)",
    )
    _add_rule_arg(p)
    _add_head_samples_arg(p)
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    p.add_argument("--seed", type=_seed_arg, default=0, help="seed of the latent draws")
    p.add_argument("--no-progress", action="store_true")


def _read_predict_input(path: Path) -> np.ndarray:
    """The examples of ``dgc-pyro predict --input``: array ``x``, or the file's only array."""
    if not path.is_file():
        raise UserError(f"--input {path} does not exist" if not path.exists() else f"--input {path} is not a file")
    return load_npz_examples(path, name=f"--input {path}")


def _cmd_predict(args: argparse.Namespace) -> int:
    from dgc_pyro.checkpoint import check_run_config, load_model
    from dgc_pyro.data.validation import check_features
    from dgc_pyro.inference.device import resolve_device
    from dgc_pyro.inference.export import prediction_columns, write_predictions
    from dgc_pyro.inference.predict import predict
    from dgc_pyro.reproducibility import seed_everything

    if args.num_samples is not None and args.num_samples < 1:
        raise UserError("--num-samples must be at least 1")
    _check_out_folder(args.out)
    x_raw = _read_predict_input(Path(args.input))
    model = load_model(args.checkpoint, map_location=resolve_device(args.device))
    meta = model.metadata
    try:
        x = check_features(x_raw, input_shape=model.input_shape, name=f"--input {args.input}")
    except ValueError as e:
        raise UserError(str(e)) from None
    if args.reject in ("density", "both") and getattr(model, "ood_detector", None) is None:
        raise UserError(
            f"--reject {args.reject} needs the OOD flag, and {args.checkpoint} has none "
            "(fit it with dgc_pyro.inference.fit_ood_threshold and save the model again)"
        )
    saved = check_run_config(meta.get("config", {}), args.checkpoint)
    num_samples = args.num_samples or _saved_num_samples(saved)
    swag = _head_posterior(model, args.head_samples, saved, args.checkpoint)
    seed_everything(args.seed)
    _check_rule(model, args.rule, args.checkpoint)
    pred = predict(
        model,
        x,
        int(num_samples),
        balanced=model.has_class_prior,
        reject=args.reject,
        progress=not args.no_progress,
        rule=args.rule,
        head_seed=args.seed,
        **swag,
    )
    names = [str(n) for n in meta.get("class_names") or range(model.num_classes)]
    npz_path, csv_path = write_predictions(pred, args.out, names)  # computed first, each file written atomically
    columns = prediction_columns(pred)
    flagged = (
        f", {int(columns['ood'].sum())} flagged out of distribution"
        if "ood" in columns
        else " (no OOD flag in this checkpoint)"
    )
    rejected = f", {int(columns['rejected'].sum())} rejected ({args.reject})" if "rejected" in columns else ""
    print(
        f"predicted {len(pred.labels)} examples{_head_draws_note(swag)}{flagged}{rejected}; wrote {npz_path} and "
        f"{csv_path}"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dgc-pyro`` console script."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        argv = ["fit"]  # no arguments: the embedded digits default
    args = parser.parse_args(argv)
    args.argv = tuple(argv)  # which flags were typed (fit --resume refuses the fixed ones by the name given)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    import torch

    threads = torch.get_num_threads()  # --threads holds for this command only (main may be called in-process)
    try:
        commands = {"fit": _cmd_fit, "evaluate": _cmd_evaluate, "augment": _cmd_augment, "predict": _cmd_predict}
        return commands[args.command](args)
    except (UserError, ValueError, OSError, CheckpointError, FloatingPointError) as e:
        # Multi-line library messages (e.g. a list of missing files) are folded into the one line.
        message = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"dgc-pyro {args.command}: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:
        checkpoint = getattr(e, "checkpoint", None)
        where = ""
        if checkpoint is not None:
            run_dir = Path(checkpoint).parent.parent
            where = (
                f"; saved the state after epoch {e.epoch} in {checkpoint}; continue with: "
                f"dgc-pyro fit --resume {run_dir}"
            )
        print(f"dgc-pyro {args.command}: interrupted{where}", file=sys.stderr)
        return 128 + getattr(e, "signum", 2)
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    sys.exit(main())
