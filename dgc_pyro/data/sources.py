"""Readers for the paper's datasets, built on torchvision's dataset classes.

Every reader exposes the labels without decoding images and decodes only the images asked for,
so the imbalanced subset of CelebA (about 17,700 of 160,000 training images) is all that is ever
read from disk.

Folder layout under ``root`` (torchvision's own layout, so ``download=True`` fills it):

- ``mnist``:   ``root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte``
- ``fashion``: ``root/FashionMNIST/raw/...`` (same file names)
- ``svhn``:    ``root/SVHN/{train,test}_32x32.mat`` (``root/svhn/`` and ``root/`` itself are also
  searched, for copies downloaded with ``torchvision.datasets.SVHN(root=...)`` directly)
- ``celeba``:  ``root/celeba/img_align_celeba/*.jpg`` plus ``list_attr_celeba.txt``,
  ``list_eval_partition.txt``, ``identity_CelebA.txt``, ``list_bbox_celeba.txt``,
  ``list_landmarks_align_celeba.txt``
- ``digits``:  bundled with scikit-learn; ``root`` is ignored.

torchvision verifies md5 sums of the SVHN and CelebA files. With ``download=False`` we check only
that the files exist (see ``_SVHN`` / ``_CelebA``): hashing 200 MB on every start is slow, and the
check would reject re-encoded or test copies. With ``download=True`` torchvision's md5 checks apply.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..registry import Registry
from .protocol import DIGITS_COUNTS, PAPER_COUNTS

__all__ = [
    "CELEBA_ATTRIBUTES",
    "DATASETS",
    "DATASET_REGISTRY",
    "DEFAULT_ROOT",
    "DatasetSpec",
    "ImageSource",
    "default_counts",
    "open_source",
]

#: Data folder used when ``root`` is None (relative to the working directory).
DEFAULT_ROOT = Path("data")

#: CelebA's five classes: images with exactly one of these attributes, class index in this order.
CELEBA_ATTRIBUTES: tuple[str, ...] = ("Blond_Hair", "Black_Hair", "Bald", "Brown_Hair", "Gray_Hair")

# CelebA's aligned images are 178x218 (WxH); the usual practice is a central 178x178 crop (the
# face region, dropping background above and below) resized to 64x64.
CELEBA_CROP = 178
CELEBA_SIZE = 64

_DIGITS_TEST_PER_CLASS = 50
_DIGITS_SPLIT_SEED = 0


class ImageSource:
    """One split of one dataset: labels up front, images decoded on demand.

    Attributes: ``name``, ``split``, ``labels`` (int64 numpy array), ``input_shape`` (C, H, W),
    ``num_classes``, ``class_names``. ``images(indices)`` returns a float32 tensor
    ``(n, C, H, W)`` with values in [0, 1].
    """

    def __init__(
        self,
        name: str,
        split: str,
        labels: np.ndarray,
        input_shape: tuple[int, int, int],
        class_names: Sequence[str],
        loader: Callable[[np.ndarray], torch.Tensor],
    ) -> None:
        self.name = name
        self.split = split
        self.labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self._loader = loader
        # The readers check their files' labels with the file's name; this catches any other source.
        problem = _labels_out_of_range(self.labels, self.num_classes)
        if problem:
            raise ValueError(f"{name} {split} split: {problem}")

    @classmethod
    def from_arrays(
        cls, name: str, split: str, x: torch.Tensor, y: Any, class_names: Sequence[str] | None = None
    ) -> ImageSource:
        """A source over images already in memory: ``x`` float ``(n, C, H, W)`` in [0, 1], ``y`` integer labels;
        ``class_names`` default to ``"0"``, ``"1"``, ... up to the largest label (e.g. for a registered dataset's
        reader, docs/extending.md)."""
        images = torch.as_tensor(x, dtype=torch.float32)
        labels = np.asarray(y.cpu() if isinstance(y, torch.Tensor) else y, dtype=np.int64).reshape(-1)
        if images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                f"{name} {split} split: x must be (n, C, H, W) with one label each, got x of shape "
                f"{tuple(images.shape)} and {len(labels)} labels"
            )
        if class_names is None:
            class_names = [str(c) for c in range(int(labels.max()) + 1 if len(labels) else 0)]
        return cls(name, split, labels, tuple(images.shape[1:]), class_names, lambda idx: images[torch.from_numpy(idx)])

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ImageSource(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"input_shape={self.input_shape}, num_classes={self.num_classes})"
        )

    def images(self, indices: Any = None) -> torch.Tensor:
        """Decode the images at ``indices`` (all images when None) as float32 (n, C, H, W) in [0, 1]."""
        if indices is None:
            idx = np.arange(len(self), dtype=np.int64)
        else:
            if isinstance(indices, torch.Tensor):
                indices = indices.detach().cpu().numpy()
            idx = np.asarray(indices)
            if idx.ndim != 1:
                raise ValueError(f"indices must be 1-D, got shape {idx.shape}")
            if idx.size == 0:
                return torch.zeros((0, *self.input_shape), dtype=torch.float32)
            if idx.dtype.kind not in "iu":
                raise ValueError(f"indices must be integers, got dtype {idx.dtype}")
            idx = idx.astype(np.int64)
            if idx.min() < 0 or idx.max() >= len(self):
                raise ValueError(
                    f"indices must lie in 0..{len(self) - 1} for {self.name} {self.split} "
                    f"(got min {idx.min()}, max {idx.max()})"
                )
        if idx.size == 0:
            return torch.zeros((0, *self.input_shape), dtype=torch.float32)
        out = self._loader(idx)
        return out.to(torch.float32).contiguous()


def _missing(name: str, split: str, expected: Sequence[Path], root: Path, extra: str = "") -> FileNotFoundError:
    files = "\n".join(f"  {p}" for p in expected)
    return FileNotFoundError(
        f"{name} ({split} split) not found under {root}. Expected:\n{files}\n"
        f"Get it with open_source({name!r}, root={str(root)!r}, download=True) in Python, "
        f"or pass --download to the dgc-pyro CLI.{extra}"
    )


def _wrap_read_error(name: str, root: Path, download: bool, e: Exception) -> RuntimeError:
    if download:
        return RuntimeError(f"could not download or read {name} into {root}: {e}")
    return RuntimeError(
        f"could not read the {name} files under {root} ({type(e).__name__}: {e}); they may be "
        "truncated or corrupted: delete them and retry with download=True (--download)"
    )


def _bad_file(name: str, split: str, path: Path, problem: str) -> RuntimeError:
    """A dataset file that was read but holds impossible content, in the words of :func:`_wrap_read_error`."""
    return RuntimeError(
        f"could not read the {name} {split} file {path}: {problem}; it may be truncated or corrupted: "
        "delete it and retry with download=True (--download)"
    )


def _labels_out_of_range(labels: np.ndarray, num_classes: int) -> str | None:
    """How many of ``labels`` fall outside ``0..num_classes - 1``, in words (None when none do)."""
    bad = (labels < 0) | (labels >= num_classes)
    if not bad.any():
        return None
    return f"{int(bad.sum())} labels outside 0..{num_classes - 1} (e.g. {int(labels[bad][0])})"


def _check_file_labels(name: str, split: str, path: Path, labels: np.ndarray, num_classes: int) -> None:
    """Labels outside the dataset's classes would fail only after training (test split) or vanish (train split)."""
    problem = _labels_out_of_range(labels, num_classes)
    if problem:
        raise _bad_file(name, split, path, problem)


