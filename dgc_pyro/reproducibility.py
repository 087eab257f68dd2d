"""Seeding, capturing/restoring every random number generator, and deterministic-algorithm mode.

* :func:`seed_everything` makes Python, NumPy, torch (CPU and CUDA) and Pyro draw the same numbers.
* :func:`get_rng_state` / :func:`set_rng_state` snapshot and restore all of them (plus an optional
  ``torch.Generator``, e.g. the one that orders the training data), so that a resumed fit draws
  exactly the numbers the uninterrupted fit would have drawn. The snapshot holds only tensors and
  JSON-able values, so it can be stored without pickle (see :mod:`dgc_pyro.checkpoint`).
* :func:`deterministic_mode` turns on ``torch.use_deterministic_algorithms`` and cuDNN's
  deterministic mode for the duration of a block (see ``docs/reliability.md`` for what that does and
  does not guarantee on CUDA).
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import pyro
import torch

__all__ = ["deterministic_mode", "get_rng_state", "seed_everything", "set_rng_state"]

#: Values of ``CUBLAS_WORKSPACE_CONFIG`` that make cuBLAS deterministic (CUDA >= 10.2).
CUBLAS_DETERMINISTIC_CONFIGS = (":4096:8", ":16:8")


def seed_everything(seed: int) -> None:
    """Seed every random number generator the package draws from."""
    seed = int(seed)
    random.seed(seed)
    # pyro.set_rng_seed also seeds NumPy's legacy generator, which takes only 0 .. 2**32 - 1.
    pyro.set_rng_seed(seed % 2**32)  # seeds torch (CPU and CUDA) as well
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state(generator: torch.Generator | None = None) -> dict[str, Any]:
    """Snapshot of the Python, NumPy, torch CPU and CUDA generators (and ``generator`` if given).

    Returns a dict of CPU tensors and JSON-able values (no numpy arrays, no tuples of objects):
    ``"python"`` (``random.getstate()`` as nested lists), ``"numpy"`` (the legacy global
    ``np.random`` MT19937 state as a dict), ``"torch"`` (ByteTensor), ``"cuda"`` (list of ByteTensors,
    one per visible device; empty when CUDA has not been initialised in this process) and
    ``"generator"`` (ByteTensor or None).
    """
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state(legacy=False)
    return {
        "python": [int(version), [int(v) for v in internal], gauss],
        "numpy": {
            "bit_generator": str(np_state["bit_generator"]),
            "key": [int(v) for v in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        # Only when CUDA is in use: querying it would otherwise initialise CUDA (on every GPU).
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_initialized() else [],
        "generator": generator.get_state() if generator is not None else None,
    }


def set_rng_state(state: Mapping[str, Any], generator: torch.Generator | None = None) -> list[str]:
    """Restore a snapshot taken by :func:`get_rng_state`.

    Raises ValueError when the snapshot is malformed. Returns a list of human-readable notes about
    parts that could not be restored exactly (a CUDA state saved on another machine, a data-order
    generator saved on another device type); the caller decides whether to warn.
    """
    notes: list[str] = []
    try:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(v) for v in internal), gauss))
        np_state = state["numpy"]
        np.random.set_state(
            {
                "bit_generator": np_state["bit_generator"],
                "state": {"key": np.asarray(np_state["key"], dtype=np.uint32), "pos": int(np_state["pos"])},
                "has_gauss": int(np_state["has_gauss"]),
                "gauss": float(np_state["gauss"]),
            }
        )
        torch.set_rng_state(_byte_tensor(state["torch"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"malformed random number generator state: {type(e).__name__}: {e}") from None
    # No CUDA states: CUDA was not in use when the snapshot was taken, so there is nothing to restore.
    cuda_states = state.get("cuda") or []
    if cuda_states and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda_states])
        else:
            # Fewer/more GPUs than when saved: restore what matches, the rest keeps its state.
            for i, s in enumerate(cuda_states[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(_byte_tensor(s), i)
            notes.append(
                f"the snapshot holds {len(cuda_states)} CUDA generator states, this machine has "
                f"{torch.cuda.device_count()} GPUs"
            )
    elif cuda_states:
        notes.append("the snapshot holds CUDA generator states, but CUDA is not available here")
    if generator is not None:
        saved = state.get("generator")
        if saved is None:
            notes.append("the snapshot holds no data-order generator state")
        else:
            try:
                generator.set_state(_byte_tensor(saved))
            except (RuntimeError, ValueError, TypeError):
                # A CPU generator state does not fit a CUDA generator and vice versa.
                notes.append(f"the data-order generator state does not fit a {generator.device.type} generator")
    return notes


def _byte_tensor(value: Any) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"expected a uint8 tensor, got {type(value).__name__}")
    return value.detach().to("cpu", torch.uint8).contiguous()


@contextlib.contextmanager
def deterministic_mode(enabled: bool = True) -> Iterator[None]:
    """Within the block, make torch choose deterministic algorithms; restore the previous settings after.

    Turns on ``torch.use_deterministic_algorithms(True, warn_only=True)`` (operations without a
    deterministic implementation warn instead of failing), ``torch.backends.cudnn.deterministic`` and
    turns off ``cudnn.benchmark``. When CUDA is available and ``CUBLAS_WORKSPACE_CONFIG`` is not set to
    a deterministic value it is set to ``":4096:8"`` for the block; that only takes effect if cuBLAS
    has not yet been initialised in this process (set it in the environment before starting Python to
    be sure). ``enabled=False`` is a no-op, so callers can write ``with deterministic_mode(flag):``.
    """
    if not enabled:
        yield
        return
    previous = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cudnn.deterministic,
        torch.backends.cudnn.benchmark,
    )
    env_before = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if torch.cuda.is_available() and env_before not in CUBLAS_DETERMINISTIC_CONFIGS:
        if env_before is not None:
            warnings.warn(
                f"CUBLAS_WORKSPACE_CONFIG={env_before!r} does not make cuBLAS deterministic; using ':4096:8' "
                "for this fit",
                stacklevel=3,
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic = previous[2]
        torch.backends.cudnn.benchmark = previous[3]
        if os.environ.get("CUBLAS_WORKSPACE_CONFIG") != env_before:
            if env_before is None:
                os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
            else:
                os.environ["CUBLAS_WORKSPACE_CONFIG"] = env_before
