"""Fitting DGC by stochastic variational inference: the public entry point.

:func:`fit` checks what a data-parallel launch must know first and hands the fit to one of two places below it:
:func:`dgc_pyro.inference.training.train` (one process: the set-up, the epoch loop, validation, model selection,
checkpoints) or :func:`dgc_pyro.inference.distributed.fit_distributed` (``devices > 1`` or a ``strategy``), whose
ranks each run ``train`` with their data-parallel context.

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

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from dgc_pyro.data.transforms import Transform
from dgc_pyro.inference.distributed import fit_distributed
from dgc_pyro.inference.divergence import TrainingDivergedError, site_terms
from dgc_pyro.inference.objectives import Objective
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

__all__ = ["CHANCE_CHECK_EPOCH", "DEFAULT_WARMUP_STEPS", "NEAR_CHANCE", "History", "TrainingDivergedError",
           "TrainingInterrupted", "fit", "site_terms"]

#: The arguments that choose where the fit runs; every other argument of fit goes to train unchanged.
_LAUNCH_ARGUMENTS = ("model", "x", "y", "devices", "strategy")


def fit(
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
    devices: int = 1,
    strategy: str | None = None,
    transform: str | Transform | None = None,
    perturbation_prior: str = "train",
    lr_schedule: str = "constant",
    warmup_steps: int | None = None,
    perturbation_start: float = 0.0,
    retrain_head_epochs: int = 0,
    perturbation_noise: str = "own",
    callbacks: Sequence[Any] = (),
) -> History:
    """Fit ``model`` to ``(x, y)`` by SVI and return the :class:`History` (``history.model`` is the model).

    Args:
        x, y: training features ``(N, *model.input_shape)`` in [0, 1] and integer labels; every class
            ``0..num_classes-1`` must have at least one training example.
        epochs, batch_size, lr: optimisation schedule (Adam with ``betas``).
        objective: ``"elbo"`` (``Trace_ELBO``), ``"elbo-analytic"``, or a loss callable
            ``loss(model_fn, guide_fn, x, y) -> Tensor`` as ``pyro.infer.SVI`` accepts.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        seed: seeds every generator, so a CPU fit is reproducible.
        val_fraction: stratified share of the training data held out for validation and model
            selection (never the test set); 0 disables it unless ``x_val``/``y_val`` are given.
        perturbation_rate: the paper's rate r of the data-perturbation step (0 turns it off).
        classifier_lr: learning rate of the perturbation step's optimiser (default: ``lr``).
        engine: ``"graph"``: the loss and its gradients captured once per batch shape as an aten graph and
            replayed, without per-step tracing; bit-identical to ``"torch"`` for models whose Python control
            flow does not depend on data or on Python-side state (:mod:`dgc_pyro.inference.capture`); when a
            model cannot be captured the fit warns in one line and continues with ``"torch"`` from that step.
            ``"torch"``: the model and guide traced every step. ``"svi"``: ``pyro.infer.SVI``. Default (None):
            ``"graph"`` for a built-in ``objective``; ``"torch"`` for a loss callable (whose Python state a
            capture would freeze) and in data-parallel fits (the only engine there). Checkpoints of ``"graph"``
            and ``"torch"`` fits resume with either.
        val_num_samples: latent draws per class when scoring the validation split.
        select_best: restore the weights of the epoch with the best validation ACSA.
        callback: called as ``callback(epoch, record)`` after every epoch.
        callbacks: objects with some of the training loop's hooks (``on_epoch_end(trainer, epoch, record)``, ...;
            :mod:`dgc_pyro.inference.callbacks`, e.g. :class:`~dgc_pyro.inference.callbacks.EarlyStopping`), run
            after ``callback`` and before the epoch's checkpoint. In data-parallel fits every rank runs them
            (spawned ranks get pickled copies), so their decisions must follow from the records alone.
        pretrain_steps: steps of the reference code's encoder pre-training (z's mean/covariance matched
            to the prior, :func:`~dgc_pyro.inference.pretrain.pretrain_encoder`) before the first epoch; 0 skips it.
        checkpoint_dir: folder for ``training_state.safetensors``, written atomically every
            ``checkpoint_every`` epochs, after the last epoch, and when the fit is interrupted (Ctrl-C,
            SIGTERM) or diverges (the last good state).
        resume: continue from ``checkpoint_dir``'s checkpoint when there is one (start afresh when
            there is none, so a job script can always pass it).
        resume_from: continue from this checkpoint folder or file (it must exist); later checkpoints
            go to ``checkpoint_dir``, or back to the same file when ``checkpoint_dir`` is None.
            Resuming needs the same data and settings (``epochs`` may grow); on CPU the result is
            bit-identical to an uninterrupted fit.
        checkpoint_metadata: JSON-able dict stored in the checkpoint (``dgc-pyro fit`` keeps its run
            configuration there); a resumed fit keeps the saved one when this is None.
        check_every: also check the loss for NaN/inf every this many steps (one host sync each);
            by default it is checked once per epoch.
        deterministic: run the fit under :func:`dgc_pyro.reproducibility.deterministic_mode`
            (deterministic torch/cuDNN algorithms; only matters on CUDA).
        compile: ``torch.compile`` the networks (True, or a dict of compile options); off by default
            (see :func:`dgc_pyro.inference.engine.compile_networks`). With ``engine="graph"`` the captured
            graph of the loss and its gradients is compiled instead.
        devices, strategy: data-parallel fitting over ``devices`` processes (``strategy="ddp"``: gloo on
            CPU, nccl on CUDA; under ``torchrun`` the launched ranks), see
            :mod:`dgc_pyro.inference.distributed`; the fitted weights end up in ``model``.
        transform: random training-time transform of every batch (``"shift"``, ``"shift-flip"`` or a
            callable ``transform(x, generator)``, :mod:`dgc_pyro.data.transforms`); it draws from the fit's
            generator, so seeded fits stay reproducible. Validation data is never transformed. With
            ``devices > 1`` a callable must be picklable (a module-level function), as the ranks are spawned.
        perturbation_prior: for a logit-adjusted model (built with ``class_prior``), the class frequencies
            whose log the perturbation step adds to its logits: ``"train"`` (the training prior, as in the
            main step) or ``"perturbed"`` (the frequencies of the step's re-drawn latents, which the
            minority repeats make nearly uniform); see :mod:`dgc_pyro.inference.perturbation`.
        lr_schedule: ``"constant"`` (the paper's) or ``"cosine"``: both optimisers' rates decay from ``lr``
            and ``classifier_lr`` to 0 over the fit's steps (:mod:`dgc_pyro.inference.schedule`). The cosine
            spans ``epochs``, so a resumed cosine fit must keep them.
        warmup_steps: linear learning-rate warm-up of both optimisers over the first
            ``min(warmup_steps, steps per epoch)`` steps, against the early blow-up of deep networks at rates
            that train well afterwards (:mod:`dgc_pyro.inference.schedule`); 0 turns it off. Default
            (None): :data:`DEFAULT_WARMUP_STEPS`, or, when resuming, what the checkpoint's fit used.
        perturbation_start: deferred re-balancing (DRW, Cao et al. 2019): the perturbation step runs only from
            epoch ``ceil(perturbation_start * epochs) + 1`` on; a number in [0, 1), 0 (the default) runs it in
            every epoch (:mod:`dgc_pyro.inference.deferred`).
        retrain_head_epochs: classifier re-training (cRT, Kang et al. 2020): the last this many epochs freeze the
            encoder and decoder and train p(y | z) alone, with the perturbation step's optimiser, on
            class-balanced batches of latents drawn from q(z | x, y); their ``loss`` is that cross-entropy.
            0 (the default) has no such stage. Either deferral fixes the stages to ``epochs``, so a resumed fit
            must keep them.
        perturbation_noise: ``"own"`` (the default): re-drawn latents use q's own sigma; ``"head"``: those of
            the tail classes (the ones the step repeats) get the head classes' pooled within-class spread
            (ISDA / RSG / GCL; :func:`~dgc_pyro.inference.perturbation.borrowed_scale`). Single-process only.

    When the validation ACSA is still near chance after :data:`CHANCE_CHECK_EPOCH` epochs (fits of fewer epochs
    are not judged; near chance means at most ``1/C + NEAR_CHANCE * (1 - 1/C)`` for C classes, 0.145 for 10),
    the fit warns in one line (a RuntimeWarning) and goes on: a fit that blew up early must not hand over its
    model silently.

    Raises:
        ValueError: bad data or arguments. TrainingDivergedError (a FloatingPointError): the loss
        became NaN/inf. CheckpointError (a ValueError) / FileNotFoundError: an unusable checkpoint to
        resume from. TrainingInterrupted (a KeyboardInterrupt): Ctrl-C/SIGTERM during a checkpointed fit.
    """
    options = {k: v for k, v in locals().items() if k not in _LAUNCH_ARGUMENTS}
    data_parallel = devices != 1 or strategy is not None
    if data_parallel and (retrain_head_epochs or perturbation_noise != "own"):
        raise ValueError("retrain_head_epochs and perturbation_noise='head' are not supported in data-parallel fits")
    check_perturbation_model(model, perturbation_rate)  # before the data-parallel workers are started
    if data_parallel:  # this fit in `devices` processes (engine "torch")
        return fit_distributed(model, x, y, devices=devices, strategy=strategy, **options)
    return train(model, x, y, **options)
