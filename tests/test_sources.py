"""Dataset readers: sklearn digits, real Fashion-MNIST, and tiny MNIST/SVHN/CelebA fixtures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures import write_celeba_fixture, write_mnist_fixture, write_svhn_fixture

from dgc_pyro.data import (
    DATASETS,
    DIGITS_COUNTS,
    PAPER_COUNTS,
    ImageSource,
    dev_indices,
    imbalanced_indices,
    load_imbalanced,
    open_source,
)

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_fashion = pytest.mark.skipif(
    not (SHARED_DATA / "FashionMNIST" / "raw" / "train-images-idx3-ubyte").is_file(),
    reason=f"real Fashion-MNIST files not found under {SHARED_DATA} (see shared/data/README.md)",
)


def _check_images(x: torch.Tensor, n: int, shape: tuple[int, ...]) -> None:
    assert x.dtype == torch.float32
    assert tuple(x.shape) == (n, *shape)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0


def test_datasets_tuple():
    assert DATASETS == ("mnist", "fashion", "svhn", "celeba", "digits")


def test_unknown_name_and_bad_split():
    with pytest.raises(ValueError, match="unknown dataset 'cifar'"):
        open_source("cifar")
    with pytest.raises(ValueError, match="split must be one of"):
        open_source("digits", split="valid")


# --- digits -------------------------------------------------------------------------------------


def test_digits_source():
    tr = open_source("digits", split="train")
    te = open_source("digits", split="test")
    assert isinstance(tr, ImageSource)
    assert len(tr) + len(te) == 1797
    assert len(te) == 500
    assert np.bincount(te.labels).tolist() == [50] * 10
    assert tr.input_shape == (1, 8, 8) and tr.num_classes == 10 and len(tr.class_names) == 10
    assert tr.labels.dtype == np.int64
    x_tr, x_te = tr.images(), te.images()
    _check_images(x_tr, len(tr), (1, 8, 8))
    _check_images(x_te, 500, (1, 8, 8))
    assert float(x_tr.max()) == 1.0  # /16, not /255
    # Train and test are disjoint and together are exactly sklearn's 1797 images (as multisets).
    from sklearn.datasets import load_digits

    d = load_digits()
    ours = np.concatenate([x_tr.numpy().reshape(len(tr), -1), x_te.numpy().reshape(500, -1)]) * 16
    ours = np.round(ours).astype(np.int64)
    ours = np.concatenate([ours, np.concatenate([tr.labels, te.labels])[:, None]], axis=1)
    ref = np.concatenate([d.data.astype(np.int64), d.target[:, None]], axis=1)
    assert np.array_equal(ours[np.lexsort(ours.T[::-1])], ref[np.lexsort(ref.T[::-1])])
    # The held-out test split is fixed, whatever else happens.
    assert np.array_equal(open_source("digits", split="test").labels, te.labels)


def test_digits_images_subset_and_index_errors():
    src = open_source("digits")
    sub = src.images([3, 0, 3])
    assert torch.equal(sub[0], sub[2])
    assert torch.equal(sub[1], src.images(np.array([0]))[0])
    assert src.images([]).shape == (0, 1, 8, 8)
    with pytest.raises(ValueError, match="indices must lie in"):
        src.images([len(src)])
    with pytest.raises(ValueError, match="integers"):
        src.images([0.5])


def test_load_imbalanced_digits():
    s = load_imbalanced("digits", seed=3)
    assert s.train_counts.tolist() == list(DIGITS_COUNTS)
    assert s.x_train.shape == (sum(DIGITS_COUNTS), 1, 8, 8) and s.x_test.shape == (500, 1, 8, 8)
    assert s.y_train.dtype == torch.int64 and s.x_train.dtype == torch.float32
    again = load_imbalanced("digits", seed=3)
    assert torch.equal(s.x_train, again.x_train) and torch.equal(s.y_train, again.y_train)
    other = load_imbalanced("digits", seed=4)
    assert not torch.equal(s.y_train, other.y_train)
    with pytest.raises(ValueError, match="one count for each of the 10 classes"):
        load_imbalanced("digits", counts=(5, 5))
    with pytest.raises(ValueError, match="requested 200"):
        load_imbalanced("digits", counts=(200,) + (5,) * 9)


def test_dev_set_is_balanced_outside_the_subset_and_fixed_by_the_seed():
    src = open_source("digits", split="train")
    subset = imbalanced_indices(src.labels, DIGITS_COUNTS, 3)
    dev = dev_indices(src.labels, subset, 4, 3)
    assert np.bincount(src.labels[dev], minlength=10).tolist() == [4] * 10
    assert not np.isin(dev, subset).any() and len(np.unique(dev)) == len(dev)
    assert np.array_equal(dev, dev_indices(src.labels, subset, 4, 3))
    assert not np.array_equal(dev, dev_indices(src.labels, subset, 4, 4))
    s = load_imbalanced("digits", seed=3, evaluate_on="dev", dev_per_class=4)
    plain = load_imbalanced("digits", seed=3)
    assert torch.equal(s.x_train, plain.x_train) and torch.equal(s.y_train, plain.y_train)  # same subset
    assert torch.equal(s.x_test, src.images(dev)) and torch.equal(s.y_test, torch.from_numpy(src.labels[dev]))
    left = min(np.bincount(np.delete(src.labels, subset), minlength=10))
    with pytest.raises(ValueError, match=f"class .*only {left} are left outside the subset"):
        load_imbalanced("digits", seed=3, evaluate_on="dev", dev_per_class=left + 1)
    with pytest.raises(ValueError, match="evaluate_on must be one of"):
        load_imbalanced("digits", evaluate_on="validation")
    with pytest.raises(ValueError, match="per_class must be"):
        dev_indices(src.labels, subset, 0, 3)


# --- real Fashion-MNIST -------------------------------------------------------------------------


@needs_fashion
def test_fashion_real_files():
    tr = open_source("fashion", SHARED_DATA, split="train")
    te = open_source("fashion", SHARED_DATA, split="test")
    assert len(tr) == 60000 and len(te) == 10000
    assert np.bincount(tr.labels).tolist() == [6000] * 10
    assert np.bincount(te.labels).tolist() == [1000] * 10
    assert tr.input_shape == (1, 28, 28) and tr.class_names[0] == "T-shirt/top"
    _check_images(tr.images([0, 59999]), 2, (1, 28, 28))


@needs_fashion
def test_fashion_load_imbalanced_paper_counts():
    s = load_imbalanced("fashion", root=SHARED_DATA, seed=0)
    assert s.train_counts.tolist() == list(PAPER_COUNTS["fashion"])
    _check_images(s.x_train, sum(PAPER_COUNTS["fashion"]), (1, 28, 28))
    _check_images(s.x_test, 10000, (1, 28, 28))
    assert s.test_counts.tolist() == [1000] * 10
    # The subset is the protocol's, image for image.
    src = open_source("fashion", SHARED_DATA)
    idx = imbalanced_indices(src.labels, PAPER_COUNTS["fashion"], 0)
    assert torch.equal(s.y_train, torch.from_numpy(src.labels[idx]))
    assert torch.equal(s.x_train[:5], src.images(idx[:5]))
    # The dev set: 1000 training images a class, none of them in the subset, and the same subset as before.
    dev = dev_indices(src.labels, idx, 1000, 0)
    assert np.bincount(src.labels[dev]).tolist() == [1000] * 10 and not np.isin(dev, idx).any()
    d = load_imbalanced("fashion", root=SHARED_DATA, seed=0, evaluate_on="dev", dev_per_class=20)
    assert torch.equal(d.y_train, s.y_train) and d.test_counts.tolist() == [20] * 10


# --- MNIST fixture ------------------------------------------------------------------------------


def test_mnist_fixture(tmp_path):
    write_mnist_fixture(tmp_path, per_class=[6, 5, 5, 4, 4, 4, 3, 3, 3, 3], test_per_class=2)
    src = open_source("mnist", tmp_path)
    assert len(src) == 40 and src.class_names == [str(c) for c in range(10)]
    assert np.bincount(src.labels).tolist() == [6, 5, 5, 4, 4, 4, 3, 3, 3, 3]
    counts = (5, 4, 3, 3, 2, 2, 2, 1, 1, 1)
    s = load_imbalanced("mnist", tmp_path, counts=counts, seed=1)
    assert s.train_counts.tolist() == list(counts)
    _check_images(s.x_train, sum(counts), (1, 28, 28))
    _check_images(s.x_test, 20, (1, 28, 28))
    assert s.test_counts.tolist() == [2] * 10
    # Images round-trip the 8-bit values exactly.
    assert torch.allclose(s.x_train * 255, (s.x_train * 255).round(), atol=1e-3)


def test_fashion_fixture_folder_name(tmp_path):
    raw = write_mnist_fixture(tmp_path, per_class=2, dataset="fashion")
    assert raw == tmp_path / "FashionMNIST" / "raw"
    assert len(open_source("fashion", tmp_path, split="test")) == 20
    with pytest.raises(FileNotFoundError):
        open_source("mnist", tmp_path)


def test_missing_files_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        open_source("mnist", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte") in msg
    assert "download=True" in msg and "--download" in msg


def test_missing_root_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        open_source("fashion", root=tmp_path / "nope")
    assert "does not exist" in str(e.value) and "download=True" in str(e.value)


def test_missing_one_file_named(tmp_path):
    raw = write_mnist_fixture(tmp_path, per_class=1)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError) as e:
        open_source("mnist", tmp_path, split="train")
    assert "t10k-labels-idx1-ubyte" in str(e.value)
    assert "train-images" not in str(e.value)


def test_corrupted_file_readable_error(tmp_path):
    raw = write_mnist_fixture(tmp_path, per_class=1)
    (raw / "train-images-idx3-ubyte").write_bytes(b"\x00\x00\x08")
    with pytest.raises(RuntimeError, match="could not read the mnist files"):
        open_source("mnist", tmp_path)


# --- SVHN fixture -------------------------------------------------------------------------------


def test_svhn_fixture(tmp_path):
    write_svhn_fixture(tmp_path, per_class=4, test_per_class=3)
    tr = open_source("svhn", tmp_path, split="train")
    te = open_source("svhn", tmp_path, split="test")
    assert len(tr) == 40 and len(te) == 30
    assert tr.input_shape == (3, 32, 32)
    assert np.bincount(tr.labels).tolist() == [4] * 10  # label 10 became digit 0
    assert tr.labels.min() == 0 and tr.labels.max() == 9
    s = load_imbalanced("svhn", tmp_path, counts=(4, 3, 3, 2, 2, 2, 1, 1, 1, 1), seed=0)
    assert s.train_counts.tolist() == [4, 3, 3, 2, 2, 2, 1, 1, 1, 1]
    _check_images(s.x_train, 20, (3, 32, 32))
    _check_images(s.x_test, 30, (3, 32, 32))


def test_svhn_image_layout(tmp_path):
    """Pixel (h, w, c) of image n in the .mat file is x[n, c, h, w] of the loaded tensor."""
    from scipy.io import loadmat

    folder = write_svhn_fixture(tmp_path, per_class=1)
    mat = loadmat(folder / "train_32x32.mat")
    src = open_source("svhn", tmp_path)
    x = src.images([2])
    expected = torch.from_numpy(np.transpose(mat["X"][..., 2], (2, 0, 1)).astype(np.float32) / 255)
    assert torch.allclose(x[0], expected)
    assert src.labels[2] == int(mat["y"][2, 0]) % 10


def test_svhn_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        open_source("svhn", tmp_path, split="test")
    assert str(tmp_path / "SVHN" / "test_32x32.mat") in str(e.value)
    assert "download=True" in str(e.value)


# --- CelebA fixture -----------------------------------------------------------------------------


def test_celeba_fixture(tmp_path):
    info = write_celeba_fixture(tmp_path, per_class=[4, 3, 2, 2, 2], n_none=3, n_two=3)
    tr = open_source("celeba", tmp_path, split="train")
    va = open_source("celeba", tmp_path, split="valid")
    te = open_source("celeba", tmp_path, split="test")
    assert tr.class_names == ["Blond_Hair", "Black_Hair", "Bald", "Brown_Hair", "Gray_Hair"]
    assert tr.input_shape == (3, 64, 64) and tr.num_classes == 5
    # Images with zero or two hair attributes are excluded; the rest keep file order.
    assert tr.labels.tolist() == info["labels"]["train"]
    assert va.labels.tolist() == info["labels"]["valid"]
    assert te.labels.tolist() == info["labels"]["test"]
    assert np.bincount(tr.labels).tolist() == [4, 3, 2, 2, 2]
    assert len(te) == 10

    x = tr.images(np.arange(len(tr)))
    _check_images(x, len(tr), (3, 64, 64))
    # Centre crop: the red bands above and below the 178x178 face region are gone, and each image
    # is the uniform colour of its class.
    colours = torch.tensor([(40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (200, 40, 200)]) / 255
    for img, lab in zip(x, tr.labels):
        assert torch.allclose(img.mean(dim=(1, 2)), colours[lab], atol=0.03)
        assert torch.allclose(img[:, 0, :].mean(dim=1), colours[lab], atol=0.06)


def test_celeba_load_imbalanced(tmp_path):
    write_celeba_fixture(tmp_path, per_class=3, test_per_class=2)
    s = load_imbalanced("celeba", tmp_path, counts=(3, 2, 2, 1, 1), seed=5)
    assert s.train_counts.tolist() == [3, 2, 2, 1, 1]
    _check_images(s.x_train, 9, (3, 64, 64))
    assert s.test_counts.tolist() == [2] * 5


def test_celeba_missing(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        open_source("celeba", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "celeba" / "list_attr_celeba.txt") in msg
    assert "img_align_celeba" in msg and "download=True" in msg and "--download" in msg


# --- files whose contents are impossible --------------------------------------------------------


def _rewrite_idx_labels(path: Path, labels: list[int]) -> None:
    import struct

    path.write_bytes(struct.pack(">BBBBI", 0, 0, 0x08, 1, len(labels)) + bytes(labels))


@pytest.mark.parametrize("split, prefix", [("train", "train"), ("test", "t10k")])
def test_mnist_more_labels_than_images_names_the_file(tmp_path, split, prefix):
    raw = write_mnist_fixture(tmp_path, per_class=1)
    _rewrite_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", list(range(10)) * 2)
    with pytest.raises(RuntimeError) as e:
        open_source("mnist", tmp_path, split=split)
    assert str(e.value).startswith(
        f"could not read the mnist {split} file {raw / f'{prefix}-labels-idx1-ubyte'}: 20 labels for the 10 images"
    )
    assert "truncated or corrupted" in str(e.value)


def test_mnist_label_outside_the_classes_fails_when_opened(tmp_path):
    raw = write_mnist_fixture(tmp_path, per_class=1)
    _rewrite_idx_labels(raw / "train-labels-idx1-ubyte", [200] + list(range(1, 10)))
    # Before the fix the label 200 was silently left out of every imbalanced subset.
    with pytest.raises(
        RuntimeError, match=r"mnist train file .*train-labels-idx1-ubyte: 1 labels outside 0\.\.9 \(e\.g\. 200\)"
    ):
        load_imbalanced("mnist", tmp_path, counts=[1] * 10)


def _rewrite_svhn(folder: Path, split: str, **changes) -> Path:
    from scipy.io import loadmat, savemat

    path = folder / f"{split}_32x32.mat"
    mat = loadmat(path)
    savemat(path, {"X": changes.get("X", mat["X"]), "y": changes.get("y", mat["y"])})
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda x, y: {"y": np.concatenate([y, y[:5]])}, "y holds 15 labels for the 10 images in X"),
        (lambda x, y: {"y": y[:7]}, "y holds 7 labels for the 10 images in X"),
        (lambda x, y: {"X": x.astype(np.float64) / 255}, "X has dtype float64, expected uint8 pixel values 0..255"),
        (
            lambda x, y: {"y": np.where(np.arange(len(y))[:, None] == 0, 11, y).astype(np.uint8)},
            r"1 labels outside 0..9 (e.g. 11)",
        ),
    ],
    ids=["more labels", "fewer labels", "float pixels", "label 11"],
)
def test_svhn_impossible_contents_name_the_file(tmp_path, change, message):
    from scipy.io import loadmat

    folder = write_svhn_fixture(tmp_path, per_class=1)
    mat = loadmat(folder / "test_32x32.mat")
    path = _rewrite_svhn(folder, "test", **change(mat["X"], mat["y"]))
    with pytest.raises(RuntimeError) as e:
        open_source("svhn", tmp_path, split="test")
    assert str(e.value).startswith(f"could not read the svhn test file {path}: {message}"), str(e.value)


@pytest.mark.parametrize(
    "edit, names, values",
    [
        (lambda header, row: ("image_id " + header, row), 41, 40),
        (lambda header, row: (header.replace("Bald ", ""), row), 39, 40),
        (lambda header, row: (header, row.rsplit(None, 1)[0]), 40, 39),
    ],
    ids=["extra image_id", "a missing name", "a value short in every row"],
)
def test_celeba_header_and_rows_must_agree(tmp_path, edit, names, values):
    info = write_celeba_fixture(tmp_path, per_class=1, valid_per_class=1, test_per_class=1)
    attr = info["folder"] / "list_attr_celeba.txt"
    count, header, *rows = attr.read_text().splitlines()
    edited = [edit(header, row) for row in rows]
    attr.write_text("\n".join([count, edited[0][0], *(row for _, row in edited)]) + "\n")
    with pytest.raises(RuntimeError) as e:
        open_source("celeba", tmp_path)
    assert str(e.value).startswith(
        f"could not read the celeba train file {attr}: its header names {names} attributes but its rows hold {values} values"
    ), str(e.value)


def test_celeba_row_of_another_length_names_the_file_and_line(tmp_path):
    info = write_celeba_fixture(tmp_path, per_class=1, valid_per_class=1, test_per_class=1)
    attr = info["folder"] / "list_attr_celeba.txt"
    lines = attr.read_text().splitlines()
    lines[4] = " ".join(lines[4].split()[:-3])  # the third image's row lost three values
    attr.write_text("\n".join(lines) + "\n")
    with pytest.raises(RuntimeError) as e:
        open_source("celeba", tmp_path)
    assert str(e.value).startswith(
        f"could not read the celeba train file {attr}: line 5 holds 38 fields but the rows before it hold 41"
    ), str(e.value)
