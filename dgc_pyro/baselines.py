"""Discriminative baselines on DGC's own encoder backbone, for honest side-by-side comparisons.

Losses: plain cross-entropy (``"ce"``), logit-adjusted cross-entropy (Menon et al. 2021,
``"logit_adjusted"``), balanced softmax (Ren et al. 2020, ``"balanced_softmax"``), class-balanced focal
loss (Cui et al. 2019, ``"cb_focal"``) and LDAM with deferred re-weighting (Cao et al. 2019,
``"ldam_drw"``). ``"logistic"`` is scikit-learn's multinomial logistic regression on the raw pixels.

Each is a :class:`BaselineSpec` in :data:`BASELINE_REGISTRY`, which carries its loss and properties (whether it
takes a tau, uses deferred re-weighting, a cosine head); add one with ``BASELINE_REGISTRY.register(name, spec)``
(docs/extending.md) and ``fit_baseline``, ``run_experiment`` and ``dgc-pyro fit --baseline`` accept it.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from dgc_pyro.arguments import check_fraction, check_positive, check_seed
from dgc_pyro.calibration import check_temperature
from dgc_pyro.data.splits import stratified_holdout
from dgc_pyro.data.transforms import Transform, resolve_transform
from dgc_pyro.data.validation import check_features, check_xy
from dgc_pyro.device import resolve_device
from dgc_pyro.inference.schedule import check_lr_schedule, scheduled_lr
from dgc_pyro.metrics import imbalance_report
from dgc_pyro.models.networks import build_networks
from dgc_pyro.registry import Registry
from dgc_pyro.reproducibility import seed_everything


class BackboneClassifier(nn.Module):
    """DGC's encoder feature body with a linear softmax head (the "same encoder with cross-entropy")."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int, preset: str = "small") -> None:
        super().__init__()
        encoder, _, _ = build_networks(input_shape, num_classes, latent_dim=1, preset=preset)
        self.input_shape = tuple(input_shape)
        self.encoder = encoder
        self.hidden = nn.Sequential(nn.Linear(encoder.feature_dim, encoder.hidden_dim), nn.ReLU())
        self.head = nn.Linear(encoder.hidden_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.hidden(self.encoder.features(x)))


