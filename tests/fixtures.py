"""Tiny on-disk datasets in the exact layouts torchvision reads, for tests and smoke runs.

Images carry a class-dependent pattern (a bright block whose position depends on the class)
plus noise, so a model trained on them for a few steps can beat chance.

Import from a test module as ``from fixtures import write_mnist_fixture`` (pytest puts ``tests/``
on ``sys.path`` because the folder has no ``__init__.py``).
"""

from __future__ import annotations

import importlib.util
import struct
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

import numpy as np

__all__ = [
    "CELEBA_ATTR_NAMES",
    "HAIR_ATTRS",
    "write_celeba_fixture",
    "write_mnist_fixture",
    "write_svhn_fixture",
]


def _per_class(per_class: int | Sequence[int], num_classes: int) -> list[int]:
    if isinstance(per_class, int):
        return [per_class] * num_classes
    counts = list(per_class)
    if len(counts) != num_classes:
        raise ValueError(f"per_class needs {num_classes} entries, got {len(counts)}")
    return counts


def _pattern_images(labels: np.ndarray, h: int, w: int, c: int, num_classes: int, rng) -> np.ndarray:
    """uint8 (n, h, w, c): noise plus a bright block at a class-specific position."""
    imgs = rng.integers(0, 60, size=(len(labels), h, w, c), dtype=np.uint8)
    bh, bw = max(h // 4, 1), max(w // max(num_classes, 1), 1)
    for i, lab in enumerate(labels):
        x0 = int(lab) * bw
        imgs[i, h // 2 - bh // 2 : h // 2 + bh // 2 + 1, x0 : x0 + bw] = 230
    return imgs


def _write_idx(path: Path, arr: np.ndarray) -> None:
    # IDX header: two zero bytes, type code 0x08 (uint8), number of dims; then big-endian dims.
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(header + arr.tobytes())


def write_mnist_fixture(
    root: str | Path,
    per_class: int | Sequence[int] = 5,
    *,
    test_per_class: int | Sequence[int] | None = None,
    dataset: str = "mnist",
    seed: int = 0,
) -> Path:
    """Write ``root/MNIST/raw`` (or ``root/FashionMNIST/raw`` for ``dataset="fashion"``) IDX files.

    Writes all four files torchvision requires (train/t10k images idx3 magic 2051, labels idx1
    magic 2049), 28x28 uint8, shuffled. ``per_class`` may be one int or one count per class.
    Returns the raw folder.
    """
    folder = {"mnist": "MNIST", "fashion": "FashionMNIST"}[dataset]
    raw = Path(root) / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if test_per_class is None:
        test_per_class = per_class
    for prefix, pc in (("train", per_class), ("t10k", test_per_class)):
        counts = _per_class(pc, 10)
        labels = np.repeat(np.arange(10), counts).astype(np.uint8)
        labels = labels[rng.permutation(len(labels))]
        imgs = _pattern_images(labels, 28, 28, 1, 10, rng)[..., 0]
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", imgs)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def write_svhn_fixture(
    root: str | Path,
    per_class: int | Sequence[int] = 5,
    *,
    test_per_class: int | Sequence[int] | None = None,
    seed: int = 0,
) -> Path:
    """Write ``root/SVHN/{train,test}_32x32.mat`` in SVHN's real layout.

    ``X`` is uint8 (32, 32, 3, N), ``y`` is uint8 (N, 1) with label 10 meaning digit 0. Returns
    the folder. Class index c in ``per_class`` is digit c.
    """
    from scipy.io import savemat

    folder = Path(root) / "SVHN"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    if test_per_class is None:
        test_per_class = per_class
    for split, pc in (("train", per_class), ("test", test_per_class)):
        counts = _per_class(pc, 10)
        digits = np.repeat(np.arange(10), counts)
        digits = digits[rng.permutation(len(digits))]
        imgs = _pattern_images(digits, 32, 32, 3, 10, rng)  # (N, H, W, C)
        x = np.ascontiguousarray(np.transpose(imgs, (1, 2, 3, 0)))
        y = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)
        savemat(folder / f"{split}_32x32.mat", {"X": x, "y": y})
    return folder


CELEBA_ATTR_NAMES = [
    "5_o_Clock_Shadow",
    "Arched_Eyebrows",
    "Attractive",
    "Bags_Under_Eyes",
    "Bald",
    "Bangs",
    "Big_Lips",
    "Big_Nose",
    "Black_Hair",
    "Blond_Hair",
    "Blurry",
    "Brown_Hair",
    "Bushy_Eyebrows",
    "Chubby",
    "Double_Chin",
    "Eyeglasses",
    "Goatee",
    "Gray_Hair",
    "Heavy_Makeup",
    "High_Cheekbones",
    "Male",
    "Mouth_Slightly_Open",
    "Mustache",
    "Narrow_Eyes",
    "No_Beard",
    "Oval_Face",
    "Pale_Skin",
    "Pointy_Nose",
    "Receding_Hairline",
    "Rosy_Cheeks",
    "Sideburns",
    "Smiling",
    "Straight_Hair",
    "Wavy_Hair",
    "Wearing_Earrings",
    "Wearing_Hat",
    "Wearing_Lipstick",
    "Wearing_Necklace",
    "Wearing_Necktie",
    "Young",
]
HAIR_ATTRS = ("Blond_Hair", "Black_Hair", "Bald", "Brown_Hair", "Gray_Hair")

