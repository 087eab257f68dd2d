"""Learning-rate schedules shared by DGC's :func:`~dgc_pyro.inference.fit` and the baselines.

A schedule is a pure function of the step count, not an optimiser-side object with its own state: the
learning rate of step ``t`` (0-based, over ``total`` steps) is ``lr * lr_factor(schedule, t, total)``.
A resumed fit therefore continues the schedule exactly from its global step, and DGC and the baselines
decay alike when a benchmark gives them the same schedule.

- ``"constant"``: the base learning rate throughout (the paper's recipe, and the default).
- ``"cosine"``: half a cosine from the base rate down to 0 over the whole fit (Loshchilov & Hutter 2017,
  without restarts).

Either can start with a linear warm-up (``warmup`` steps: step ``t < warmup`` runs at ``(t + 1) / warmup`` of the
scheduled rate), which :func:`~dgc_pyro.inference.fit` turns on by default: Adam's first updates are about
``lr * sign(grad)`` for every weight at once, before its second-moment estimates mean anything, and at a rate that
later trains well they can throw a deep network's activations into a region it never recovers from (the paper
networks at lr 1e-3: a loss of 3.8e6 in epoch 1). The warm-up is a pure function of the step like the rest, so it
keeps resumes exact.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import pyro.optim
import torch

from dgc_pyro.config import LR_SCHEDULES, check_choice  # the names live with the option


def check_lr_schedule(name: Any) -> str:
    """``name`` if it is one of :data:`LR_SCHEDULES`; a ValueError naming the choices otherwise."""
    check_choice("lr_schedule", name, LR_SCHEDULES)
    return name


def lr_factor(schedule: str, step: int, total: int, warmup: int = 0) -> float:
    """The multiplier of the base learning rate for step ``step`` (0-based) of ``total``, after ``warmup``
    linear warm-up steps (0: none)."""
    warm = (step + 1) / warmup if step < warmup else 1.0
    if schedule == "constant":
        return warm
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))
    raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {schedule!r}")


def set_lr(optimizer: torch.optim.Optimizer | pyro.optim.PyroOptim, lr: float) -> None:
    """Set the learning rate of every parameter group of ``optimizer``.

    A ``pyro.optim.PyroOptim`` holds one torch optimiser per parameter and creates more as it meets new
    parameters; both the existing ones and the arguments of those to come are updated.
    """
    if isinstance(optimizer, torch.optim.Optimizer):
        groups: Iterable[dict[str, Any]] = optimizer.param_groups
    elif isinstance(optimizer, pyro.optim.PyroOptim):
        if not isinstance(optimizer.pt_optim_args, dict):
            raise TypeError("cannot schedule a PyroOptim whose optim_args is a callable; it sets its own rates")
        optimizer.pt_optim_args["lr"] = lr
        groups = [g for o in optimizer.optim_objs.values() for g in o.param_groups]
    else:
        raise TypeError(f"cannot set the learning rate of a {type(optimizer).__name__}")
    for group in groups:
        # fused/capturable Adam may hold lr as a tensor; fill it in place so captured graphs see the change
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def scheduled_lr(
    optimizer: torch.optim.Optimizer | pyro.optim.PyroOptim,
    base_lr: float,
    schedule: str,
    step: int,
    total: int,
    warmup: int = 0,
) -> float:
    """The rate of step ``step`` (of ``total``) under ``schedule`` after ``warmup`` steps, set on ``optimizer``.

    Returns the rate. Under ``"constant"`` the optimiser is left as it was built once the warm-up is over (its last
    step runs at the full rate), so a constant fit touches no optimiser after its first ``warmup`` steps.
    """
    rate = base_lr * lr_factor(schedule, step, total, warmup)
    if schedule != "constant" or step < warmup:
        set_lr(optimizer, rate)
    return rate
