"""The configuration of a DGC run: :class:`ModelConfig` (what model), :class:`TrainConfig` (how it is fitted) and
:class:`Recipe` (the two together), typed and frozen.

Every option is one field, and each field carries its facts in ``dataclasses.field(metadata=...)``:

- ``help``: one line for the CLI and the docs;
- ``choices``: the values a string option takes (None: any, or a registry's names that the CLI fills in);
- ``resume``: ``"fixed"`` (a resumed fit must keep it: it changes what is fitted) or ``"free"`` (how long, where
  and how fast: ``epochs``, the engine, the devices, ...);
- ``role``: ``"recipe"`` (part of what a recipe describes) or ``"run"`` (how this run executes; not part of a
  recipe's identity, and :func:`dgc_pyro.experiment.train` lets a caller set it beside a recipe);
- ``baseline``: whether a baseline fitted beside DGC shares it (:meth:`Recipe.baseline_options`);
- ``absent``: the value a fit had before the option existed, for checkpoints that lack it (default: the default);
- ``parse``: how a command-line text becomes a value (default: from the type of the default).

(The values ``objective`` and ``transform`` take are registries above this module, :data:`dgc_pyro.inference.
objectives.OBJECTIVES` and :data:`dgc_pyro.data.transforms.TRANSFORM_CHOICES`; the CLI asks them.)

From these the package generates, rather than re-lists: the CLI flags of ``dgc-pyro fit`` and its ``FIELD=VALUE``
overrides (:func:`parse_overrides`), the resume check (:func:`resume_differences`, one comparison of the saved
settings against the requested ones), the settings a checkpoint and ``History.config`` record
(:meth:`TrainConfig.to_dict`) and the benchmarks' pooling check (:meth:`Recipe.to_dict`). Adding an option is one
field here plus the code that uses it.

This module sits low in the layering (it imports only the ground: argument checks, the model's option checks and
the names of the built-in networks and likelihoods), so ``inference/``, ``experiment.py`` and ``cli.py`` can all
import it. The names of the values an option takes live here (:data:`ENGINES`, :data:`LR_SCHEDULES`, ...), and the
modules that implement them import them from here.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dgc_pyro.arguments import check_betas, check_fraction, check_non_negative, check_positive
from dgc_pyro.models.dgc import COVARIANCES, DGC, LATENT_PRIORS, check_model_options
from dgc_pyro.models.likelihoods import LIKELIHOODS
from dgc_pyro.models.networks import PRESETS

__all__ = [
    "DEFAULT_HEAD_SAMPLES",
    "ENGINES",
    "LR_SCHEDULES",
    "PERTURBATION_NOISES",
    "PERTURBATION_PRIORS",
    "STRATEGIES",
    "ModelConfig",
    "Recipe",
    "TrainConfig",
    "check_deferred",
    "check_options",
    "check_swag",
    "check_swag_model",
    "config_fields",
    "first_perturbation_epoch",
    "first_window_epoch",
    "parse_overrides",
    "parse_value",
    "resume_differences",
]

#: Training steps (:mod:`dgc_pyro.inference.engine`).
ENGINES = ("torch", "graph", "svi")
#: Learning-rate schedules (:mod:`dgc_pyro.inference.schedule`).
LR_SCHEDULES = ("constant", "cosine")
#: Class frequencies of the perturbation step's logit adjustment (:mod:`dgc_pyro.inference.perturbation`).
PERTURBATION_PRIORS = ("train", "perturbed")
#: Spread of the perturbation step's re-drawn tail latents (:mod:`dgc_pyro.inference.perturbation`).
PERTURBATION_NOISES = ("own", "head")
#: Data-parallel strategies (:mod:`dgc_pyro.inference.distributed`).
STRATEGIES = ("ddp",)
#: Label-head draws a SWAG prediction averages over unless told (``swag_samples``, ``predict(..., swag=...)``).
DEFAULT_HEAD_SAMPLES = 10

FIXED, FREE = "fixed", "free"
_UNSET: Any = object()


def _option(
    default: Any = _UNSET,
    help: str = "",
    *,
    factory: Callable[[], Any] | None = None,
    choices: tuple[Any, ...] | None = None,
    resume: str = FIXED,
    role: str = "recipe",
    baseline: bool = False,
    absent: Any = _UNSET,
    parse: Callable[[str], Any] | None = None,
) -> Any:
    """A config field with its facts in ``metadata`` (see the module docs)."""
    metadata = {
        "help": help,
        "choices": choices,
        "resume": resume,
        "role": role,
        "baseline": baseline,
        "absent": absent,
        "parse": parse,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# ----------------------------------------------------------------------------- parsing text into field values
def _parse_bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise ValueError("expected true or false")
    return text.lower() in ("true", "1")


def _none_or(convert: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        return None if text.lower() == "none" else convert(text)

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def _parse_betas(text: str) -> tuple[float, float]:
    values = tuple(float(v) for v in text.split(","))
    if len(values) != 2:
        raise ValueError("expected 2 comma-separated numbers")
    return values  # type: ignore[return-value]


def parse_value(f: dataclasses.Field, text: str) -> Any:
    """The value of field ``f`` that the text ``text`` (a CLI argument, a ``FIELD=VALUE`` item) stands for.

    ``none`` gives None where the field's default is None; booleans take true/false/1/0; ``betas`` two
    comma-separated numbers. Raises ValueError when the text does not convert, or gives a non-finite number.
    """
    text = text.strip()
    parse = f.metadata.get("parse")
    if parse is None:
        default = f.default
        if isinstance(default, bool):
            parse = _parse_bool
        elif isinstance(default, (int, float, str)):
            parse = type(default)
        else:
            raise ValueError(f"{f.name} cannot be given as text")
    value = parse(text)
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("the value must be finite")
    return value


# ----------------------------------------------------------------------------- checks shared by the fields
def first_window_epoch(start: float, epochs: int) -> int:
    """The first (1-based) epoch of a stage that begins after the share ``start`` of ``epochs``:
    ``ceil(start * epochs) + 1`` (the perturbation step's ``perturbation_start``, SWAG's ``swag_start``)."""
    return math.ceil(start * epochs) + 1


def first_perturbation_epoch(perturbation_start: float, epochs: int) -> int:
    """The first (1-based) epoch that runs the perturbation step: ``ceil(perturbation_start * epochs) + 1``."""
    return first_window_epoch(perturbation_start, epochs)


def check_deferred(perturbation_start: Any, retrain_head_epochs: Any, epochs: int, perturbation_rate: float) -> None:
    """Raise ValueError naming the problem unless the deferred stages fit into ``epochs``.

    ``epochs`` must already be checked (a positive integer).
    """
    check_fraction("perturbation_start", perturbation_start)
    check_non_negative("retrain_head_epochs", retrain_head_epochs, integer=True)
    if retrain_head_epochs >= epochs:
        raise ValueError(
            f"retrain_head_epochs={retrain_head_epochs} leaves no epoch of the main fit "
            f"(epochs={epochs}); it must be smaller than epochs"
        )
    last = epochs - retrain_head_epochs  # the last epoch of the main steps
    first = first_perturbation_epoch(perturbation_start, epochs)
    if perturbation_start > 0 and perturbation_rate > 0 and first > last:
        raise ValueError(
            f"perturbation_start={perturbation_start} starts the perturbation step at epoch {first}, "
            f"after the last epoch of the main steps ({last} of {epochs}): it would never run"
        )


def check_swag(swag_start: Any, swag_rank: Any, swag_samples: Any, epochs: int, swag_every_steps: Any = None) -> None:
    """Raise ValueError naming the problem unless the SWAG options are usable in a fit of ``epochs`` epochs.

    ``epochs`` must already be checked (a positive integer). Whether ``swag_every_steps`` fits in an epoch depends on
    the data: the collector checks that when the fit starts.
    """
    check_non_negative("swag_rank", swag_rank, integer=True)
    check_positive("swag_samples", swag_samples, integer=True)
    if swag_every_steps is not None:
        check_positive("swag_every_steps", swag_every_steps, integer=True)
    if swag_start is None:
        if swag_every_steps is not None:
            raise ValueError(f"swag_every_steps={swag_every_steps} needs a SWAG window: set swag_start too")
        return
    check_fraction("swag_start", swag_start)
    first = first_window_epoch(swag_start, epochs)
    if first > epochs:
        raise ValueError(
            f"swag_start={swag_start} starts the SWAG window at epoch {first}, after the last epoch ({epochs}): "
            "it would collect nothing"
        )


def check_swag_model(swag_start: Any, has_label_head: bool) -> None:
    """Raise ValueError when SWAG of the label head is asked of a model without one (``latent_prior=
    "class_conditional"``: its p(y | z) is Bayes' rule on the class Gaussians, with no weights to model)."""
    if swag_start is not None and not has_label_head:
        raise ValueError(
            f"swag_start={swag_start} needs a label head p(y | z), which a model with "
            "latent_prior='class_conditional' does not have; use swag_start=None"
        )


def check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_options(cls: type, options: Iterable[str], what: str = "option") -> None:
    """Raise TypeError naming the first of ``options`` that is not a field of ``cls``, with the close matches."""
    names = [f.name for f in dataclasses.fields(cls)]
    for name in options:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; {cls.__name__} has {', '.join(names)}"
            raise TypeError(f"unknown {what} {name!r}{hint}")


# ----------------------------------------------------------------------------- the configurations
@dataclass(frozen=True)
class ModelConfig:
    """What model a recipe builds: networks, likelihoods, guide and latent prior (:class:`~dgc_pyro.models.DGC`)."""

    latent_dim: int = _option(64, "size of the latent z")
    preset: str = _option(
        "small",
        "network sizes: small (CPU friendly) or paper (the reference code's)",
        choices=tuple(PRESETS),
        baseline=True,
    )
    likelihood: str = _option("normal", "pixel likelihood p(x | z)", choices=tuple(LIKELIHOODS))
    obs_scale: float = _option(0.1, "sigma of the normal pixel likelihood")
    label_weight: float = _option(1.0, "weight of log p(y | z) in the objective")
    logit_adjustment: float = _option(
        0.0,
        "tau of the logit-adjusted label likelihood softmax(f(z) + tau log pi); 0 turns it off (with it, "
        "evaluation predicts class-balanced)",
    )
    label_in_guide: bool = _option(
        True,
        "the paper's q(z | x, y) (true; --guide xy) or a label-free q(z | x), scored with the latent rule "
        "(false; --guide x)",
    )
    observe_x: bool = _option(
        True,
        "the model has the pixel site p(x | z) (true: DGC) or not (false: the vib control, with a label-free guide)",
    )
    latent_prior: str = _option(
        "standard",
        "N(0, I) with a label head (standard) or p(z | y) = N(mu_y, Sigma) scored by Bayes' rule "
        "(class_conditional: needs a label-free guide and perturbation rate 0)",
        choices=LATENT_PRIORS,
    )
    covariance: str = _option("shared", "the class-conditional prior's diagonal covariance", choices=COVARIANCES)
    shrinkage: float = _option(
        10.0, "k of the class-conditional prior's shrinkage n_c / (n_c + k) toward the pooled class (0: off)"
    )

    def __post_init__(self) -> None:
        check_model_options(**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)})

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def build_model(self, input_shape: tuple[int, ...], num_classes: int, train_counts: Any = None) -> DGC:
        """The DGC this config describes; ``train_counts`` sets the class prior of a logit-adjusted model and the
        class-conditional prior's shrinkage counts."""
        prior = None
        if self.logit_adjustment > 0:
            if train_counts is None:
                raise ValueError("a recipe with logit_adjustment > 0 needs the training class counts")
            prior = np.asarray(train_counts, dtype=np.float64)
        counts = None
        if self.latent_prior != "standard":  # the shrinkage weights n_c / (n_c + k) need the counts
            if train_counts is None and self.shrinkage > 0:
                raise ValueError(
                    "a recipe with latent_prior='class_conditional' and shrinkage > 0 needs the training class counts"
                )
            counts = train_counts
        return DGC(
            input_shape,
            num_classes,
            latent_dim=self.latent_dim,
            preset=self.preset,
            likelihood=self.likelihood,
            obs_scale=self.obs_scale,
            label_weight=self.label_weight,
            label_in_guide=self.label_in_guide,
            class_prior=prior,
            logit_adjustment=self.logit_adjustment,
            observe_x=self.observe_x,
            latent_prior=self.latent_prior,
            covariance=self.covariance,
            shrinkage=self.shrinkage,
            class_counts=counts,
        )


