"""One process's fit of DGC by stochastic variational inference: set-up, the epoch loop, validation and selection.

:func:`~dgc_pyro.inference.fit.fit` is the public entry point; it hands a single-process fit to :func:`train`
and a data-parallel one to :mod:`dgc_pyro.inference.distributed`, whose ranks call :func:`train` with their
context. The training step itself (and its engines) lives in :mod:`dgc_pyro.inference.engine`.

Reliability features of the loop (see ``docs/reliability.md``):

* checkpoints: with ``checkpoint_dir`` the complete training state (weights, both optimisers, epoch,
  step, history, every random number generator, the data order and the validation split) is written
  atomically after every ``checkpoint_every`` epochs, as safetensors + JSON (never pickle);
* resume: ``resume=True`` / ``resume_from=DIR`` continue from the last checkpoint; on CPU with the
  same seed and data the result is bit-identical to an uninterrupted fit;
* interrupts: Ctrl-C (KeyboardInterrupt) or SIGTERM during a checkpointed fit write the last
  completed epoch's state before the exception propagates (:class:`TrainingInterrupted`);
* divergence: a NaN/inf loss stops the fit with :class:`TrainingDivergedError`, naming the epoch, the
  step and the term of the objective that blew up (found by replaying the step from the last good
  state); the model is put back to the last good weights.
"""

from __future__ import annotations

import math
import os
import signal
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import pyro
import pyro.optim
import torch
from tqdm.auto import tqdm

from dgc_pyro.arguments import check_betas, check_fraction, check_non_negative, check_positive, check_seed
from dgc_pyro.checkpoint import (
    TRAINING_STATE_FILE,
    TrainingState,
    check_state_matches,
    load_training_state,
    save_training_state,
    training_state_path,
)
from dgc_pyro.data.splits import stratified_holdout
from dgc_pyro.data.transforms import Transform, resolve_transform, transform_name
from dgc_pyro.data.validation import check_xy
from dgc_pyro.inference.deferred import (
    balanced_order,
    balanced_weights,
    check_deferred,
    first_perturbation_epoch,
    head_epochs_from,
    make_head_step,
)
from dgc_pyro.device import resolve_device
from dgc_pyro.inference.dist_context import DistContext
from dgc_pyro.inference.divergence import TrainingDivergedError, describe_term, first_nonfinite, site_terms
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
from dgc_pyro.inference.predict import predict
from dgc_pyro.inference.pretrain import pretrain_encoder
from dgc_pyro.inference.resume import (
    check_resumable,
    copy_tree,
    data_fingerprint,
    load_optimizer_state,
    optimizer_state,
)
from dgc_pyro.inference.schedule import check_lr_schedule, scheduled_lr
from dgc_pyro.io import CheckpointError, folder_problem, nearest_existing, to_jsonable
from dgc_pyro.metrics import imbalance_report
from dgc_pyro.models.dgc import DGC
from dgc_pyro.reproducibility import deterministic_mode, get_rng_state, seed_everything, set_rng_state

__all__ = ["CHANCE_CHECK_EPOCH", "DEFAULT_WARMUP_STEPS", "History", "TrainingDivergedError", "TrainingInterrupted",
           "train"]

#: Warm-up steps of a fit that does not say (capped at one epoch): a short ramp over Adam's first, sign-like updates.
DEFAULT_WARMUP_STEPS = 100
#: The epoch after which a fit whose validation ACSA is still near chance warns.
CHANCE_CHECK_EPOCH = 3
#: "Near chance": within this share of the way from chance ACSA to 1 (slow starters, e.g. digits models at .17-.18
#: after 3 of 40 epochs in notebook 03, must not be told they look broken).
NEAR_CHANCE = 0.05


class TrainingInterrupted(KeyboardInterrupt):
    """A checkpointed fit was stopped by Ctrl-C (``signum == SIGINT``) or SIGTERM.

    Raised after the state of the last completed epoch (``epoch``) was written to ``checkpoint``;
    continue with ``fit(..., resume=True)``. Subclasses KeyboardInterrupt, so ``except Exception``
    does not swallow it.
    """

    def __init__(self, signum: int = signal.SIGINT) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)
        self.checkpoint: Path | None = None
        self.epoch: int | None = None


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


