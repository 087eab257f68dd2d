"""Seeding: one call makes Python, NumPy, torch (CPU and CUDA) and Pyro draw the same numbers."""

from __future__ import annotations

import random

import numpy as np
import pyro
import torch


def seed_everything(seed: int) -> None:
    """Seed every random number generator the package draws from."""
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    pyro.set_rng_seed(seed)  # seeds torch (CPU and CUDA) as well
    torch.manual_seed(seed)
