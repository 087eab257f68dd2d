"""Writing a :class:`~dgc_pyro.inference.predict.Prediction` to disk: ``predictions.npz`` and ``predictions.csv``.

One home for the files ``dgc-pyro predict`` writes, so that a script gets the same columns as the command line.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dgc_pyro.inference.predict import Prediction
from dgc_pyro.io import PathLike, atomic_write_bytes, atomic_write_text

__all__ = ["PREDICTION_FILES", "prediction_columns", "write_predictions"]

#: the files :func:`write_predictions` writes into its folder
PREDICTION_FILES = ("predictions.npz", "predictions.csv")


def prediction_columns(pred: Prediction) -> dict[str, np.ndarray]:
    """The per-example columns of ``pred`` as numpy arrays: label, the uncertainty scores, the density and, when
    the model has them, the OOD score and flag and the reject mask (the class probabilities are separate)."""
    columns = {
        "label": pred.labels,
        "entropy": pred.entropy,
        "mutual_information": pred.mutual_information,
        "expected_entropy": pred.expected_entropy,
    }
    if pred.log_density is not None:
        columns["log_density"] = pred.log_density
    if pred.ood is not None:
        columns.update(ood_score=pred.ood_score, ood=pred.ood)
    if pred.rejected is not None:
        columns["rejected"] = pred.rejected
    return {k: v.detach().cpu().numpy() for k, v in columns.items()}


def write_predictions(pred: Prediction, out: PathLike, class_names: Sequence[str] | None = None) -> tuple[Path, Path]:
    """Write ``pred`` to ``out/predictions.npz`` (``proba``, ``class_names`` and every column) and
    ``out/predictions.csv`` (one row per example: index, the columns, ``p_<class>``); returns the two paths.

    Both files are built in memory first and each is written atomically, so a failure leaves no half-written file.
    """
    columns = prediction_columns(pred)
    proba = pred.proba.detach().cpu().numpy()
    names = [str(n) for n in (class_names if class_names is not None else range(proba.shape[1]))]
    if len(names) != proba.shape[1]:
        raise ValueError(f"class_names has {len(names)} names for {proba.shape[1]} classes")
    buf = io.BytesIO()
    np.savez_compressed(buf, proba=proba, class_names=np.array(names), **columns)
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["index", *columns, *(f"p_{name}" for name in names)])
    for i in range(len(proba)):
        row = [columns[k][i] for k in columns]
        writer.writerow(
            [
                i,
                *(int(v) if isinstance(v, (np.bool_, np.integer)) else f"{v:.6g}" for v in row),
                *(f"{p:.6g}" for p in proba[i]),
            ]
        )
    folder = Path(out)
    npz_path, csv_path = folder / PREDICTION_FILES[0], folder / PREDICTION_FILES[1]
    atomic_write_bytes(npz_path, buf.getvalue())
    atomic_write_text(csv_path, table.getvalue())
    return npz_path, csv_path
