"""Saving and loading fitted DGC models and resumable training states.

Both are safetensors files written atomically by :mod:`dgc_pyro.io`: tensors in the safetensors
body, everything else as JSON in its header. Nothing is ever unpickled, so loading a file from an
untrusted source can at worst be refused (``CheckpointError``), never run code.

Model-file layout (:func:`save_model`): the state dict's tensors under their own names; a SWAG head of the label
head (``model.swag``, :class:`~dgc_pyro.models.swag_head.SwagHead`) adds ``swag/mean``, ``swag/variance`` and
``swag/deviations`` (float64) with its record (``count``, ``var_clamp``) under the metadata key ``"swag"``. Files
without them (written before SWAG was a recipe option, or of fits without it) load with ``model.swag = None``.

Training-state layout (``kind == "dgc_pyro.training_state"``): tensors are named ``model/<param>``,
``best_model/<param>``, ``split/train_idx``, ``split/val_idx``, and ``optim/...`` / ``rng/...`` /
``callbacks/...`` for the tensors inside the optimiser states, random number generator snapshots and the states
of stateful callbacks (the SWAG moments; absent from older files, which read as none). Those nested structures
are stored in the JSON metadata with every tensor replaced by ``{"__tensor__": name}``, dicts as
``{"__dict__": [[key, value], ...]}`` (keeping int keys), tuples as ``{"__tuple__": [...]}`` and
non-finite floats as ``{"__float__": "nan"}``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dgc_pyro.config import Recipe
from dgc_pyro.device import resolve_device
from dgc_pyro.io import CheckpointError, load_checkpoint, save_checkpoint, to_jsonable
from dgc_pyro.models.dgc import DGC
from dgc_pyro.models.swag_head import SwagHead
from dgc_pyro.ood_detector import OODDetector

__all__ = [
    "RUN_CONFIG_FIELDS",
    "TRAINING_STATE_FILE",
    "TrainingState",
    "check_run_config",
    "load_model",
    "load_training_state",
    "save_model",
    "save_training_state",
    "training_state_path",
]

#: File name of the training state inside a checkpoint directory.
TRAINING_STATE_FILE = "training_state.safetensors"
#: File name ``dgc-pyro fit`` gives the fitted model inside its output folder.
MODEL_FILE = "model.safetensors"
#: Name prefix of the SWAG head's tensors in a model file (a state dict's names have dots, never slashes).
SWAG_PREFIX = "swag/"

_KIND = "dgc_pyro.training_state"
_STATE_VERSION = 1

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------------------------------
# Fitted models


def save_model(path: PathLike, model: DGC, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and config (plus ``metadata``), with its OOD flag and SWAG head when it has them,
    atomically to ``path``."""
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    meta = dict(metadata or {})
    meta["model"] = model.config
    detector = getattr(model, "ood_detector", None)
    if detector is not None:  # the calibrated OOD flag (dgc_pyro.inference.density) travels with the weights
        meta["ood_detector"] = detector.to_dict()
    tensors = dict(model.state_dict())
    meta.pop("swag", None)  # the head's record is the model's own (a reloaded model's metadata may hold an old one)
    head = getattr(model, "swag", None)
    if head is not None:  # the SWAG head of fit(..., swag_start=...) travels with the weights too, in one file
        head_tensors, meta["swag"] = head.to_state()
        tensors.update({SWAG_PREFIX + k: v for k, v in head_tensors.items()})
    save_checkpoint(path, tensors, meta)


def _map_location(map_location: str | torch.device) -> torch.device:
    if isinstance(map_location, torch.device):
        return resolve_device(map_location)
    if not isinstance(map_location, str):
        raise ValueError(f"map_location must be a device name such as 'cpu' or 'cuda', got {map_location!r}")
    return resolve_device(map_location)


