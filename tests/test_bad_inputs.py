"""Bad inputs at every public entry point: the API raises ValueError / FileNotFoundError (CheckpointError is
a ValueError) with a message that starts as listed; the CLI prints one line ``dgc-pyro <cmd>: error: ...``,
exits with status 2, shows no traceback and writes nothing.

The tables of cases below are also the table in ``docs/reliability.md``: ``python tests/test_bad_inputs.py``
prints it, and :func:`test_docs_table_is_generated_from_these_cases` fails when the two drift apart.
Hypothesis property tests at the end cover validators and protocol behaviour not covered by
``test_validation.py`` / ``test_protocol.py``.
"""

from __future__ import annotations

import calendar
import json
import os
import pickle
import re
import struct
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from fixtures import write_mnist_fixture
from hypothesis import given, settings
from hypothesis import strategies as st

from dgc_pyro.baselines import fit_baseline
from dgc_pyro.checkpoint import TRAINING_STATE_FILE, load_model, save_model
from dgc_pyro.cli import main
from dgc_pyro.data import (
    check_features,
    check_xy,
    imbalanced_indices,
    load_imbalanced,
    parse_counts,
    split_from_arrays,
    stratified_holdout,
)
from dgc_pyro.inference.augment import augment
from dgc_pyro.inference.density import fit_ood_threshold
from dgc_pyro.inference.fit import fit
from dgc_pyro.inference.posterior import posterior_log_densities, posterior_predictive
from dgc_pyro.inference.predict import predict, predict_proba
from dgc_pyro.inference.pretrain import pretrain_encoder
from dgc_pyro.io import CheckpointError, load_checkpoint, save_checkpoint
from dgc_pyro.metrics import imbalance_report
from dgc_pyro.models.dgc import DGC

DOCS = Path(__file__).resolve().parents[1] / "docs" / "reliability.md"

_RNG = np.random.default_rng(0)
X = _RNG.random((12, 1, 8, 8)).astype(np.float32)
Y = np.array([0, 1, 2] * 4)


def _with(arr: np.ndarray, index: tuple, value: float) -> np.ndarray:
    out = arr.copy()
    out[index] = value
    return out


@dataclass(frozen=True)
class Case:
    entry: str  # the entry point, as shown in the docs table
    what: str  # the bad input, in words
    call: Callable[[Any], Any]  # call(ctx) -> must raise
    error: type[BaseException]
    prefix: str  # the message starts with this; "{tmp}" stands for the test's temporary folder


def _fit(ctx, x=X, y=Y, **kw):
    return fit(ctx.model, x, y, **{"epochs": 1, "progress": False, **kw})


def _crop(x, generator):
    return x[..., :4, :4]


def _to_255(x, generator):
    return x * 255


def _fit_baseline(**kw):
    return fit_baseline("ce", X, Y, **{"epochs": 1, **kw})


