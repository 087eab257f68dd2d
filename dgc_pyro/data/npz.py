"""User data in ``.npz`` files (``np.savez``): a dataset with a training and an optional test split, or examples.

Every problem with a file (missing, truncated, corrupted, a lone ``.npy``, text, pickled objects, missing arrays)
raises a one-line ``FileNotFoundError`` or ``ValueError`` that names the file and says how to write it; the arrays are
then validated by :func:`~dgc_pyro.data.split_from_arrays` (or the caller's ``check_features``).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from pathlib import Path

import numpy as np

from .splits import ImbalancedSplit, split_from_arrays

__all__ = ["NPZ_DATASET_FORMAT", "load_npz", "load_npz_examples", "read_npz"]

#: What an .npz dataset holds, for messages: the arrays :func:`load_npz` reads.
NPZ_DATASET_FORMAT = "an .npz file with arrays x_train, y_train[, x_test, y_test] (written with np.savez)"

_FIX = "write it with np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"


def read_npz(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The named arrays of the ``.npz`` file ``path``, read without ever unpickling.

    Raises FileNotFoundError when there is no such file, ValueError when it is not a readable ``.npz`` archive
    of numeric arrays.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    invalid = f"{path} is not a valid .npz archive"
    try:
        # allow_pickle=False: an .npz is data; a pickle inside would run code when loaded.
        arrays = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        # numpy's message for a non-array file suggests loading it with pickle, which we never do.
        raise ValueError(
            f"{invalid} (not a zip file of .npy arrays: truncated, corrupted or another format); {_FIX}"
        ) from e
    if not isinstance(arrays, np.lib.npyio.NpzFile):
        raise ValueError(f"{invalid}: it holds a single .npy array, not named arrays; {_FIX}")
    with arrays:
        data = {}
        for key in arrays.files:
            try:
                data[key] = arrays[key]
            except ValueError as e:
                # numpy refuses object arrays with a ValueError that mentions allow_pickle; other ValueErrors
                # are damaged .npy headers.
                if "allow_pickle" in str(e):
                    raise ValueError(
                        f"{invalid}: array {key!r} holds Python objects, which are never unpickled; "
                        "store numeric arrays"
                    ) from None
                raise ValueError(f"{invalid}: array {key!r} is unreadable (truncated or corrupted: {e})") from None
            except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
                raise ValueError(f"{invalid}: array {key!r} is unreadable (truncated or corrupted: {e})") from None
    return data


def load_npz(path: str | os.PathLike[str]) -> ImbalancedSplit:
    """The dataset in ``path`` (arrays ``x_train``, ``y_train`` and optionally ``x_test``, ``y_test``) as an
    :class:`~dgc_pyro.data.ImbalancedSplit` named after the file; without test arrays a stratified 20% test set is
    carved from the training arrays (:func:`~dgc_pyro.data.split_from_arrays`, which validates them)."""
    path = Path(path)
    data = read_npz(path)
    if "x_train" not in data or "y_train" not in data:
        raise ValueError(f"{path} must contain arrays x_train and y_train (found {sorted(data)})")
    return split_from_arrays(data["x_train"], data["y_train"], data.get("x_test"), data.get("y_test"), name=path.stem)


def load_npz_examples(path: str | os.PathLike[str], *, name: str | None = None) -> np.ndarray:
    """The examples in ``path``: its array ``x``, or its only array (unvalidated: check them against the model
    with :func:`~dgc_pyro.data.check_features`). ``name`` (default: the path) names the file in messages."""
    data = read_npz(path)
    if "x" in data:
        return data["x"]
    if len(data) == 1:
        return next(iter(data.values()))
    raise ValueError(f"{name or path} must hold an array named 'x' (or a single array); found {sorted(data) or 'none'}")
