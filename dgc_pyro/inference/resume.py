"""What makes a fit resumable: copies of its state, its optimisers' state, and the check that a checkpoint fits.

:func:`~dgc_pyro.inference.fit` snapshots its state after every epoch (:func:`copy_tree`,
:func:`optimizer_state`) and puts a snapshot back when it resumes or recovers from a divergence
(:func:`load_optimizer_state`). Before resuming, :func:`check_resumable` refuses a checkpoint written for
another model, other settings (the options marked ``resume="fixed"`` in :mod:`dgc_pyro.config`) or other data (:func:`data_fingerprint`). The file
format itself is :mod:`dgc_pyro.checkpoint`'s.
"""

from __future__ import annotations

import hashlib
from typing import Any

import pyro.optim
import torch

from dgc_pyro.checkpoint import TrainingState, check_state_matches
from dgc_pyro.config import resume_differences
from dgc_pyro.io import CheckpointError, to_jsonable
from dgc_pyro.models.dgc import DGC

__all__ = [
    "check_resumable",
    "copy_tree",
    "data_fingerprint",
    "load_optimizer_state",
    "optimizer_state",
]


def data_fingerprint(*tensors: torch.Tensor | None) -> str:
    """A cheap identity of the training data: shapes, dtypes and (a strided sample of) the values."""
    h = hashlib.sha256()
    for t in tensors:
        if t is None:
            h.update(b"<none>")
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        flat = t.reshape(-1)
        stride = max(1, flat.numel() // (1 << 22))
        h.update(flat[::stride].contiguous().numpy().tobytes())
    return h.hexdigest()


def copy_tree(obj: Any) -> Any:
    """Deep copy of a nested state with every tensor copied to CPU (nothing aliases live state)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: copy_tree(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [copy_tree(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(copy_tree(v) for v in obj)
    return obj


_IMPL_KEYS = ("foreach", "fused", "capturable", "differentiable")


def optimizer_state(opt: Any, model: DGC) -> dict[str, Any]:
    """A CPU copy of a torch or Pyro optimiser's state; Pyro's per-parameter optimisers keyed by parameter name."""
    if isinstance(opt, torch.optim.Optimizer):
        return copy_tree(opt.state_dict())
    if isinstance(opt, pyro.optim.PyroOptim):
        names = {id(p): n for n, p in model.named_parameters()}
        per_param = {}
        for p, o in opt.optim_objs.items():
            if id(p) not in names:
                raise RuntimeError(
                    "the svi engine's optimiser holds a parameter that is not the model's; cannot checkpoint it"
                )
            per_param[names[id(p)]] = copy_tree(o.state_dict())
        return {"per_param": per_param}
    raise TypeError(f"cannot checkpoint an optimiser of type {type(opt).__name__}")


def _load_torch_optimizer(opt: torch.optim.Optimizer, saved: Any) -> None:
    state = copy_tree(saved)
    # Keep this run's implementation choices (fused on CUDA, foreach on CPU) over the saved ones.
    for g_saved, g_now in zip(state.get("param_groups", []), opt.param_groups):
        for k in _IMPL_KEYS:
            if k in g_now:
                g_saved[k] = g_now[k]
    opt.load_state_dict(state)


def load_optimizer_state(opt: Any, saved: Any, model: DGC) -> None:
    """Put a state from :func:`optimizer_state` back into ``opt``, keeping this run's implementation flags."""
    if isinstance(opt, torch.optim.Optimizer):
        _load_torch_optimizer(opt, saved)
    elif isinstance(opt, pyro.optim.PyroOptim):
        params = dict(model.named_parameters())
        per_param = saved["per_param"]
        unknown = sorted(set(per_param) - set(params))
        if unknown:
            raise ValueError(f"optimiser state for unknown parameters {unknown[:5]}")
        if not isinstance(opt.pt_optim_args, dict) or opt.pt_clip_args:
            raise TypeError("cannot restore a PyroOptim with per-parameter arguments or gradient clipping")
        opt.optim_objs.clear()
        opt.grad_clip.clear()
        for name, st in per_param.items():
            p = params[name]
            # PyroOptim creates one torch optimiser per parameter on first sight; create them now, as it would
            # (from its public constructor and arguments), so that their state can be loaded: its set_state keys
            # by param-store name, which module-local parameters do not have, and would load the saved state
            # only at the next step, after the schedule has set this step's rate.
            o = opt.pt_optim_constructor([p], **opt.pt_optim_args)
            _load_torch_optimizer(o, st)
            opt.optim_objs[p] = o
            opt.grad_clip[p] = None  # no clip arguments (checked above)
    else:
        raise TypeError(f"cannot restore an optimiser of type {type(opt).__name__}")


#: Model options added after checkpoints existed: a checkpoint's model config that lacks one had this value.
MODEL_CONFIG_DEFAULTS: dict[str, Any] = {"observe_x": True}


def check_resumable(saved: TrainingState, source: Any, model: DGC, config: dict[str, Any], fingerprint: str) -> None:
    """Raise CheckpointError unless ``saved`` was written for this model, these settings and this data."""
    saved_model = {**MODEL_CONFIG_DEFAULTS, **saved.model_config} if saved.model_config else {}
    now = to_jsonable(model.config)
    if saved_model and saved_model != now:
        diff = sorted(k for k in set(saved_model) | set(now) if saved_model.get(k) != now.get(k))
        raise CheckpointError(
            f"cannot resume from {source}: it was written for a different model ("
            + ", ".join(f"{k}: {saved_model.get(k)!r} in the checkpoint, {now.get(k)!r} now" for k in diff)
            + ")"
        )
    check_state_matches(model, saved.model, source)
    if saved.best_model is not None:
        check_state_matches(model, saved.best_model, f"{source} (best model)")
    # One comparison of the saved settings against the requested ones, over the options marked fixed.
    diff = resume_differences(saved.config, config)
    if diff:
        raise CheckpointError(
            f"cannot resume from {source}: it was written by a fit with different settings ("
            + ", ".join(diff)
            + "); pass the same settings (only epochs may change)"
        )
    if saved.fingerprint != fingerprint:
        raise CheckpointError(
            f"cannot resume from {source}: the training data differ from the data it was trained on "
            "(pass the same x, y and validation data)"
        )
