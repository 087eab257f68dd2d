"""Saving and loading fitted DGC models (safetensors; loading never executes code from the file)."""

from __future__ import annotations

import os
from typing import Any

import torch

from dgc_pyro.io import CheckpointError, load_checkpoint, save_checkpoint
from dgc_pyro.models.dgc import DGC


def save_model(path: str | os.PathLike[str], model: DGC, metadata: dict[str, Any] | None = None) -> None:
    """Write ``model``'s weights and config (plus ``metadata``) atomically to ``path``."""
    meta = dict(metadata or {})
    meta["model"] = model.config
    save_checkpoint(path, model.state_dict(), meta)


def load_model(
    path: str | os.PathLike[str], *, map_location: str | torch.device = "cpu", model: DGC | None = None
) -> tuple[DGC, dict[str, Any]]:
    """Rebuild a model from a checkpoint written by :func:`save_model`; returns ``(model, metadata)``.

    Models with custom networks cannot be rebuilt from their config: construct the model yourself and
    pass it as ``model`` to have the weights loaded into it.
    """
    tensors, meta = load_checkpoint(path, map_location=map_location)
    config = meta.get("model")
    if not isinstance(config, dict):
        raise CheckpointError(f"{path} has no model config; it was not written by dgc_pyro.save_model")
    if model is None:
        try:
            model = DGC.from_config(config)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot rebuild the model from its config: {e}") from None
    try:
        result = model.load_state_dict(tensors, strict=False)
    except RuntimeError as e:  # size mismatches
        raise CheckpointError(f"{path} does not match the model architecture: {str(e).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{path} does not match the model architecture: missing {sorted(result.missing_keys)[:5]}, "
            f"unexpected {sorted(result.unexpected_keys)[:5]}"
        )
    return model.to(map_location), meta
