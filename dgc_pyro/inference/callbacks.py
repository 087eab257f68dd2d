"""Callbacks of the training loop (:class:`~dgc_pyro.inference.trainer.Trainer`): what a fit does around its steps.

A callback is any object with some of these methods; the trainer calls those it has, in the order of its list:

- ``on_fit_start(trainer, start_epoch)``: before the first epoch (``start_epoch`` > 0 when resuming);
- ``on_batch_end(trainer, epoch, batch)``: after each step; the step's 0-d losses are
  ``trainer.step_losses[-1]`` and ``trainer.perturbation_losses[-1]`` (reading them syncs the device);
- ``on_train_epoch_end(trainer, epoch, totals)``: after the epoch's steps, ``totals`` the sums of the step and
  perturbation losses (one host sync), before validation;
- ``on_epoch_end(trainer, epoch, record)``: after the epoch's record (losses, rate, validation metrics) joined
  ``trainer.state.history``; set ``trainer.should_stop = True`` to end the fit after this epoch;
- ``on_state(trainer, state)``: with the epoch's complete :class:`~dgc_pyro.checkpoint.TrainingState` (the
  snapshot a checkpoint holds and a divergence resets to);
- ``on_exception(trainer, exc)``: when the fit raises; raise another exception to replace it, return to let it
  propagate;
- ``on_fit_end(trainer)``: always, last (also after an exception).

A callback with state that a resumed fit must continue from (the SWAG moments of
:class:`~dgc_pyro.inference.swag.SwagCollector`) also has ``state_key`` (a string naming it and the settings its
state belongs to), ``state_dict()`` (a copy of the state: nested dicts, lists, numbers and tensors) and
``load_state_dict(state)`` (continue from a copy of ``state``; None: start empty). Its state is part of every
:class:`~dgc_pyro.checkpoint.TrainingState`, so checkpoints carry it; joining a fit resets it, and a resumed fit
restores it before ``on_fit_start``.

:func:`~dgc_pyro.inference.fit.fit` builds its own list from its arguments (:func:`default_callbacks`) and appends
the user's ``callbacks=(...)`` after the ``callback(epoch, record)`` function and before the snapshot, so a user's
``on_epoch_end`` runs before that epoch's checkpoint is written. :class:`Callback` is an optional base class with
every method a no-op.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from dgc_pyro.arguments import check_positive
from dgc_pyro.caller_warning import warn_caller
from dgc_pyro.checkpoint import TrainingState
from dgc_pyro.inference.divergence import (
    TrainingDivergedError,
    describe_term,
    first_nonfinite,
    site_terms,
)

if TYPE_CHECKING:  # the trainer calls callbacks without importing them; annotations only
    from dgc_pyro.inference.trainer import Trainer

__all__ = [
    "CHANCE_CHECK_EPOCH",
    "NEAR_CHANCE",
    "BestOnValidation",
    "Callback",
    "ChanceWarning",
    "Checkpointing",
    "DivergenceGuard",
    "EarlyStopping",
    "EpochFunction",
    "InterruptHandler",
    "ProgressBar",
    "TrainingInterrupted",
]

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


class Callback:
    """Optional base class: every hook a no-op (see the module docs for when each runs)."""

    def on_fit_start(self, trainer: Trainer, start_epoch: int) -> None:
        """Before the first epoch."""

    def on_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        """After each step."""

    def on_train_epoch_end(self, trainer: Trainer, epoch: int, totals: list[float]) -> None:
        """After the epoch's steps, before validation."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, float]) -> None:
        """After the epoch's record joined the history."""

    def on_state(self, trainer: Trainer, state: TrainingState) -> None:
        """With the epoch's complete training state."""

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        """When the fit raises."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """Always, last."""


class EpochFunction(Callback):
    """``fn(epoch, record)`` after every epoch: ``fit``'s ``callback`` argument."""

    def __init__(self, fn: Callable[[int, dict[str, float]], None]) -> None:
        self.fn = fn

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, float]) -> None:
        self.fn(epoch, record)


