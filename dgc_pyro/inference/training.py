"""One process's fit of DGC by stochastic variational inference: set-up, the epoch loop, validation and selection.

:func:`~dgc_pyro.inference.fit.fit` is the public entry point; it hands a single-process fit to :func:`train`
and a data-parallel one to :mod:`dgc_pyro.inference.distributed`, whose ranks call :func:`train` with their
context. The training step itself (and its engines) lives in :mod:`dgc_pyro.inference.engine`.
The loop and its callbacks are :mod:`dgc_pyro.inference.trainer` and :mod:`dgc_pyro.inference.callbacks`.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.arguments import check_seed
from dgc_pyro.caller_warning import warn_caller
from dgc_pyro.checkpoint import (
    TRAINING_STATE_FILE,
    TrainingState,
    load_training_state,
    training_state_path,
)
from dgc_pyro.config import TrainConfig, check_swag_model, first_perturbation_epoch, resume_settings
from dgc_pyro.data.splits import stratified_holdout
from dgc_pyro.data.transforms import resolve_transform, transform_name
from dgc_pyro.data.validation import check_xy
from dgc_pyro.device import resolve_device
from dgc_pyro.inference.callbacks import (
    CHANCE_CHECK_EPOCH,
    NEAR_CHANCE,
    TrainingInterrupted,
    checkpointing_of,
    default_callbacks,
)
from dgc_pyro.inference.deferred import head_epochs_from, make_head_step
from dgc_pyro.inference.dist_context import DistContext
from dgc_pyro.inference.divergence import TrainingDivergedError
from dgc_pyro.inference.engine import make_step
from dgc_pyro.inference.objectives import get_objective
from dgc_pyro.inference.perturbation import (
    check_perturbation_model,
    head_classes,
    perturbation_offset,
    repeat_counts,
)
from dgc_pyro.inference.pretrain import pretrain_encoder
from dgc_pyro.inference.resume import check_resumable, data_fingerprint
from dgc_pyro.inference.swag import SwagCollector, SwagHead
from dgc_pyro.inference.trainer import Plan, RunState, Trainer
from dgc_pyro.io import CheckpointError, folder_problem, nearest_existing, to_jsonable
from dgc_pyro.models.dgc import DGC
from dgc_pyro.reproducibility import deterministic_mode, seed_everything

__all__ = [
    "CHANCE_CHECK_EPOCH",
    "DEFAULT_WARMUP_STEPS",
    "NEAR_CHANCE",
    "History",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "train",
]

#: Warm-up steps of a fit that does not say (capped at one epoch): a short ramp over Adam's first, sign-like updates.
DEFAULT_WARMUP_STEPS = 100


@dataclass
class History:
    """What a fit did: one dict per epoch (``loss``, ``perturbation_loss``, validation metrics).

    In the epochs of a head re-training stage (``fit(..., retrain_head_epochs=k)``, the last k) ``loss`` is the
    label head's cross-entropy on class-balanced latent draws and ``perturbation_loss`` is 0.

    ``model`` is the fitted model (trained in place; with ``swag_start`` its SWAG head is ``model.swag``);
    ``best_epoch`` the epoch whose weights it holds (the last one unless ``select_best`` picked an earlier one on
    validation); ``resumed_from`` the checkpoint epoch a resumed fit started from.
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
# Checks


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
    config: TrainConfig,
    *,
    x_val: Any = None,
    y_val: Any = None,
    resume: bool | str | Path | None = None,
    callbacks: Sequence[Any] = (),
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    dist: DistContext | None = None,
) -> History:
    """One process's fit: :func:`~dgc_pyro.inference.fit.fit` without the data-parallel launch.

    Takes ``fit``'s arguments with ``config`` settled (a :class:`~dgc_pyro.config.TrainConfig`) and the old
    ``callback(epoch, record)`` hook apart; ``dist`` is this rank's data-parallel context when
    :mod:`dgc_pyro.inference.distributed` runs it as one rank of a group (None otherwise).
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a dgc_pyro.config.TrainConfig, got {type(config).__name__}")
    c = config
    check_perturbation_model(model, c.perturbation_rate)
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    check_swag_model(c.swag_start, model.has_label_head)
    check_seed(seed)
    engine = c.engine
    if engine is None:  # a loss callable may keep Python state, which a captured graph would freeze (capture.py)
        engine = "graph" if isinstance(c.objective, str) else "torch"
    if not isinstance(callbacks, (list, tuple)):
        raise ValueError(f"callbacks must be a list or tuple of callback objects, got {type(callbacks).__name__}")
    if callback is not None and not callable(callback):
        raise ValueError(f"callback must be callable, got {callback!r}")
    checkpointing = checkpointing_of(callbacks)
    loss_fn = get_objective(c.objective)
    x, y = check_xy(x, y, input_shape=model.input_shape, num_classes=model.num_classes, require_all_classes=True)
    batch_transform = resolve_transform(c.transform, model.input_shape)
    if (x_val is None) != (y_val is None):
        raise ValueError("pass both x_val and y_val, or neither")
    if x_val is not None:
        x_val, y_val = check_xy(x_val, y_val, input_shape=model.input_shape, num_classes=model.num_classes)
    dev = resolve_device(device)

    # Where checkpoints come from and go to; every problem here is raised before training starts.
    ckpt_path = checkpointing.folder / TRAINING_STATE_FILE if checkpointing.folder is not None else None
    if ckpt_path is not None:
        _check_checkpoint_dir(ckpt_path.parent)
    saved: TrainingState | None = None
    source: Path | None = None
    if resume is not None and resume is not False and resume is not True:  # a checkpoint folder or file
        source = training_state_path(resume)
        saved = load_training_state(source)  # FileNotFoundError / CheckpointError
        if ckpt_path is None:
            ckpt_path = source
    elif resume is True:
        if ckpt_path is None:
            raise ValueError(
                "resume=True needs checkpoint_dir (a Checkpointing(folder) callback), or pass the "
                "checkpoint: resume=DIR"
            )
        if ckpt_path.exists():
            source = ckpt_path
            saved = load_training_state(source)
    if saved is not None and saved.epoch > c.epochs:
        raise ValueError(f"the checkpoint {source} is at epoch {saved.epoch}, beyond epochs={c.epochs}")
    warmup_steps = c.warmup_steps
    if warmup_steps is None:  # a resumed fit continues with its own warm-up (none before warm-ups existed)
        warmup_steps = DEFAULT_WARMUP_STEPS if saved is None else saved.config.get("warmup_steps", 0)

    # The settings the fit runs with, resolved (engine, classifier_lr, warm-up): what checkpoints and History record.
    c = dataclasses.replace(
        c,
        engine=engine,
        classifier_lr=c.classifier_lr or c.lr,
        warmup_steps=warmup_steps,
        transform=transform_name(c.transform),
    )
    settings = to_jsonable(resume_settings(c, seed=seed, explicit_val=x_val is not None))
    need_fingerprint = ckpt_path is not None or saved is not None
    fingerprint = data_fingerprint(x, y, x_val, y_val) if need_fingerprint else ""
    if saved is not None:
        check_resumable(saved, source, model, settings, fingerprint)

    with deterministic_mode(c.deterministic):
        seed_everything(seed)
        train_idx = val_idx = None
        if x_val is None and c.val_fraction > 0:
            if saved is not None and saved.train_idx is not None and saved.val_idx is not None:
                train_idx, val_idx = saved.train_idx, saved.val_idx
                if len(train_idx) + len(val_idx) != len(y) or bool((torch.cat([train_idx, val_idx]) >= len(y)).any()):
                    raise CheckpointError(f"{source}: its validation split does not fit the {len(y)} training examples")
            else:
                tr, va = stratified_holdout(y.numpy(), c.val_fraction, seed)
                train_idx, val_idx = torch.from_numpy(tr), torch.from_numpy(va)
            x_val, y_val = x[val_idx], y[val_idx]
            x, y = x[train_idx], y[train_idx]

        counts = np.bincount(y.numpy(), minlength=model.num_classes)
        model.to(dev)
        x_dev = x.to(dev, model.dtype, non_blocking=True)
        y_dev = y.to(dev, non_blocking=True)
        reps = repeat_counts(counts, c.perturbation_rate).to(dev)

        history = History(
            model=model,
            # every option (generated from the fields), with where and how the fit ran; the warm-up it applied
            config={
                **c.to_dict(),
                "device": str(dev),
                "seed": seed,
                "model": model.config,
                "warmup_steps": min(warmup_steps, math.ceil(len(y) / c.batch_size)),
            },
            train_counts=counts.tolist(),
        )
        if c.pretrain_steps and saved is None:
            pretrain_encoder(
                model, x_dev, y_dev, c.pretrain_steps, batch_size=c.batch_size, lr=c.lr, betas=c.betas, seed=seed
            )
        step = make_step(
            model,
            loss_fn,
            engine,
            c.lr,
            c.betas,
            c.classifier_lr,
            c.perturbation_rate > 0,
            reps,
            dev,
            compile=c.compile,
            perturbation_offset=perturbation_offset(model, reps, c.perturbation_prior),
            fallback=True,
            borrow_from=head_classes(reps) if c.perturbation_noise == "head" else None,
            dist=dist,
        )
        optimizers = step.optimizers
        # the recipe's SWAG of the label head: a collector among the fit's own callbacks, before the user's
        swag = (
            SwagCollector(c.swag_start, max_rank=c.swag_rank, every_steps=c.swag_every_steps)
            if c.swag_start is not None
            else None
        )
        trainer_callbacks = default_callbacks(
            progress=progress,
            select_best=c.select_best,
            check_every=c.check_every,
            callback=callback,
            user=tuple(callbacks),
            builtin=(swag,) if swag is not None else (),
        )
        model.swag = None  # a head of an earlier fit would not belong to the weights this fit leaves

        metadata = checkpointing.metadata
        extra = dict(metadata) if metadata is not None else (saved.extra if saved else {})
        run = RunState(
            model,
            step,
            optimizers,
            torch.Generator(device=dev).manual_seed(seed),
            ckpt_path,
            {
                "config": settings,
                "model_config": model.config,
                "fingerprint": fingerprint,
                "extra": to_jsonable(extra),
                "train_idx": train_idx,
                "val_idx": val_idx,
            },
            dist=dist,
            callbacks=trainer_callbacks,
        )
        start = 0
        if saved is not None:
            notes = run.restore(saved, source=source)
            if notes:
                warn_caller(
                    f"resuming from {source}: {'; '.join(notes)}; the continued fit is not bit-identical to "
                    "an uninterrupted one"
                )
            start = saved.epoch
            history.resumed_from = start
            if source == ckpt_path:
                run.saved_epoch = start
        history.checkpoint = ckpt_path
        run.last_good = run.snapshot(start)

        plan = Plan(
            x=x_dev,
            y=y_dev,
            counts=counts,
            batch_size=c.batch_size,
            epochs=c.epochs,
            lr=c.lr,
            base_lrs={"main": c.lr, "perturbation": c.classifier_lr},
            lr_schedule=c.lr_schedule,
            warmup_steps=warmup_steps,
            transform=batch_transform,
            x_val=x_val,
            y_val=y_val,
            val_num_samples=c.val_num_samples,
            perturbation_from=first_perturbation_epoch(c.perturbation_start, c.epochs),
            head_from=head_epochs_from(c.retrain_head_epochs, c.epochs),
        )
        head_step = make_head_step(model, optimizers["perturbation"]) if c.retrain_head_epochs else None
        trainer = Trainer(run, plan, head_step=head_step, callbacks=trainer_callbacks)
        trainer.run(start)
        if step.engine != engine:  # the graph engine fell back to the torch engine
            history.config["engine"] = step.engine

        history.epochs = run.history
        history.best_epoch = run.best_epoch
        if run.best_model is not None:
            model.load_state_dict(run.best_model)
        else:
            history.best_epoch = trainer.last_epoch  # `epochs`, or where a callback stopped the fit
        if swag is not None:
            model.swag = _swag_head(swag, trainer.last_epoch)
        model.eval()
    return history


def _swag_head(collector: SwagCollector, last_epoch: int) -> SwagHead | None:
    """The fitted SWAG head, or None (with a warning) when the fit stopped before the window."""
    if collector.moments.count:
        return collector.head
    warn_caller(
        f"swag_start={collector.start}: the fit stopped after epoch {last_epoch}, before the SWAG window (from "
        f"epoch {collector.first_epoch}); the model has no SWAG head"
    )
    return None
