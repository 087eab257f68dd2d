"""Shared test set-up: small thread pools and paths to the optional real data."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real Fashion-MNIST folder beside the checkout; skips when a clone has none."""
    if not (SHARED_DATA / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        pytest.skip(f"real data not available at {SHARED_DATA} (only present on the project's machines)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def digits():
    """The embedded imbalanced digits split."""
    from dgc_pyro.data import load_imbalanced

    return load_imbalanced("digits", seed=0)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny networks run fastest on one thread, above all on a shared machine (opt in per module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
