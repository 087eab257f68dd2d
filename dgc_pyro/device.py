"""Device selection: the one place that decides where tensors live.

It sits at the bottom of the package (torch only), so that checkpoint loading, training and prediction all use it
without importing one another.
"""

from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def auto_device() -> torch.device:
    """What ``"auto"`` resolves to: CUDA when available, else CPU (the test suite points it at ``--device``)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` picks CUDA when available, else CPU; ``"cuda"`` without a GPU is an error."""
    if isinstance(device, torch.device):
        resolved = device
    elif device == "auto":
        resolved = auto_device()
    else:
        try:
            resolved = torch.device(device)
        except RuntimeError:
            raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was requested but no CUDA GPU is available; use --device cpu or auto")
    return resolved