class EarlyStopping(Callback):
    """Stop when ``monitor`` (a record key, larger is better unless ``mode="min"``) has not improved by more than
    ``min_delta`` for ``patience`` epochs. With ``select_best`` the fit still hands over the best epoch's weights.
    """

    def __init__(self, monitor: str = "val_acsa", patience: int = 5, mode: str = "max", min_delta: float = 0.0) -> None:
        if mode not in ("max", "min"):
            raise ValueError(f"mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.patience, self.mode, self.min_delta = monitor, int(patience), mode, float(min_delta)
        self.best = -math.inf
        self.waited = 0

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, float]) -> None:
        if self.monitor not in record:
            raise KeyError(f"EarlyStopping monitors {self.monitor!r}, which the epoch record lacks ({sorted(record)})")
        value = record[self.monitor] if self.mode == "max" else -record[self.monitor]
        if value > self.best + self.min_delta:
            self.best, self.waited = value, 0
            return
        self.waited += 1
        if self.waited >= self.patience:
            trainer.should_stop = True


class BestOnValidation(Callback):
    """Model selection: keep the weights of the epoch with the best validation ACSA (``select_best``).

    The best weights and score live in the trainer's state, so checkpoints carry them and a resumed fit selects
    as the uninterrupted one did.
    """

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, float]) -> None:
        state = trainer.state
        score = record.get("val_acsa")
        if score is not None and score > state.best_score:
            state.best_score, state.best_epoch = score, epoch
            state.best_model = trainer.copy_weights()


class ChanceWarning(Callback):
    """One-line RuntimeWarning when no epoch up to :data:`CHANCE_CHECK_EPOCH` beat chance ACSA by a
    :data:`NEAR_CHANCE` share of the way to 1: a fit that blew up early must not hand over its model silently."""

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, float]) -> None:
        # Only fits that ran a few epochs: one or two epochs of a tiny model are often near chance by design.
        if epoch != CHANCE_CHECK_EPOCH:
            return
        history = trainer.state.history
        scores = [r["val_acsa"] for r in history if "val_acsa" in r]
        chance = 1.0 / trainer.state.model.num_classes
        if scores and max(scores) <= chance + NEAR_CHANCE * (1.0 - chance):
            warn_caller(
                f"validation ACSA is {max(scores):.3f} after {epoch} epoch(s), near chance ({chance:.3f}): the fit "
                f"looks broken (epoch 1 loss {history[0]['loss']:.4g}); try a lower lr (lr={trainer.plan.lr}) or a "
                "longer warm-up"
            )


