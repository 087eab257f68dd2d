"""Shared test set-up: the device tests run on, small thread pools and paths to the optional real data.

``python -m pytest --device cuda`` runs the suite on the GPU: every fit, baseline and sampler that is not pinned
to a device (``device="auto"``, the package's default) then resolves to the chosen device, and tests that build
tensors themselves take it from the ``device`` fixture. ``--device cpu`` (the default) keeps everything on the
CPU even where a GPU is present; ``--device auto`` picks CUDA when there is one. Tests that pin ``device="cpu"``
check what only holds on CPU (bit-identical replays, for example) and say so.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEVICE_OPTIONS = ("cpu", "cuda", "auto")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--device",
        choices=DEVICE_OPTIONS,
        default="cpu",
        help="device the tests fit and predict on: cpu (default), cuda, or auto (CUDA when present)",
    )


def pytest_configure(config: pytest.Config) -> None:
    # fail before collecting anything: a CUDA run on a machine without a GPU would otherwise fail test by test
    if config.getoption("--device") == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(
            "--device cuda: CUDA not available (torch.cuda.is_available() is False); use --device cpu or auto"
        )


def _chosen_device(config: pytest.Config) -> torch.device:
    name = config.getoption("--device")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


@pytest.fixture(scope="session")
def device(request: pytest.FixtureRequest) -> torch.device:
    """The device chosen with ``--device`` (``auto`` resolved)."""
    return _chosen_device(request.config)


@pytest.fixture(scope="session", autouse=True)
def _auto_means_the_chosen_device(request: pytest.FixtureRequest):
    """``device="auto"`` inside the package resolves to the ``--device`` choice for the whole session."""
    from dgc_pyro import device as device_module

    chosen = _chosen_device(request.config)
    original = device_module.auto_device
    device_module.auto_device = lambda: chosen
    yield chosen
    device_module.auto_device = original


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
