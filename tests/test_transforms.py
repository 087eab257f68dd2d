"""Training-time batch transforms: what they do to pixels, and how fit / fit_baseline / the CLI use them."""

from __future__ import annotations

import json

import pytest
import torch

from dgc_pyro.baselines import fit_baseline
from dgc_pyro.checkpoint import TRAINING_STATE_FILE
from dgc_pyro.cli import main as cli_main
from dgc_pyro.data import load_imbalanced
from dgc_pyro.data.transforms import (
    TRANSFORM_CHOICES,
    TRANSFORMS,
    random_hflip,
    random_shift,
    resolve_transform,
    shift_flip,
    transform_name,
    transform_option,
)
from dgc_pyro.inference.fit import fit
from dgc_pyro.io import CheckpointError
from dgc_pyro.models.dgc import DGC

pytestmark = pytest.mark.usefixtures("one_thread")

FIT_KW = dict(batch_size=64, progress=False, val_num_samples=2)


def one_dot(n: int, size: int = 9) -> torch.Tensor:
    """``n`` single-channel images, black except one pixel at the centre."""
    x = torch.zeros(n, 1, size, size)
    x[:, 0, size // 2, size // 2] = 1.0
    return x


def dot_positions(x: torch.Tensor) -> torch.Tensor:
    """(n, 2) row/column of each image's one bright pixel."""
    flat = x.flatten(1).argmax(1)
    return torch.stack([flat // x.shape[-1], flat % x.shape[-1]], 1)


def test_random_shift_moves_each_image_by_its_own_bounded_offset():
    x = one_dot(256)
    out = random_shift(x, torch.Generator().manual_seed(0), max_shift=2)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert torch.equal(out.sum((1, 2, 3)), x.sum((1, 2, 3)))  # the dot is moved, never cut (it is central)
    offsets = dot_positions(out) - 4
    assert int(offsets.abs().max()) == 2
    distinct = {tuple(o) for o in offsets.tolist()}
    assert len(distinct) == 25  # every offset in [-2, 2]^2 occurs among 256 draws


def test_random_shift_zero_fills_and_keeps_channels_aligned():
    x = torch.rand(8, 3, 6, 6)
    out = random_shift(x, torch.Generator().manual_seed(1), max_shift=1)
    for i in range(8):
        # Some offset in [-1, 1]^2 reproduces the image exactly on the overlap, with zeros elsewhere.
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                ref = torch.zeros_like(x[i])
                src = x[i][:, max(dy, 0) : 6 + min(dy, 0), max(dx, 0) : 6 + min(dx, 0)]
                ref[:, max(-dy, 0) : 6 + min(-dy, 0), max(-dx, 0) : 6 + min(-dx, 0)] = src
                matches.append(torch.equal(out[i], ref))
        assert sum(matches) == 1, f"image {i} is not a zero-filled translation of its source"


def test_transforms_are_reproducible_from_the_generator():
    x = torch.rand(32, 1, 8, 8)
    a = shift_flip(x, torch.Generator().manual_seed(5))
    b = shift_flip(x, torch.Generator().manual_seed(5))
    c = shift_flip(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(random_shift(x, torch.Generator(), max_shift=0), x)


def test_random_hflip_mirrors_about_half_the_images():
    x = torch.rand(400, 1, 5, 5)
    out = random_hflip(x, torch.Generator().manual_seed(0))
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert bool((same ^ mirrored).all())  # each image is either kept or mirrored, nothing else
    assert 0.4 < mirrored.float().mean().item() < 0.6


def test_resolve_transform_names_the_problem():
    assert resolve_transform(None, (1, 8, 8)) is None and resolve_transform("none", (1, 8, 8)) is None
    assert set(TRANSFORMS) == {"shift", "shift-flip"}
    assert resolve_transform("shift", (1, 8, 8)) is random_shift
    assert TRANSFORM_CHOICES == ("none", "shift", "shift-flip")
    assert transform_option("none") is None and transform_option(None) is None
    assert transform_option("shift-flip") == "shift-flip"
    # "none" and None are one setting, so a checkpoint written with one resumes with the other
    assert transform_name("none") is None and transform_name(None) is None and transform_name("shift") == "shift"

    def mine(x, g):
        return x

    checked = resolve_transform(mine, (64,))
    assert checked.fn is mine and checked.__name__ == "mine" and transform_name(mine) == "mine"
    x = torch.rand(4, 64)
    assert checked(x, torch.Generator()) is x
    with pytest.raises(ValueError, match="one of \\['shift', 'shift-flip'\\], got 'rotate'"):
        resolve_transform("rotate", (1, 8, 8))
    with pytest.raises(ValueError, match="needs inputs shaped \\(C, H, W\\); these are shaped \\(64,\\)"):
        resolve_transform("shift", (64,))


@pytest.mark.parametrize(
    "fn, match",
    [
        (
            lambda x, g: x[:, :32],
            r"must keep the batch's shape \(4, 64\) and dtype torch.float32; it returned shape \(4, 32\)",
        ),
        (lambda x, g: x.double(), r"it returned shape \(4, 64\), dtype torch.float64"),
        (lambda x, g: None, "returned NoneType, not a tensor"),
        (
            lambda x, g: x * 300,
            r"returned values in \[[\d.]+, [\d.]+\]; transformed inputs must stay finite and within \[0, 1\]",
        ),
        (lambda x, g: x * float("nan"), "returned values in \\[nan, nan\\]"),
    ],
)
def test_a_users_transform_that_breaks_the_batch_is_named(fn, match):
    checked = resolve_transform(fn, (64,))
    with pytest.raises(ValueError, match=match):
        checked(torch.rand(4, 64), torch.Generator())


def test_fit_stops_at_a_bad_transform_with_its_name(digits):
    def blow_up(x, g):
        return x * 255

    with pytest.raises(ValueError, match="transform blow_up returned values in"):
        fit(new_model(digits), digits.x_train, digits.y_train, epochs=1, transform=blow_up, progress=False)


@pytest.fixture(scope="module")
def digits():
    return load_imbalanced("digits")


def new_model(d) -> DGC:
    torch.manual_seed(0)
    return DGC(d.input_shape, 10, latent_dim=4)


def test_fit_with_a_transform_is_seeded_and_changes_the_fit(digits):
    fits = []
    for transform in ("shift", "shift", None):
        m = new_model(digits)
        fit(m, digits.x_train, digits.y_train, epochs=2, seed=3, transform=transform, **FIT_KW)
        fits.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
    assert torch.equal(fits[0], fits[1])
    assert not torch.equal(fits[0], fits[2])


def test_fit_transforms_training_batches_only(digits):
    seen: list[tuple[int, ...]] = []

    def spy(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        assert isinstance(generator, torch.Generator)
        seen.append(tuple(x.shape))
        return x

    h = fit(new_model(digits), digits.x_train, digits.y_train, epochs=2, transform=spy, **FIT_KW)
    n_train = len(digits.y_train) - round(0.1 * len(digits.y_train))  # the validation split is never transformed
    batches = -(-n_train // 64)
    assert len(seen) == 2 * batches
    assert all(s[1:] == tuple(digits.input_shape) for s in seen)
    assert sum(s[0] for s in seen) // 2 == n_train
    assert h.config["transform"] == "spy"


def test_resume_refuses_another_transform(digits, tmp_path):
    fit(
        new_model(digits),
        digits.x_train,
        digits.y_train,
        epochs=1,
        transform="shift",
        checkpoint_dir=tmp_path,
        **FIT_KW,
    )
    assert (tmp_path / TRAINING_STATE_FILE).is_file()
    with pytest.raises(CheckpointError, match="transform='shift' in the checkpoint, None now"):
        fit(new_model(digits), digits.x_train, digits.y_train, epochs=2, checkpoint_dir=tmp_path, resume=True, **FIT_KW)


def test_fit_baseline_with_a_transform(digits):
    calls = []

    def spy(x, generator):
        calls.append(len(x))
        return shift_flip(x, generator)

    a = fit_baseline("ce", digits.x_train, digits.y_train, epochs=1, seed=0, transform=spy)
    assert sum(calls) == len(digits.y_train) - round(0.1 * len(digits.y_train))
    b = fit_baseline("ce", digits.x_train, digits.y_train, epochs=1, seed=0, transform=None)
    pa = torch.cat([p.flatten() for p in a.module.parameters()])
    pb = torch.cat([p.flatten() for p in b.module.parameters()])
    assert not torch.equal(pa, pb)
    with pytest.raises(ValueError, match="logistic baseline .* takes no transform"):
        fit_baseline("logistic", digits.x_train, digits.y_train, transform="shift")
    with pytest.raises(ValueError, match="needs inputs shaped"):
        fit_baseline("ce", digits.x_train.flatten(1), digits.y_train, transform="shift")


def test_cli_fit_records_the_transform(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli_main(
        ["fit", "--epochs", "1", "--transform", "shift", "--baseline", "none", "--no-progress", "--out", str(out)]
    )
    assert rc == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["config"]["recipe"]["transform"] == "shift"
    assert metrics["history"]["config"]["transform"] == "shift"
