"""Loss and gradients of a Pyro training step, captured once as an aten graph and replayed.

The ``"torch"`` engine traces the Pyro model and guide on every step: poutine handlers, distribution
objects and the ELBO sum are Python work that the hand-written PyTorch step does not have (about 1 ms
a step, which dominates small networks and fast GPUs). :class:`CapturedGradients` runs that Python once
per input signature: ``torch.fx.experimental.proxy_tensor.make_fx`` records the forward pass through
the Pyro traces and the backward pass (``torch.autograd.grad``) as one graph of aten operations, with
the module's parameters and buffers as graph inputs. Replaying the graph does the same arithmetic
without the tracing, so the Pyro model/guide stay the single source of truth for the loss: change the
model and the next capture records the change.

What a captured graph assumes, and what the engine checks or handles:

- the step has no data-dependent Python control flow and no host synchronisation (``.item()``, a
  NaN check, ``F.one_hot``'s label check); such a step fails to capture with
  :class:`GraphCaptureError`, naming the cause, and runs under ``engine="torch"`` as it is;
- shapes, dtypes and devices are those of the captured call, and so is the train/eval mode: a new
  batch size (the last, smaller batch of an epoch) is captured once more, and a graph is kept per
  signature;
- random draws (the guide's reparameterised noise, dropout) are operations of the graph and are drawn
  afresh from the global generator on every replay, in the eager order: an uncompiled replay gives
  the same numbers as the eager step under the same seed. Capture itself runs the step once on real
  tensors; the generators and the buffers (BatchNorm statistics) are restored afterwards, so capturing
  changes neither the model nor the random stream.

``compile`` hands each captured graph to ``torch.compile`` (inductor): the graph has only tensor
inputs, so Dynamo guards on shapes and dtypes alone and does not recompile from step to step, as it
does when it compiles the Pyro-traced loss directly. Compiled graphs draw their random numbers with
inductor's own generator (``torch._inductor.config.fallback_random = True`` restores the eager draws).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

__all__ = ["CapturedGradients", "GraphCaptureError"]


class GraphCaptureError(RuntimeError):
    """The step could not be recorded as a static graph (data-dependent control flow, a host sync, ...)."""


class _Bound(nn.Module):
    """``fn`` as the forward of a module holding ``module``, so that ``torch.func.functional_call``
    can swap the parameters and buffers in for the call."""

    def __init__(self, module: nn.Module, fn: Callable[..., tuple[torch.Tensor, ...]]) -> None:
        super().__init__()
        self.module = module
        self._fn = fn

    def forward(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return self._fn(*args)


def _signature(args: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((tuple(a.shape), a.dtype, a.device, a.requires_grad) for a in args)


class CapturedGradients:
    """``fn(*args) -> (loss, *extras)`` replayed from a captured graph that also computes d loss / d params.

    Calling the object returns ``(loss, *extras)`` detached and leaves the gradients in ``p.grad`` of
    ``module``'s trainable parameters (accumulated into an existing ``p.grad``, as ``backward`` does;
    parameters the loss does not depend on keep ``grad`` None). ``fn`` must read the parameters through
    ``module`` (its submodules' attributes), which is how Pyro models built from ``nn.Module`` /
    ``PyroModule`` networks read them.

    Args:
        module: the module whose parameters and buffers ``fn`` uses.
        fn: the loss computation; its first output is the scalar loss, further outputs (for example the
            guide's location and scale) are returned detached.
        compile: False, True or a dict of ``torch.compile`` options for every captured graph.
    """

    def __init__(
        self, module: nn.Module, fn: Callable[..., tuple[torch.Tensor, ...]], compile: bool | dict[str, Any] = False
    ) -> None:
        self.module = module
        self._bound = _Bound(module, fn)
        self.compile_options: dict[str, Any] | None = (
            None if compile is False else dict(compile) if isinstance(compile, dict) else {}
        )
        self._graphs: dict[tuple, tuple[Callable[..., Any], list[bool]]] = {}
        self._slots: tuple[list[tuple[dict, str]], list[tuple[dict, str]]] = ([], [])

    @property
    def num_graphs(self) -> int:
        """How many input signatures have been captured so far."""
        return len(self._graphs)

    def _state(self) -> tuple[list[str], list[nn.Parameter], list[str], list[torch.Tensor]]:
        named = [(n, p) for n, p in self._bound.named_parameters() if p.requires_grad]
        buffers = list(self._bound.named_buffers())
        # Where each tensor lives, so that a replay reads the module's current tensors (a buffer replaced
        # by .to(...) included) without walking the module tree every step (~0.1 ms on these models).
        owners = dict(self._bound.named_modules(remove_duplicate=False))
        self._slots = (
            [(owners[n.rpartition(".")[0]]._parameters, n.rpartition(".")[2]) for n, _ in named],
            [(owners[n.rpartition(".")[0]]._buffers, n.rpartition(".")[2]) for n, _ in buffers],
        )
        return [n for n, _ in named], [p for _, p in named], [n for n, _ in buffers], [b for _, b in buffers]

    def _current(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        p_slots, b_slots = self._slots
        return [d[k] for d, k in p_slots], [d[k] for d, k in b_slots]

    def _capture(self, args: tuple[torch.Tensor, ...]) -> tuple[Callable[..., Any], list[bool]]:
        from torch.fx.experimental.proxy_tensor import make_fx

        p_names, params, b_names, buffers = self._state()
        used: list[bool] = []

        def loss_and_grads(ps: list[torch.Tensor], bs: list[torch.Tensor], *inputs: torch.Tensor):
            state = {**dict(zip(p_names, ps)), **dict(zip(b_names, bs))}
            out = torch.func.functional_call(self._bound, state, inputs)
            if not isinstance(out, tuple) or not out or not torch.is_tensor(out[0]) or out[0].dim() != 0:
                raise GraphCaptureError("the step function must return a tuple whose first item is the scalar loss")
            grads = torch.autograd.grad(out[0], ps, allow_unused=True)
            used[:] = [g is not None for g in grads]
            return (*(o.detach() for o in out), *(g for g in grads if g is not None))

        devices = sorted({t.device for t in (*params, *args) if t.device.type == "cuda"}, key=str)
        saved = [b.detach().clone() for b in buffers]
        try:
            with torch.random.fork_rng(devices=devices), torch.enable_grad():
                graph = make_fx(loss_and_grads, tracing_mode="real")(params, buffers, *args)
        except GraphCaptureError:
            raise
        except Exception as e:  # torch reports data-dependent control flow / host syncs as RuntimeError
            raise GraphCaptureError(
                f"the training step could not be captured as a static graph ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); use engine='torch'"
            ) from e
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)
        run: Callable[..., Any] = graph
        if self.compile_options is not None:
            run = torch.compile(graph, dynamic=False, **self.compile_options)
        return run, list(used)

    def __call__(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        key = (self.module.training, _signature(args))
        entry = self._graphs.get(key)
        if entry is None:
            entry = self._graphs[key] = self._capture(args)
        run, used = entry
        params, buffers = self._current()
        with torch.no_grad():  # the graph computes the gradients itself: no autograd record of the replay
            out = run(params, buffers, *args)
            n_out = len(out) - sum(used)
            grads = iter(out[n_out:])
            for p, has_grad in zip(params, used):
                if not has_grad:
                    continue
                g = next(grads)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
        if self.compile_options is not None:
            # A compiled graph may hand out buffers that its next replay reuses (CUDA graphs under
            # mode="reduce-overhead"); the loss and extras outlive the step, so they get their own memory.
            return tuple(o.clone() for o in out[:n_out])
        return tuple(out[:n_out])

    def reset(self) -> None:
        """Forget every captured graph (the next call captures afresh), e.g. after adding parameters,
        submodules or buffers to the module, or changing which parameters require gradients."""
        self._graphs.clear()