# ---------------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST


def _open_idx(
    name: str,
    torchvision_name: str,
    root: Path,
    split: str,
    download: bool,
    *,
    class_names: Sequence[str] | None = None,
) -> ImageSource:
    """MNIST-format data read with ``torchvision.datasets.<torchvision_name>``; ``class_names`` default to
    torchvision's."""
    from torchvision import datasets

    cls = getattr(datasets, torchvision_name)
    raw = root / cls.__name__ / "raw"
    # torchvision requires all four raw files even when only one split is read.
    expected = [raw / f"{p}-{kind}" for p in ("train", "t10k") for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    legacy = [root / cls.__name__ / "processed" / f for f in ("training.pt", "test.pt")]
    if not download and not all(p.is_file() for p in expected) and not all(p.is_file() for p in legacy):
        raise _missing(name, split, [p for p in expected if not p.is_file()], root)
    try:
        ds = cls(root=str(root), train=(split == "train"), download=download)
    except Exception as e:
        raise _wrap_read_error(name, root, download, e) from e
    data = ds.data  # uint8 (N, 28, 28); 47 MB for the training split, so kept in memory
    labels = ds.targets.numpy().astype(np.int64)
    class_names = list(class_names) if class_names is not None else list(ds.classes)
    prefix = "train" if split == "train" else "t10k"
    image_file, label_file = raw / f"{prefix}-images-idx3-ubyte", raw / f"{prefix}-labels-idx1-ubyte"
    if not label_file.is_file():  # read from torchvision's legacy processed/*.pt file instead
        image_file = label_file = legacy[0 if split == "train" else 1]
    if tuple(data.shape[1:]) != (28, 28):
        raise _bad_file(name, split, image_file, f"images of size {tuple(data.shape[1:])}, expected (28, 28)")
    if len(labels) != len(data):
        # torchvision reads the two files independently; extra labels would index past the images.
        raise _bad_file(
            name, split, label_file, f"{len(labels)} labels for the {len(data)} images of {image_file.name}"
        )
    _check_file_labels(name, split, label_file, labels, len(class_names))

    def load(idx: np.ndarray) -> torch.Tensor:
        return data[torch.from_numpy(idx)].unsqueeze(1).to(torch.float32).div_(255.0)

    return ImageSource(name, split, labels, (1, 28, 28), class_names, load)


class _OptionalMD5:
    """Mixin for torchvision datasets: md5 integrity checks only when ``verify_md5`` (i.e. on download).

    Subclasses say which files must exist via ``_files_present``; reading stays torchvision's own code.
    """

    def __init__(self, *args: Any, verify_md5: bool = True, **kwargs: Any) -> None:
        # Set before torchvision's __init__, which runs the integrity check.
        self._verify_md5 = verify_md5
        super().__init__(*args, **kwargs)

    def _check_integrity(self) -> bool:
        if self._verify_md5:
            return super()._check_integrity()  # type: ignore[misc]
        return self._files_present()

    def _files_present(self) -> bool:
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------
# SVHN


@functools.cache
def _svhn_class() -> type:
    from torchvision import datasets

    class _SVHN(_OptionalMD5, datasets.SVHN):
        """torchvision's SVHN, checking only that the file exists unless ``verify_md5``.

        The md5 check is the only thing bypassed; reading is torchvision's own code.
        """

        def _files_present(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    return _SVHN


def _open_svhn(root: Path, split: str, download: bool) -> ImageSource:
    fname = f"{split}_32x32.mat"
    candidates = [root / "SVHN", root / "svhn", root]
    folder = next((d for d in candidates if (d / fname).is_file()), None)
    if folder is None:
        if not download:
            raise _missing("svhn", split, [root / "SVHN" / fname], root)
        folder = root / "SVHN"
    try:
        ds = _svhn_class()(root=str(folder), split=split, download=download, verify_md5=download)
    except Exception as e:
        raise _wrap_read_error("svhn", folder, download, e) from e
    data = ds.data  # uint8 (N, 3, 32, 32) view of the .mat array
    # torchvision already maps label 10 to digit 0; reshape undoes its squeeze of a one-example file.
    labels = np.asarray(ds.labels, dtype=np.int64).reshape(-1)
    path = folder / fname
    if tuple(data.shape[1:]) != (3, 32, 32):
        n, c, h, w = data.shape  # torchvision's transpose of X (H, W, C, N) succeeds only on 4-D arrays
        raise _bad_file("svhn", split, path, f"X has shape {(h, w, c, n)}, expected (32, 32, 3, N)")
    if data.dtype != np.uint8:
        # load() divides by 255, which would silently darken float images already scaled to [0, 1].
        raise _bad_file("svhn", split, path, f"X has dtype {data.dtype}, expected uint8 pixel values 0..255")
    if len(labels) != len(data):
        raise _bad_file("svhn", split, path, f"y holds {len(labels)} labels for the {len(data)} images in X")
    _check_file_labels("svhn", split, path, labels, 10)

    def load(idx: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(data[idx])).to(torch.float32).div_(255.0)

    return ImageSource("svhn", split, labels, (3, 32, 32), [str(c) for c in range(10)], load)


# ---------------------------------------------------------------------------------------------
# CelebA

_CELEBA_FILES = (
    "list_attr_celeba.txt",
    "identity_CelebA.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
    "list_eval_partition.txt",
)


@functools.cache
def _celeba_class() -> type:
    from torchvision import datasets

    class _CelebA(_OptionalMD5, datasets.CelebA):
        """torchvision's CelebA, checking only that the files exist unless ``verify_md5``.

        torchvision md5-checks the five annotation files before reading them; that check is the
        only thing bypassed here (``download=True`` keeps it). Parsing is torchvision's own code.
        """

        def _files_present(self) -> bool:
            base = os.path.join(self.root, self.base_folder)
            return all(os.path.isfile(os.path.join(base, f)) for f in _CELEBA_FILES) and os.path.isdir(
                os.path.join(base, "img_align_celeba")
            )

    return _CelebA


def _celeba_transform(img) -> torch.Tensor:
    from torchvision.transforms import functional as F

    img = img.convert("RGB")
    img = F.center_crop(img, [CELEBA_CROP, CELEBA_CROP])
    img = F.resize(img, [CELEBA_SIZE, CELEBA_SIZE], antialias=True)
    return F.pil_to_tensor(img)


def _check_celeba_rows(attr_file: Path, split: str) -> None:
    """Every row of the attribute file must hold as many values as the first: a short or long row would otherwise
    fail inside torchvision's parser, with a message that does not name the file or the line."""
    with open(attr_file, encoding="utf-8", errors="replace") as f:
        lines = f.read().splitlines()[2:]  # the image count, the header, then one row per image
    expected = None
    for number, line in enumerate(lines, start=3):
        n = len(line.split())
        if n == 0:
            continue
        if expected is None:
            expected = n
        elif n != expected:
            raise _bad_file(
                "celeba", split, attr_file, f"line {number} holds {n} fields but the rows before it hold {expected}"
            )


def _open_celeba(root: Path, split: str, download: bool) -> ImageSource:
    from PIL import Image

    base = root / "celeba"
    expected = [base / f for f in _CELEBA_FILES] + [base / "img_align_celeba"]
    if not download:
        missing = [p for p in expected if not p.exists()]
        if missing:
            raise _missing(
                "celeba",
                split,
                missing,
                root,
                extra=" CelebA is hosted on Google Drive (download needs the 'gdown' package and is "
                "often rate-limited); alternatively unpack img_align_celeba.zip and the annotation "
                f"files from the official site into {base}.",
            )
    if (base / "list_attr_celeba.txt").is_file():
        _check_celeba_rows(base / "list_attr_celeba.txt", split)
    try:
        ds = _celeba_class()(root=str(root), split=split, target_type="attr", download=download, verify_md5=download)
    except Exception as e:
        raise _wrap_read_error("celeba", root, download, e) from e

    names = [n for n in ds.attr_names if n]
    attr_file = base / "list_attr_celeba.txt"
    n_values = ds.attr.shape[1] if ds.attr.ndim == 2 else 0
    if len(names) != n_values:
        # Columns are looked up by header position, so a missing or extra name would shift every attribute.
        raise _bad_file(
            "celeba",
            split,
            attr_file,
            f"its header names {len(names)} attributes but its rows hold {n_values} values after the image name",
        )
    try:
        cols = [names.index(a) for a in CELEBA_ATTRIBUTES]
    except ValueError:
        raise RuntimeError(f"{attr_file} lacks one of the attributes {CELEBA_ATTRIBUTES}") from None
    hair = ds.attr[:, cols].numpy()  # (N, 5) in {0, 1}
    if not np.isin(hair, (0, 1)).all():  # torchvision maps the file's -1/1 to 0/1
        raise _bad_file("celeba", split, attr_file, f"hair attributes {CELEBA_ATTRIBUTES} must be -1 or 1")
    keep = np.flatnonzero(hair.sum(axis=1) == 1)
    labels = hair[keep].argmax(axis=1).astype(np.int64)
    files = [ds.filename[i] for i in keep]
    img_dir = base / "img_align_celeba"

    def load(idx: np.ndarray) -> torch.Tensor:
        out = torch.empty((len(idx), 3, CELEBA_SIZE, CELEBA_SIZE), dtype=torch.uint8)
        for j, i in enumerate(idx):
            path = img_dir / files[i]
            try:
                with Image.open(path) as img:
                    out[j] = _celeba_transform(img)
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"CelebA image {path} is listed in list_eval_partition.txt but missing; "
                    "unpack img_align_celeba.zip completely (or use download=True / --download)"
                ) from None
        return out.to(torch.float32).div_(255.0)

    return ImageSource("celeba", split, labels, (3, CELEBA_SIZE, CELEBA_SIZE), list(CELEBA_ATTRIBUTES), load)


# ---------------------------------------------------------------------------------------------
# sklearn digits


def _digits_split() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    images = (d.images / 16.0).astype(np.float32)
    labels = d.target.astype(np.int64)
    # A fixed, balanced held-out test set, independent of the protocol seed, so that every
    # imbalanced training subset is scored on the same 500 images.
    rng = np.random.default_rng(_DIGITS_SPLIT_SEED)
    test = np.sort(
        np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:_DIGITS_TEST_PER_CLASS] for c in range(10)])
    )
    train = np.setdiff1d(np.arange(len(labels)), test)
    return images, labels, train, test


