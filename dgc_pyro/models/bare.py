"""Calling a PyroModule's ``@pyro_method`` without its parameter bookkeeping, when that bookkeeping is moot.

Training (the torch and graph engines) and prediction both call the model and guide this way, so the helper sits
with the models, below both.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from pyro.nn import PyroModule

__all__ = ["bare_method", "plain_module_tree"]


def plain_module_tree(module: torch.nn.Module) -> bool:
    """True when no PyroModule in ``module`` declares PyroParam or PyroSample attributes."""
    return all(
        not m.__dict__.get("_pyro_params") and not m.__dict__.get("_pyro_samples")
        for m in module.modules()
        if isinstance(m, PyroModule)
    )


def bare_method(module: PyroModule, name: str) -> Callable[..., Any]:
    """``module.<name>`` without PyroModule's parameter bookkeeping, when that bookkeeping is moot.

    A ``@pyro_method`` enters the module's Pyro context, in which every access to a submodule replays
    one (empty) ``pyro.param`` statement per parameter through the handler stack: about a quarter of
    the step time of a small network. The torch engine and prediction use ``module.parameters()`` directly and
    never read those statements, so when the module tree has no PyroParam/PyroSample attributes (whose
    values do depend on the context) the undecorated method is called: the same computation and the
    same sample sites. Otherwise the method is returned as it is.
    """
    method = getattr(module, name)
    # __wrapped__ is set by functools.wraps inside pyro_method: the public way to reach the undecorated function
    raw = getattr(getattr(type(module), name), "__wrapped__", None)
    if raw is None or not plain_module_tree(module):
        return method
    return types.MethodType(raw, module)
