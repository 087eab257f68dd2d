"""Fitting DGC by stochastic variational inference: the epoch loop, validation and model selection.

The training step itself (and its two engines) lives in :mod:`dgc_pyro.inference.engine`.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pyro
import torch
from tqdm.auto import tqdm

from dgc_pyro.data.splits import stratified_holdout
from dgc_pyro.data.validation import check_xy
from dgc_pyro.inference.device import resolve_device
from dgc_pyro.inference.objectives import Objective, get_objective
from dgc_pyro.inference.engine import ENGINES, make_step
from dgc_pyro.inference.perturbation import repeat_counts
from dgc_pyro.inference.predict import predict
from dgc_pyro.metrics import imbalance_report
from dgc_pyro.models.dgc import DGC
from dgc_pyro.reproducibility import seed_everything

@dataclass
class History:
    """What a fit did: one dict per epoch (``loss``, ``perturbation_loss``, validation metrics).

    ``model`` is the fitted model (trained in place); ``best_epoch`` the epoch whose weights it holds
    when ``select_best`` was on.
    """

    model: DGC
    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    train_counts: list[int] = field(default_factory=list)

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


def _check_positive(name: str, value: float, integer: bool = False) -> None:
    if integer and (not isinstance(value, (int, np.integer)) or isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value!r}")


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
    engine: str = "torch",
    val_num_samples: int = 10,
    select_best: bool = True,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> History:
    """Fit ``model`` to ``(x, y)`` by SVI and return the :class:`History` (``history.model`` is the model).

    Args:
        x, y: training features ``(N, *model.input_shape)`` in [0, 1] and integer labels.
        epochs, batch_size, lr: optimisation schedule (Adam with ``betas``).
        objective: ``"elbo"`` (``Trace_ELBO``), ``"elbo-analytic"``, or a loss callable
            ``loss(model_fn, guide_fn, x, y) -> Tensor`` as ``pyro.infer.SVI`` accepts.
        device: ``"auto"`` (CUDA when present), ``"cpu"`` or ``"cuda"``.
        seed: seeds every generator, so a CPU fit is reproducible.
        val_fraction: stratified share of the training data held out for validation and model
            selection (never the test set); 0 disables it unless ``x_val``/``y_val`` are given.
        perturbation_rate: the paper's rate r of the data-perturbation step (0 turns it off).
        classifier_lr: learning rate of the perturbation step's optimiser (default: ``lr``).
        engine: ``"torch"`` (fast, default) or ``"svi"`` (``pyro.infer.SVI``).
        val_num_samples: latent draws per class when scoring the validation split.
        select_best: restore the weights of the epoch with the best validation ACSA.
        callback: called as ``callback(epoch, record)`` after every epoch.
    """
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    _check_positive("epochs", epochs, integer=True)
    _check_positive("batch_size", batch_size, integer=True)
    _check_positive("lr", lr)
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    loss_fn = get_objective(objective)
    x, y = check_xy(x, y, input_shape=model.input_shape, num_classes=model.num_classes)
    if (x_val is None) != (y_val is None):
        raise ValueError("pass both x_val and y_val, or neither")

    seed_everything(seed)
    if x_val is not None:
        x_val, y_val = check_xy(x_val, y_val, input_shape=model.input_shape, num_classes=model.num_classes)
    elif val_fraction > 0:
        train_idx, val_idx = stratified_holdout(y.numpy(), val_fraction, seed)
        x_val, y_val = x[val_idx], y[val_idx]
        x, y = x[train_idx], y[train_idx]

    counts = np.bincount(y.numpy(), minlength=model.num_classes)
    dev = resolve_device(device)
    model.to(dev)
    x_dev = x.to(dev, non_blocking=True)
    y_dev = y.to(dev, non_blocking=True)
    reps = repeat_counts(counts, perturbation_rate).to(dev)

    history = History(
        model=model,
        config={
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "betas": list(betas),
            "objective": objective if isinstance(objective, str) else getattr(objective, "__name__", "custom"),
            "device": str(dev), "seed": seed, "val_fraction": val_fraction,
            "perturbation_rate": perturbation_rate, "engine": engine, "model": model.config,
        },
        train_counts=counts.tolist(),
    )
    step = make_step(model, loss_fn, engine, lr, betas, classifier_lr or lr, perturbation_rate > 0, reps, dev)

    n = x_dev.shape[0]
    num_batches = math.ceil(n / batch_size)
    generator = torch.Generator(device=dev).manual_seed(seed)
    best_score, best_state = -math.inf, None
    bar = tqdm(range(1, epochs + 1), desc="fit", unit="epoch", disable=not progress, leave=False)
    with pyro.settings.context(module_local_params=True):
        for epoch in bar:
            model.train()
            perm = torch.randperm(n, device=dev, generator=generator)
            loss_sum = torch.zeros((), device=dev)
            pert_sum = torch.zeros((), device=dev)
            for b in range(num_batches):
                idx = perm[b * batch_size : (b + 1) * batch_size]
                main, pert = step(x_dev[idx], y_dev[idx])
                loss_sum += main
                pert_sum += pert
            record: dict[str, float] = {
                "epoch": epoch,
                "loss": loss_sum.item() / num_batches,
                "perturbation_loss": pert_sum.item() / num_batches,
            }
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(
                    f"the training loss became {record['loss']} in epoch {epoch}; lower the learning rate "
                    "or check the data"
                )
            if x_val is not None:
                pred = predict(model, x_val, val_num_samples)
                report = imbalance_report(y_val, pred.labels.cpu(), num_classes=model.num_classes, train_counts=counts)
                record.update({f"val_{k}": v for k, v in report.items()})
                if select_best and report["acsa"] > best_score:
                    best_score, history.best_epoch = report["acsa"], epoch
                    best_state = copy.deepcopy(model.state_dict())
            history.epochs.append(record)
            bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if k in ("loss", "val_acsa")})
            if callback is not None:
                callback(epoch, record)
    if best_state is not None:
        model.load_state_dict(best_state)
    elif select_best or x_val is None:
        history.best_epoch = epochs
    model.eval()
    return history