def logit_adjusted_loss(logits: torch.Tensor, y: torch.Tensor, prior: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Logit-adjusted softmax cross-entropy (Menon et al. 2021, Eq. 10): CE(f(x) + tau * log pi, y).

    Prediction uses the unadjusted logits f(x), i.e. the balanced (prior-free) posterior.
    """
    return F.cross_entropy(logits + tau * prior.clamp_min(1e-12).log(), y)


def balanced_softmax_loss(
    logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, tau: float = 1.0
) -> torch.Tensor:
    """Balanced softmax (Ren et al. 2020, Eq. 4): CE(f(x) + tau * log n, y) with n the per-class training counts.

    tau = 1 is the paper's loss. log n and log pi differ by the constant log N, which the softmax ignores, so
    this is the logit-adjusted loss of the same tau: the two rows differ only by floating-point rounding.
    """
    return F.cross_entropy(logits + tau * counts.clamp_min(1.0).log(), y)


def class_balanced_weights(counts: torch.Tensor, beta: float) -> torch.Tensor:
    """Cui et al. (2019) weights (1 - beta) / (1 - beta^n_c), normalised to sum to the number of classes."""
    effective = (1.0 - beta ** counts.clamp_min(1.0)) / (1.0 - beta)
    weights = 1.0 / effective
    return weights / weights.sum() * len(counts)


def cb_focal_loss(
    logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, beta: float = 0.999, gamma: float = 1.0
) -> torch.Tensor:
    """Class-balanced softmax focal loss (Cui et al. 2019, Eq. 7 with a softmax focal term).

    Mean over the batch of w_y * (1 - p_y)^gamma * (-log p_y), with :func:`class_balanced_weights`
    (as in the authors' code: the weighted sum divided by the batch size, not by the sum of weights,
    which would undo part of the re-weighting batch by batch).
    """
    weights = class_balanced_weights(counts, beta)
    log_p = F.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
    focal = (1.0 - log_p.exp()).clamp_min(0.0) ** gamma * (-log_p)
    return (weights[y] * focal).mean()


def ldam_margins(counts: torch.Tensor, max_margin: float = 0.5) -> torch.Tensor:
    """LDAM margins Delta_c proportional to n_c^(-1/4), scaled so the largest (smallest class) is ``max_margin``."""
    margins = 1.0 / counts.clamp_min(1.0) ** 0.25
    return margins * (max_margin / margins.max())


def ldam_loss(
    logits: torch.Tensor,
    y: torch.Tensor,
    counts: torch.Tensor,
    weights: torch.Tensor | None = None,
    max_margin: float = 0.5,
    s: float = 30.0,
) -> torch.Tensor:
    """LDAM (Cao et al. 2019, Eq. 13): CE(s * (cos - Delta_y 1_y), y), optionally class-weighted (DRW)."""
    adjusted = logits - F.one_hot(y, logits.shape[-1]).to(logits.dtype) * ldam_margins(counts, max_margin)[y][:, None]
    return F.cross_entropy(s * adjusted, y, weight=weights)


LDAM_SCALE = 30.0
DRW_BETA = 0.9999
DRW_START = 0.8  # share of the epochs after which DRW switches on (epoch 160 of 200 in Cao et al.)


@dataclass
class FittedBaseline:
    """A trained baseline: ``predict_proba(x)`` gives (N, C) class probabilities, ``logits(x)`` the scores they
    are the softmax of (divided by :attr:`temperature`)."""

    name: str
    module: nn.Module | None
    sklearn_model: Any = None
    device: torch.device = torch.device("cpu")
    num_classes: int = 0
    input_shape: tuple[int, ...] = ()
    #: best validation ACSA (the selected epoch's), None without a validation split
    val_acsa: float | None = None
    #: one record per epoch: ``epoch``, ``lr`` (the epoch's first step) and, with a validation split, ``val_acsa``
    history: list[dict[str, float]] = field(default_factory=list)
    #: the epoch whose weights the module holds (the best on validation, else the last)
    best_epoch: int | None = None
    #: with ``fit_baseline(..., keep_last_state=True)``: a CPU copy of the last epoch's weights
    last_state: dict[str, torch.Tensor] | None = None
    #: post-hoc temperature T of :meth:`predict_proba`, softmax(logits / T); fit it on held-out data with
    #: :func:`dgc_pyro.calibration.temperature_scale` of :meth:`logits` (1.0: the trained model as it is)
    temperature: float = 1.0
    #: the factor the network's outputs are trained with (:attr:`BaselineSpec.logit_scale`; LDAM's s)
    logit_scale: float = 1.0

    @torch.no_grad()
    def logits(self, x: Any, batch_size: int = 1024) -> torch.Tensor:
        """Class scores (N, C) on the CPU, before the temperature: the network's logits (LDAM's scaled cosines;
        the logistic model's decision function), e.g. for the energy score -logsumexp(logits). For the
        logit-adjusted family these are the prior-free f(x)."""
        x = check_features(x, input_shape=self.input_shape)
        if self.sklearn_model is not None:
            flat = x.reshape(len(x), -1).cpu().numpy()
            return torch.as_tensor(self.sklearn_model.decision_function(flat), dtype=torch.float32)
        assert self.module is not None
        self.module.eval()
        return torch.cat(
            [self._logits(x[i : i + batch_size].to(self.device)).cpu() for i in range(0, len(x), batch_size)]
        )

    def predict_proba(self, x: Any, batch_size: int = 1024) -> torch.Tensor:
        """Class probabilities softmax(logits / temperature); for the logit-adjusted family this is the balanced
        (prior-free) posterior."""
        t = check_temperature(self.temperature)
        if self.sklearn_model is not None and t == 1.0:
            x = check_features(x, input_shape=self.input_shape)
            flat = x.reshape(len(x), -1).cpu().numpy()
            return torch.as_tensor(self.sklearn_model.predict_proba(flat), dtype=torch.float32)
        return torch.softmax(self.logits(x, batch_size) / t, -1)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        assert self.module is not None
        logits = self.module(x)
        return logits if self.logit_scale == 1.0 else self.logit_scale * logits

    def predict(self, x: Any) -> torch.Tensor:
        """Predicted labels."""
        return self.predict_proba(x).argmax(-1)


class _CosineHead(nn.Module):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.weight = nn.Parameter(linear.weight.detach().clone())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(h, dim=-1) @ F.normalize(self.weight, dim=-1).T


# ----------------------------------------------------------------------------- the baseline registry
#: A baseline's training loss: ``loss(logits, y, counts, *, tau, drw_active) -> scalar`` with ``counts`` the
#: per-class training counts (float, on the logits' device), ``tau`` the log-prior scale (1.0 unless the entry
#: ``takes_tau``) and ``drw_active`` True in the deferred re-weighting phase (only for a ``deferred_reweighting`` entry).
BaselineLoss = Callable[..., torch.Tensor]
#: A fitter that replaces the training loop: ``fitter(name, x, y, num_classes, transform) -> FittedBaseline``.
BaselineFitter = Callable[[str, torch.Tensor, torch.Tensor, int, Transform | None], FittedBaseline]


@dataclass(frozen=True)
class BaselineSpec:
    """A baseline of :data:`BASELINE_REGISTRY`: its loss on DGC's encoder backbone (or a fitter of its own) and the
    properties :func:`fit_baseline` reads instead of the baseline's name.

    Attributes:
        loss: the training loss (:data:`BaselineLoss`), trained with Adam on :class:`BackboneClassifier`.
        fitter: fits the baseline without that loop (``"logistic"``: scikit-learn); give a loss or a fitter.
        takes_tau: the loss has a log-prior offset scaled by ``tau`` (``fit_baseline(..., tau=)``); the others
            refuse ``tau != 1``.
        deferred_reweighting: the loss is told ``drw_active=True`` from :data:`DRW_START` of the epochs on (LDAM-DRW).
        cosine_head: the head scores cosines of normalised features and weights (LDAM's NormedLinear).
        logit_scale: the factor the head's outputs are trained with, applied to the fitted model's logits as well.
    """

    loss: BaselineLoss | None = None
    fitter: BaselineFitter | None = None
    takes_tau: bool = False
    deferred_reweighting: bool = False
    cosine_head: bool = False
    logit_scale: float = 1.0

    def __post_init__(self) -> None:
        if (self.loss is None) == (self.fitter is None):
            raise ValueError("a BaselineSpec needs exactly one of loss= (trained on the backbone) and fitter=")


def _ce(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, *, tau: float, drw_active: bool) -> torch.Tensor:
    return F.cross_entropy(logits, y)


def _logit_adjusted(
    logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, *, tau: float, drw_active: bool
) -> torch.Tensor:
    return logit_adjusted_loss(logits, y, counts / counts.sum(), tau)


def _balanced_softmax(
    logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, *, tau: float, drw_active: bool
) -> torch.Tensor:
    return balanced_softmax_loss(logits, y, counts, tau)


def _cb_focal(
    logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, *, tau: float, drw_active: bool
) -> torch.Tensor:
    return cb_focal_loss(logits, y, counts)


def _ldam_drw(
    logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, *, tau: float, drw_active: bool
) -> torch.Tensor:
    # Deferred re-weighting: class-balanced weights (beta = 0.9999) only in the last part of training.
    weights = class_balanced_weights(counts, DRW_BETA) if drw_active else None
    # The logits are cosines (normalised features and weights, _CosineHead), as in LDAM's NormedLinear.
    return ldam_loss(logits, y, counts, weights, s=LDAM_SCALE)


def _fit_logistic(
    name: str, x: torch.Tensor, y: torch.Tensor, num_classes: int, transform: Transform | None
) -> FittedBaseline:
    """scikit-learn's multinomial logistic regression on the raw pixels, fitted in one call."""
    if transform is not None:
        raise ValueError("the logistic baseline is fitted in one call by scikit-learn and takes no transform")
    clf = LogisticRegression(max_iter=2000, C=1.0)
    clf.fit(x.reshape(len(x), -1).cpu().numpy(), y.numpy())
    if list(clf.classes_) != list(range(num_classes)):
        raise ValueError("logistic baseline needs every class in the training data")
    return FittedBaseline(name, None, sklearn_model=clf, num_classes=num_classes, input_shape=tuple(x.shape[1:]))


#: The baselines :func:`fit_baseline`, :func:`~dgc_pyro.experiment.run_experiment` and ``dgc-pyro fit --baseline``
#: accept, by name.
BASELINE_REGISTRY: Registry[BaselineSpec] = Registry("baseline")
BASELINE_REGISTRY.register("ce", BaselineSpec(_ce))
BASELINE_REGISTRY.register("logit_adjusted", BaselineSpec(_logit_adjusted, takes_tau=True))
BASELINE_REGISTRY.register("balanced_softmax", BaselineSpec(_balanced_softmax, takes_tau=True))
BASELINE_REGISTRY.register("cb_focal", BaselineSpec(_cb_focal))
BASELINE_REGISTRY.register(
    "ldam_drw", BaselineSpec(_ldam_drw, deferred_reweighting=True, cosine_head=True, logit_scale=LDAM_SCALE)
)
BASELINE_REGISTRY.register("logistic", BaselineSpec(fitter=_fit_logistic))


def baseline_losses() -> tuple[str, ...]:
    """The registered baselines trained with a loss on the backbone (:func:`baseline_loss` computes it)."""
    return tuple(name for name, spec in BASELINE_REGISTRY.items() if spec.loss is not None)


def tau_baselines() -> tuple[str, ...]:
    """The registered baselines that take a ``tau`` (the scale of their log-prior offset)."""
    return tuple(name for name, spec in BASELINE_REGISTRY.items() if spec.takes_tau)


#: The built-in names (frozen at import; the registry and the functions above list added ones too): every
#: baseline, those with a loss, and those with a tau.
BASELINES: tuple[str, ...] = BASELINE_REGISTRY.names()
BASELINE_LOSSES: tuple[str, ...] = baseline_losses()
TAU_LOSSES: tuple[str, ...] = tau_baselines()


def baseline_loss(
    name: str,
    logits: torch.Tensor,
    y: torch.Tensor,
    counts: torch.Tensor,
    *,
    drw_active: bool = False,
    tau: float = 1.0,
) -> torch.Tensor:
    """The training loss of baseline ``name`` given logits, labels and per-class training counts (``tau`` scales
    the log-prior offset of the baselines that take one; ``drw_active``: the deferred re-weighting phase)."""
    spec = BASELINE_REGISTRY.get(name)
    if spec.loss is None:
        raise ValueError(
            f"baseline {name!r} has no training loss (it has a fitter of its own); losses: "
            f"{', '.join(baseline_losses())}"
        )
    return spec.loss(logits, y, counts, tau=tau, drw_active=drw_active)


def fit_baseline(
    name: str,
    x: Any,
    y: Any,
    *,
    num_classes: int | None = None,
    preset: str = "small",
    epochs: int = 20,
    batch_size: int = 100,
    lr: float = 1e-3,
    device: str | torch.device = "auto",
    seed: int = 0,
    val_fraction: float = 0.1,
    progress: bool = False,
    transform: str | Transform | None = None,
    lr_schedule: str = "constant",
    select_best: bool = True,
    keep_last_state: bool = False,
    tau: float = 1.0,
) -> FittedBaseline:
    """Train baseline ``name`` (a name of :data:`BASELINE_REGISTRY`) on ``(x, y)`` with the same validation protocol
    as DGC.

    ``transform`` randomly transforms every training batch as in :func:`dgc_pyro.inference.fit`
    (``"shift"``, ``"shift-flip"`` or a callable, :mod:`dgc_pyro.data.transforms`); ``lr_schedule``
    (``"constant"`` or ``"cosine"``) decays Adam's rate as DGC's fit does (:mod:`dgc_pyro.inference.schedule`).
    ``select_best`` keeps the weights of the epoch with the best validation ACSA, as in ``fit``; with False the
    last epoch's weights are kept (the validation ACSA is still recorded in ``history``). ``keep_last_state``
    also keeps a copy of the last epoch's weights in ``last_state``, so both can be scored from one fit.
    ``tau`` scales the log-prior offset of ``"logit_adjusted"`` and ``"balanced_softmax"`` (the baselines whose
    :attr:`BaselineSpec.takes_tau`; 1.0 is each paper's loss); the other baselines have none and take only 1.0.
    """
    spec = BASELINE_REGISTRY.get(name)
    check_positive("epochs", epochs, integer=True)
    check_positive("batch_size", batch_size, integer=True)
    check_positive("lr", lr)
    check_seed(seed)
    check_fraction("val_fraction", val_fraction)
    check_lr_schedule(lr_schedule)
    if (
        isinstance(tau, bool)
        or not isinstance(tau, (int, float, np.integer, np.floating))
        or not math.isfinite(tau)
        or tau < 0
    ):
        raise ValueError(f"tau must be a finite number >= 0, got {tau!r}")
    if tau != 1.0 and not spec.takes_tau:
        raise ValueError(
            f"tau scales the log-prior offset of {' and '.join(tau_baselines())}; {name!r} has none (tau=1 only)"
        )
    x, y = check_xy(x, y, num_classes=num_classes, require_all_classes=True)
    num_classes = int(num_classes if num_classes is not None else int(y.max()) + 1)
    input_shape = tuple(x.shape[1:])
    batch_transform = resolve_transform(transform, input_shape)
    seed_everything(seed)
    if spec.fitter is not None:
        return spec.fitter(name, x, y, num_classes, batch_transform)

    x_val = y_val = None
    if val_fraction > 0:
        tr, va = stratified_holdout(y.numpy(), val_fraction, seed)
        x_val, y_val, x, y = x[va], y[va], x[tr], y[tr]
    dev = resolve_device(device)
    module = BackboneClassifier(input_shape, num_classes, preset)
    if spec.cosine_head:
        module.head = _CosineHead(module.head)
    module.to(dev)
    counts_np = np.bincount(y.numpy(), minlength=num_classes)
    counts = torch.as_tensor(counts_np, dtype=torch.float32, device=dev)
    opt = torch.optim.Adam(module.parameters(), lr=lr)
    x_dev, y_dev = x.to(dev), y.to(dev)
    fitted = FittedBaseline(
        name, module, device=dev, num_classes=num_classes, input_shape=input_shape, logit_scale=spec.logit_scale
    )
    gen = torch.Generator(device=dev).manual_seed(seed)
    best, best_state, best_epoch = -math.inf, None, epochs
    drw_start = int(DRW_START * epochs) + 1
    steps_per_epoch = math.ceil(len(x_dev) / batch_size)
    total_steps, step = epochs * steps_per_epoch, 0
    for epoch in tqdm(range(1, epochs + 1), desc=name, disable=not progress, leave=False):
        module.train()
        perm = torch.randperm(len(x_dev), device=dev, generator=gen)
        record: dict[str, float] = {"epoch": epoch}
        for i in range(0, len(perm), batch_size):
            record.setdefault("lr", scheduled_lr(opt, lr, lr_schedule, step, total_steps))  # keeps the epoch's first
            step += 1
            idx = perm[i : i + batch_size]
            xb = x_dev[idx] if batch_transform is None else batch_transform(x_dev[idx], gen)
            logits = module(xb)
            drw_active = spec.deferred_reweighting and epoch >= drw_start
            loss = spec.loss(logits, y_dev[idx], counts, tau=tau, drw_active=drw_active)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        if x_val is not None:
            acsa = imbalance_report(y_val, fitted.predict(x_val), num_classes=num_classes, train_counts=counts_np)[
                "acsa"
            ]
            record["val_acsa"] = float(acsa)
            if select_best and acsa > best:
                best, best_state, best_epoch = acsa, copy.deepcopy(module.state_dict()), epoch
        fitted.history.append(record)
    if keep_last_state:
        fitted.last_state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    if best_state is not None:
        module.load_state_dict(best_state)
        fitted.val_acsa = float(best)
    elif x_val is not None:
        fitted.val_acsa = fitted.history[-1]["val_acsa"]
    fitted.best_epoch = best_epoch
    module.eval()
    return fitted
