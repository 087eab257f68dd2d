"""Fitting DGC by stochastic variational inference: the public entry point.

:func:`fit` checks what a data-parallel launch must know first and hands the fit to one of two places below it:
:func:`dgc_pyro.inference.training.train` (one process: the set-up, the epoch loop, validation, model selection,
checkpoints) or :func:`dgc_pyro.inference.distributed.fit_distributed` (``devices > 1`` or a ``strategy``), whose
ranks each run ``train`` with their data-parallel context. The options are a :class:`~dgc_pyro.config.TrainConfig`.

Reliability features of the loop (see ``docs/reliability.md``):

* checkpoints: with a :class:`~dgc_pyro.inference.callbacks.Checkpointing` callback (``checkpoint_dir=``) the
  complete training state (weights, both optimisers, epoch, step, history, every random number generator, the data
  order and the validation split) is written atomically after every ``every`` epochs, as safetensors + JSON (never
  pickle);
* resume: ``resume=True`` (from the checkpoint folder) / ``resume=DIR`` continue from the last checkpoint; on CPU
  with the same seed and data the result is bit-identical to an uninterrupted fit;
* interrupts: Ctrl-C (KeyboardInterrupt) or SIGTERM during a checkpointed fit write the last
  completed epoch's state before the exception propagates (:class:`TrainingInterrupted`);
* divergence: a NaN/inf loss stops the fit with :class:`TrainingDivergedError`, naming the epoch, the
  step and the term of the objective that blew up (found by replaying the step from the last good
  state); the model is put back to the last good weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from dgc_pyro.caller_warning import warn_caller
from dgc_pyro.config import TrainConfig, check_options, check_swag_model
from dgc_pyro.inference.callbacks import Checkpointing
from dgc_pyro.inference.distributed import fit_distributed
from dgc_pyro.inference.divergence import TrainingDivergedError, site_terms
from dgc_pyro.inference.perturbation import check_perturbation_model
from dgc_pyro.inference.training import (
    CHANCE_CHECK_EPOCH,
    DEFAULT_WARMUP_STEPS,
    NEAR_CHANCE,
    History,
    TrainingInterrupted,
    train,
)
from dgc_pyro.models.dgc import DGC

__all__ = [
    "CHANCE_CHECK_EPOCH",
    "DEFAULT_WARMUP_STEPS",
    "NEAR_CHANCE",
    "History",
    "TrainConfig",
    "TrainingDivergedError",
    "TrainingInterrupted",
    "fit",
    "site_terms",
]

#: Keywords of fit before it took a TrainConfig, still accepted (see fit's docstring for what each became).
_OLD_KEYWORDS = ("callback", "checkpoint_dir", "checkpoint_every", "checkpoint_metadata", "resume_from")


def fit(
    model: DGC,
    x: Any,
    y: Any,
    config: TrainConfig | None = None,
    *,
    x_val: Any = None,
    y_val: Any = None,
    resume: bool | str | Path | None = None,
    callbacks: Sequence[Any] = (),
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    **options: Any,
) -> History:
    """Fit ``model`` to ``(x, y)`` by SVI with ``config`` and return the :class:`History` (``history.model`` is
    the model, trained in place; with ``swag_start`` it carries the SWAG head of its label head, ``model.swag``).

    Args:
        x, y: training features ``(N, *model.input_shape)`` in [0, 1] and integer labels; every class
            ``0..num_classes-1`` must have at least one training example.
        config: the training options (:class:`~dgc_pyro.config.TrainConfig`: objective, optimiser, schedule,
            epochs, batches, validation, perturbation, transform, engine, devices; each field documents itself).
            Default: ``TrainConfig()``.
        x_val, y_val: validation data for model selection instead of the ``val_fraction`` hold-out.
        resume: ``True``: continue from the :class:`~dgc_pyro.inference.callbacks.Checkpointing` folder's
            checkpoint when there is one (start afresh when there is none, so a job script can always pass it);
            a path: continue from this checkpoint folder or file (it must exist; later checkpoints go to the
            Checkpointing folder, or back to the same file without one). Resuming needs the same data and the
            same options marked ``resume="fixed"`` (``epochs`` may grow); on CPU the result is bit-identical to an
            uninterrupted fit.
        callbacks: objects with some of the training loop's hooks (``on_epoch_end(trainer, epoch, record)``, ...;
            :mod:`dgc_pyro.inference.callbacks`, e.g. :class:`~dgc_pyro.inference.callbacks.EarlyStopping`, and
            :class:`~dgc_pyro.inference.callbacks.Checkpointing` for checkpoints), run before the epoch's checkpoint.
            In data-parallel fits every rank runs them (spawned ranks get pickled copies), so their decisions must
            follow from the records alone.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        seed: seeds every generator, so a CPU fit is reproducible.
        progress: a progress bar on stderr.
        **options: changes to ``config``'s fields (``fit(model, x, y, epochs=5, lr=3e-4)``); an unknown name is a
            TypeError naming the close matches.

    Old keywords, still accepted: ``checkpoint_dir=D, checkpoint_every=K, checkpoint_metadata=M`` are
    ``callbacks=[Checkpointing(D, every=K, metadata=M)]``; ``resume_from=P`` is ``resume=P``; ``callback=fn`` is
    ``callbacks=[EpochFunction(fn)]`` (run first among the callbacks; in spawned data-parallel fits called in this
    process with rank 0's records); ``devices``, ``strategy``, ``engine``, ``check_every``, ``deterministic`` and
    ``compile`` are TrainConfig fields.

    When the validation ACSA is still near chance after :data:`CHANCE_CHECK_EPOCH` epochs (fits of fewer epochs
    are not judged; near chance means at most ``1/C + NEAR_CHANCE * (1 - 1/C)`` for C classes, 0.145 for 10),
    the fit warns in one line (a RuntimeWarning) and goes on: a fit that blew up early must not hand over its
    model silently.

    A model that carries an OOD flag (``model.ood_detector``, from ``fit_ood_threshold``) loses it, with a
    RuntimeWarning: the flag's threshold was set on the old weights' densities.

    Raises:
        ValueError: bad data or arguments. TypeError: an unknown option. TrainingDivergedError (a
        FloatingPointError): the loss became NaN/inf. CheckpointError (a ValueError) / FileNotFoundError: an
        unusable checkpoint to resume from. TrainingInterrupted (a KeyboardInterrupt): Ctrl-C/SIGTERM during a
        checkpointed fit.
    """
    if config is None:
        config = TrainConfig()
    elif not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a dgc_pyro.config.TrainConfig, got {type(config).__name__}")
    old = {k: options.pop(k) for k in _OLD_KEYWORDS if k in options}
    check_options(TrainConfig, options, "fit option")
    config = config.replace(**options)
    callbacks, resume = _old_keywords(old, callbacks, resume)
    check_perturbation_model(model, config.perturbation_rate)  # before the data-parallel workers are started
    check_swag_model(config.swag_start, getattr(model, "has_label_head", True))
    if getattr(model, "ood_detector", None) is not None:
        # its threshold is a quantile of the old weights' densities: kept, it would flag at an unknown rate
        warn_caller(
            "fit: the OOD flag calibrated before this fit (model.ood_detector) no longer matches the weights and "
            "is dropped; calibrate it again with fit_ood_threshold(model, x_dev)"
        )
        model.ood_detector = None
    kwargs = dict(
        x_val=x_val,
        y_val=y_val,
        resume=resume,
        callbacks=callbacks,
        device=device,
        seed=seed,
        progress=progress,
        callback=old.get("callback"),
    )
    if config.data_parallel:  # this fit in `devices` processes (engine "torch")
        return fit_distributed(model, x, y, config, **kwargs)
    return train(model, x, y, config, **kwargs)


def _old_keywords(
    old: dict[str, Any], callbacks: Sequence[Any], resume: bool | str | Path | None
) -> tuple[Sequence[Any], bool | str | Path | None]:
    """``callbacks`` and ``resume`` with fit's old checkpoint keywords folded in."""
    if any(k in old for k in ("checkpoint_dir", "checkpoint_every", "checkpoint_metadata")):
        if not isinstance(callbacks, (list, tuple)):
            raise ValueError(f"callbacks must be a list or tuple of callback objects, got {type(callbacks).__name__}")
        if any(isinstance(c, Checkpointing) for c in callbacks):
            raise ValueError(
                "pass checkpoint_dir/checkpoint_every/checkpoint_metadata or a Checkpointing callback, not both"
            )
        writer = Checkpointing(
            old.get("checkpoint_dir"), every=old.get("checkpoint_every", 1), metadata=old.get("checkpoint_metadata")
        )
        callbacks = (*callbacks, writer)
    if old.get("resume_from") is not None:
        if resume not in (None, False):
            raise ValueError("pass resume=PATH or resume_from=PATH, not both")
        resume = old["resume_from"]
    return callbacks, resume
