"""Training steps: one SVI update of DGC plus the paper's data-perturbation update.

Two engines run the same loss callable over the same model/guide pair:

- ``engine="torch"`` (default): the objective's differentiable loss, one fused/foreach
  ``torch.optim.Adam`` over all parameters, data resident on the device and no host synchronisation
  inside an epoch;
- ``engine="svi"``: textbook ``pyro.infer.SVI`` with ``pyro.optim.Adam``, for reference and for users
  who compose further Pyro machinery around it.
"""

from __future__ import annotations

from typing import Any, Callable

import pyro
import pyro.optim
import torch
from pyro import poutine

from dgc_pyro.inference.objectives import Objective
from dgc_pyro.inference.perturbation import guide_normal_params, perturbation_loss
from dgc_pyro.models.dgc import DGC

ENGINES = ("torch", "svi")
Step = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_step(
    model: DGC,
    loss_fn: Objective,
    engine: str,
    lr: float,
    betas: tuple[float, float],
    classifier_lr: float,
    perturb: bool,
    reps: torch.Tensor,
    device: torch.device,
) -> Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """One training step ``step(x, y) -> (loss, perturbation_loss)`` as 0-d tensors (no host sync)."""
    fused = device.type == "cuda"
    cls_opt = torch.optim.Adam(model.classifier.parameters(), lr=classifier_lr, betas=betas, foreach=not fused, fused=fused or None)
    zero = torch.zeros((), device=device)

    def perturbation(guide_trace, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not perturb:
            return zero
        loc, scale = guide_normal_params(guide_trace, model, x, y)
        loss = perturbation_loss(model, loc, scale, y, reps)
        loss.backward()
        cls_opt.step()
        cls_opt.zero_grad(set_to_none=True)
        return loss.detach()

    def scaled(fn: Callable[..., Any]) -> Callable[..., Any]:
        # Per-example loss, so the learning rate does not depend on the batch size.
        def wrapped(x: torch.Tensor, y: torch.Tensor) -> Any:
            with poutine.scale(scale=1.0 / x.shape[0]):
                return fn(x, y)

        return wrapped

    guide = poutine.trace(model.guide)  # records q(z | x, y) for the perturbation step
    model_fn, guide_fn = scaled(model.model), scaled(guide)

    if engine == "svi":
        svi = pyro.infer.SVI(model_fn, guide_fn, pyro.optim.Adam({"lr": lr, "betas": betas}), loss=loss_fn)

        def svi_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            loss = svi.step(x, y)
            return torch.tensor(loss, device=device), perturbation(guide.trace, x, y)

        return svi_step

    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, foreach=not fused, fused=fused or None)

    def torch_step(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loss = loss_fn(model_fn, guide_fn, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach(), perturbation(guide.trace, x, y)

    return torch_step