def _callable_name(value: Any) -> Any:
    """A JSON-able name of a callable option (its ``__name__``), the value itself otherwise."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    return getattr(value, "__name__", type(value).__name__)


@dataclass(frozen=True)
class TrainConfig:
    """How a DGC is fitted: objective, optimiser, schedule, epochs, batches, validation, perturbation, transform,
    engine and devices. The options of :func:`dgc_pyro.inference.fit` (``fit(model, x, y, config, **changes)``)."""

    objective: Any = _option(
        "elbo",
        "training objective: elbo (Trace_ELBO), elbo-analytic, ... or, in Python, a loss callable "
        "loss(model_fn, guide_fn, x, y) as pyro.infer.SVI accepts",
    )
    epochs: int = _option(20, "training epochs (a resumed fit may grow them)", resume=FREE, baseline=True)
    batch_size: int = _option(
        100, "training examples per step; more than there are gives one full batch per epoch", baseline=True
    )
    lr: float = _option(1e-3, "Adam's learning rate")
    betas: tuple[float, float] = _option(
        (0.9, 0.999), "Adam's betas, two comma-separated numbers in [0, 1)", parse=_parse_betas
    )
    classifier_lr: float | None = _option(
        None, "learning rate of the perturbation step's optimiser (default: lr)", parse=_none_or(float)
    )
    lr_schedule: str = _option(
        "constant",
        "learning-rate schedule: constant or cosine (decays to 0 over the fit)",
        choices=LR_SCHEDULES,
        baseline=True,
    )
    warmup_steps: int | None = _option(
        None,
        "linear learning-rate warm-up over the first min(warmup_steps, steps per epoch) steps; 0 turns it off "
        "(default: 100, or a resumed fit's own)",
        absent=0,
        parse=_none_or(int),
    )
    val_fraction: float = _option(
        0.1,
        "stratified share of the training data held out for validation and model "
        "selection (never the test set); 0 disables it",
        baseline=True,
    )
    val_num_samples: int = _option(
        10, "latent draws per class when scoring the validation split (a recipe's evaluation uses as many)"
    )
    select_best: bool = _option(
        True,
        "keep the weights of the epoch with the best validation ACSA (true; --keep best) or those of the last "
        "epoch (false; --keep last: the validation split then only monitors)",
        baseline=True,
    )
    perturbation_rate: float = _option(
        0.6,
        "the paper's r, from 0 (no data-perturbation step) to 1 (each class's "
        "latents repeated up to the majority's count)",
    )
    perturbation_prior: str = _option(
        "train",
        "with logit adjustment: the class frequencies of the perturbation step's offset, the training prior "
        "(train) or those of its re-drawn latents (perturbed)",
        choices=PERTURBATION_PRIORS,
    )
    perturbation_start: float = _option(
        0.0,
        "deferred re-balancing (DRW): the perturbation step runs from epoch ceil(perturbation_start * epochs) + 1 "
        "on; in [0, 1)",
    )
    perturbation_noise: str = _option(
        "own",
        "spread of the perturbation step's re-drawn tail latents: q's own sigma (own) or the head classes' "
        "(head; single-process only)",
        choices=PERTURBATION_NOISES,
    )
    retrain_head_epochs: int = _option(
        0, "classifier re-training (cRT): the last this many epochs train p(y | z) alone on class-balanced draws"
    )
    swag_start: float | None = _option(
        None,
        "SWAG of the label head p(y | z): a Gaussian over its weights from their path in the epochs after "
        "ceil(swag_start * epochs), in [0, 1); predictions average over swag_samples head draws (none: off)",
        parse=_none_or(float),
    )
    swag_rank: int = _option(
        20, "SWAG's low-rank part: the last this many deviations of the head's weights (0: diagonal only)"
    )
    swag_every_steps: int | None = _option(
        None,
        "SWAG snapshots: one after every this many steps of the window's epochs, at most the steps of an epoch "
        "(none: one per epoch, after its last step)",
        parse=_none_or(int),
    )
    swag_samples: int = _option(
        DEFAULT_HEAD_SAMPLES,
        "label-head draws a SWAG prediction averages over (the run's evaluation, and dgc-pyro evaluate and predict "
        "unless --head-samples says otherwise); how the fit's model predicts, not what it fits",
        resume=FREE,
    )
    pretrain_steps: int = _option(0, "steps of the reference code's encoder pre-training before the first epoch")
    transform: Any = _option(
        None,
        "random training-time transform of every batch: shift (up to 2 pixels), shift-flip (also a horizontal "
        "flip; not for digits) or none; in Python also a callable transform(x, generator)",
        baseline=True,
        parse=lambda text: None if text.lower() == "none" else text,
    )
    engine: str | None = _option(
        None,
        "training step: graph (captured once and replayed, the fastest; falls back to torch with a warning), "
        "torch (traces the Pyro model every step), svi (textbook pyro.infer.SVI) (default: graph, torch for a "
        "loss callable or several devices)",
        choices=(None, *ENGINES),
        resume=FREE,
        role="run",
        parse=_none_or(str),
    )
    check_every: int | None = _option(
        None,
        "also check the loss for NaN/inf every this many steps (one host sync each; default: once per epoch)",
        resume=FREE,
        role="run",
        parse=_none_or(int),
    )
    deterministic: bool = _option(
        False, "deterministic torch/cuDNN algorithms (matters on CUDA)", resume=FREE, role="run"
    )
    compile: Any = _option(
        False,
        "torch.compile the networks (with the graph engine: the captured graph); slow to start; in Python "
        "also a dict of compile options",
        resume=FREE,
        role="run",
        parse=_parse_bool,
    )
    devices: int = _option(
        1,
        "data-parallel processes (one per GPU on CUDA; gloo on CPU); under torchrun: processes per node",
        resume=FREE,
        role="run",
    )
    strategy: str | None = _option(
        None,
        "data-parallel strategy (default: ddp when devices > 1)",
        choices=(None, *STRATEGIES),
        resume=FREE,
        role="run",
        parse=_none_or(str),
    )

    def __post_init__(self) -> None:
        # Checked in fit's old order, so that the first problem named is the same as before.
        check_positive("epochs", self.epochs, integer=True)
        check_positive("batch_size", self.batch_size, integer=True)
        check_positive("lr", self.lr)
        check_positive("val_num_samples", self.val_num_samples, integer=True)
        if self.check_every is not None:
            check_positive("check_every", self.check_every, integer=True)
        if self.classifier_lr is not None:
            check_positive("classifier_lr", self.classifier_lr)
        check_non_negative("pretrain_steps", self.pretrain_steps, integer=True)
        check_fraction("val_fraction", self.val_fraction)
        check_non_negative("perturbation_rate", self.perturbation_rate)
        check_betas(self.betas)
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))  # a JSON list becomes the tuple
        if self.engine is not None:
            check_choice("engine", self.engine, ENGINES)
        if self.warmup_steps is not None:
            check_non_negative("warmup_steps", self.warmup_steps, integer=True)
        check_choice("perturbation_prior", self.perturbation_prior, PERTURBATION_PRIORS)
        check_choice("perturbation_noise", self.perturbation_noise, PERTURBATION_NOISES)
        check_deferred(self.perturbation_start, self.retrain_head_epochs, self.epochs, self.perturbation_rate)
        check_swag(self.swag_start, self.swag_rank, self.swag_samples, self.epochs, self.swag_every_steps)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        if not (isinstance(self.objective, str) or callable(self.objective)):
            raise ValueError(f"objective must be a name or a loss callable, got {self.objective!r}")
        if not (self.transform is None or isinstance(self.transform, str) or callable(self.transform)):
            raise ValueError(
                f"transform must be None, a name or a callable transform(x, generator), got {self.transform!r}"
            )
        for name in ("deterministic", "select_best"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.compile, (bool, dict)):
            raise ValueError(f"compile must be True, False or a dict of torch.compile options, got {self.compile!r}")
        if isinstance(self.devices, bool) or not isinstance(self.devices, int) or self.devices < 1:
            raise ValueError(f"devices must be a positive integer, got {self.devices!r}")
        if self.strategy is not None:
            check_choice("strategy", self.strategy, STRATEGIES)
        if self.data_parallel and (self.retrain_head_epochs or self.perturbation_noise != "own"):
            raise ValueError(
                "retrain_head_epochs and perturbation_noise='head' are not supported in data-parallel fits"
            )

    @property
    def data_parallel(self) -> bool:
        """Whether the fit runs in several processes (``devices > 1`` or a ``strategy``)."""
        return self.devices != 1 or self.strategy is not None

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes``; an unknown name is a TypeError naming it and its close matches."""
        check_options(TrainConfig, changes, "TrainConfig option")
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """The fields as a JSON-able dict (a callable objective or transform by its name, ``betas`` a list)."""
        out = {f.name: _callable_name(getattr(self, f.name)) for f in dataclasses.fields(self)}
        out["betas"] = list(self.betas)
        if isinstance(self.compile, dict):
            out["compile"] = dict(self.compile)
        return out