API_CASES = [
    # fit: features
    Case(
        "fit",
        "x without the channel axis",
        lambda c: _fit(c, x=X[:, 0]),
        ValueError,
        "x has the wrong shape: expected (n, 1, 8, 8), got (12, 8, 8); add the channel dimension",
    ),
    Case(
        "fit",
        "x with 3 channels instead of 1",
        lambda c: _fit(c, x=np.repeat(X, 3, axis=1)),
        ValueError,
        "x has the wrong shape: expected (n, 1, 8, 8), got (12, 3, 8, 8)",
    ),
    Case(
        "fit",
        "x channels-last (n, H, W, C)",
        lambda c: _fit(c, x=X.transpose(0, 2, 3, 1)),
        ValueError,
        "x has the wrong shape: expected (n, 1, 8, 8), got (12, 8, 8, 1); this looks like channels-last",
    ),
    Case(
        "fit",
        "x flattened (n, 64)",
        lambda c: _fit(c, x=X.reshape(12, 64)),
        ValueError,
        "x has the wrong shape: expected (n, 1, 8, 8), got (12, 64); reshape it to (n, 1, 8, 8)",
    ),
    Case(
        "fit",
        "x of strings",
        lambda c: _fit(c, x=np.full((12, 1, 8, 8), "a")),
        ValueError,
        "x must be numeric (bool, int or float), got non-numeric dtype <U1",
    ),
    Case(
        "fit",
        "x as 8-bit pixels (uint8 0..255)",
        lambda c: _fit(c, x=(X * 255).astype(np.uint8)),
        ValueError,
        "x holds integer values in [",
    ),
    Case(
        "fit", "x as float pixels 0..255", lambda c: _fit(c, x=X * 255), ValueError, "x has values outside [0, 1]: min="
    ),
    Case(
        "fit", "x with negative values", lambda c: _fit(c, x=X - 0.5), ValueError, "x has values outside [0, 1]: min="
    ),
    Case(
        "fit",
        "x with a NaN",
        lambda c: _fit(c, x=_with(X, (0, 0, 0, 0), np.nan)),
        ValueError,
        "x contains non-finite values: 1 NaN and 0 infinite",
    ),
    Case(
        "fit",
        "x with an inf",
        lambda c: _fit(c, x=_with(X, (0, 0, 0, 0), np.inf)),
        ValueError,
        "x contains non-finite values: 0 NaN and 1 infinite",
    ),
    Case("fit", "empty x and y", lambda c: _fit(c, x=X[:0], y=Y[:0]), ValueError, "x is empty (shape (0, 1, 8, 8))"),
    Case(
        "fit",
        "x and y of different lengths",
        lambda c: _fit(c, y=Y[:11]),
        ValueError,
        "x and y have different lengths: x has 12 examples, y has 11 labels",
    ),
    # fit: labels
    Case(
        "fit",
        "fractional labels",
        lambda c: _fit(c, y=_with(Y.astype(float), (0,), 0.5)),
        ValueError,
        "y contains 1 non-integer values (e.g. 0.5)",
    ),
    Case(
        "fit",
        "a NaN label",
        lambda c: _fit(c, y=_with(Y.astype(float), (0,), np.nan)),
        ValueError,
        "y contains 1 NaN or infinite values",
    ),
    Case(
        "fit",
        "a label >= num_classes",
        lambda c: _fit(c, y=_with(Y, (0,), 3)),
        ValueError,
        "y contains 1 labels >= num_classes=3 (max 3)",
    ),
    Case(
        "fit",
        "a negative label",
        lambda c: _fit(c, y=_with(Y, (0,), -1)),
        ValueError,
        "y contains 1 negative labels (min -1)",
    ),
    Case(
        "fit",
        "uint64 labels >= 2**63",
        lambda c: _fit(c, y=_with(Y.astype(np.uint64), (0,), 2**63)),
        ValueError,
        "y holds uint64 values up to 9223372036854775808, beyond the int64 range",
    ),
    Case(
        "fit",
        "string labels",
        lambda c: _fit(c, y=np.array(["a", "b", "c"] * 4)),
        ValueError,
        "y must be numeric (bool, int or float), got non-numeric dtype",
    ),
    Case(
        "fit",
        "one-hot labels (n, C)",
        lambda c: _fit(c, y=np.eye(3)[Y]),
        ValueError,
        "y must be a 1-D array of class indices, got 2-D shape (12, 3); if these are one-hot rows",
    ),
    Case(
        "fit",
        "a class with no training example",
        lambda c: _fit(c, y=np.array([0, 1] * 6)),
        ValueError,
        "classes [2] have no examples in y",
    ),
    Case(
        "fit",
        "a single class",
        lambda c: _fit(c, y=np.zeros(12, int)),
        ValueError,
        "y contains only one distinct class (0)",
    ),
    # fit: settings
    Case("fit", "epochs=0", lambda c: _fit(c, epochs=0), ValueError, "epochs must be positive and finite, got 0"),
    Case("fit", "lr=nan", lambda c: _fit(c, lr=float("nan")), ValueError, "lr must be positive and finite, got nan"),
    Case(
        "fit", "batch_size=2.5", lambda c: _fit(c, batch_size=2.5), ValueError, "batch_size must be an integer, got 2.5"
    ),
    Case(
        "fit",
        "val_fraction=1.0",
        lambda c: _fit(c, val_fraction=1.0),
        ValueError,
        "val_fraction must be in [0, 1), got 1.0",
    ),
    Case(
        "fit",
        "perturbation_rate=-1",
        lambda c: _fit(c, perturbation_rate=-1),
        ValueError,
        "perturbation_rate must be a finite number >= 0, got -1",
    ),
    Case(
        "fit",
        "an unknown perturbation_prior",
        lambda c: _fit(c, perturbation_prior="uniform"),
        ValueError,
        "perturbation_prior must be one of ('train', 'perturbed'), got 'uniform'",
    ),
    Case(
        "fit",
        "perturbation_start=1.0",
        lambda c: _fit(c, perturbation_start=1.0),
        ValueError,
        "perturbation_start must be in [0, 1), got 1.0",
    ),
    Case(
        "fit",
        "a perturbation_start after the last epoch",
        lambda c: _fit(c, epochs=4, perturbation_start=0.9),
        ValueError,
        "perturbation_start=0.9 starts the perturbation step at epoch 5, after the last epoch",
    ),
    Case(
        "fit",
        "retrain_head_epochs=epochs",
        lambda c: _fit(c, epochs=2, retrain_head_epochs=2),
        ValueError,
        "retrain_head_epochs=2 leaves no epoch of the main fit (epochs=2)",
    ),
    Case(
        "fit",
        "a swag_start whose window is after the last epoch",
        lambda c: _fit(c, epochs=4, swag_start=0.9),
        ValueError,
        "swag_start=0.9 starts the SWAG window at epoch 5, after the last epoch (4): it would collect nothing",
    ),
    Case("fit", "swag_samples=0", lambda c: _fit(c, swag_samples=0), ValueError, "swag_samples must be positive"),
    Case(
        "fit",
        "SWAG of a class-conditional model (no label head)",
        lambda c: fit(
            DGC((1, 8, 8), 3, latent_dim=2, latent_prior="class_conditional", label_in_guide=False, shrinkage=0.0),
            X,
            Y,
            epochs=1,
            progress=False,
            perturbation_rate=0.0,
            swag_start=0.0,
        ),
        ValueError,
        "swag_start=0.0 needs a label head p(y | z), which a model with latent_prior='class_conditional' does not have",
    ),
    Case(
        "fit",
        "an unknown perturbation_noise",
        lambda c: _fit(c, perturbation_noise="class"),
        ValueError,
        "perturbation_noise must be one of ('own', 'head'), got 'class'",
    ),
    Case(
        "fit",
        "perturbation_noise='head' with devices=2",
        lambda c: _fit(c, perturbation_noise="head", devices=2),
        ValueError,
        "retrain_head_epochs and perturbation_noise='head' are not supported in data-parallel fits",
    ),
    Case(
        "fit",
        "an unknown lr_schedule",
        lambda c: _fit(c, lr_schedule="linear"),
        ValueError,
        "lr_schedule must be one of ('constant', 'cosine'), got 'linear'",
    ),
    Case("fit", "seed=-1", lambda c: _fit(c, seed=-1), ValueError, "seed must be a non-negative integer, got -1"),
    Case("fit", "an unknown engine", lambda c: _fit(c, engine="jax"), ValueError, "engine must be one of"),
    Case(
        "fit",
        "warmup_steps=-1",
        lambda c: _fit(c, warmup_steps=-1),
        ValueError,
        "warmup_steps must be a non-negative integer, got -1",
    ),
    Case(
        "fit",
        "engine='graph' with devices=2",
        lambda c: _fit(c, engine="graph", devices=2),
        ValueError,
        "data-parallel fitting supports engine='torch' only, not engine='graph'",
    ),
    Case("fit", "an unknown objective", lambda c: _fit(c, objective="foo"), ValueError, "unknown objective 'foo'"),
    Case("fit", "x_val without y_val", lambda c: _fit(c, x_val=X), ValueError, "pass both x_val and y_val, or neither"),
    Case(
        "fit",
        "resume=True without checkpoint_dir",
        lambda c: _fit(c, resume=True),
        ValueError,
        "resume=True needs checkpoint_dir",
    ),
    Case(
        "fit",
        "resume_from a folder without checkpoint",
        lambda c: _fit(c, resume_from=c.tmp / "nowhere"),
        FileNotFoundError,
        "[Errno 2] no training checkpoint found (expected it at this path): '{tmp}/nowhere/training_state.safetensors'",
    ),
    Case(
        "fit",
        "checkpoint_dir that is a file",
        lambda c: _fit(c, checkpoint_dir=c.tmp / "model.safetensors"),
        ValueError,
        "checkpoint_dir {tmp}/model.safetensors exists and is not a folder",
    ),
    Case(
        "fit",
        "checkpoint_dir below a file",
        lambda c: _fit(c, checkpoint_dir=c.tmp / "model.safetensors" / "ckpt"),
        ValueError,
        "checkpoint_dir {tmp}/model.safetensors/ckpt cannot be created: {tmp}/model.safetensors is a file",
    ),
    Case(
        "fit",
        "checkpoint_every=0",
        lambda c: _fit(c, checkpoint_every=0),
        ValueError,
        "checkpoint_every must be positive and finite, got 0",
    ),
    Case(
        "fit",
        "resume_from a pickle",
        lambda c: _fit(c, resume_from=c.tmp / "evil.pt"),
        CheckpointError,
        "{tmp}/evil.pt is not a valid dgc_pyro checkpoint: not a safetensors file or truncated/corrupted",
    ),
    Case(
        "fit",
        "a transform that changes the shape",
        lambda c: _fit(c, transform=_crop),
        ValueError,
        "transform _crop must keep the batch's shape (9, 1, 8, 8) and dtype torch.float32; it returned shape "
        "(9, 1, 4, 4)",
    ),
    Case(
        "fit",
        "a transform that returns 0..255 pixels",
        lambda c: _fit(c, transform=_to_255),
        ValueError,
        "transform _to_255 returned values in [0",
    ),
    # baselines: the same protocol checks as fit
    Case(
        "fit_baseline",
        "epochs=0",
        lambda c: _fit_baseline(epochs=0),
        ValueError,
        "epochs must be positive and finite, got 0",
    ),
    Case(
        "fit_baseline",
        "batch_size=0",
        lambda c: _fit_baseline(batch_size=0),
        ValueError,
        "batch_size must be positive and finite, got 0",
    ),
    Case(
        "fit_baseline",
        "epochs=1.5",
        lambda c: _fit_baseline(epochs=1.5),
        ValueError,
        "epochs must be an integer, got 1.5",
    ),
    Case("fit_baseline", "lr=-1", lambda c: _fit_baseline(lr=-1), ValueError, "lr must be positive and finite, got -1"),
    Case(
        "fit_baseline",
        "seed=-1",
        lambda c: _fit_baseline(seed=-1),
        ValueError,
        "seed must be a non-negative integer, got -1",
    ),
    Case(
        "fit_baseline",
        "val_fraction=1.5",
        lambda c: _fit_baseline(val_fraction=1.5),
        ValueError,
        "val_fraction must be in [0, 1), got 1.5",
    ),
    Case(
        "fit_baseline", "an unknown baseline", lambda c: fit_baseline("svm", X, Y), ValueError, "unknown baseline 'svm'"
    ),
    Case(
        "fit_baseline",
        "a class with no examples",
        lambda c: fit_baseline("ce", X, Y, num_classes=4),
        ValueError,
        "classes [3] have no examples in y",
    ),
    # posterior draws and densities
    Case(
        "posterior_log_densities",
        "z with the wrong latent size",
        lambda c: posterior_log_densities(c.model, X, Y, torch.zeros(2, 12, 5)),
        ValueError,
        "z must have shape (S, N=12, k=2), got (2, 12, 5)",
    ),
    Case(
        "posterior_log_densities",
        "NaN in z",
        lambda c: posterior_log_densities(c.model, X, Y, torch.full((2, 12, 2), float("nan"))),
        ValueError,
        "z contains 48 NaN or infinite values",
    ),
    Case(
        "posterior_log_densities",
        "y shorter than x",
        lambda c: posterior_log_densities(c.model, X, Y[:5], torch.zeros(2, 12, 2)),
        ValueError,
        "x has 12 examples but y has 5 labels",
    ),
    Case(
        "posterior_predictive",
        "num_samples=2.5",
        lambda c: posterior_predictive(c.model, X, num_samples=2.5),
        ValueError,
        "num_samples must be an integer, got 2.5",
    ),
    # encoder pre-training
    Case(
        "pretrain_encoder",
        "steps=-1",
        lambda c: pretrain_encoder(c.model, X, Y, steps=-1),
        ValueError,
        "steps must be a non-negative integer, got -1",
    ),
    Case(
        "pretrain_encoder",
        "batch_size=1",
        lambda c: pretrain_encoder(c.model, X, Y, steps=1, batch_size=1),
        ValueError,
        "batch_size must be at least 2 (a covariance needs two draws), got 1",
    ),
    Case(
        "pretrain_encoder",
        "lr=0",
        lambda c: pretrain_encoder(c.model, X, Y, steps=1, lr=0),
        ValueError,
        "lr must be positive and finite, got 0",
    ),
    # augmentation
    Case(
        "augment",
        "an unknown sampling_strategy",
        lambda c: augment(c.model, X, Y, sampling_strategy="more"),
        ValueError,
        "sampling_strategy must be one of ('auto', 'minority', 'not majority', 'not minority', 'all'), a float, "
        "a dict of target counts or a callable, got 'more'",
    ),
    Case(
        "augment",
        "x flattened (n, 64)",
        lambda c: augment(c.model, X.reshape(12, 64), Y),
        ValueError,
        "x has the wrong shape: expected (n, 1, 8, 8), got (12, 64)",
    ),
    # prediction
    Case(
        "predict",
        "x flattened (n, 64)",
        lambda c: predict(c.model, X.reshape(12, 64)),
        ValueError,
        "x has the wrong shape: expected (n, 1, 8, 8), got (12, 64)",
    ),
    Case(
        "predict",
        "x with a NaN",
        lambda c: predict(c.model, _with(X, (1, 0, 2, 2), np.nan)),
        ValueError,
        "x contains non-finite values: 1 NaN and 0 infinite",
    ),
    Case(
        "predict",
        "num_samples=0",
        lambda c: predict(c.model, X, 0),
        ValueError,
        "num_samples must be an integer >= 1, got 0",
    ),
    Case(
        "predict",
        "num_samples=2.5",
        lambda c: predict(c.model, X, 2.5),
        ValueError,
        "num_samples must be an integer >= 1, got 2.5",
    ),
    Case(
        "predict",
        "num_samples=10**9 (a result too big for memory)",
        lambda c: predict(c.model, X, 10**9),
        ValueError,
        "num_samples=1000000000 is too many for 12 examples: the (12, 3, 3000000000) log weights",
    ),
    Case(
        "predict",
        "density_samples=0",
        lambda c: predict(c.model, X, 2, density_samples=0),
        ValueError,
        "density_samples must be an integer >= 1, got 0",
    ),
    Case(
        "predict",
        "an unknown reject rule",
        lambda c: predict(c.model, X, 2, reject="energy"),
        ValueError,
        "reject must be one of ('entropy', 'density', 'both') or None, got 'energy'",
    ),
    Case(
        "predict",
        'reject="density" without an OOD detector',
        lambda c: predict(c.model, X, 2, reject="density"),
        ValueError,
        'reject="density" needs the calibrated OOD flag: the model has no OOD detector',
    ),
    Case(
        "fit_ood_threshold",
        "false_alarm=1.5",
        lambda c: fit_ood_threshold(c.model, X, 1.5),
        ValueError,
        "false_alarm must be a rate strictly between 0 and 1, got 1.5",
    ),
    Case(
        "fit_ood_threshold",
        "too few held-out images for the rate",
        lambda c: fit_ood_threshold(c.model, X, 0.05),
        ValueError,
        "x_dev has 12 images; a false-alarm rate of 0.05 needs at least 20 held-out",
    ),
    Case("predict_proba", "empty x", lambda c: predict_proba(c.model, X[:0]), ValueError, "x is empty"),
    Case(
        "predict_proba",
        "x as float pixels 0..255",
        lambda c: predict_proba(c.model, X * 255),
        ValueError,
        "x has values outside [0, 1]",
    ),
    Case(
        "predict_proba",
        "a model that is not a DGC",
        lambda c: predict_proba("model.safetensors", X),
        TypeError,
        "model must be a dgc_pyro.models.DGC, got str",
    ),
    # model construction
    Case(
        "DGC",
        "input_shape=None",
        lambda c: DGC(None, 3),
        ValueError,
        "input_shape must be a non-empty tuple of positive ints, got None",
    ),
    Case(
        "DGC",
        "input_shape with a zero",
        lambda c: DGC((1, 0, 8), 3),
        ValueError,
        "input_shape must be a non-empty tuple of positive ints, got (1, 0, 8)",
    ),
    Case("DGC", "num_classes=1", lambda c: DGC((1, 8, 8), 1), ValueError, "num_classes must be an integer >= 2, got 1"),
    Case(
        "DGC",
        "num_classes=2.5",
        lambda c: DGC((1, 8, 8), 2.5),
        ValueError,
        "num_classes must be an integer >= 2, got 2.5",
    ),
    Case(
        "DGC",
        "latent_dim=0",
        lambda c: DGC((1, 8, 8), 3, latent_dim=0),
        ValueError,
        "latent_dim must be a positive integer, got 0",
    ),
    Case("DGC", "an unknown preset", lambda c: DGC((1, 8, 8), 3, preset="huge"), ValueError, "preset must be one of"),
    Case(
        "DGC",
        "an unknown likelihood",
        lambda c: DGC((1, 8, 8), 3, likelihood="poisson"),
        ValueError,
        "likelihood must be one of",
    ),
    Case(
        "DGC",
        "obs_scale=0",
        lambda c: DGC((1, 8, 8), 3, obs_scale=0),
        ValueError,
        "obs_scale must be a positive finite number, got 0",
    ),
    Case(
        "DGC",
        "a class prior of the wrong length",
        lambda c: DGC((1, 8, 8), 3, class_prior=[5, 1]),
        ValueError,
        "class_prior must have one entry per class (3), got shape (2,)",
    ),
    Case(
        "DGC",
        "a class prior with an empty class",
        lambda c: DGC((1, 8, 8), 3, class_prior=[5, 0, 1]),
        ValueError,
        "class_prior entries must be positive and finite",
    ),
    Case(
        "DGC",
        "logit_adjustment=-1",
        lambda c: DGC((1, 8, 8), 3, class_prior=[5, 2, 1], logit_adjustment=-1.0),
        ValueError,
        "logit_adjustment must be a finite number >= 0, got -1.0",
    ),
    # metrics
    Case(
        "imbalance_report",
        "y_true and y_pred of different lengths",
        lambda c: imbalance_report([0, 1, 2], [0, 1]),
        ValueError,
        "y_true and y_pred have different lengths (3 vs 2)",
    ),
    Case("imbalance_report", "empty labels", lambda c: imbalance_report([], []), ValueError, "y_true is empty"),
    Case(
        "imbalance_report",
        "fractional labels",
        lambda c: imbalance_report([0, 1.5], [0, 1]),
        ValueError,
        "y_true must hold integer class labels, got non-integer floats",
    ),
    Case(
        "imbalance_report",
        "a prediction outside num_classes",
        lambda c: imbalance_report([0, 1, 2], [0, 1, 5], num_classes=3),
        ValueError,
        "y_pred contains label 5 outside [0, 3)",
    ),
    Case(
        "imbalance_report",
        "a single class without num_classes",
        lambda c: imbalance_report([0, 0], [0, 0]),
        ValueError,
        "only one class label occurs in the data",
    ),
    Case(
        "imbalance_report",
        "a label of 10**12 without num_classes",
        lambda c: imbalance_report([0, 1, 10**12], [0, 1, 1]),
        ValueError,
        "y_true and y_pred have labels up to 1000000000000, which would mean 1000000000001 classes for 3 "
        "examples (at most 1000 are inferred)",
    ),
    Case(
        "imbalance_report",
        "negative train_counts",
        lambda c: imbalance_report([0, 1], [0, 1], train_counts=[5, -1]),
        ValueError,
        "train_counts must hold finite non-negative numbers",
    ),
    # checkpoints
    Case(
        "load_model",
        "a missing file",
        lambda c: load_model(c.tmp / "missing.safetensors"),
        FileNotFoundError,
        "[Errno 2] checkpoint file not found: '{tmp}/missing.safetensors'",
    ),
    Case(
        "load_model",
        "a folder without model.safetensors",
        lambda c: load_model(c.tmp / "empty"),
        FileNotFoundError,
        "[Errno 2] {tmp}/empty is a folder without model.safetensors",
    ),
    Case(
        "load_model",
        "a truncated file",
        lambda c: load_model(c.tmp / "truncated.safetensors"),
        CheckpointError,
        "{tmp}/truncated.safetensors is not a valid dgc_pyro checkpoint: not a safetensors file or truncated/corrupted",
    ),
    Case(
        "load_model",
        "a pickle / torch.save file",
        lambda c: load_model(c.tmp / "evil.pt"),
        CheckpointError,
        "{tmp}/evil.pt is not a valid dgc_pyro checkpoint: not a safetensors file or truncated/corrupted",
    ),
    Case(
        "load_model",
        "weights of another architecture",
        lambda c: load_model(c.tmp / "model.safetensors", model=DGC((1, 8, 8), 3, latent_dim=3)),
        CheckpointError,
        "{tmp}/model.safetensors does not match the model architecture: ",
    ),
    Case(
        "load_model",
        "weights with a NaN (corrupted tensor data)",
        lambda c: load_model(c.tmp / "nanweights.safetensors"),
        CheckpointError,
        "{tmp}/nanweights.safetensors is not a valid dgc_pyro checkpoint: tensor ",
    ),
    Case(
        "load_model",
        "map_location='gpu0'",
        lambda c: load_model(c.tmp / "model.safetensors", map_location="gpu0"),
        ValueError,
        "device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got 'gpu0'",
    ),
    # data
    Case(
        "split_from_arrays",
        "a label of 10**12",
        lambda c: split_from_arrays(X, _with(Y, (0,), 10**12)),
        ValueError,
        "y_train has labels up to 1000000000000, which imply 1000000000001 classes, but y_train has only 12 labels",
    ),
    Case(
        "split_from_arrays",
        "a test class missing from training",
        lambda c: split_from_arrays(X, Y, X[:1], [3]),
        ValueError,
        "classes [3] have no examples in y_train",
    ),
    Case(
        "split_from_arrays",
        "channels-last images (n, H, W, 3)",
        lambda c: split_from_arrays(np.repeat(X, 3, axis=1).transpose(0, 2, 3, 1), Y),
        ValueError,
        "x_train has shape (12, 8, 8, 3), which looks like channels-last (n, H, W, C) images; store them as "
        "(n, C, H, W) = (n, 3, 8, 8), e.g. x_train.transpose(0, 3, 1, 2)",
    ),
    Case(
        "split_from_arrays",
        "one example of each class and no test set",
        lambda c: split_from_arrays(X[:3], Y[:3]),
        ValueError,
        "x_train and y_train are too small to split: each of the 3 classes has a single example, so no "
        "test set can be carved from them; carving one needs at least 2 examples of a class, and 3 of every class",
    ),
    Case(
        "load_imbalanced",
        "more examples than a class has",
        lambda c: load_imbalanced("digits", counts=[500] + [5] * 9),
        ValueError,
        "class 0: requested 500 examples but only 128 are available",
    ),
    Case(
        "load_imbalanced",
        "counts for 3 of 10 classes",
        lambda c: load_imbalanced("digits", counts=[5, 5, 5]),
        ValueError,
        "counts must give one count for each of the 10 classes of digits, got 3 entries",
    ),
    Case(
        "load_imbalanced",
        "a class count of 0",
        lambda c: load_imbalanced("digits", counts=[5] * 9 + [0]),
        ValueError,
        "counts must be >= 1 for every class; classes [9] have [0]",
    ),
    Case(
        "load_imbalanced",
        "an unknown dataset",
        lambda c: load_imbalanced("cifar"),
        ValueError,
        "unknown dataset 'cifar'; choose one of",
    ),
    Case(
        "load_imbalanced",
        "a missing data folder",
        lambda c: load_imbalanced("mnist", c.tmp / "nodata"),
        FileNotFoundError,
        "data root {tmp}/nodata does not exist (looking for mnist train data)",
    ),
    Case(
        "load_imbalanced",
        "an incomplete MNIST folder",
        lambda c: load_imbalanced("mnist", c.tmp / "partial"),
        FileNotFoundError,
        "mnist (train split) not found under {tmp}/partial. Expected:\n  {tmp}/partial/MNIST/raw/",
    ),
    Case(
        "load_imbalanced",
        "an unknown evaluation set",
        lambda c: load_imbalanced("digits", evaluate_on="val"),
        ValueError,
        "evaluate_on must be one of ('test', 'dev'), got 'val'",
    ),
    Case(
        "load_imbalanced",
        "a dev set larger than the unused images",
        lambda c: load_imbalanced("digits", evaluate_on="dev", dev_per_class=100),
        ValueError,
        "class 0: a dev set of 100 a class needs 100 unused training examples, but only 8 are left outside the subset",
    ),
]