# Distinct colours per class for the face region; the 20-pixel bands above and below, which the
# 178x178 centre crop removes, are painted red so a test can tell whether cropping happened.
_CLASS_COLOURS = ((40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200), (200, 40, 200))
_OTHER_COLOUR = (128, 128, 128)
_BAND_COLOUR = (255, 0, 0)


def write_celeba_fixture(
    root: str | Path,
    per_class: int | Sequence[int] = 3,
    *,
    valid_per_class: int | Sequence[int] = 2,
    test_per_class: int | Sequence[int] = 2,
    n_none: int = 2,
    n_two: int = 2,
    seed: int = 0,
) -> dict:
    """Write ``root/celeba`` in the layout torchvision's ``CelebA`` reads.

    Per partition (0 train, 1 valid, 2 test): ``per_class`` images with exactly one hair
    attribute for each of the five classes, plus ``n_none`` images with no hair attribute and
    ``n_two`` with two (both must be excluded by the loader). Files: ``img_align_celeba/*.jpg``
    (178x218 RGB JPEGs), ``list_attr_celeba.txt``, ``list_eval_partition.txt``,
    ``identity_CelebA.txt``, ``list_bbox_celeba.txt``, ``list_landmarks_align_celeba.txt``.

    Returns ``{"folder": Path, "labels": {"train": [...], "valid": [...], "test": [...]}}`` where
    each list holds, in file order, the class index of every kept image of that partition.
    """
    from PIL import Image

    base = Path(root) / "celeba"
    img_dir = base / "img_align_celeba"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    col = {a: CELEBA_ATTR_NAMES.index(a) for a in HAIR_ATTRS}

    rows = []  # (filename, partition, attr vector in {-1, 1}, class or None)
    expected: dict[str, list[int]] = {"train": [], "valid": [], "test": []}
    for part, pname, pc in ((0, "train", per_class), (1, "valid", valid_per_class), (2, "test", test_per_class)):
        items: list[tuple[str, int | None, tuple[str, ...]]] = []
        for c, n in enumerate(_per_class(pc, 5)):
            items += [("one", c, (HAIR_ATTRS[c],))] * n
        items += [("none", None, ())] * n_none
        for k in range(n_two):
            items.append(("two", None, (HAIR_ATTRS[k % 5], HAIR_ATTRS[(k + 1) % 5])))
        order = rng.permutation(len(items))
        for j in order:
            _, c, hair = items[j]
            attrs = np.where(rng.random(40) < 0.3, 1, -1)
            for a in HAIR_ATTRS:
                attrs[col[a]] = 1 if a in hair else -1
            rows.append((f"{len(rows) + 1:06d}.jpg", part, attrs, c))
            if c is not None:
                expected[pname].append(c)

    for fname, _, _, c in rows:
        img = np.zeros((218, 178, 3), dtype=np.uint8)
        img[:, :] = _CLASS_COLOURS[c] if c is not None else _OTHER_COLOUR
        img[:20] = _BAND_COLOUR
        img[-20:] = _BAND_COLOUR
        Image.fromarray(img).save(img_dir / fname, quality=95, subsampling=0)

    n = len(rows)
    with open(base / "list_attr_celeba.txt", "w") as f:
        f.write(f"{n}\n")
        f.write(" ".join(CELEBA_ATTR_NAMES) + " \n")  # the real header line ends with a space
        for fname, _, attrs, _ in rows:
            f.write(fname + " " + " ".join(f"{int(v):2d}" for v in attrs) + "\n")
    with open(base / "list_eval_partition.txt", "w") as f:
        for fname, part, _, _ in rows:
            f.write(f"{fname} {part}\n")
    with open(base / "identity_CelebA.txt", "w") as f:
        for i, (fname, _, _, _) in enumerate(rows):
            f.write(f"{fname} {1 + i % 7}\n")
    with open(base / "list_bbox_celeba.txt", "w") as f:
        f.write(f"{n}\nimage_id x_1 y_1 width height\n")
        for fname, _, _, _ in rows:
            f.write(f"{fname}    95  71 226 313\n")
    with open(base / "list_landmarks_align_celeba.txt", "w") as f:
        f.write(f"{n}\n")
        f.write(
            "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y leftmouth_x leftmouth_y "
            "rightmouth_x rightmouth_y\n"
        )
        for fname, _, _, _ in rows:
            f.write(f"{fname}  69  109  106  113   77  142   73  152  108  154\n")
    return {"folder": base, "labels": expected}


REPO = Path(__file__).resolve().parents[1]


def load_benchmark(name: str) -> ModuleType:
    """Import ``benchmarks/<name>.py`` as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(f"dgc_benchmark_{name}", REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    # Registered before executing so dataclasses and pickling inside the script can resolve the module.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