def config_fields(
    *classes: type, role: str | None = None, resume: str | None = None, baseline: bool | None = None
) -> list[dataclasses.Field]:
    """The fields of ``classes`` (default: ModelConfig and TrainConfig), optionally only those whose metadata has
    this ``role``, ``resume`` or ``baseline`` value."""
    out = []
    for cls in classes or (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            if role is not None and f.metadata["role"] != role:
                continue
            if resume is not None and f.metadata["resume"] != resume:
                continue
            if baseline is not None and f.metadata["baseline"] != baseline:
                continue
            out.append(f)
    return out


def absent_value(f: dataclasses.Field) -> Any:
    """The value a fit had before option ``f`` existed (what a checkpoint without it was written with)."""
    absent = f.metadata["absent"]
    return f.default if absent is _UNSET else absent


# ----------------------------------------------------------------------------- resume: one comparison
#: Facts of a fit that a resumed fit must share besides the fixed options: its seed, whether it was given its own
#: validation data, and ``epochs`` where the fit's rates or stages are fractions of it (the cosine's length, the
#: deferred stages, the SWAG window), so that such a fit cannot grow its epochs.
RUN_FACTS: dict[str, Any] = {"seed": None, "explicit_val": None, "schedule_epochs": None, "deferred_epochs": None}
#: Engines that run the same step on the same optimiser state: a checkpoint of one resumes with the other.
SAME_STEP = {"graph": "torch"}


def resume_settings(config: TrainConfig, *, seed: int, explicit_val: bool) -> dict[str, Any]:
    """What a checkpoint records of the fit's settings: every option (:meth:`TrainConfig.to_dict`, with the resolved
    values the fit ran with) and the :data:`RUN_FACTS`."""
    epochs = config.epochs
    return {
        **config.to_dict(),
        "seed": seed,
        "explicit_val": explicit_val,
        "schedule_epochs": epochs if config.lr_schedule != "constant" else None,
        "deferred_epochs": epochs
        if config.perturbation_start > 0 or config.retrain_head_epochs or config.swag_start is not None
        else None,
    }


def resume_differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """``key=saved in the checkpoint, now now`` for every setting a resumed fit must keep (the ``resume="fixed"``
    options and the :data:`RUN_FACTS`) whose value differs, and for an engine whose step differs.

    ``saved`` is a checkpoint's record (:func:`resume_settings`); an option it lacks was written before the option
    existed and had its ``absent`` value. Older checkpoints recorded ``classifier_lr`` resolved to ``lr``, as this
    record does.
    """
    keys = {f.name: absent_value(f) for f in config_fields(TrainConfig, resume=FIXED)} | RUN_FACTS
    diffs = [
        f"{k}={saved.get(k, absent)!r} in the checkpoint, {now.get(k)!r} now"
        for k, absent in sorted(keys.items())
        if saved.get(k, absent) != now.get(k)
    ]
    engine_then, engine_now = saved.get("engine"), now.get("engine")
    if SAME_STEP.get(engine_then, engine_then) != SAME_STEP.get(engine_now, engine_now):
        diffs.append(f"engine={engine_then!r} in the checkpoint, {engine_now!r} now")
    return sorted(diffs)


# ----------------------------------------------------------------------------- the recipe: model and training
#: Old names of fields, as recipes and checkpoints written before the configuration had one name per option.
LEGACY_NAMES = {"num_samples": "val_num_samples"}
#: The training settings of ``Recipe()``: fit's defaults with the runs' 30 epochs.
RECIPE_TRAIN = TrainConfig(epochs=30)


def split_flat(flat: Mapping[str, Any], what: str = "recipe field") -> tuple[dict[str, Any], dict[str, Any]]:
    """Flat field values (old names mapped, :data:`LEGACY_NAMES`) as ``(model changes, train changes)``; an unknown
    name is a TypeError naming it and its close matches."""
    model_names = {f.name for f in dataclasses.fields(ModelConfig)}
    train_names = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for key, value in flat.items():
        name = LEGACY_NAMES.get(key, key)
        if name in model_names:
            model[name] = value
        elif name in train_names:
            train[name] = value
        else:
            names = sorted(model_names | train_names)
            close = difflib.get_close_matches(key, names, n=3)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; fields: {', '.join(names)}"
            raise TypeError(f"unknown {what} {key!r}{hint}")
    return model, train


@dataclass(frozen=True, init=False)
class Recipe:
    """A DGC run's model and training settings: ``Recipe(model=ModelConfig(...), train=TrainConfig(...))``.

    Flat keywords work too (``Recipe(epochs=60, latent_dim=16)``, ``dataclasses.replace(recipe, lr=3e-4)``): each
    goes to the one config that has the field, and ``recipe.epochs`` reads it back. ``num_samples`` is the old name
    of ``val_num_samples``, the latent draws of validation and of the run's evaluation.
    """

    model: ModelConfig
    train: TrainConfig

    def __init__(self, model: ModelConfig | None = None, train: TrainConfig | None = None, **flat: Any) -> None:
        model_changes, train_changes = split_flat(flat)
        model = ModelConfig() if model is None else model
        train = RECIPE_TRAIN if train is None else train
        if not isinstance(model, ModelConfig) or not isinstance(train, TrainConfig):
            raise TypeError("Recipe(model=, train=) takes a ModelConfig and a TrainConfig")
        object.__setattr__(self, "model", dataclasses.replace(model, **model_changes) if model_changes else model)
        object.__setattr__(self, "train", dataclasses.replace(train, **train_changes) if train_changes else train)
        # where the two configs meet: what fit would refuse for the model this recipe builds, refused now
        check_swag_model(self.train.swag_start, self.model.latent_prior == "standard")

    def __getattr__(self, name: str) -> Any:
        # Flat reads (recipe.epochs, recipe.latent_dim) of the one field that holds each option.
        if name in ("model", "train") or name.startswith("__"):
            raise AttributeError(name)
        name = LEGACY_NAMES.get(name, name)
        for part in (self.model, self.train):
            if name in part.__dataclass_fields__:
                return getattr(part, name)
        raise AttributeError(f"{type(self).__name__} has no field {name!r}")

    @property
    def num_samples(self) -> int:
        """Latent draws per class of validation and evaluation (``train.val_num_samples``)."""
        return self.train.val_num_samples

    @classmethod
    def from_flat(cls, flat: Mapping[str, Any]) -> Recipe:
        """The recipe of a flat dict such as :meth:`to_dict` writes (older names and JSON lists accepted)."""
        return cls(**dict(flat))

    def replace(self, **flat: Any) -> Recipe:
        """A copy with flat field changes (``recipe.replace(lr=3e-4, latent_dim=16)``)."""
        return Recipe(self.model, self.train, **flat)

    def to_dict(self, *, include_run: bool = True) -> dict[str, Any]:
        """Every field, flat, JSON-able: what metrics.json and checkpoints record and the benchmarks compare
        (without the ``role="run"`` fields when ``include_run`` is False)."""
        run = {f.name for f in config_fields(TrainConfig, role="run")}
        train = {k: v for k, v in self.train.to_dict().items() if include_run or k not in run}
        return {**self.model.to_dict(), **train}

    def fit_options(self) -> dict[str, Any]:
        """The options of :func:`~dgc_pyro.inference.fit` that this recipe sets: its ``role="recipe"`` training
        fields (the caller adds the data, device, seed and how the run executes)."""
        return {f.name: getattr(self.train, f.name) for f in config_fields(TrainConfig, role="recipe")}

    def baseline_options(self) -> dict[str, Any]:
        """The keyword arguments of :func:`~dgc_pyro.baselines.fit_baseline` that a baseline run beside this recipe
        shares with it (the ``baseline=True`` fields: backbone preset and training protocol; the caller sets
        ``lr``)."""
        return {
            f.name: getattr(self.model if f.name in ModelConfig.__dataclass_fields__ else self.train, f.name)
            for f in config_fields(baseline=True)
        }

    @property
    def balanced(self) -> bool:
        """Whether evaluation uses ``predict(..., balanced=True)`` (with the logit-adjusted likelihood)."""
        return self.model.logit_adjustment > 0

    def build_model(self, input_shape: tuple[int, ...], num_classes: int, train_counts: Any = None) -> DGC:
        """The DGC this recipe describes (:meth:`ModelConfig.build_model`)."""
        return self.model.build_model(input_shape, num_classes, train_counts)


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """Parse ``FIELD=VALUE`` strings into flat :class:`Recipe` changes, each value converted as its field's CLI
    flag converts it (:func:`parse_value`). Unknown fields and unconvertible values raise ValueError naming them."""
    fields = {f.name: f for f in config_fields()}
    changes: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"recipe override {item!r} is not FIELD=VALUE")
        name = LEGACY_NAMES.get(name, name)
        if name not in fields:
            close = difflib.get_close_matches(name, list(fields), n=3)
            raise ValueError(
                f"recipe override {item!r}: no field {name!r}; "
                + (f"did you mean {' or '.join(close)}?" if close else f"fields: {', '.join(fields)}")
            )
        try:
            changes[name] = parse_value(fields[name], text)
        except ValueError as err:
            raise ValueError(f"recipe override {item!r}: {err}") from None
    return changes