class _Run:
    """The mutable state of one fit and the operations on it (snapshot, restore, save, diagnose)."""

    def __init__(self, model: DGC, step: Callable, optimizers: dict[str, Any], generator: torch.Generator,
                 ckpt_path: Path | None, static: dict[str, Any], dist: DistContext | None = None) -> None:
        self.model = model
        self.dist = dist
        self.step = step
        self.optimizers = optimizers
        self.generator = generator
        self.ckpt_path = ckpt_path
        self.static = static  # config, model_config, fingerprint, extra, train_idx, val_idx
        self.history: list[dict[str, Any]] = []
        self.best_epoch: int | None = None
        self.best_score = -math.inf
        self.best_model: dict[str, torch.Tensor] | None = None
        self.global_step = 0
        self.last_good: TrainingState | None = None
        self.saved_epoch = -1

    def snapshot(self, epoch: int) -> TrainingState:
        return TrainingState(
            epoch=epoch,
            global_step=self.global_step,
            model=copy_tree(self.model.state_dict()),
            optimizers={name: optimizer_state(o, self.model) for name, o in self.optimizers.items()},
            rng=get_rng_state(self.generator),
            history=[dict(r) for r in self.history],
            best_epoch=self.best_epoch,
            best_score=self.best_score,
            best_model=self.best_model,
            train_idx=self.static["train_idx"],
            val_idx=self.static["val_idx"],
            config=self.static["config"],
            model_config=self.static["model_config"],
            fingerprint=self.static["fingerprint"],
            extra=self.static["extra"],
        )

    def restore(self, state: TrainingState, *, source: Any = "the snapshot") -> list[str]:
        """Load ``state`` into the model, optimisers, generators and bookkeeping; returns RNG notes.

        States read from a file were checked for damage (non-finite weights) by ``check_resumable``; an
        in-memory snapshot may hold non-finite weights on purpose, when a divergence is being replayed.
        """
        check_state_matches(self.model, state.model, source, require_finite=False)
        if state.best_model is not None:
            check_state_matches(self.model, state.best_model, f"{source} (best model)", require_finite=False)
        missing = sorted(set(self.optimizers) - set(state.optimizers))
        if missing:
            raise CheckpointError(f"{source} lacks the state of optimiser(s) {missing}")
        self.model.load_state_dict(state.model)
        try:
            for name, opt in self.optimizers.items():
                load_optimizer_state(opt, state.optimizers[name], self.model)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
            raise CheckpointError(f"{source}: the optimiser state does not fit this model/engine ({type(e).__name__}: {e})") from None
        try:
            notes = set_rng_state(state.rng, self.generator)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        self.history = [dict(r) for r in state.history]
        self.best_epoch, self.best_score, self.best_model = state.best_epoch, state.best_score, state.best_model
        self.global_step = state.global_step
        return notes

    def save(self, state: TrainingState) -> Path | None:
        if self.ckpt_path is None:
            return None
        if state.epoch != self.saved_epoch:
            if self.dist is None or self.dist.is_rank_zero:  # data-parallel ranks hold identical states: one writer is enough
                save_training_state(self.ckpt_path, state)
            self.saved_epoch = state.epoch
        return self.ckpt_path


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
        optimizers = getattr(step, "optimizers", None)
        if not isinstance(optimizers, dict):
            raise RuntimeError("make_step must expose the step's optimisers as step.optimizers (a dict)")

        extra = dict(checkpoint_metadata) if checkpoint_metadata is not None else (saved.extra if saved else {})
        run = _Run(model, step, optimizers, torch.Generator(device=dev).manual_seed(seed), ckpt_path, {
            "config": resume_config, "model_config": model.config, "fingerprint": fingerprint,
            "extra": to_jsonable(extra), "train_idx": train_idx, "val_idx": val_idx,
        }, dist=dist)
        start = 0
        if saved is not None:
            notes = run.restore(saved, source=source)
            if notes:
                warnings.warn(
                    f"resuming from {source}: {'; '.join(notes)}; the continued fit is not bit-identical to an "
                    "uninterrupted one", RuntimeWarning, stacklevel=2,
                )
            start = saved.epoch
            history.resumed_from = start
            if source == ckpt_path:
                run.saved_epoch = start
        history.checkpoint = ckpt_path
        run.last_good = run.snapshot(start)

        ctx = _Loop(run, x_dev, y_dev, x_val, y_val, counts, batch_size, epochs, checkpoint_every, check_every,
                    select_best, val_num_samples, callback, progress, lr, batch_transform,
                    schedule=lr_schedule, base_lrs={"main": lr, "perturbation": classifier_lr or lr},
                    warmup_steps=warmup_steps,
                    perturbation_from=first_perturbation_epoch(perturbation_start, epochs),
                    head_from=head_epochs_from(retrain_head_epochs, epochs),
                    head_step=make_head_step(model, optimizers["perturbation"]) if retrain_head_epochs else None)
        ctx.run(start)
        if getattr(step, "engine", engine) != engine:  # the graph engine fell back to the torch engine
            history.config["engine"] = step.engine

        history.epochs = run.history
        history.best_epoch = run.best_epoch
        if run.best_model is not None:
            model.load_state_dict(run.best_model)
        else:
            history.best_epoch = epochs
        model.eval()
    return history


