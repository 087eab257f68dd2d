"""DGC as an imbalanced-learn over-sampler: fit a DGC, add synthetic minority examples.

``DGCSampler`` is a scikit-learn estimator (parameters stored unchanged by ``__init__``, fitted
attributes ending in ``_``) that honours imbalanced-learn's ``fit_resample`` contract, so it drops
into ``imblearn.pipeline.Pipeline`` in front of any classifier::

    from imblearn.pipeline import Pipeline
    from sklearn.linear_model import LogisticRegression
    from dgc_pyro import DGCSampler

    pipe = Pipeline([("dgc", DGCSampler(input_shape=(1, 8, 8), epochs=30)), ("clf", LogisticRegression())])
    pipe.fit(X_train, y_train).predict(X_test)

The DGC is the one ``dgc-pyro fit`` trains: the recipe of :func:`dgc_pyro.experiment.default_recipe` for the
input shape unless ``recipe=`` gives another, fitted by :func:`dgc_pyro.experiment.train`.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch
from imblearn.over_sampling.base import BaseOverSampler
from imblearn.utils import check_target_type
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn_compat.utils.validation import validate_data

from dgc_pyro.data.splits import ImbalancedSplit
from dgc_pyro.experiment import Recipe, default_recipe, train
from dgc_pyro.inference.augment import augment
from dgc_pyro.inference.engine import ENGINES
from dgc_pyro.inference.objectives import OBJECTIVES
from dgc_pyro.models.likelihoods import LIKELIHOODS
from dgc_pyro.models.networks import PRESETS

__all__ = ["DGCSampler"]

#: Classes smaller than this make the fit skip its validation hold-out (model selection on a
#: handful of examples is noise, and the generator needs every example it can get).
MIN_CLASS_FOR_VALIDATION = 10


class DGCSampler(BaseOverSampler):
    """Over-sample with synthetic examples decoded from a DGC fitted on the data itself.

    ``fit_resample(X, y)`` fits a :class:`~dgc_pyro.models.DGC` to ``(X, y)`` and returns ``X`` and
    ``y`` followed by the synthetic examples of :func:`dgc_pyro.inference.augment`, as many per class
    as ``sampling_strategy`` asks (imbalanced-learn's over-sampling semantics). The DGC is ``recipe``'s,
    fitted by :func:`dgc_pyro.experiment.train`.

    Parameters
    ----------
    sampling_strategy : float, str, dict or callable, default="auto"
        As for every imbalanced-learn over-sampler (``"auto"`` grows every class but the majority to
        the majority's size).
    input_shape : tuple of int or None, default=None
        Shape of one example. None: ``X``'s own shape, i.e. a vector model with input shape ``(D,)``
        for flat ``(N, D)`` data, or the image shape for ``(N, C, H, W)`` data. Given, e.g.
        ``(1, 8, 8)``, flat rows are reshaped to it for the model (and the output stays flat).
    recipe : dgc_pyro.experiment.Recipe or None, default=None
        The model and its training (label weight, pixel likelihood and its scale, logit adjustment, guide,
        objective, epochs, ...). None: the recipe ``dgc-pyro fit`` uses for a dataset of the model's input shape,
        ``default_recipe(input_shape=input_shape_)`` (digits' for ``(1, 8, 8)``, MNIST's for ``(1, 28, 28)``,
        else ``Recipe()``). Its validation split is dropped when a class has fewer than
        :data:`MIN_CLASS_FOR_VALIDATION` examples.
    latent_dim, preset, likelihood, epochs, batch_size, lr, objective : None or a value, default=None
        Shortcuts for the recipe's fields of these names: given, they replace the recipe's (a preset given
        with the default recipe brings its optimisation settings, as ``dgc-pyro fit --preset`` does).
    device : str or torch.device, default="auto"
        Where to train (:func:`dgc_pyro.inference.fit`).
    engine : {"graph", "torch", "svi"}, default="graph"
        The training step of :func:`dgc_pyro.inference.fit` (``"graph"`` falls back to ``"torch"`` with a
        warning for a model it cannot capture).
    random_state : int, RandomState instance or None, default=None
        Seeds the fit (weights, mini-batches) and the sampling.
    filter_threshold : float or None, default=None
        Keep only synthetic examples whose class posterior under the model is at least this.
    output : {"mean", "residual"}, default="mean"
        What a synthetic example is: the decoded mean image, or the real source example plus the decoded
        change of its latent (keeps the source's detail; see :func:`dgc_pyro.inference.augment`).
    progress : bool, default=False
        Show a progress bar while fitting.

    Attributes
    ----------
    model_ : DGC
        The fitted model.
    history_ : dgc_pyro.inference.History
        What the fit did, epoch by epoch.
    sampling_strategy_ : dict
        Number of synthetic examples asked for per class (original labels).
    classes_ : ndarray
        The class labels; the model's class ``i`` is ``classes_[i]``.
    input_shape_ : tuple of int
        Shape of one example as the model sees it.
    recipe_ : dgc_pyro.experiment.Recipe
        The recipe the model was fitted with (``recipe`` or the default, with the shortcuts applied).
    n_synthetic_ : dict
        Number of synthetic examples actually added per class (smaller than asked only when the
        filter could not fill a quota).
    """

    _parameter_constraints: dict = {  # noqa: RUF012 - scikit-learn's own idiom for a class's parameter checks
        **BaseOverSampler._parameter_constraints,
        "input_shape": [None, tuple, list],
        "recipe": [None, Recipe],
        "latent_dim": [None, Interval(numbers.Integral, 1, None, closed="left")],
        "preset": [None, StrOptions(set(PRESETS))],
        "likelihood": [None, StrOptions(set(LIKELIHOODS))],
        "epochs": [None, Interval(numbers.Integral, 1, None, closed="left")],
        "batch_size": [None, Interval(numbers.Integral, 1, None, closed="left")],
        "lr": [None, Interval(numbers.Real, 0, None, closed="neither")],
        "objective": [None, StrOptions(set(OBJECTIVES)), callable],
        "device": [str, torch.device],
        "engine": [StrOptions(set(ENGINES))],
        "filter_threshold": [None, Interval(numbers.Real, 0, 1, closed="both")],
        "output": [StrOptions({"mean", "residual"})],
        "progress": ["boolean"],
    }

    def __init__(
        self,
        *,
        sampling_strategy="auto",
        input_shape=None,
        recipe=None,
        latent_dim=None,
        preset=None,
        likelihood=None,
        epochs=None,
        batch_size=None,
        lr=None,
        objective=None,
        device="auto",
        engine="graph",
        random_state=None,
        filter_threshold=None,
        output="mean",
        progress=False,
    ):
        super().__init__(sampling_strategy=sampling_strategy)
        self.input_shape = input_shape
        self.recipe = recipe
        self.latent_dim = latent_dim
        self.preset = preset
        self.likelihood = likelihood
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.objective = objective
        self.device = device
        self.engine = engine
        self.random_state = random_state
        self.filter_threshold = filter_threshold
        self.output = output
        self.progress = progress

    def _check_X_y(self, X, y, accept_sparse=None):
        # Images (N, C, H, W) are accepted as well as flat rows; sparse input is not (the networks are dense).
        y, binarize_y = check_target_type(y, indicate_one_vs_all=True)
        X, y = validate_data(self, X=X, y=y, reset=True, accept_sparse=False, allow_nd=True)
        return X, y, binarize_y

    def _model_shape(self, X: np.ndarray) -> tuple[int, ...]:
        if self.input_shape is None:
            return tuple(int(s) for s in X.shape[1:])
        shape = tuple(int(s) for s in self.input_shape)
        if not shape or any(s <= 0 for s in shape):
            raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {self.input_shape!r}")
        if math.prod(shape) != math.prod(X.shape[1:]):
            raise ValueError(
                f"input_shape {shape} has {math.prod(shape)} features but X has {math.prod(X.shape[1:])} "
                f"per example (shape {X.shape})"
            )
        return shape

    #: the constructor's shortcuts for Recipe fields of the same names
    _RECIPE_SHORTCUTS = ("latent_dim", "preset", "likelihood", "epochs", "batch_size", "lr", "objective")

    def _recipe(self, input_shape: tuple[int, ...], counts: np.ndarray) -> Recipe:
        """``recipe`` (None: the default recipe for ``input_shape``) with the shortcuts given applied."""
        recipe = self.recipe if self.recipe is not None else default_recipe(input_shape=input_shape, preset=self.preset)
        changes = {name: getattr(self, name) for name in self._RECIPE_SHORTCUTS if getattr(self, name) is not None}
        if counts.min() < MIN_CLASS_FOR_VALIDATION:
            changes["val_fraction"] = 0.0
        return dataclasses.replace(recipe, **changes) if changes else recipe

    def _seed(self) -> int:
        if isinstance(self.random_state, numbers.Integral):
            return int(self.random_state)
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _fit_resample(self, X, y):
        self.classes_, y_idx = np.unique(y, return_inverse=True)
        self.input_shape_ = self._model_shape(X)
        x_model = np.asarray(X, dtype=np.float32).reshape((X.shape[0], *self.input_shape_))
        counts = np.bincount(y_idx, minlength=len(self.classes_))
        seed = self._seed()

        self.recipe_ = self._recipe(self.input_shape_, counts)
        # train takes a split: the training arrays, with an empty test split (the sampler evaluates nothing)
        x_t, y_t = torch.from_numpy(x_model), torch.from_numpy(y_idx.astype(np.int64))
        split = ImbalancedSplit(
            "DGCSampler",
            x_t,
            y_t,
            x_t[:0],
            y_t[:0],
            [str(c) for c in self.classes_],
            len(self.classes_),
            self.input_shape_,
        )
        trained = train(self.recipe_, split, seed, device=self.device, progress=self.progress, engine=self.engine)
        self.model_, self.history_ = trained.model, trained.history

        index_of = {label: i for i, label in enumerate(self.classes_.tolist())}
        targets = {index_of[label]: int(counts[index_of[label]] + n) for label, n in self.sampling_strategy_.items()}
        x_syn, y_syn = augment(
            self.model_, x_model, y_idx, targets, filter_threshold=self.filter_threshold, seed=seed, output=self.output
        )
        added = np.bincount(y_syn.numpy(), minlength=len(self.classes_))
        self.n_synthetic_ = {label: int(added[index_of[label]]) for label in self.sampling_strategy_}

        out_dtype = np.result_type(X.dtype, np.float32)
        x_new = x_syn.numpy().reshape((x_syn.shape[0], *X.shape[1:])).astype(out_dtype, copy=False)
        X_res = np.concatenate([X.astype(out_dtype, copy=False), x_new])
        y_res = np.concatenate([y, self.classes_[y_syn.numpy()]])
        return X_res, y_res