def _open_digits(root: Path, split: str, download: bool) -> ImageSource:
    """sklearn's bundled digits (``root`` and ``download`` are unused)."""
    images, labels, train, test = _digits_split()
    sel = train if split == "train" else test
    x = torch.from_numpy(images[sel]).unsqueeze(1)

    def load(idx: np.ndarray) -> torch.Tensor:
        return x[torch.from_numpy(idx)]

    return ImageSource("digits", split, labels[sel], (1, 8, 8), [str(c) for c in range(10)], load)


# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# The dataset registry

#: A dataset's reader: ``open(root, split, download) -> ImageSource`` (``root`` is a Path; see :func:`open_source`).
DatasetOpener = Callable[[Path, str, bool], ImageSource]


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of :data:`DATASET_REGISTRY`: its reader and what the package needs to know about it.

    Attributes:
        open: the reader (:data:`DatasetOpener`); it returns an :class:`ImageSource` of one split, decoding images
            only on demand (:meth:`ImageSource.from_arrays` wraps tensors already in memory).
        input_shape: ``(C, H, W)`` of its images; :func:`open_source` checks the reader against it.
        num_classes: its number of classes, likewise checked.
        default_counts: the per-class training counts of the imbalanced subset when none are given
            (:func:`default_counts`), one per class.
        splits: the splits ``open`` accepts (CelebA adds ``"valid"``).
        bundled: the data ships with a package (sklearn's digits): ``root`` is not needed and not checked.
    """

    open: DatasetOpener
    input_shape: tuple[int, ...]
    num_classes: int
    default_counts: tuple[int, ...]
    splits: tuple[str, ...] = ("train", "test")
    bundled: bool = False

    def __post_init__(self) -> None:
        if len(self.default_counts) != self.num_classes:
            raise ValueError(f"default_counts gives {len(self.default_counts)} counts for {self.num_classes} classes")


_DIGIT_NAMES = tuple(str(c) for c in range(10))

#: The datasets :func:`open_source`, :func:`~dgc_pyro.data.load_imbalanced` and ``dgc-pyro --dataset`` accept, by
#: name (lower case; aliases such as ``fashion-mnist`` resolve to their entry).
DATASET_REGISTRY: Registry[DatasetSpec] = Registry("dataset")
DATASET_REGISTRY.register(
    "mnist",
    DatasetSpec(
        functools.partial(_open_idx, "mnist", "MNIST", class_names=_DIGIT_NAMES), (1, 28, 28), 10, PAPER_COUNTS["mnist"]
    ),
)
DATASET_REGISTRY.register(
    "fashion",
    DatasetSpec(functools.partial(_open_idx, "fashion", "FashionMNIST"), (1, 28, 28), 10, PAPER_COUNTS["fashion"]),
    aliases=("fashion-mnist", "fashion_mnist", "fashionmnist"),
)
DATASET_REGISTRY.register(
    "svhn", DatasetSpec(_open_svhn, (3, 32, 32), 10, PAPER_COUNTS["svhn"]), aliases=("svnh",)
)  # the reference code's spelling
DATASET_REGISTRY.register(
    "celeba",
    DatasetSpec(
        _open_celeba,
        (3, CELEBA_SIZE, CELEBA_SIZE),
        len(CELEBA_ATTRIBUTES),
        PAPER_COUNTS["celeba"],
        splits=("train", "valid", "test"),
    ),
)
DATASET_REGISTRY.register("digits", DatasetSpec(_open_digits, (1, 8, 8), 10, DIGITS_COUNTS, bundled=True))

#: The built-in names (frozen at import; :meth:`DATASET_REGISTRY.names() <dgc_pyro.registry.Registry.names>` also
#: lists added ones).
DATASETS: tuple[str, ...] = DATASET_REGISTRY.names()


def _normalize_name(name: str) -> str:
    if not isinstance(name, str):
        raise ValueError(f"dataset name must be a string, one of {', '.join(DATASET_REGISTRY.names())}; got {name!r}")
    key = name.strip()
    key = key if key in DATASET_REGISTRY else key.lower()
    if key not in DATASET_REGISTRY:
        raise DATASET_REGISTRY.unknown(name)  # names what was given, before the case folding
    return DATASET_REGISTRY.canonical(key)


def default_counts(dataset: str) -> tuple[int, ...]:
    """The per-class training counts of ``dataset`` when none are given (:attr:`DatasetSpec.default_counts`):
    paper Table 1, or ``DIGITS_COUNTS`` for digits."""
    return DATASET_REGISTRY.get(_normalize_name(dataset)).default_counts


def open_source(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    split: str = "train",
    download: bool = False,
) -> ImageSource:
    """Open one split ("train" or "test"; CelebA also "valid") of a registered dataset without decoding images.

    ``root`` defaults to ``./data``. Nothing is downloaded unless ``download=True``; missing
    files raise ``FileNotFoundError`` naming the expected paths.
    """
    key = _normalize_name(name)
    spec = DATASET_REGISTRY.get(key)
    if split not in spec.splits:
        raise ValueError(f"split must be one of {spec.splits} for {key}, got {split!r}")
    root_path = (Path(root) if root is not None else DEFAULT_ROOT).expanduser()
    if not spec.bundled:
        if download:
            root_path.mkdir(parents=True, exist_ok=True)
        elif not root_path.is_dir():
            raise FileNotFoundError(
                f"data root {root_path.absolute()} does not exist (looking for {key} {split} data). Point root= "
                f"at the folder holding the data, or get it with "
                f"open_source({key!r}, root={str(root_path)!r}, download=True) in Python / --download on the CLI."
            )
    source = spec.open(root_path, split, download)
    # A registered reader that disagrees with its entry would fail far from here (a network built for the wrong
    # shape, counts for the wrong number of classes).
    if tuple(source.input_shape) != tuple(spec.input_shape) or source.num_classes != spec.num_classes:
        raise ValueError(
            f"dataset {key!r}: its reader returned {tuple(source.input_shape)} images with {source.num_classes} "
            f"classes, but it is registered with {tuple(spec.input_shape)} and {spec.num_classes}"
        )
    return source