class _Loop:
    """The epoch loop with divergence checks, checkpoints and interrupt handling."""

    def __init__(self, run: _Run, x: torch.Tensor, y: torch.Tensor, x_val: Any, y_val: Any, counts: np.ndarray,
                 batch_size: int, epochs: int, checkpoint_every: int, check_every: int | None, select_best: bool,
                 val_num_samples: int, callback: Any, progress: bool, lr: float,
                 transform: Transform | None = None, schedule: str = "constant",
                 base_lrs: dict[str, float] | None = None, warmup_steps: int = 0, perturbation_from: int = 1,
                 head_from: int | None = None, head_step: Callable | None = None) -> None:
        self.run_ = run
        self.x, self.y, self.x_val, self.y_val, self.counts = x, y, x_val, y_val, counts
        self.batch_size, self.epochs = batch_size, epochs
        self.checkpoint_every, self.check_every = checkpoint_every, check_every
        self.select_best, self.val_num_samples = select_best, val_num_samples
        self.callback, self.progress, self.lr = callback, progress, lr
        self.transform = transform
        self.n = x.shape[0]
        self.num_batches = math.ceil(self.n / batch_size)
        self.schedule, self.base_lrs = schedule, dict(base_lrs or {})
        self.total_steps = epochs * self.num_batches
        self.warmup = min(warmup_steps, self.num_batches)  # at most the first epoch
        self.perturbation_from, self.head_from, self.head_step = perturbation_from, head_from, head_step
        self.weights = balanced_weights(y, counts) if head_from is not None else None

    def retraining(self, epoch: int) -> bool:
        """Whether ``epoch`` is in the head re-training stage (``retrain_head_epochs``)."""
        return self.head_from is not None and epoch >= self.head_from

    def start_epoch(self, epoch: int) -> tuple[torch.Tensor, Callable]:
        """Set the model's modes and the perturbation switch for ``epoch``; return its data order and step.

        Everything here follows from the epoch number (and the fit's generator), so a resumed or replayed
        epoch starts exactly as the uninterrupted one did.
        """
        run = self.run_
        run.model.train()
        run.step.set_perturbing(epoch >= self.perturbation_from)
        if self.retraining(epoch):
            run.model.encoder.eval()  # frozen: its BatchNorm/dropout as at prediction, no running-statistic updates
            run.model.decoder.eval()
            return balanced_order(self.weights, run.generator), self.head_step
        return torch.randperm(self.n, device=self.x.device, generator=run.generator), run.step

    def set_step_lr(self, step: int) -> float:
        """Apply the schedule's rates for global step ``step`` to every optimiser; returns the main rate."""
        rates = {name: scheduled_lr(opt, self.base_lrs[name], self.schedule, step, self.total_steps, self.warmup)
                 for name, opt in self.run_.optimizers.items()}
        return rates["main"]

    def warn_if_near_chance(self, epoch: int) -> None:
        """One-line RuntimeWarning when no epoch so far beat chance ACSA by a tenth of the way to 1."""
        # Only fits that ran a few epochs: one or two epochs of a tiny model are often near chance by design.
        if epoch != CHANCE_CHECK_EPOCH:
            return
        scores = [r["val_acsa"] for r in self.run_.history if "val_acsa" in r]
        chance = 1.0 / self.run_.model.num_classes
        if scores and max(scores) <= chance + NEAR_CHANCE * (1.0 - chance):
            loss = self.run_.history[0]["loss"]
            warnings.warn(
                f"validation ACSA is {max(scores):.3f} after {epoch} epoch(s), near chance ({chance:.3f}): the fit "
                f"looks broken (epoch 1 loss {loss:.4g}); try a lower lr (lr={self.lr}) or a longer warm-up",
                RuntimeWarning, stacklevel=5)

    def batch(self, perm: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = perm[b * self.batch_size : (b + 1) * self.batch_size]
        x = self.x[idx]
        if self.transform is not None:
            x = self.transform(x, self.run_.generator)
        return x, self.y[idx]

    def run(self, start: int) -> None:
        run = self.run_
        use_signal = run.ckpt_path is not None and threading.current_thread() is threading.main_thread()
        previous = None
        if use_signal:
            def on_sigterm(signum: int, frame: Any) -> None:
                raise TrainingInterrupted(signum)

            previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            with pyro.settings.context(module_local_params=True):
                self._epochs(start)
        except KeyboardInterrupt as exc:
            if run.ckpt_path is None:
                raise
            if use_signal:  # a second SIGTERM must not abort the checkpoint being written
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
            path = run.save(run.last_good)
            interrupted = exc if isinstance(exc, TrainingInterrupted) else TrainingInterrupted(signal.SIGINT)
            interrupted.checkpoint, interrupted.epoch = path, run.last_good.epoch
            if interrupted is exc:
                raise
            raise interrupted from exc
        finally:
            if use_signal:
                signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)

    def _epochs(self, start: int) -> None:
        run = self.run_
        model = run.model
        bar = tqdm(range(start + 1, self.epochs + 1), desc="fit", unit="epoch", disable=not self.progress,
                   leave=False, initial=start, total=self.epochs)
        for epoch in bar:
            perm, step = self.start_epoch(epoch)
            mains: list[torch.Tensor] = []
            perts: list[torch.Tensor] = []
            checked = 0
            epoch_lr = self.set_step_lr(run.global_step)
            for b in range(self.num_batches):
                if b:
                    self.set_step_lr(run.global_step + b)
                try:
                    main, pert = step(*self.batch(perm, b))
                except ValueError as e:
                    # torch.distributions' argument validation: non-finite parameters reached a distribution.
                    if "found invalid values" not in str(e):
                        raise
                    k = first_nonfinite(mains, perts)
                    self._diverged(epoch, b if k is None else k, mains, perts, error=e)
                mains.append(main)
                perts.append(pert)
                if self.check_every and (b + 1) % self.check_every == 0:
                    k = first_nonfinite(mains[checked:], perts[checked:])
                    if k is not None:
                        self._diverged(epoch, checked + k, mains, perts)
                    checked = b + 1
            totals = torch.stack([torch.stack(mains).double().sum(), torch.stack(perts).double().sum()]).tolist()
            if not all(math.isfinite(v) for v in totals):
                k = first_nonfinite(mains, perts)
                self._diverged(epoch, k if k is not None else self.num_batches - 1, mains, perts)
            run.global_step += self.num_batches
            record: dict[str, float] = {
                "epoch": epoch,
                "loss": totals[0] / self.num_batches,
                "perturbation_loss": totals[1] / self.num_batches,
                "lr": epoch_lr,
            }
            if self.x_val is not None:
                # Labels only: no density score (it costs decoder rows, and a model without the x site has none).
                pred = predict(model, self.x_val, self.val_num_samples, balanced=model.has_class_prior, density=False)
                report = imbalance_report(self.y_val, pred.labels.cpu(), num_classes=model.num_classes,
                                          train_counts=self.counts)
                record.update({f"val_{k}": v for k, v in report.items()})
                if self.select_best and report["acsa"] > run.best_score:
                    run.best_score, run.best_epoch = report["acsa"], epoch
                    run.best_model = copy_tree(model.state_dict())
            run.history.append(record)
            if self.x_val is not None:
                self.warn_if_near_chance(epoch)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "val_acsa")})
            if self.callback is not None:
                self.callback(epoch, record)
            run.last_good = run.snapshot(epoch)
            if run.ckpt_path is not None and (epoch % self.checkpoint_every == 0 or epoch == self.epochs):
                run.save(run.last_good)

    def _diverged(self, epoch: int, k: int, mains: list[torch.Tensor], perts: list[torch.Tensor],
                  error: Exception | None = None) -> None:
        """Locate the term that blew up in step ``k`` of ``epoch``, reset to the last good state, raise."""
        run = self.run_
        good = run.last_good
        assert good is not None
        main = float(mains[k]) if k < len(mains) else None
        pert = float(perts[k]) if k < len(perts) else None
        terms: dict[str, float] = {}
        bad_params: list[str] = []
        note = ""
        try:
            # Replay the epoch from the last good state up to step k (same RNG draws on the same
            # device), then evaluate every site of the model and guide on the offending batch.
            run.restore(good)
            perm, step = self.start_epoch(epoch)
            for b in range(k):
                self.set_step_lr(good.global_step + b)
                step(*self.batch(perm, b))
            self.set_step_lr(good.global_step + k)
            bad_params = [n for n, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())]
            if main is None or not math.isfinite(main):
                terms = site_terms(run.model, *self.batch(perm, k))
        except Exception as e:  # noqa: BLE001 - the diagnosis is best effort; the divergence is reported anyway
            note = f" (replaying the step to find the term failed: {type(e).__name__}: {str(e).splitlines()[0]})"
        finally:
            try:
                run.restore(good)
            except Exception:  # noqa: BLE001
                pass
        if pert is not None and not math.isfinite(pert):
            terms["perturbation"] = pert
        nonfinite = [t for t, v in terms.items() if not math.isfinite(v)]
        path = None
        if run.ckpt_path is not None:
            try:
                path = run.save(good)
            except OSError as e:
                note += f" (writing the last good checkpoint failed: {e})"
        if main is None:
            detail = str(error).splitlines()[0].split(" to satisfy the constraint")[0] if error else "invalid values"
            what = f"the loss could not be computed ({detail[:160]}: non-finite values)"
        else:
            what = f"the training loss is {main}"
            if pert is not None and not math.isfinite(pert):
                what += f" and the perturbation loss is {pert}"
        parts = []
        if nonfinite:
            parts.append("non-finite term(s): " + ", ".join(f"{describe_term(t)} = {terms[t]}" for t in nonfinite))
        main_bad = main is None or not math.isfinite(main)
        if main_bad and not note and not any(t != "perturbation" for t in nonfinite):
            parts.append("replaying the step did not reproduce a non-finite model/guide term "
                         "(a non-deterministic device or objective?)")
        where = "; ".join(parts)
        if bad_params:
            where += ("; " if where else "") + (
                f"parameters already non-finite before the step: {bad_params[:5]}"
            )
        message = (
            f"training diverged in epoch {epoch}, step {k + 1}/{self.num_batches} "
            f"(global step {good.global_step + k + 1}): {what}"
            + (f"; {where}" if where else "") + note
            + f". The model was reset to the weights after epoch {good.epoch}"
            + (f"; last good checkpoint: {path}" if path else "")
            + f". Lower the learning rate (lr={self.lr}) or check the data."
        )
        raise TrainingDivergedError(
            message, epoch=epoch, step=k + 1, global_step=good.global_step + k + 1, loss=main,
            perturbation_loss=pert, terms=terms, nonfinite_terms=nonfinite, nonfinite_parameters=bad_params,
            last_good_epoch=good.epoch, checkpoint=path,
        ) from error