class ProgressBar(Callback):
    """A tqdm bar over the epochs with the loss and validation ACSA (off with ``progress=False``)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.bar: Any = None

    def on_fit_start(self, trainer: Trainer, start_epoch: int) -> None:
        self.bar = tqdm(
            desc="fit",
            unit="epoch",
            disable=not self.enabled,
            leave=False,
            initial=start_epoch,
            total=trainer.plan.epochs,
        )

    def on_epoch_end(self, trainer: Trainer, epoch: int, record: dict[str, float]) -> None:
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "val_acsa")}, refresh=False)
        self.bar.update(1)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.bar is not None:
            self.bar.close()


class Checkpointing(Callback):
    """Write the training state into ``folder`` (``training_state.safetensors``) every ``every`` epochs, after the
    last epoch, when the fit stops early, and (with :class:`InterruptHandler` and :class:`DivergenceGuard`) when it
    is interrupted or diverges: the last good state.

    ``metadata``: a JSON-able dict stored in the checkpoint (``dgc-pyro fit`` keeps its run configuration there); a
    resumed fit keeps the saved one when it is None. Without a ``folder`` a fit resumed from a file writes back to
    that file, and other fits write nothing. ``fit`` finds this callback among its ``callbacks`` (at most one), as
    Lightning's ``ModelCheckpoint``; ``fit(checkpoint_dir=..., checkpoint_every=...)`` is the old spelling.
    """

    def __init__(
        self, folder: str | Path | None = None, every: int = 1, metadata: Mapping[str, Any] | None = None
    ) -> None:
        check_positive("checkpoint_every", every, integer=True)
        if metadata is not None and not isinstance(metadata, Mapping):
            raise ValueError(f"checkpoint_metadata must be a dict, got {type(metadata).__name__}")
        self.folder = None if folder is None else Path(folder)
        self.every = every
        self.metadata = metadata

    def on_state(self, trainer: Trainer, state: TrainingState) -> None:
        if trainer.state.ckpt_path is None:
            return
        if state.epoch % self.every == 0 or state.epoch == trainer.plan.epochs or trainer.should_stop:
            trainer.state.save(state)


class InterruptHandler(Callback):
    """Ctrl-C or SIGTERM during a checkpointed fit: write the last completed epoch's state, then raise
    :class:`TrainingInterrupted`. SIGTERM is turned into that exception only in the main thread."""

    def __init__(self) -> None:
        self.use_signal = False
        self.previous: Any = None

    def on_fit_start(self, trainer: Trainer, start_epoch: int) -> None:
        self.use_signal = trainer.state.ckpt_path is not None and threading.current_thread() is threading.main_thread()
        if self.use_signal:

            def on_sigterm(signum: int, frame: Any) -> None:
                raise TrainingInterrupted(signum)

            self.previous = signal.signal(signal.SIGTERM, on_sigterm)

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        state = trainer.state
        if not isinstance(exc, KeyboardInterrupt) or state.ckpt_path is None:
            return
        if self.use_signal:  # a second SIGTERM must not abort the checkpoint being written
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        path = state.save(state.last_good)
        interrupted = exc if isinstance(exc, TrainingInterrupted) else TrainingInterrupted(signal.SIGINT)
        interrupted.checkpoint, interrupted.epoch = path, state.last_good.epoch
        if interrupted is not exc:
            raise interrupted from exc

    def on_fit_end(self, trainer: Trainer) -> None:
        if self.use_signal:
            signal.signal(signal.SIGTERM, self.previous if self.previous is not None else signal.SIG_DFL)
            self.use_signal = False


class DivergenceGuard(Callback):
    """A NaN/inf loss stops the fit with :class:`~dgc_pyro.inference.divergence.TrainingDivergedError`.

    The losses are checked once per epoch (one host sync), and every ``check_every`` steps when given. The error
    names the epoch, the step and the term of the objective that blew up, found by replaying the epoch from the
    last good state; the model is put back to that state, which is also written as the last good checkpoint.
    """

    def __init__(self, check_every: int | None = None) -> None:
        self.check_every = check_every
        self.checked = 0

    def on_batch_end(self, trainer: Trainer, epoch: int, batch: int) -> None:
        if batch == 0:
            self.checked = 0
        if self.check_every and (batch + 1) % self.check_every == 0:
            k = first_nonfinite(trainer.step_losses[self.checked :], trainer.perturbation_losses[self.checked :])
            if k is not None:
                self.diverged(trainer, epoch, self.checked + k)
            self.checked = batch + 1

    def on_train_epoch_end(self, trainer: Trainer, epoch: int, totals: list[float]) -> None:
        if not all(math.isfinite(v) for v in totals):
            k = first_nonfinite(trainer.step_losses, trainer.perturbation_losses)
            self.diverged(trainer, epoch, k if k is not None else trainer.num_batches - 1)

    def on_exception(self, trainer: Trainer, exc: BaseException) -> None:
        # torch.distributions' argument validation inside a step: non-finite parameters reached a distribution.
        if trainer.batch_index is None or not isinstance(exc, ValueError) or "found invalid values" not in str(exc):
            return
        k = first_nonfinite(trainer.step_losses, trainer.perturbation_losses)
        self.diverged(trainer, trainer.epoch, trainer.batch_index if k is None else k, error=exc)

    def diverged(self, trainer: Trainer, epoch: int, k: int, error: Exception | None = None) -> None:
        """Locate the term that blew up in step ``k`` of ``epoch``, reset to the last good state, raise."""
        run, mains, perts = trainer.state, trainer.step_losses, trainer.perturbation_losses
        trainer.batch_index = None  # the replay's own errors are not a new divergence
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
            perm, step = trainer.start_epoch(epoch)
            for b in range(k):
                trainer.set_step_lr(good.global_step + b)
                step(*trainer.batch(perm, b))
            trainer.set_step_lr(good.global_step + k)
            bad_params = [n for n, p in run.model.named_parameters() if not bool(torch.isfinite(p).all())]
            if main is None or not math.isfinite(main):
                terms = site_terms(run.model, *trainer.batch(perm, k))
        except Exception as e:
            note = f" (replaying the step to find the term failed: {type(e).__name__}: {str(e).splitlines()[0]})"
        finally:
            with contextlib.suppress(Exception):  # the report below matters more than a failed restore
                run.restore(good)
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
            parts.append(
                "replaying the step did not reproduce a non-finite model/guide term "
                "(a non-deterministic device or objective?)"
            )
        where = "; ".join(parts)
        if bad_params:
            where += ("; " if where else "") + (f"parameters already non-finite before the step: {bad_params[:5]}")
        message = (
            f"training diverged in epoch {epoch}, step {k + 1}/{trainer.num_batches} "
            f"(global step {good.global_step + k + 1}): {what}"
            + (f"; {where}" if where else "")
            + note
            + f". The model was reset to the weights after epoch {good.epoch}"
            + (f"; last good checkpoint: {path}" if path else "")
            + f". Lower the learning rate (lr={trainer.plan.lr}) or check the data."
        )
        raise TrainingDivergedError(
            message,
            epoch=epoch,
            step=k + 1,
            global_step=good.global_step + k + 1,
            loss=main,
            perturbation_loss=pert,
            terms=terms,
            nonfinite_terms=nonfinite,
            nonfinite_parameters=bad_params,
            last_good_epoch=good.epoch,
            checkpoint=path,
        ) from error


def checkpointing_of(callbacks: Sequence[Any]) -> Checkpointing:
    """The :class:`Checkpointing` among ``callbacks`` (a default one, writing nowhere, when there is none)."""
    found = [c for c in callbacks if isinstance(c, Checkpointing)]
    if len(found) > 1:
        raise ValueError(f"callbacks holds {len(found)} Checkpointing callbacks; a fit writes one checkpoint: pass one")
    return found[0] if found else Checkpointing()


def default_callbacks(
    *,
    progress: bool,
    select_best: bool,
    check_every: int | None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
    user: Sequence[Any] = (),
    builtin: Sequence[Any] = (),
) -> list[Any]:
    """The callbacks of a fit in the order they run: the divergence guard first (its exception handler diagnoses a
    failed step before anything else sees it), model selection, the chance warning, progress, the ``builtin`` ones
    of the fit's options (the SWAG collector), ``callback``, the user's, then the interrupt handler and the
    checkpoint writer (the user's :class:`Checkpointing`, moved last, so that it writes what every other callback
    did in the epoch)."""
    callbacks: list[Any] = [DivergenceGuard(check_every)]
    if select_best:
        callbacks.append(BestOnValidation())
    callbacks += [ChanceWarning(), ProgressBar(progress), *builtin]
    if callback is not None:
        callbacks.append(EpochFunction(callback))
    callbacks += [c for c in user if not isinstance(c, Checkpointing)]
    callbacks += [InterruptHandler(), checkpointing_of(user)]
    return callbacks
