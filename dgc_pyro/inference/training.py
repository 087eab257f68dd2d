"""One process's fit of DGC by stochastic variational inference: set-up, the epoch loop, validation and selection.

:func:`~dgc_pyro.inference.fit.fit` is the public entry point; it hands a single-process fit to :func:`train`
and a data-parallel one to :mod:`dgc_pyro.inference.distributed`, whose ranks call :func:`train` with their
context. The training step itself (and its engines) lives in :mod:`dgc_pyro.inference.engine`.
The loop and its callbacks are :mod:`dgc_pyro.inference.trainer` and :mod:`dgc_pyro.inference.callbacks`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.arguments import (
    check_betas,
    check_fraction,
    check_non_negative,
    check_positive,
    check_seed,
)
from dgc_pyro.caller_warning import warn_caller
from dgc_pyro.checkpoint import (
    TRAINING_STATE_FILE,
    TrainingState,
    load_training_state,
    training_state_path,
)
from dgc_pyro.data.splits import stratified_holdout
from dgc_pyro.data.transforms import Transform, resolve_transform, transform_name
from dgc_pyro.data.validation import check_xy
from dgc_pyro.device import resolve_device
from dgc_pyro.inference.callbacks import (
    CHANCE_CHECK_EPOCH,
    NEAR_CHANCE,
    TrainingInterrupted,
    default_callbacks,
)
from dgc_pyro.inference.deferred import (
    check_deferred,
    first_perturbation_epoch,
    head_epochs_from,
    make_head_step,
)
from dgc_pyro.inference.dist_context import DistContext
from dgc_pyro.inference.divergence import TrainingDivergedError
from dgc_pyro.inference.engine import ENGINES, make_step
from dgc_pyro.inference.objectives import Objective, get_objective
from dgc_pyro.inference.perturbation import (
    check_perturbation_model,
    check_perturbation_noise,
    check_perturbation_prior,
    head_classes,
    perturbation_offset,
    repeat_counts,
)
from dgc_pyro.inference.pretrain import pretrain_encoder
from dgc_pyro.inference.resume import check_resumable, data_fingerprint
from dgc_pyro.inference.schedule import check_lr_schedule
from dgc_pyro.inference.trainer import Plan, RunState, Trainer
from dgc_pyro.io import CheckpointError, folder_problem, nearest_existing, to_jsonable
from dgc_pyro.models.dgc import DGC
from dgc_pyro.reproducibility import deterministic_mode, seed_everything

__all__ = ["CHANCE_CHECK_EPOCH", "DEFAULT_WARMUP_STEPS", "NEAR_CHANCE", "History", "TrainingDivergedError",
           "TrainingInterrupted", "train"]

#: Warm-up steps of a fit that does not say (capped at one epoch): a short ramp over Adam's first, sign-like updates.
DEFAULT_WARMUP_STEPS = 100


@dataclass
class History:
    """What a fit did: one dict per epoch (``loss``, ``perturbation_loss``, validation metrics).

    In the epochs of a head re-training stage (``fit(..., retrain_head_epochs=k)``, the last k) ``loss`` is the
    label head's cross-entropy on class-balanced latent draws and ``perturbation_loss`` is 0.

    ``model`` is the fitted model (trained in place); ``best_epoch`` the epoch whose weights it holds (the last
    one unless ``select_best`` picked an earlier one on validation); ``resumed_from`` the checkpoint epoch a
    resumed fit started from.
    """

    model: DGC
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    train_counts: list[int] = field(default_factory=list)
    resumed_from: int | None = None
    checkpoint: Path | None = None

    @property
    def losses(self) -> list[float]:
        """Mean training loss (negative ELBO per example, or the objective's value) per epoch."""
        return [e["loss"] for e in self.epochs]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (without the model)."""
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "config": self.config,
            "train_counts": self.train_counts,
        }


# ---------------------------------------------------------------------------------------------
# Argument checks


def _check_fit_args(
    epochs: Any, batch_size: Any, lr: Any, seed: Any, val_fraction: Any, perturbation_rate: Any,
    classifier_lr: Any, betas: Any, val_num_samples: Any, checkpoint_every: Any, check_every: Any,
    pretrain_steps: Any,
) -> None:
    check_positive("epochs", epochs, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("lr", lr)
    check_positive("val_num_samples", val_num_samples, integer=True)
    check_positive("checkpoint_every", checkpoint_every, integer=True)
    if check_every is not None:
        check_positive("check_every", check_every, integer=True)
    if classifier_lr is not None:
        check_positive("classifier_lr", classifier_lr)
    check_seed(seed)
    check_non_negative("pretrain_steps", pretrain_steps, integer=True)
    check_fraction("val_fraction", val_fraction)
    check_non_negative("perturbation_rate", perturbation_rate)
    check_betas(betas)


def _check_checkpoint_dir(folder: Path) -> None:
    """Raise ValueError now when checkpoints could not be written to ``folder``.

    The first checkpoint is written after an epoch; a folder that can never be created (a file in its
    place or above it, no write permission) would otherwise fail only then. Nothing is created here, so
    a fit that fails later validation leaves no empty folder behind.
    """
    problem = folder_problem(folder)
    if problem:
        raise ValueError(f"checkpoint_dir {folder} {problem}")
    existing = nearest_existing(folder)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"checkpoint_dir {folder} is not writable: no write permission in {existing}")


# ---------------------------------------------------------------------------------------------
# The fit


def train(
    model: DGC,
    x: Any,
    y: Any,
    *,
    epochs: int = 20,
    batch_size: int = 100,
    lr: float = 1e-3,
    objective: str | Objective = "elbo",
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    val_fraction: float = 0.1,
    x_val: Any = None,
    y_val: Any = None,
    perturbation_rate: float = 0.6,
    classifier_lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
    engine: str | None = None,
    val_num_samples: int = 10,
    select_best: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    pretrain_steps: int = 0,
    checkpoint_dir: str | Path | None = None,
    checkpoint_every: int = 1,
    resume: bool = False,
    resume_from: str | Path | None = None,
    checkpoint_metadata: Mapping[str, Any] | None = None,
    check_every: int | None = None,
    deterministic: bool = False,
    compile: bool | dict[str, Any] = False,
    transform: str | Transform | None = None,
    perturbation_prior: str = "train",
    lr_schedule: str = "constant",
    warmup_steps: int | None = None,
    perturbation_start: float = 0.0,
    retrain_head_epochs: int = 0,
    perturbation_noise: str = "own",
    callbacks: Sequence[Any] = (),
    dist: DistContext | None = None,
) -> History:
    """One process's fit: :func:`~dgc_pyro.inference.fit.fit` without the data-parallel launch.

    Takes ``fit``'s keyword arguments but ``devices`` and ``strategy``; ``dist`` is this rank's data-parallel
    context when :mod:`dgc_pyro.inference.distributed` runs it as one rank of a group (None otherwise).
    """
    check_perturbation_model(model, perturbation_rate)
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    _check_fit_args(epochs, batch_size, lr, seed, val_fraction, perturbation_rate, classifier_lr, betas,
                    val_num_samples, checkpoint_every, check_every, pretrain_steps)
    if engine is None:  # a loss callable may keep Python state, which a captured graph would freeze (capture.py)
        engine = "graph" if isinstance(objective, str) else "torch"
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if warmup_steps is not None:
        check_non_negative("warmup_steps", warmup_steps, integer=True)
    check_perturbation_prior(perturbation_prior)  # before any data work; the offset is built after the split
    check_perturbation_noise(perturbation_noise)
    check_deferred(perturbation_start, retrain_head_epochs, epochs, perturbation_rate)
    check_lr_schedule(lr_schedule)
    if not isinstance(callbacks, (list, tuple)):
        raise ValueError(f"callbacks must be a list or tuple of callback objects, got {type(callbacks).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {callback!r}")
    if checkpoint_metadata is not None and not isinstance(checkpoint_metadata, Mapping):
        raise ValueError(f"checkpoint_metadata must be a dict, got {type(checkpoint_metadata).__name__}")
    loss_fn = get_objective(objective)
    x, y = check_xy(x, y, input_shape=model.input_shape, num_classes=model.num_classes, require_all_classes=True)
    batch_transform = resolve_transform(transform, model.input_shape)
    transform_label = transform_name(transform)
    if (x_val is None) != (y_val is None):
        raise ValueError("pass both x_val and y_val, or neither")
    if x_val is not None:
        x_val, y_val = check_xy(x_val, y_val, input_shape=model.input_shape, num_classes=model.num_classes)
    dev = resolve_device(device)

    # Where checkpoints come from and go to; every problem here is raised before training starts.
    ckpt_path = Path(checkpoint_dir) / TRAINING_STATE_FILE if checkpoint_dir is not None else None
    if ckpt_path is not None:
        _check_checkpoint_dir(ckpt_path.parent)
    saved: TrainingState | None = None
    source: Path | None = None
    if resume_from is not None:
        source = training_state_path(resume_from)
        saved = load_training_state(source)  # FileNotFoundError / CheckpointError
        if ckpt_path is None:
            ckpt_path = source
    elif resume:
        if ckpt_path is None:
            raise ValueError("resume=True needs checkpoint_dir (or pass resume_from=DIR)")
        if ckpt_path.exists():
            source = ckpt_path
            saved = load_training_state(source)
    if saved is not None and saved.epoch > epochs:
        raise ValueError(f"the checkpoint {source} is at epoch {saved.epoch}, beyond epochs={epochs}")
    if warmup_steps is None:  # a resumed fit continues with its own warm-up (none before warm-ups existed)
        warmup_steps = DEFAULT_WARMUP_STEPS if saved is None else saved.config.get("warmup_steps", 0)

    objective_name = objective if isinstance(objective, str) else getattr(objective, "__name__", "custom")
    resume_config = to_jsonable({
        "batch_size": batch_size, "lr": lr, "betas": list(betas), "objective": objective_name, "seed": seed,
        "val_fraction": val_fraction, "explicit_val": x_val is not None, "perturbation_rate": perturbation_rate,
        "classifier_lr": classifier_lr or lr, "engine": engine, "val_num_samples": val_num_samples,
        "select_best": bool(select_best), "pretrain_steps": pretrain_steps, "transform": transform_label,
        "perturbation_prior": perturbation_prior, "lr_schedule": lr_schedule,
        # the cosine's length is part of every step's rate, so such a fit cannot grow its epochs on resume
        "schedule_epochs": epochs if lr_schedule != "constant" else None,
        "warmup_steps": warmup_steps,
        "perturbation_start": perturbation_start, "retrain_head_epochs": retrain_head_epochs,
        "perturbation_noise": perturbation_noise,
        # the deferred stages' epochs are fractions or counts of `epochs`, which a resumed fit must then keep
        "deferred_epochs": epochs if perturbation_start > 0 or retrain_head_epochs else None,
    })
    need_fingerprint = ckpt_path is not None or saved is not None
    fingerprint = data_fingerprint(x, y, x_val, y_val) if need_fingerprint else ""
    if saved is not None:
        check_resumable(saved, source, model, resume_config, fingerprint)

    with deterministic_mode(deterministic):
        seed_everything(seed)
        train_idx = val_idx = None
        if x_val is None and val_fraction > 0:
            if saved is not None and saved.train_idx is not None and saved.val_idx is not None:
                train_idx, val_idx = saved.train_idx, saved.val_idx
                if len(train_idx) + len(val_idx) != len(y) or bool((torch.cat([train_idx, val_idx]) >= len(y)).any()):
                    raise CheckpointError(f"{source}: its validation split does not fit the {len(y)} training examples")
            else:
                tr, va = stratified_holdout(y.numpy(), val_fraction, seed)
                train_idx, val_idx = torch.from_numpy(tr), torch.from_numpy(va)
            x_val, y_val = x[val_idx], y[val_idx]
            x, y = x[train_idx], y[train_idx]

        counts = np.bincount(y.numpy(), minlength=model.num_classes)
        model.to(dev)
        x_dev = x.to(dev, model.dtype, non_blocking=True)
        y_dev = y.to(dev, non_blocking=True)
        reps = repeat_counts(counts, perturbation_rate).to(dev)

        history = History(
            model=model,
            config={
                "epochs": epochs, "batch_size": batch_size, "lr": lr, "betas": list(betas),
                "objective": objective_name,
                "device": str(dev), "seed": seed, "val_fraction": val_fraction,
                "perturbation_rate": perturbation_rate, "engine": engine, "model": model.config,
                "pretrain_steps": pretrain_steps, "transform": transform_label,
                "perturbation_prior": perturbation_prior, "lr_schedule": lr_schedule,
                "warmup_steps": min(warmup_steps, math.ceil(len(y) / batch_size)),
                "perturbation_start": perturbation_start, "retrain_head_epochs": retrain_head_epochs,
                "perturbation_noise": perturbation_noise,
            },
            train_counts=counts.tolist(),
        )
        if pretrain_steps and saved is None:
            pretrain_encoder(model, x_dev, y_dev, pretrain_steps, batch_size=batch_size, lr=lr, betas=betas, seed=seed)
        step = make_step(model, loss_fn, engine, lr, betas, classifier_lr or lr, perturbation_rate > 0, reps, dev,
                         compile=compile, perturbation_offset=perturbation_offset(model, reps, perturbation_prior),
                         fallback=True, borrow_from=head_classes(reps) if perturbation_noise == "head" else None,
                         dist=dist)
        optimizers = step.optimizers

        extra = dict(checkpoint_metadata) if checkpoint_metadata is not None else (saved.extra if saved else {})
        run = RunState(model, step, optimizers, torch.Generator(device=dev).manual_seed(seed), ckpt_path, {
            "config": resume_config, "model_config": model.config, "fingerprint": fingerprint,
            "extra": to_jsonable(extra), "train_idx": train_idx, "val_idx": val_idx,
        }, dist=dist)
        start = 0
        if saved is not None:
            notes = run.restore(saved, source=source)
            if notes:
                warn_caller(f"resuming from {source}: {'; '.join(notes)}; the continued fit is not bit-identical to "
                            "an uninterrupted one")
            start = saved.epoch
            history.resumed_from = start
            if source == ckpt_path:
                run.saved_epoch = start
        history.checkpoint = ckpt_path
        run.last_good = run.snapshot(start)

        plan = Plan(
            x=x_dev, y=y_dev, counts=counts, batch_size=batch_size, epochs=epochs, lr=lr,
            base_lrs={"main": lr, "perturbation": classifier_lr or lr}, lr_schedule=lr_schedule,
            warmup_steps=warmup_steps, transform=batch_transform, x_val=x_val, y_val=y_val,
            val_num_samples=val_num_samples, perturbation_from=first_perturbation_epoch(perturbation_start, epochs),
            head_from=head_epochs_from(retrain_head_epochs, epochs),
        )
        trainer = Trainer(
            run, plan, head_step=make_head_step(model, optimizers["perturbation"]) if retrain_head_epochs else None,
            callbacks=default_callbacks(progress=progress, select_best=select_best, check_every=check_every,
                                        checkpoint_every=checkpoint_every, callback=callback, user=tuple(callbacks)),
        )
        trainer.run(start)
        if step.engine != engine:  # the graph engine fell back to the torch engine
            history.config["engine"] = step.engine

        history.epochs = run.history
        history.best_epoch = run.best_epoch
        if run.best_model is not None:
            model.load_state_dict(run.best_model)
        else:
            history.best_epoch = trainer.last_epoch  # `epochs`, or where a callback stopped the fit
        model.eval()
    return history