@dataclass(frozen=True)
class CliCase:
    what: str
    argv: list[str]  # "{tmp}" is replaced; "--out {out}" is added to fit/evaluate
    prefix: str  # after "dgc-pyro <cmd>: error: "
    patch: Callable[[pytest.MonkeyPatch], None] | None = None  # a fault the machine would cause, injected


def _refuse_writes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read-only folder (chmod cannot make one for root, who runs the tests): creating any file is refused."""

    def refuse(directory, name):
        raise PermissionError(13, "Permission denied", str(Path(directory) / name))

    monkeypatch.setattr("dgc_pyro.io._create_temp", refuse)


def _full_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    """A file system with 1000 bytes free."""
    monkeypatch.setattr(
        "dgc_pyro.io.shutil.disk_usage", lambda path: SimpleNamespace(total=10**9, used=10**9 - 1000, free=1000)
    )


CLI_CASES = [
    CliCase(
        "more examples than a class has",
        ["fit", "--counts", "500,5,5,5,5,5,5,5,5,5"],
        "class 0: requested 500 examples but only 128 are available",
    ),
    CliCase(
        "counts for 3 of 10 classes",
        ["fit", "--counts", "5,5,5"],
        "counts must give one count for each of the 10 classes of digits, got 3 entries",
    ),
    CliCase(
        "counts that are not numbers",
        ["fit", "--counts", "a,b"],
        "argument --counts: counts entry 0 ('a') is not an integer",
    ),
    CliCase("--epochs 0", ["fit", "--epochs", "0"], "--epochs must be at least 1"),
    CliCase("--epochs x", ["fit", "--epochs", "x"], "argument --epochs: invalid int value: 'x'"),
    CliCase("--lr -1", ["fit", "--lr", "-1", "--epochs", "1"], "lr must be positive and finite, got -1.0"),
    CliCase("an unknown dataset", ["fit", "--dataset", "cifar"], "unknown dataset 'cifar'; choose one of"),
    CliCase(
        "a missing data folder",
        ["fit", "--dataset", "mnist", "--data-dir", "{tmp}/nodata"],
        "data root {tmp}/nodata does not exist",
    ),
    CliCase(
        "an incomplete MNIST folder",
        ["fit", "--dataset", "mnist", "--data-dir", "{tmp}/partial"],
        "mnist (train split) not found under {tmp}/partial. Expected: {tmp}/partial/MNIST/raw/",
    ),
    CliCase("a missing .npz file", ["fit", "--dataset", "{tmp}/missing.npz"], "{tmp}/missing.npz does not exist"),
    CliCase(
        ".npz without x_train",
        ["fit", "--dataset", "{tmp}/nokeys.npz"],
        "{tmp}/nokeys.npz must contain arrays x_train and y_train",
    ),
    CliCase(
        ".npz with a NaN pixel",
        ["fit", "--dataset", "{tmp}/nan.npz"],
        "x_train contains non-finite values: 1 NaN and 0 infinite",
    ),
    CliCase(
        ".npz with 0..255 pixels", ["fit", "--dataset", "{tmp}/pixels255.npz"], "x_train has values outside [0, 1]"
    ),
    CliCase(
        ".npz with fractional labels",
        ["fit", "--dataset", "{tmp}/fraclabels.npz"],
        "y_train contains 1 non-integer values",
    ),
    CliCase(
        ".npz with a single class",
        ["fit", "--dataset", "{tmp}/oneclass.npz"],
        "y_train contains only one distinct class (0)",
    ),
    CliCase(
        "a truncated .npz",
        ["fit", "--dataset", "{tmp}/truncated.npz"],
        "{tmp}/truncated.npz is not a valid .npz archive (not a zip file of .npy arrays",
    ),
    CliCase(
        ".npz with a flipped byte",
        ["fit", "--dataset", "{tmp}/flipped.npz"],
        "{tmp}/flipped.npz is not a valid .npz archive: array 'x_train' is unreadable (truncated or corrupted",
    ),
    CliCase(
        "a .npy file named .npz",
        ["fit", "--dataset", "{tmp}/single.npz"],
        "{tmp}/single.npz is not a valid .npz archive: it holds a single .npy array",
    ),
    CliCase(
        "a text file named .npz",
        ["fit", "--dataset", "{tmp}/text.npz"],
        "{tmp}/text.npz is not a valid .npz archive (not a zip file of .npy arrays",
    ),
    CliCase(
        ".npz with a label of 10**12",
        ["fit", "--dataset", "{tmp}/hugelabel.npz"],
        "y_train has labels up to 1000000000000, which imply 1000000000001 classes, but y_train has only 12 labels",
    ),
    CliCase(
        ".npz with uint64 labels >= 2**63",
        ["fit", "--dataset", "{tmp}/uint64.npz"],
        "y_train holds uint64 values up to 9223372036854775808, beyond the int64 range",
    ),
    CliCase(
        ".npz whose test set has a class missing from training",
        ["fit", "--dataset", "{tmp}/testclass.npz"],
        "classes [3] have no examples in y_train",
    ),
    CliCase(
        "--counts with an .npz",
        ["fit", "--dataset", "{tmp}/good.npz", "--counts", "2,2,2"],
        "--counts applies only to the built-in datasets",
    ),
    CliCase(
        "--download and --data-dir with an .npz",
        ["fit", "--dataset", "{tmp}/good.npz", "--download", "--data-dir", "{tmp}"],
        "--download, --data-dir apply only to the built-in datasets",
    ),
    CliCase(
        "an MNIST test label of 200",
        ["fit", "--dataset", "mnist", "--data-dir", "{tmp}/mnistlabel", "--counts", "1,1,1,1,1,1,1,1,1,1"],
        "could not read the mnist test file {tmp}/mnistlabel/MNIST/raw/t10k-labels-idx1-ubyte: 1 labels outside 0..9 "
        "(e.g. 200)",
    ),
    CliCase(
        "MNIST train labels longer than the images",
        ["fit", "--dataset", "mnist", "--data-dir", "{tmp}/mnistlong", "--counts", "1,1,1,1,1,1,1,1,1,1"],
        "could not read the mnist train file {tmp}/mnistlong/MNIST/raw/train-labels-idx1-ubyte: 15 labels for the 10 "
        "images of train-images-idx3-ubyte",
    ),
    CliCase("--seed -1", ["fit", "--seed", "-1"], "argument --seed: must be an integer from 0 to 4294967295, got '-1'"),
    CliCase(
        "--seed beyond 2**32 - 1",
        ["fit", "--seed", "18446744073709551616"],
        "argument --seed: must be an integer from 0 to 4294967295, got '18446744073709551616'",
    ),
    CliCase(
        "--out that is a file",
        ["fit", "--out", "{tmp}/model.safetensors"],
        "--out {tmp}/model.safetensors exists and is not a folder",
    ),
    CliCase(
        "--out below a file",
        ["fit", "--out", "{tmp}/model.safetensors/run"],
        "--out {tmp}/model.safetensors/run cannot be created: {tmp}/model.safetensors is a file",
    ),
    CliCase(
        "a fresh fit into an interrupted fit's --out",
        ["fit", "--out", "{tmp}/badrun"],
        "--out {tmp}/badrun holds an interrupted fit ({tmp}/badrun/checkpoint/training_state.safetensors is newer "
        "than any metrics.json); continue it with 'dgc-pyro fit --resume {tmp}/badrun'",
    ),
    CliCase(
        "--resume of a missing folder", ["fit", "--resume", "{tmp}/nowhere"], "--resume {tmp}/nowhere: no such folder"
    ),
    CliCase(
        "--resume with a damaged checkpoint",
        ["fit", "--resume", "{tmp}/badrun"],
        "{tmp}/badrun/checkpoint/training_state.safetensors is not a valid dgc_pyro checkpoint",
    ),
    CliCase(
        "--resume with a changed recipe",
        ["fit", "--resume", "{tmp}/badrun", "--lr", "0.1"],
        "--resume takes the data and recipe from the checkpoint; drop --lr",
    ),
    CliCase(
        "--resume with a changed weight choice",
        ["fit", "--resume", "{tmp}/badrun", "--keep", "last"],
        "--resume takes the data and recipe from the checkpoint; drop --keep",
    ),
    CliCase(
        "predict an input of another shape",
        [
            "predict",
            "--checkpoint",
            "{tmp}/model.safetensors",
            "--input",
            "{tmp}/pred_shape.npz",
            "--out",
            "{tmp}/predout",
        ],
        "--input {tmp}/pred_shape.npz has the wrong shape: expected (n, 1, 8, 8), got (12, 64)",
    ),
    CliCase(
        "predict an input with a NaN",
        [
            "predict",
            "--checkpoint",
            "{tmp}/model.safetensors",
            "--input",
            "{tmp}/pred_nan.npz",
            "--out",
            "{tmp}/predout",
        ],
        "--input {tmp}/pred_nan.npz contains non-finite values",
    ),
    CliCase(
        "predict an empty input",
        [
            "predict",
            "--checkpoint",
            "{tmp}/model.safetensors",
            "--input",
            "{tmp}/pred_empty.npz",
            "--out",
            "{tmp}/predout",
        ],
        "--input {tmp}/pred_empty.npz is empty",
    ),
    CliCase(
        "evaluate a missing checkpoint",
        ["evaluate", "--checkpoint", "{tmp}/missing.safetensors"],
        "[Errno 2] checkpoint file not found: '{tmp}/missing.safetensors'",
    ),
    CliCase(
        "evaluate a pickle",
        ["evaluate", "--checkpoint", "{tmp}/evil.pt"],
        "{tmp}/evil.pt is not a valid dgc_pyro checkpoint",
    ),
    CliCase(
        "evaluate a truncated checkpoint",
        ["evaluate", "--checkpoint", "{tmp}/truncated.safetensors"],
        "{tmp}/truncated.safetensors is not a valid dgc_pyro checkpoint",
    ),
    CliCase(
        "evaluate a checkpoint with NaN weights",
        ["evaluate", "--checkpoint", "{tmp}/nanweights.safetensors"],
        "{tmp}/nanweights.safetensors is not a valid dgc_pyro checkpoint: tensor ",
    ),
    CliCase(
        "evaluate a checkpoint whose run configuration is a list",
        ["evaluate", "--checkpoint", "{tmp}/cfglist.safetensors"],
        "{tmp}/cfglist.safetensors: its run configuration is unusable (a list, not a mapping)",
    ),
    CliCase(
        "evaluate a checkpoint with counts=5 in its run configuration",
        ["evaluate", "--checkpoint", "{tmp}/cfgcounts.safetensors"],
        "{tmp}/cfgcounts.safetensors: its run configuration is unusable (counts must be a list of integers, got 5)",
    ),
    # issue 19: a new user's first hour
    CliCase(
        ".npz with channels-last images (n, 8, 8, 3)",
        ["fit", "--dataset", "{tmp}/channelslast.npz"],
        "x_train has shape (12, 8, 8, 3), which looks like channels-last (n, H, W, C) images; store them as "
        "(n, C, H, W) = (n, 3, 8, 8), e.g. x_train.transpose(0, 3, 1, 2)",
    ),
    CliCase(
        ".npz with 3 examples of 3 classes",
        ["fit", "--dataset", "{tmp}/three.npz"],
        "x_train and y_train are too small to split: each of the 3 classes has a single example, so no test set "
        "can be carved from them; carving one needs at least 2 examples of a class, and 3 of every class so that "
        "each class is in the training, validation and test sets (9 examples)",
    ),
    CliCase(
        "a fresh fit into a finished run's --out",
        ["fit", "--out", "{tmp}/finished"],
        "--out {tmp}/finished holds a finished run ({tmp}/finished/metrics.json: digits, seed 0, ACSA 0.850, "
        "written 2026-01-02 03:04 UTC); give --overwrite to replace it, or another --out",
    ),
    CliCase(
        "fit --out on a read-only folder",
        ["fit", "--out", "{tmp}/outdir"],
        "--out {tmp}/outdir is not writable: Permission denied; give another folder",
        _refuse_writes,
    ),
    CliCase(
        "fit --out on a full disk",
        ["fit", "--out", "{tmp}/outdir"],
        "--out {tmp}/outdir has only 0.0 MiB free on its file system, and about 1.0 MiB will be written",
        _full_disk,
    ),
    CliCase(
        "fit --out below a read-only folder",
        ["fit", "--out", "{tmp}/outdir/new/run"],
        "--out {tmp}/outdir/new/run is not writable (its nearest existing folder {tmp}/outdir): Permission denied",
        _refuse_writes,
    ),
    CliCase(
        "evaluate --out on a read-only folder",
        ["evaluate", "--checkpoint", "{tmp}/model.safetensors", "--out", "{tmp}/outdir"],
        "--out {tmp}/outdir is not writable: Permission denied",
        _refuse_writes,
    ),
    CliCase(
        "augment --out on a read-only folder",
        ["augment", "--checkpoint", "{tmp}/model.safetensors", "--out", "{tmp}/outdir"],
        "--out {tmp}/outdir is not writable: Permission denied",
        _refuse_writes,
    ),
    CliCase(
        "--num-samples 1000000000 (checked before training)",
        ["fit", "--num-samples", "1000000000"],
        "num_samples=1000000000 is too many for 500 examples: the (500, 10, 10000000000) log weights of the "
        "'mixture' rule and the posterior's temporaries need ",
    ),
    CliCase(
        "--perturbation-rate 5",
        ["fit", "--perturbation-rate", "5"],
        "--perturbation-rate must be in [0, 1], got 5 (the paper's r: 0 turns the perturbation step off, 1 repeats "
        "each class's latents up to the majority's count)",
    ),
    CliCase(
        "a folder as --dataset",
        ["fit", "--dataset", "{tmp}/empty/"],
        "--dataset {tmp}/empty/ is a folder; give one of mnist, fashion, svhn, celeba, digits, or an .npz file with "
        "arrays x_train, y_train[, x_test, y_test]",
    ),
]


@dataclass(frozen=True)
class NoticeCase:
    """An input that is accepted, with a one-line notice on stderr of what is done instead."""

    what: str
    argv: list[str]
    notice: str  # the whole line


NOTICE_CASES = [
    NoticeCase(
        "a batch size larger than the training data",
        ["fit", "--batch-size", "100000", "--epochs", "1"],
        "dgc-pyro fit: notice: the batch size 100000 is more than the 372 training examples (after the "
        "validation split); every epoch is one batch of 372",
    ),
]


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    model = DGC((1, 8, 8), 3, latent_dim=2)
    save_model(tmp / "model.safetensors", model)
    save_model(tmp / "cfglist.safetensors", model, {"config": [1, 2]})
    save_model(tmp / "cfgcounts.safetensors", model, {"config": {"dataset": "digits", "counts": 5}})
    data = (tmp / "model.safetensors").read_bytes()
    (tmp / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (tmp / "evil.pt").write_bytes(pickle.dumps({"w": _Payload(tmp / "pwned")}))
    (tmp / "empty").mkdir()
    (tmp / "outdir").mkdir()
    (tmp / "finished").mkdir()
    (tmp / "finished" / "metrics.json").write_text(
        json.dumps({"acsa": 0.85, "config": {"dataset": "digits", "seed": 0}})
    )
    written = calendar.timegm((2026, 1, 2, 3, 4, 0, 0, 0, 0))
    os.utime(tmp / "finished" / "metrics.json", (written, written))
    raw = tmp / "partial" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    (raw / "train-images-idx3-ubyte").write_bytes(b"")
    (tmp / "badrun" / "checkpoint").mkdir(parents=True)
    (tmp / "badrun" / "checkpoint" / TRAINING_STATE_FILE).write_bytes(b"\x00" * 64)
    x = X.reshape(12, 64)
    np.savez(tmp / "nokeys.npz", a=np.zeros(3))
    np.savez(tmp / "nan.npz", x_train=_with(x, (0, 0), np.nan), y_train=Y)
    np.savez(tmp / "pixels255.npz", x_train=x * 255, y_train=Y)
    np.savez(tmp / "fraclabels.npz", x_train=x, y_train=_with(Y.astype(float), (0,), 0.5))
    np.savez(tmp / "oneclass.npz", x_train=x, y_train=np.zeros(12, int))
    np.savez(tmp / "good.npz", x_train=x, y_train=Y)
    np.savez(tmp / "channelslast.npz", x_train=np.repeat(X, 3, axis=1).transpose(0, 2, 3, 1), y_train=Y)
    np.savez(tmp / "three.npz", x_train=x[:3], y_train=Y[:3])
    np.savez(tmp / "pred_shape.npz", x=x)
    np.savez(tmp / "pred_nan.npz", x=_with(X, (0, 0, 0, 0), np.nan))
    np.savez(tmp / "pred_empty.npz", x=X[:0])
    good = (tmp / "good.npz").read_bytes()
    (tmp / "truncated.npz").write_bytes(good[: len(good) // 2])
    # A byte inside x_train's data (after the zip entry and .npy headers): the zip's CRC no longer matches.
    (tmp / "flipped.npz").write_bytes(good[:1000] + bytes([good[1000] ^ 0xFF]) + good[1001:])
    with open(tmp / "single.npz", "wb") as f:
        np.save(f, x)
    (tmp / "text.npz").write_text("x_train,y_train\n0.5,1\n")
    np.savez(tmp / "hugelabel.npz", x_train=x, y_train=_with(Y, (0,), 10**12))
    np.savez(tmp / "uint64.npz", x_train=x, y_train=_with(Y.astype(np.uint64), (0,), 2**63))
    np.savez(tmp / "testclass.npz", x_train=x, y_train=Y, x_test=x[:1], y_test=[3])
    tensors, meta = load_checkpoint(tmp / "model.safetensors")
    name = sorted(k for k, t in tensors.items() if t.is_floating_point())[0]
    tensors[name] = tensors[name].clone().fill_(float("nan"))
    save_checkpoint(tmp / "nanweights.safetensors", tensors, meta)
    raw = write_mnist_fixture(tmp / "mnistlabel", per_class=1)
    labels = raw / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:8] + bytes([200]) + labels.read_bytes()[9:])
    raw = write_mnist_fixture(tmp / "mnistlong", per_class=1)
    (raw / "train-labels-idx1-ubyte").write_bytes(
        struct.pack(">BBBBI", 0, 0, 0x08, 1, 15) + bytes(range(10)) + bytes(5)
    )
    yield SimpleNamespace(tmp=tmp, model=model)
    assert not (tmp / "pwned").exists()


@pytest.mark.parametrize("case", API_CASES, ids=lambda c: f"{c.entry}: {c.what}")
def test_api_bad_input(ctx, case):
    with pytest.raises(case.error) as info:
        case.call(ctx)
    assert type(info.value) is case.error
    assert isinstance(info.value, (ValueError, FileNotFoundError, TypeError))
    expected = case.prefix.replace("{tmp}", str(ctx.tmp))
    assert str(info.value).startswith(expected), f"{str(info.value)!r}\ndoes not start with\n{expected!r}"


def _snapshot(folder: Path) -> list[tuple[str, bytes]] | None:
    """The files below ``folder`` with their contents (None when it does not exist)."""
    if not folder.exists():
        return None
    if not folder.is_dir():
        return [("", folder.read_bytes())]
    return sorted((str(p.relative_to(folder)), p.read_bytes()) for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("case", CLI_CASES, ids=lambda c: c.what)
def test_cli_bad_input_one_line_exit_2_nothing_written(ctx, case, capsys, tmp_path, monkeypatch):
    if case.patch is not None:
        case.patch(monkeypatch)
    out = tmp_path / "out"
    argv = [a.replace("{tmp}", str(ctx.tmp)) for a in case.argv]
    if "--resume" not in argv and "--out" not in argv:
        argv += ["--out", str(out)]
    for flag in ("--resume", "--out"):  # a folder the case names must come out as it went in
        if flag in argv:
            out = Path(argv[argv.index(flag) + 1])
            break
    before = _snapshot(out)
    if argv[0] == "fit":
        argv += ["--no-progress", "--baseline", "none"] if "--resume" not in argv else ["--no-progress"]
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's own usage errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err, err
    expected = f"dgc-pyro {argv[0]}: error: " + case.prefix.replace("{tmp}", str(ctx.tmp))
    assert err.startswith(expected), f"{err!r}\ndoes not start with\n{expected!r}"
    assert _snapshot(out) == before  # no half-written output: a new folder is not created, an old one is untouched


@pytest.mark.parametrize("case", NOTICE_CASES, ids=lambda c: c.what)
def test_cli_notice_is_one_line_and_the_command_runs(case, capsys, tmp_path):
    out = tmp_path / "out"
    assert main([*case.argv, "--out", str(out), "--no-progress", "--baseline", "none", "--num-samples", "2"]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == [case.notice]
    assert (out / "metrics.json").is_file()


def test_cli_resume_error_leaves_run_folder_untouched(ctx, capsys):
    folder = ctx.tmp / "badrun"
    before = sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file())
    assert main(["fit", "--resume", str(folder), "--no-progress"]) == 2
    capsys.readouterr()
    assert sorted((p.relative_to(folder), p.read_bytes()) for p in folder.rglob("*") if p.is_file()) == before


# ---------------------------------------------------------------------------------------------
# The docs table


def render_table() -> str:
    """The Markdown table of :data:`API_CASES` and :data:`CLI_CASES` that docs/reliability.md shows."""

    def cell(text: str) -> str:
        text = text.replace("{tmp}", "<dir>").replace("\n", " ").replace("|", "\\|")
        return f"`{text}`"

    rows = ["| Entry point | Bad input | Raises | Message starts with |", "|---|---|---|---|"]
    for c in API_CASES:
        rows.append(f"| `{c.entry}` | {c.what} | `{c.error.__name__}` | {cell(c.prefix)} |")
    for c in CLI_CASES:
        cmd = " ".join(a if not a.startswith("{tmp}") else a.replace("{tmp}", "<dir>") for a in c.argv)
        rows.append(f"| `dgc-pyro {cmd}` | {c.what} | exit 2 | {cell(f'dgc-pyro {c.argv[0]}: error: ' + c.prefix)} |")
    for n in NOTICE_CASES:
        rows.append(f"| `dgc-pyro {' '.join(n.argv)}` | {n.what} | exit 0, runs | {cell(n.notice)} |")
    return "\n".join(rows) + "\n"


def test_docs_table_is_generated_from_these_cases():
    assert render_table() in DOCS.read_text(encoding="utf-8"), (
        "docs/reliability.md is out of date: regenerate its table with `python tests/test_bad_inputs.py`"
    )


# ---------------------------------------------------------------------------------------------
# Property tests (what test_validation.py / test_protocol.py do not already cover)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(2, 6))
def test_property_check_xy_class_coverage(labels, k):
    labels = [v % k for v in labels]
    x = np.zeros((len(labels), 2), np.float32)
    present = set(labels)
    if len(present) < 2:
        with pytest.raises(ValueError, match="only one distinct class"):
            check_xy(x, labels, num_classes=k, require_all_classes=True)
    elif present != set(range(k)):
        missing = sorted(set(range(k)) - present)
        with pytest.raises(
            ValueError, match=re.escape(f"classes {missing} have no examples in y (expected every class in 0..{k - 1} ")
        ):
            check_xy(x, labels, num_classes=k, require_all_classes=True)
        check_xy(x, labels, num_classes=k)  # fine without the requirement
    else:
        xt, yt = check_xy(x, labels, num_classes=k, require_all_classes=True)
        assert yt.tolist() == labels and xt.shape == (len(labels), 2)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 20), st.integers(1, 20))
def test_property_check_xy_lengths(n_x, n_y):
    x = np.zeros((n_x, 3), np.float32)
    y = np.arange(n_y) % 2
    if n_x != n_y:
        with pytest.raises(ValueError, match=f"x has {n_x} examples, y has {n_y} labels"):
            check_xy(x, y)
    elif n_y >= 2:
        check_xy(x, y)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=3), st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_property_check_features_shape(expected, got):
    x = np.zeros((2, *got), np.float32)
    if tuple(got) == tuple(expected):
        assert check_features(x, input_shape=tuple(expected)).shape == (2, *expected)
    else:
        with pytest.raises(ValueError, match=r"x has the wrong shape: expected \(n, " + ", ".join(map(str, expected))):
            check_features(x, input_shape=tuple(expected))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 12), min_size=2, max_size=5), st.integers(0, 2**31), st.data())
def test_property_dict_counts_equal_list_counts(sizes, seed, data):
    labels = np.repeat(np.arange(len(sizes)), sizes)
    counts = [data.draw(st.integers(0, s)) for s in sizes]
    if sum(counts) == 0:
        return
    as_list = imbalanced_indices(labels, counts, seed)
    as_dict = imbalanced_indices(labels, dict(enumerate(counts)), seed)
    np.testing.assert_array_equal(as_list, as_dict)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 10**6), min_size=2, max_size=12), st.sampled_from([",", ", ", " ", " , "]))
def test_property_parse_counts_round_trip(counts, sep):
    assert parse_counts(sep.join(map(str, counts))) == tuple(counts)
    with pytest.raises(ValueError):
        parse_counts(sep.join(map(str, counts)) + sep + "-1")
    with pytest.raises(ValueError):
        parse_counts(sep.join(map(str, counts)) + sep + "x")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 15), min_size=1, max_size=5), st.floats(0.05, 0.95), st.integers(0, 2**31))
def test_property_stratified_holdout(sizes, fraction, seed):
    labels = np.random.default_rng(seed).permutation(np.repeat(np.arange(len(sizes)), sizes))
    train, held = stratified_holdout(labels, fraction, seed)
    assert not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(len(labels)))
    for c, n in enumerate(sizes):
        n_train = int((labels[train] == c).sum())
        assert n_train >= 1  # every class stays in training
        if n >= 2:
            assert (labels[held] == c).sum() >= 1
    again = stratified_holdout(labels, fraction, seed)
    np.testing.assert_array_equal(train, again[0])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3)), min_size=1, max_size=40))
def test_property_imbalance_report_acsa_is_mean_recall(pairs):
    y_true, y_pred = (np.array(v) for v in zip(*pairs))
    report = imbalance_report(y_true, y_pred, num_classes=4)
    recalls = [((y_pred == c) & (y_true == c)).sum() / max((y_true == c).sum(), 1) for c in range(4)]
    assert report["acsa"] == pytest.approx(np.mean(recalls))
    assert all(0.0 <= report[k] <= 1.0 for k in ("acsa", "gmean", "fmacro", "r_mi", "p_ma", "acc"))
    with pytest.raises(ValueError, match="outside"):
        imbalance_report(y_true, np.append(y_pred[1:], 4), num_classes=4)


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    return DGC((1, 2, 2), 3, latent_dim=2)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=2, max_size=12))
def test_property_fit_requires_every_class(tiny_model, labels):
    x = np.full((len(labels), 1, 2, 2), 0.5, np.float32)
    if len(set(labels)) == 3:
        return  # valid data: training is not what this property is about
    pattern = "only one distinct class" if len(set(labels)) == 1 else r"classes \[\d\] have no examples"
    with pytest.raises(ValueError, match=pattern):
        fit(tiny_model, x, labels, epochs=1, progress=False)


if __name__ == "__main__":
    sys.stdout.write(render_table())