def check_state_matches(
    model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: Any, *, require_finite: bool = True
) -> None:
    """Raise CheckpointError unless ``tensors`` has exactly ``model``'s state keys with the same shapes,
    and (with ``require_finite``, for states read from a file) finite values in every floating-point tensor.

    Checked before anything is copied, so a mismatching or damaged file leaves the model untouched.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not match the model architecture: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}"
        )
    for name, t in expected.items():
        got = tensors[name]
        if tuple(got.shape) != tuple(t.shape):
            raise CheckpointError(
                f"{source} does not match the model architecture: {name} has shape {tuple(got.shape)} in the "
                f"checkpoint but {tuple(t.shape)} in the model"
            )
        if got.dtype.is_floating_point != t.dtype.is_floating_point:
            raise CheckpointError(
                f"{source} does not match the model: {name} has dtype {got.dtype}, expected {t.dtype}"
            )
        # safetensors has no checksum, so flipped bytes in the tensor data load without complaint; fit never
        # saves NaN/inf weights (it stops with TrainingDivergedError first), so they mean a damaged file.
        if require_finite and got.dtype.is_floating_point and not bool(torch.isfinite(got).all()):
            bad = int((~torch.isfinite(got)).sum())
            raise CheckpointError(
                f"{source} is not a valid dgc_pyro checkpoint: tensor {name} holds {bad} NaN or infinite values "
                "(the file is corrupted); re-create it"
            )


def load_model(path: PathLike, *, map_location: str | torch.device = "cpu", model: DGC | None = None) -> DGC:
    """Rebuild a model from a checkpoint written by :func:`save_model`; returns the model, with the checkpoint's
    metadata (the dict given to :func:`save_model`, plus ``"model"``: its config) as ``model.metadata`` and its
    SWAG head as ``model.swag`` (None for a file without one).

    ``path`` may also be an output folder of ``dgc-pyro fit`` (its ``model.safetensors`` is loaded) or
    a training state written by ``fit(..., checkpoint_dir=...)`` (the weights of its last epoch are
    loaded). Models with custom networks cannot be rebuilt from their config: construct the model
    yourself and pass it as ``model`` to have the weights loaded into it.

    Raises:
        FileNotFoundError: no such file (or a folder without ``model.safetensors``).
        CheckpointError (a ValueError): not a dgc_pyro checkpoint (pickle files included: they are
            refused, never unpickled), truncated or corrupted, or not matching the architecture.
        ValueError: a bad ``map_location``.
    """
    device = _map_location(map_location)
    if model is not None and not isinstance(model, DGC):
        raise ValueError(f"model must be a dgc_pyro.models.DGC or None, got {type(model).__name__}")
    p = Path(path)
    if p.is_dir():
        if (p / MODEL_FILE).is_file():
            p = p / MODEL_FILE
        else:
            raise FileNotFoundError(
                2,
                f"{p} is a folder without {MODEL_FILE}; pass the model file written by save_model or dgc-pyro fit",
                str(p / MODEL_FILE),
            )
    tensors, meta = load_checkpoint(p, map_location="cpu")
    if meta.get("kind") == _KIND:
        tensors = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
    swag = {k[len(SWAG_PREFIX) :]: tensors.pop(k) for k in list(tensors) if k.startswith(SWAG_PREFIX)}
    if bool(swag) != isinstance(meta.get("swag"), dict):
        raise CheckpointError(f"{p} is not a valid dgc_pyro checkpoint: its SWAG head's tensors and record disagree")
    config = meta.get("model")
    if not isinstance(config, dict):
        raise CheckpointError(f"{p} has no model config; it was not written by dgc_pyro.save_model")
    if model is None:
        try:
            model = DGC.from_config(config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{p}: cannot rebuild the model from its config: {e}") from None
    check_state_matches(model, tensors, p)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:  # defensive: check_state_matches should have caught it
        raise CheckpointError(f"{p} does not match the model architecture: {str(e).splitlines()[-1].strip()}") from None
    if meta.get("ood_detector") is not None:  # absent from checkpoints written before the flag existed
        try:
            model.ood_detector = OODDetector.from_dict(meta["ood_detector"])
        except ValueError as e:
            raise CheckpointError(f"{p}: {e}") from None
    model.swag = _load_swag(model, swag, meta.get("swag"), p) if swag else None
    model.metadata = meta
    return model.to(device)


def _load_swag(model: DGC, tensors: dict[str, torch.Tensor], record: dict[str, Any], path: Path) -> SwagHead:
    """The SWAG head of a model file, checked (CheckpointError naming the file)."""
    try:
        return SwagHead.from_state(model, tensors, record)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: its SWAG head is unusable ({e})") from None


# ---------------------------------------------------------------------------------------------
# Run configurations: what dgc-pyro fit saves beside the weights (model metadata "config") and in its training
# states (extra "run"), read back by evaluate, augment, predict and fit --resume


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_int_list(v: Any) -> bool:
    return isinstance(v, list) and all(_is_int(c) for c in v)


#: The entries a run configuration may carry, each with what it must be and its check (a recipe's entries are then
#: checked by building the :class:`~dgc_pyro.config.Recipe`, whose fields they are).
RUN_CONFIG_FIELDS: dict[str, tuple[str, Any]] = {
    "dataset": ("a string", lambda v: isinstance(v, str)),
    "dataset_arg": ("a string", lambda v: isinstance(v, str)),
    "data_dir": ("a string", lambda v: isinstance(v, str)),
    "seed": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "counts": ("a list of integers", _is_int_list),
    "train_counts": ("a list of integers", _is_int_list),
    "baseline": ("a string", lambda v: isinstance(v, str)),
    "recipe": ("a mapping", lambda v: isinstance(v, dict)),
}


def check_run_config(config: Any, source: Any, *, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """``config`` checked entry by entry against :data:`RUN_CONFIG_FIELDS` (absent or None entries pass unless
    named in ``required``); returns it. The safetensors format protects the tensors, not the JSON metadata beside
    them, and a damaged entry would otherwise fail deep in the command that reads it.

    Raises CheckpointError ``"<source>: its run configuration is unusable (...)"`` naming the first bad entry.
    """
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: its run configuration is unusable (a {type(config).__name__}, not a mapping)")
    for key in required:
        if config.get(key) is None:
            raise CheckpointError(f"{source}: its run configuration is unusable ({key} is missing)")
    for key, (what, ok) in RUN_CONFIG_FIELDS.items():
        if config.get(key) is not None and not ok(config[key]):
            raise CheckpointError(
                f"{source}: its run configuration is unusable ({key} must be {what}, got {config[key]!r})"
            )
    if isinstance(config.get("recipe"), dict):  # its entries are the config fields (older names accepted)
        try:
            Recipe.from_flat(config["recipe"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{source}: its run configuration is unusable (recipe: {e})") from None
    return config


# ---------------------------------------------------------------------------------------------
# Training states


@dataclass
class TrainingState:
    """Everything a fit needs to continue exactly where it stopped (after ``epoch`` complete epochs).

    Tensors are CPU copies. ``optimizers`` maps a name (``"main"``, ``"perturbation"``) to the nested
    state of that optimiser (a ``torch.optim`` state dict, or ``{"per_param": {name: state dict}}`` for
    Pyro's per-parameter optimisers); ``rng`` is :func:`dgc_pyro.reproducibility.get_rng_state`'s
    snapshot; ``config`` the settings that must match on resume; ``fingerprint`` identifies the data;
    ``callbacks`` maps a stateful callback's ``state_key`` to its state (nested, with tensors; the SWAG moments).
    """

    epoch: int
    global_step: int
    model: dict[str, torch.Tensor]
    optimizers: dict[str, Any]
    rng: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_score: float = -math.inf
    best_model: dict[str, torch.Tensor] | None = None
    train_idx: torch.Tensor | None = None
    val_idx: torch.Tensor | None = None
    config: dict[str, Any] = field(default_factory=dict)
    model_config: dict[str, Any] = field(default_factory=dict)
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    callbacks: dict[str, Any] = field(default_factory=dict)


def training_state_path(path: PathLike) -> Path:
    """The training-state file for ``path``: ``path`` itself if it is a file or ends in ``.safetensors``,
    else ``path/training_state.safetensors``."""
    p = Path(path)
    if p.is_file() or (p.suffix == ".safetensors" and not p.is_dir()):
        return p
    return p / TRAINING_STATE_FILE


def _encode(obj: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        v = float(obj)
        return v if math.isfinite(v) else {"__float__": repr(v)}
    if isinstance(obj, Mapping):
        items = []
        seen: set[str] = set()
        for i, (k, v) in enumerate(obj.items()):
            if isinstance(k, bool) or not isinstance(k, (str, int, np.integer)):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__} ({k!r}) at {key}")
            k = k if isinstance(k, str) else int(k)
            # Readable tensor names (optim/main/state/3/exp_avg) unless the key could clash.
            part = str(k) if (str(k) not in seen and "/" not in str(k) and not str(k).startswith("#")) else f"#{i}"
            seen.add(part)
            items.append([k, _encode(v, f"{key}/{part}", tensors)])
        return {"__dict__": items}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(obj)]
    raise TypeError(f"cannot store an object of type {type(obj).__name__} at {key} in a training state")


def _decode(obj: Any, tensors: Mapping[str, torch.Tensor], used: set[str], where: str) -> Any:
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, list):
        return [_decode(v, tensors, used, where) for v in obj]
    if isinstance(obj, dict) and len(obj) == 1:
        ((tag, value),) = obj.items()
        if tag == "__tensor__" and isinstance(value, str):
            if value not in tensors:
                raise ValueError(f"{where} refers to tensor {value!r}, which the file does not contain")
            used.add(value)
            return tensors[value]
        if tag == "__float__" and value in ("nan", "inf", "-inf"):
            return float(value)
        if tag == "__tuple__" and isinstance(value, list):
            return tuple(_decode(v, tensors, used, where) for v in value)
        if tag == "__dict__" and isinstance(value, list):
            out = {}
            for pair in value:
                if not (
                    isinstance(pair, list)
                    and len(pair) == 2
                    and isinstance(pair[0], (str, int))
                    and not isinstance(pair[0], bool)
                ):
                    raise ValueError(f"{where} holds a malformed dict entry {str(pair)[:80]}")
                out[pair[0]] = _decode(pair[1], tensors, used, where)
            return out
    raise ValueError(f"{where} holds an unexpected value {str(obj)[:80]}")


def save_training_state(path: PathLike, state: TrainingState) -> Path:
    """Write ``state`` atomically to ``path`` (a folder gets ``training_state.safetensors``); returns the file."""
    target = training_state_path(path)
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in state.model.items()}
    if state.best_model is not None:
        tensors.update({f"best_model/{k}": v for k, v in state.best_model.items()})
    if state.train_idx is not None:
        tensors["split/train_idx"] = state.train_idx
    if state.val_idx is not None:
        tensors["split/val_idx"] = state.val_idx
    meta = {
        "kind": _KIND,
        "state_version": _STATE_VERSION,
        "epoch": int(state.epoch),
        "global_step": int(state.global_step),
        "model": to_jsonable(state.model_config),
        "config": to_jsonable(state.config),
        "fingerprint": state.fingerprint,
        "extra": to_jsonable(state.extra),
        "history": _encode(state.history, "history", tensors),
        "best_epoch": state.best_epoch,
        "best_score": _encode(state.best_score, "best_score", tensors),
        "has_best_model": state.best_model is not None,
        "optimizers": _encode(state.optimizers, "optim", tensors),
        "rng": _encode(state.rng, "rng", tensors),
        "callbacks": _encode(state.callbacks, "callbacks", tensors),
    }
    save_checkpoint(target, tensors, meta)
    return target


def load_training_state(path: PathLike) -> TrainingState:
    """Read a training state written by :func:`save_training_state` (tensors on CPU; never unpickles).

    Raises FileNotFoundError when there is none, CheckpointError when the file is not a readable
    dgc_pyro training state (truncated, corrupted, a pickle, a model file, a newer version).
    """
    p = training_state_path(path)
    if not p.is_file():
        raise FileNotFoundError(2, "no training checkpoint found (expected it at this path)", str(p))
    tensors, meta = load_checkpoint(p, map_location="cpu")
    kind = meta.get("kind")
    if kind != _KIND:
        what = "a fitted model (save_model), not a training state" if "model" in meta else "not a training state"
        raise CheckpointError(
            f"{p} is {what}; resume needs the {TRAINING_STATE_FILE} written by fit(checkpoint_dir=...)"
        )
    version = meta.get("state_version")
    if not isinstance(version, int) or version < 1:
        raise CheckpointError(f"{p} is not a valid training state: malformed state_version {version!r}")
    if version > _STATE_VERSION:
        raise CheckpointError(
            f"{p} has training-state version {version}; this dgc_pyro reads up to {_STATE_VERSION}: upgrade dgc_pyro"
        )
    used: set[str] = set()
    try:
        epoch, step = meta["epoch"], meta["global_step"]
        if not (isinstance(epoch, int) and isinstance(step, int) and epoch >= 0 and step >= 0):
            raise ValueError(f"bad epoch/global_step {epoch!r}/{step!r}")
        model = {k[len("model/") :]: v for k, v in tensors.items() if k.startswith("model/")}
        best = {k[len("best_model/") :]: v for k, v in tensors.items() if k.startswith("best_model/")}
        if not model:
            raise ValueError("no model tensors")
        if bool(meta.get("has_best_model")) != bool(best):
            raise ValueError("best-model tensors missing or unexpected")
        history = _decode(meta["history"], tensors, used, "history")
        optimizers = _decode(meta["optimizers"], tensors, used, "optimizers")
        rng = _decode(meta["rng"], tensors, used, "rng")
        best_score = _decode(meta.get("best_score", {"__float__": "-inf"}), tensors, used, "best_score")
        # absent from training states written before callbacks had state
        callbacks = _decode(meta.get("callbacks", {"__dict__": []}), tensors, used, "callbacks")
        if not (isinstance(history, list) and all(isinstance(r, dict) for r in history)):
            raise ValueError("history is not a list of records")
        if not isinstance(optimizers, dict) or not isinstance(rng, dict) or not isinstance(callbacks, dict):
            raise ValueError("optimizer, rng or callback state is not a dict")
        if len(history) != epoch:
            raise ValueError(f"history has {len(history)} records for {epoch} epochs")
        for name in ("config", "model", "extra"):
            if not isinstance(meta.get(name, {}), dict):
                raise ValueError(f"{name} is not a JSON object")
        best_epoch = meta.get("best_epoch")
        if best_epoch is not None and not isinstance(best_epoch, int):
            raise ValueError(f"bad best_epoch {best_epoch!r}")
        if not isinstance(best_score, (int, float)):
            raise ValueError(f"bad best_score {best_score!r}")
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p} is not a valid training state: {type(e).__name__}: {e}") from None
    for key in ("split/train_idx", "split/val_idx"):
        t = tensors.get(key)
        if t is not None and (t.dtype != torch.int64 or t.ndim != 1):
            raise CheckpointError(f"{p} is not a valid training state: {key} must be a 1-D int64 tensor")
    return TrainingState(
        epoch=epoch,
        global_step=step,
        model=model,
        optimizers=optimizers,
        rng=rng,
        history=history,
        best_epoch=best_epoch,
        best_score=float(best_score),
        best_model=best or None,
        train_idx=tensors.get("split/train_idx"),
        val_idx=tensors.get("split/val_idx"),
        config=meta.get("config", {}),
        model_config=meta.get("model", {}),
        fingerprint=str(meta.get("fingerprint", "")),
        extra=meta.get("extra", {}),
        callbacks=callbacks,
    )
