"""A data-parallel rank's place in its group, and the collectives a training step needs.

This module is what the training step (:mod:`dgc_pyro.inference.engine`) knows of data parallelism: the context
is handed to the step by whoever runs it (:mod:`dgc_pyro.inference.distributed`), never looked up, so the step
does not import the launcher that imports the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyro
import torch
import torch.distributed as dist
from pyro.poutine.messenger import Messenger

__all__ = ["DistContext", "GlobalNoise", "check_engine"]


@dataclass(frozen=True)
class DistContext:
    """This process's place in the data-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_rank_zero(self) -> bool:
        """True on the rank that writes files and reports progress."""
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """Rows ``lo:hi`` of an ``n``-row global batch that this rank computes (as ``torch.tensor_split``)."""
        q, r = divmod(int(n), self.world_size)
        lo = self.rank * q + min(self.rank, r)
        return lo, lo + q + (1 if self.rank < r else 0)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """In-place sum over the ranks (asynchronous with respect to the host on CUDA)."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def broadcast_model(self, module: torch.nn.Module) -> None:
        """Copy rank 0's parameters and buffers to every rank (one flat broadcast)."""
        tensors = [t for t in list(module.parameters()) + list(module.buffers()) if t.is_floating_point()]
        if not tensors:
            return
        flat = torch.cat([t.detach().reshape(-1) for t in tensors])
        dist.broadcast(flat, src=0)
        offset = 0
        with torch.no_grad():
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def all_reduce_gradients(
        self, module: torch.nn.Module, params: list[torch.nn.Parameter], extra: list[torch.Tensor], with_buffers: bool
    ) -> list[torch.Tensor]:
        """Sum gradients of ``params`` (and ``extra`` 0-d tensors) over ranks in one collective; with
        ``with_buffers`` also average the floating-point buffers of ``module`` (BatchNorm running statistics).

        Gradients must already be scaled so that their sum is the global gradient. Returns ``extra`` reduced.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        buffers = [b for b in module.buffers() if b.is_floating_point()] if with_buffers else []
        parts = [g.reshape(-1) for g in grads] + [b.reshape(-1) / self.world_size for b in buffers]
        parts += [e.detach().reshape(1).to(grads[0].dtype) for e in extra]
        flat = torch.cat(parts)
        self.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset : offset + g.numel()].view_as(p)
            offset += g.numel()
        with torch.no_grad():
            for b in buffers:
                b.copy_(flat[offset : offset + b.numel()].view_as(b))
                offset += b.numel()
        return [flat[offset + i] for i in range(len(extra))]


class GlobalNoise(Messenger):
    """Draws the guide's reparameterised Normal noise for the whole global batch and keeps this shard's rows.

    ``torch.distributions.Normal.rsample`` draws ``eps`` of the site's shape and returns loc + eps * scale;
    here eps is drawn for ``total`` rows from the (identically seeded) generator of every rank and rows
    ``lo:hi`` are used, so each rank sees exactly the noise that a single process fitting the global batch
    would have drawn for its examples. Sites of any other form are sampled as usual.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lo = self.hi = self.total = 0

    def _pyro_sample(self, msg: dict[str, Any]) -> None:
        if msg["is_observed"] or msg["value"] is not None or msg["args"] or msg["kwargs"]:
            return
        base = msg["fn"]
        while isinstance(base, torch.distributions.Independent):
            base = base.base_dist
        if type(base) not in (torch.distributions.Normal, pyro.distributions.Normal):
            return
        shape = base.batch_shape
        if len(shape) == 0 or shape[0] != self.hi - self.lo:
            return
        eps = torch.empty((self.total,) + tuple(shape[1:]), dtype=base.loc.dtype, device=base.loc.device).normal_()
        msg["value"] = base.loc + eps[self.lo : self.hi] * base.scale


def check_engine(engine: str) -> None:
    """Data-parallel runs take ``engine="torch"`` only: the graph and SVI engines are single-process."""
    if engine != "torch":
        raise ValueError(f"data-parallel fitting supports engine='torch' only, not engine={engine!r}")
