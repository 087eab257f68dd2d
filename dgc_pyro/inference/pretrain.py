"""Encoder pre-training of the reference code: match the moments of encoded z to the prior's.

Before the main objective, the WAE/DGC reference code runs up to 200 Adam steps on the encoder alone,
minimising ``mean((mean_q - mean_p)^2) + mean((cov_q - cov_p)^2)`` between a batch of encoded latents
and a batch of prior draws, so that the MMD term starts from latents on the prior's scale.
"""

from __future__ import annotations

from typing import Any

import pyro
import torch

from dgc_pyro.arguments import check_betas, check_non_negative, check_positive
from dgc_pyro.data.validation import check_xy
from dgc_pyro.models.dgc import DGC


def moment_matching_loss(z_q: torch.Tensor, z_p: torch.Tensor) -> torch.Tensor:
    """Squared differences of the means plus of the covariances of two (n, k) samples (mean over entries)."""
    mean_q, mean_p = z_q.mean(0, keepdim=True), z_p.mean(0, keepdim=True)
    dq, dp = z_q - mean_q, z_p - mean_p
    cov_q = dq.T @ dq / max(1, z_q.shape[0] - 1)
    cov_p = dp.T @ dp / max(1, z_p.shape[0] - 1)
    return (mean_q - mean_p).pow(2).mean() + (cov_q - cov_p).pow(2).mean()


def pretrain_encoder(
    model: DGC,
    x: Any,
    y: Any,
    steps: int = 200,
    *,
    batch_size: int = 100,
    lr: float = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    tol: float = 0.0,
    seed: int | None = None,
) -> list[float]:
    """Pre-train ``model.encoder`` so that z ~ q(z | x, y) has the prior's mean and covariance.

    Runs ``steps`` Adam steps on the encoder's parameters only, each on a random batch of ``(x, y)``
    and a batch of draws from ``model.prior`` (so a custom prior is matched), and stops early once the
    loss falls below ``tol``. Data are moved to the model's device. Returns the loss per step.
    """
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    check_non_negative("steps", steps, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("lr", lr)
    check_betas(betas)
    if batch_size < 2:
        raise ValueError(f"batch_size must be at least 2 (a covariance needs two draws), got {batch_size}")
    x, y = check_xy(x, y, input_shape=model.input_shape, num_classes=model.num_classes)
    dev = model.device
    x, y = x.to(dev), y.to(dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, ()).item()))
    opt = torch.optim.Adam(model.encoder.parameters(), lr=lr, betas=betas)
    losses: list[float] = []
    was_training = model.training
    model.train()
    try:
        with pyro.settings.context(module_local_params=True):
            for _ in range(steps):
                idx = torch.randint(0, x.shape[0], (min(int(batch_size), x.shape[0]),), device=dev, generator=gen)
                loc, scale = model.encode(x[idx], y[idx])
                z_q = loc + scale * torch.randn_like(loc)
                with torch.no_grad():
                    z_p = model.prior((idx.shape[0],)).sample()
                loss = moment_matching_loss(z_q, z_p)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                if losses[-1] < tol:
                    break
    finally:
        model.train(was_training)
    return losses
