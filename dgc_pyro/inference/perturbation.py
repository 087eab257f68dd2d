"""The paper's data-perturbation step: the classifier head sees re-drawn minority latents.

After each main step, every example of class c in the batch has its q(z | x, y) parameters repeated
``floor(1 + rate * (n_max - n_c) / n_c)`` times (the reference code's rule), z is redrawn with fresh
noise and a separate optimiser updates p(y | z) alone. No images are decoded.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from dgc_pyro.models.dgc import DGC


def repeat_counts(class_counts: np.ndarray | torch.Tensor, rate: float) -> torch.Tensor:
    """Per-class repetition factors ``floor(1 + rate * (n_max - n_c) / n_c)`` (1 for empty classes)."""
    counts = torch.as_tensor(np.asarray(class_counts), dtype=torch.float64)
    if rate < 0:
        raise ValueError(f"perturbation rate must be >= 0, got {rate}")
    n_max = counts.max()
    safe = counts.clamp_min(1.0)
    reps = torch.floor(1.0 + rate * (n_max - counts) / safe)
    return torch.where(counts > 0, reps, torch.ones_like(reps)).long()


def guide_normal_params(guide_trace, model: DGC, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Detached (loc, scale) of q(z | x, y) from a recorded guide trace, re-encoding only for non-Normal guides."""
    node = guide_trace.nodes.get("z") if guide_trace is not None else None
    d = node["fn"] if node is not None else None
    while d is not None and hasattr(d, "base_dist"):
        d = d.base_dist
    if isinstance(d, torch.distributions.Normal):
        return d.loc.detach(), d.scale.detach()
    with torch.no_grad():
        return model.encode(x, y)


def perturbation_loss(
    model: DGC, loc: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, reps_per_class: torch.Tensor
) -> torch.Tensor:
    """Mean cross-entropy of p(y | z) on latents re-drawn from q(z | x, y), minority examples repeated."""
    reps = reps_per_class[y]
    loc = loc.repeat_interleave(reps, dim=0)
    scale = scale.repeat_interleave(reps, dim=0)
    y_rep = y.repeat_interleave(reps, dim=0)
    z = loc + scale * torch.randn_like(loc)
    return F.cross_entropy(model.label_logits(z), y_rep)
