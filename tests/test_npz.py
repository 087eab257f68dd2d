"""dgc_pyro.data.load_npz and friends: user data in .npz files, read without unpickling, refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgc_pyro.data import ImbalancedSplit, load_npz, load_npz_examples, read_npz


def _arrays(n_per_class=(6, 4, 3)):
    rng = np.random.default_rng(0)
    y = np.repeat(np.arange(len(n_per_class)), n_per_class)
    return rng.uniform(size=(len(y), 1, 4, 4)).astype(np.float32), y


def test_load_npz_gives_the_split_named_after_the_file(tmp_path):
    x, y = _arrays()
    np.savez(tmp_path / "toy.npz", x_train=x, y_train=y, x_test=x[:3], y_test=y[:3])
    split = load_npz(tmp_path / "toy.npz")
    assert isinstance(split, ImbalancedSplit) and split.name == "toy"
    assert split.input_shape == (1, 4, 4) and split.num_classes == 3 and split.train_counts.tolist() == [6, 4, 3]
    torch.testing.assert_close(split.x_train, torch.from_numpy(x))
    assert split.y_test.tolist() == y[:3].tolist()


def test_load_npz_without_test_arrays_carves_a_test_set(tmp_path):
    x, y = _arrays((10, 10, 10))
    np.savez(tmp_path / "toy.npz", x_train=x, y_train=y)
    split = load_npz(str(tmp_path / "toy.npz"))
    assert len(split.y_train) + len(split.y_test) == 30 and len(split.y_test) > 0


def _write_bad(tmp_path, case):
    path = tmp_path / f"{case}.npz"
    x, y = _arrays()
    if case == "nokeys":
        np.savez(path, a=np.zeros(3))
    elif case == "text":
        path.write_text("x_train,y_train\n0.5,1\n")
    elif case == "single":
        with path.open("wb") as f:
            np.save(f, x)
    elif case == "truncated":
        np.savez(tmp_path / "good.npz", x_train=x, y_train=y)
        good = (tmp_path / "good.npz").read_bytes()
        path.write_bytes(good[: len(good) // 2])
    elif case == "objects":
        np.savez(path, x_train=np.array([{"a": 1}], dtype=object), y_train=y)
    elif case == "pixels":
        np.savez(path, x_train=x * 255, y_train=y)
    return path


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("missing", FileNotFoundError, "missing.npz does not exist"),
        ("nokeys", ValueError, "nokeys.npz must contain arrays x_train and y_train (found ['a'])"),
        ("text", ValueError, "text.npz is not a valid .npz archive (not a zip file of .npy arrays"),
        ("single", ValueError, "single.npz is not a valid .npz archive: it holds a single .npy array"),
        ("truncated", ValueError, "truncated.npz is not a valid .npz archive"),
        ("objects", ValueError, "objects.npz is not a valid .npz archive: array 'x_train' holds Python objects"),
        ("pixels", ValueError, "x_train has values outside [0, 1]"),
    ],
)
def test_load_npz_refuses_bad_files_in_one_line(tmp_path, case, error, message):
    path = _write_bad(tmp_path, case)
    with pytest.raises(error) as info:
        load_npz(path)
    assert message in str(info.value) and len(str(info.value).splitlines()) == 1


def test_load_npz_examples_takes_x_or_the_only_array(tmp_path):
    x, _ = _arrays()
    np.savez(tmp_path / "named.npz", x=x, other=np.zeros(2))
    np.savez(tmp_path / "only.npz", images=x)
    np.savez(tmp_path / "two.npz", a=x, b=x)
    np.testing.assert_array_equal(load_npz_examples(tmp_path / "named.npz"), x)
    np.testing.assert_array_equal(load_npz_examples(tmp_path / "only.npz"), x)
    with pytest.raises(
        ValueError,
        match=r"^--input two\.npz must hold an array named 'x' \(or a single array\); "
        r"found \['a', 'b'\]$",
    ):
        load_npz_examples(tmp_path / "two.npz", name="--input two.npz")
    assert sorted(read_npz(tmp_path / "named.npz")) == ["other", "x"]
