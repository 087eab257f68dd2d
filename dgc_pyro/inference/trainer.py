"""The epoch loop of one fit: data order, batches, learning-rate schedule, validation, and the callbacks' hooks.

:class:`Trainer` runs epochs of a :class:`~dgc_pyro.inference.engine.Step` over the training data and builds each
epoch's record; everything else a fit does around that (divergence checks, model selection, progress, checkpoints,
interrupts, the user's hooks) is a callback (:mod:`dgc_pyro.inference.callbacks`). Everything an epoch does follows
from its number and the fit's generator, so a resumed or replayed epoch runs exactly as the uninterrupted one did.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch

from dgc_pyro.checkpoint import TrainingState, check_state_matches, save_training_state
from dgc_pyro.data.transforms import Transform
from dgc_pyro.inference.deferred import balanced_order, balanced_weights
from dgc_pyro.inference.dist_context import DistContext
from dgc_pyro.inference.engine import Step
from dgc_pyro.inference.predict import predict
from dgc_pyro.inference.resume import copy_tree, load_optimizer_state, optimizer_state
from dgc_pyro.inference.schedule import scheduled_lr
from dgc_pyro.io import CheckpointError
from dgc_pyro.metrics import imbalance_report
from dgc_pyro.models.dgc import DGC
from dgc_pyro.reproducibility import get_rng_state, set_rng_state

__all__ = ["Plan", "RunState", "Trainer"]


class RunState:
    """The mutable state of one fit and the operations on it (snapshot, restore, save).

    ``callbacks``: the fit's callbacks; those with state (a ``state_key`` and ``state_dict`` / ``load_state_dict``,
    :mod:`dgc_pyro.inference.callbacks`) are part of every snapshot, and joining a fit resets them
    (``load_state_dict(None)``) until :meth:`restore` gives them a saved state.
    """

    def __init__(
        self,
        model: DGC,
        step: Step,
        optimizers: dict[str, Any],
        generator: torch.Generator,
        ckpt_path: Path | None,
        static: dict[str, Any],
        dist: DistContext | None = None,
        callbacks: Sequence[Any] = (),
    ) -> None:
        self.stateful: dict[str, Any] = {}
        for callback in callbacks:
            if hasattr(callback, "state_key") and callable(getattr(callback, "state_dict", None)):
                key = callback.state_key
                if key in self.stateful:
                    raise ValueError(f"two callbacks keep their state under the same key {key!r}; pass one of them")
                self.stateful[key] = callback
        for callback in self.stateful.values():
            callback.load_state_dict(None)
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
            callbacks={key: callback.state_dict() for key, callback in self.stateful.items()},
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
            raise CheckpointError(
                f"{source}: the optimiser state does not fit this model/engine ({type(e).__name__}: {e})"
            ) from None
        try:
            notes = set_rng_state(state.rng, self.generator)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        try:  # a callback whose state the snapshot lacks starts empty (it was written without that callback)
            for key, callback in self.stateful.items():
                callback.load_state_dict(state.callbacks.get(key))
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: a callback's state does not fit ({e})") from None
        self.history = [dict(r) for r in state.history]
        self.best_epoch, self.best_score, self.best_model = state.best_epoch, state.best_score, state.best_model
        self.global_step = state.global_step
        return notes

    def save(self, state: TrainingState) -> Path | None:
        if self.ckpt_path is None:
            return None
        if state.epoch != self.saved_epoch:
            if (
                self.dist is None or self.dist.is_rank_zero
            ):  # data-parallel ranks hold identical states: one writer is enough
                save_training_state(self.ckpt_path, state)
            self.saved_epoch = state.epoch
        return self.ckpt_path


@dataclass(frozen=True)
class Plan:
    """What the loop runs, fixed for the whole fit: the data, the batches, the rates and the stages."""

    x: torch.Tensor
    y: torch.Tensor
    counts: np.ndarray
    batch_size: int
    epochs: int
    lr: float
    base_lrs: dict[str, float]
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    transform: Transform | None = None
    x_val: Any = None
    y_val: Any = None
    val_num_samples: int = 10
    perturbation_from: int = 1
    head_from: int | None = None
    num_batches: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "num_batches", math.ceil(self.x.shape[0] / self.batch_size))


class Trainer:
    """The epoch loop over ``state``'s step and model, following ``plan``, with ``callbacks``' hooks.

    ``head_step``: the step of the head re-training epochs (``plan.head_from`` on). What callbacks may read:
    ``state`` (:class:`RunState`: model, history, best epoch, global step, last good snapshot), ``plan``,
    ``epoch``, ``batch_index`` (the step running, None outside the steps), ``step_losses`` and
    ``perturbation_losses`` (this epoch's 0-d tensors); they may set ``should_stop``.
    """

    def __init__(
        self, state: RunState, plan: Plan, *, head_step: Step | None = None, callbacks: Sequence[Any] = ()
    ) -> None:
        self.state, self.plan, self.head_step = state, plan, head_step
        self.callbacks = list(callbacks)
        self.num_batches = plan.num_batches
        self.total_steps = plan.epochs * self.num_batches
        self.warmup = min(plan.warmup_steps, self.num_batches)  # at most the first epoch
        self.weights = balanced_weights(plan.y, plan.counts) if plan.head_from is not None else None
        self.epoch = 0
        self.last_epoch = 0
        self.batch_index: int | None = None
        self.step_losses: list[torch.Tensor] = []
        self.perturbation_losses: list[torch.Tensor] = []
        self.should_stop = False

    # ------------------------------------------------------------------ what callbacks and replays use
    def retraining(self, epoch: int) -> bool:
        """Whether ``epoch`` is in the head re-training stage (``retrain_head_epochs``)."""
        return self.plan.head_from is not None and epoch >= self.plan.head_from

    def start_epoch(self, epoch: int) -> tuple[torch.Tensor, Step]:
        """Set the model's modes and the perturbation switch for ``epoch``; return its data order and step."""
        run = self.state
        run.model.train()
        run.step.set_perturbing(epoch >= self.plan.perturbation_from)
        if self.retraining(epoch):
            run.model.encoder.eval()  # frozen: its BatchNorm/dropout as at prediction, no running-statistic updates
            run.model.decoder.eval()
            return balanced_order(self.weights, run.generator), self.head_step
        return torch.randperm(self.plan.x.shape[0], device=self.plan.x.device, generator=run.generator), run.step

    def set_step_lr(self, step: int) -> float:
        """Apply the schedule's rates for global step ``step`` to every optimiser; returns the main rate."""
        plan = self.plan
        rates = {
            name: scheduled_lr(opt, plan.base_lrs[name], plan.lr_schedule, step, self.total_steps, self.warmup)
            for name, opt in self.state.optimizers.items()
        }
        return rates["main"]

    def batch(self, perm: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``b`` of the epoch's order ``perm``, transformed when the fit has a transform."""
        idx = perm[b * self.plan.batch_size : (b + 1) * self.plan.batch_size]
        x = self.plan.x[idx]
        if self.plan.transform is not None:
            x = self.plan.transform(x, self.state.generator)
        return x, self.plan.y[idx]

    def copy_weights(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the model's state dict (for model selection)."""
        return copy_tree(self.state.model.state_dict())

    def validate(self) -> dict[str, float]:
        """``val_*`` metrics of the validation split (nothing without one)."""
        plan, model = self.plan, self.state.model
        if plan.x_val is None:
            return {}
        # Labels only: no density score (it costs decoder rows, and a model without the x site has none).
        pred = predict(model, plan.x_val, plan.val_num_samples, balanced=model.has_class_prior, density=False)
        report = imbalance_report(
            plan.y_val, pred.labels.cpu(), num_classes=model.num_classes, train_counts=plan.counts
        )
        return {f"val_{k}": v for k, v in report.items()}

    # ------------------------------------------------------------------ the loop
    def _hook(self, name: str, *args: Any) -> None:
        for callback in self.callbacks:
            method = getattr(callback, name, None)
            if method is not None:
                method(self, *args)

    def run(self, start: int) -> None:
        """Epochs ``start + 1 .. plan.epochs`` (fewer when a callback sets ``should_stop``)."""
        self.last_epoch, self.should_stop = start, False
        with pyro.settings.context(module_local_params=True):
            try:
                self._hook("on_fit_start", start)
                self._epochs(start)
            except BaseException as exc:
                self._hook("on_exception", exc)  # a callback may raise a replacement
                raise
            finally:
                self._hook("on_fit_end")

    def _epochs(self, start: int) -> None:
        run = self.state
        for epoch in range(start + 1, self.plan.epochs + 1):
            self.epoch = epoch
            perm, step = self.start_epoch(epoch)
            self.step_losses, self.perturbation_losses = [], []
            epoch_lr = self.set_step_lr(run.global_step)
            for b in range(self.num_batches):
                if b:
                    self.set_step_lr(run.global_step + b)
                self.batch_index = b
                main, pert = step(*self.batch(perm, b))
                self.step_losses.append(main)
                self.perturbation_losses.append(pert)
                self._hook("on_batch_end", epoch, b)
            self.batch_index = None
            totals = torch.stack(
                [torch.stack(self.step_losses).double().sum(), torch.stack(self.perturbation_losses).double().sum()]
            ).tolist()
            self._hook("on_train_epoch_end", epoch, totals)
            run.global_step += self.num_batches
            record: dict[str, float] = {
                "epoch": epoch,
                "loss": totals[0] / self.num_batches,
                "perturbation_loss": totals[1] / self.num_batches,
                "lr": epoch_lr,
            }
            record.update(self.validate())
            run.history.append(record)
            self._hook("on_epoch_end", epoch, record)
            run.last_good = run.snapshot(epoch)
            self.last_epoch = epoch
            self._hook("on_state", run.last_good)
            if self.should_stop:
                break
