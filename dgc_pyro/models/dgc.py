"""DGC as a Pyro model/guide pair: p(z) p(x | z) p(y | z) with q(z | x, y), or p(y) p(z | y) p(x | z) with q(z | x)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.nn import PyroModule, pyro_method
from torch import nn

from dgc_pyro.models.latent_prior import COVARIANCES, ClassConditionalPrior
from dgc_pyro.models.likelihoods import LIKELIHOODS, make_likelihood
from dgc_pyro.models.networks import PRESETS, Classifier, Decoder, Encoder, build_networks

#: The latent priors of :class:`DGC`: N(0, I) with a label head p(y | z), or one Gaussian per class p(z | y).
LATENT_PRIORS = ("standard", "class_conditional")


class DGC(PyroModule):
    """Deep generative classifier: a latent confounder z generates both the features x and the label y.

    Sites: ``"z"`` (latent, prior N(0, I) by default), ``"x"`` (observed features) and ``"y"``
    (observed label; sampled when ``y`` is None). All sites live in ``pyro.plate("data")``.

    Args:
        input_shape: shape of one example, e.g. ``(1, 28, 28)`` or ``(64,)``.
        num_classes: number of classes C.
        latent_dim: size k of z.
        preset: ``"small"`` (CPU friendly) or ``"paper"`` (the reference architecture).
        likelihood: ``"bernoulli"``, ``"continuous_bernoulli"`` or ``"normal"`` for p(x | z).
        obs_scale: standard deviation of the ``"normal"`` likelihood.
        label_weight: multiplies the log-likelihood of ``"y"`` during training (``poutine.scale``);
            the pixel term has as many terms as the image has pixels, so 1.0 lets x dominate.
        label_in_guide: True (the paper) joins the one-hot label to the encoder, q(z | x, y); False makes
            the guide q(z | x), so that z must carry the class information that is in x.
        class_prior: training class frequencies (counts or probabilities, length C). With it the label
            likelihood is p(y | z) = softmax(f(z) + tau * log pi) (logit adjustment, Menon et al. 2021): the
            network f is free of the training imbalance, and :meth:`balanced_labels` (used by
            ``predict(..., balanced=True)``) scores with softmax(f(z)), the label likelihood under a uniform
            class prior. None (default): p(y | z) = softmax(f(z)).
        logit_adjustment: tau above (1.0 is the Bayes-consistent choice); ignored without ``class_prior``.
        observe_x: True (default) makes the model generate the features, the ``"x"`` site p(x | z). False drops the
            site: the model is p(z) p(y | z) with the guide q(z | x), a variational information bottleneck (Alemi et
            al. 2017), the control that prices DGC's generative part. The decoder is then built but unused. It needs
            ``label_in_guide=False``: the rules that score a label-conditioned guide weigh draws by p(x | z).
        latent_prior: ``"standard"`` (default): z ~ N(0, I) and the label head p(y | z) = softmax(f(z)).
            ``"class_conditional"``: the generative classifier y ~ Categorical(pi), z | y ~ N(mu_y, diag(sigma_y^2))
            with learnable class means and scales (:class:`~dgc_pyro.models.latent_prior.ClassConditionalPrior`),
            x ~ p(x | z) and a label-free guide q(z | x) (needs ``label_in_guide=False`` and the x site). Its
            p(y | z) is Bayes' rule on the class Gaussians (the classifier network is built but unused), and
            ``predict`` scores it with ``rule="bayes"``: p(y = c | x) proportional to
            p(y = c) * mean_s [p(x | z_s) p(z_s | y = c) / q(z_s | x)] on shared draws z_s ~ q(z | x).
            pi is the normalised ``class_prior`` (raised to ``logit_adjustment``; :meth:`balanced_labels` and
            ``predict(..., balanced=True)`` make it uniform), or uniform without one. As p(y) p(z | y) = p(z) p(y | z),
            ``label_weight`` multiplies the same log p(y | z) as in the standard model: the observed model adds
            (label_weight - 1) * log p(y | z) as a factor site ``"label_weight"`` (1.0: the exact joint).
        covariance: ``"shared"`` (one diagonal for all classes, default) or ``"per_class"``; class-conditional only.
        shrinkage: k, the strength (in pseudo-examples) of the hierarchical prior that pulls every class's mean
            (and per-class variance) toward the count-weighted pooled one: the fitted mean is
            w_c * (class mean of the latents) + (1 - w_c) * pooled mean with w_c = n_c / (n_c + k), so tail classes
            borrow from the head ones (:mod:`dgc_pyro.models.latent_prior`). Default 10 (a priori, not tuned);
            0 turns it off. Needs ``class_counts``; class-conditional only.
        class_counts: the training class counts n_c of the shrinkage (length C); class-conditional only.
        encoder, decoder, classifier: optional custom networks replacing the defaults; they must
            follow the call conventions of :class:`Encoder`, :class:`Decoder`, :class:`Classifier`.

    Custom models subclass DGC and override :meth:`prior`, :meth:`likelihood` or the networks,
    keeping the site names so that fitting, prediction and diagnostics keep working.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        latent_dim: int = 64,
        preset: str = "small",
        *,
        likelihood: str = "bernoulli",
        obs_scale: float = 0.1,
        label_weight: float = 1.0,
        label_in_guide: bool = True,
        class_prior: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        logit_adjustment: float = 1.0,
        observe_x: bool = True,
        latent_prior: str = "standard",
        covariance: str = "shared",
        shrinkage: float = 10.0,
        class_counts: Sequence[float] | np.ndarray | torch.Tensor | None = None,
        encoder: nn.Module | None = None,
        decoder: nn.Module | None = None,
        classifier: nn.Module | None = None,
    ) -> None:
        # Built with module-local parameters available, so the model works both under Pyro's global
        # param store (plain SVI) and under ``module_local_params=True`` (what dgc_pyro's engines use,
        # so that two models never share parameters through the global store).
        with pyro.settings.context(module_local_params=True):
            super().__init__()
        if isinstance(input_shape, (str, bytes)) or not hasattr(input_shape, "__iter__"):
            raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
        input_shape = tuple(input_shape)
        if not input_shape or not all(_is_int(s) and s > 0 for s in input_shape):
            raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got {input_shape!r}")
        input_shape = tuple(int(s) for s in input_shape)
        if not _is_int(num_classes) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        check_model_options(
            latent_dim=latent_dim,
            preset=preset,
            likelihood=likelihood,
            obs_scale=obs_scale,
            label_weight=label_weight,
            logit_adjustment=logit_adjustment,
            label_in_guide=label_in_guide,
            observe_x=observe_x,
            latent_prior=latent_prior,
            covariance=covariance,
            shrinkage=shrinkage,
        )
        prior = _check_class_prior(class_prior, int(num_classes)) if class_prior is not None else None
        counts = _check_latent_prior(
            latent_prior, covariance, shrinkage, class_counts, int(num_classes), label_in_guide, observe_x
        )
        self.input_shape = input_shape
        self.num_classes = int(num_classes)
        self.latent_dim = int(latent_dim)
        self.preset = preset
        self.likelihood_name = likelihood
        self.obs_scale = float(obs_scale)
        self.label_weight = float(label_weight)
        self.label_in_guide = bool(label_in_guide)
        self.class_prior = prior
        self.logit_adjustment = float(logit_adjustment)
        self.observe_x = bool(observe_x)
        self.latent_prior = latent_prior
        self.covariance = covariance
        self.shrinkage = float(shrinkage)
        self.class_counts = counts
        self._offset_active = True
        #: what the checkpoint this model was loaded from holds beside the weights (``load_model``; the CLI's run
        #: configuration is under ``"config"``); empty for a model built here
        self.metadata: dict[str, Any] = {}
        #: the SWAG posterior over the label head's weights (:class:`dgc_pyro.inference.swag.SwagHead`) that
        #: ``fit(..., swag_start=...)`` collected, saved with the weights; None without one. Prediction uses it only
        #: when asked: ``predict(model, x, swag=model.swag)``
        self.swag: Any = None
        default_enc, default_dec, default_cls = build_networks(input_shape, self.num_classes, self.latent_dim, preset)
        self.custom_networks = tuple(
            name
            for name, net in (("encoder", encoder), ("decoder", decoder), ("classifier", classifier))
            if net is not None
        )
        self.encoder = encoder if encoder is not None else default_enc
        self.decoder = decoder if decoder is not None else default_dec
        self.classifier = classifier if classifier is not None else default_cls
        # Buffers move with .to(device), so the prior is created on the model's device.
        self.register_buffer("_zero", torch.zeros(()), persistent=False)
        # Rebuilt from the config (class_prior, logit_adjustment), so not part of the state dict.
        offset = torch.zeros(self.num_classes) if prior is None else self.logit_adjustment * torch.tensor(prior).log()
        self.register_buffer("label_offset", offset.float(), persistent=False)
        self.class_gaussians = None
        if latent_prior == "class_conditional":
            #: mu_c and sigma_c of p(z | y = c); their parameters are in the state dict (``class_gaussians.*``)
            self.class_gaussians = ClassConditionalPrior(self.num_classes, self.latent_dim, covariance)
            # Rebuilt from the config, like label_offset; zeros stand for "no counts" (then shrinkage is 0).
            self.register_buffer(
                "_class_counts", torch.tensor(counts or [0.0] * self.num_classes).float(), persistent=False
            )

    # ------------------------------------------------------------------ configuration
    @property
    def config(self) -> dict[str, Any]:
        """JSON-serialisable constructor arguments (custom networks cannot be serialised)."""
        config = {
            "class": type(self).__name__,
            "input_shape": list(self.input_shape),
            "num_classes": self.num_classes,
            "latent_dim": self.latent_dim,
            "preset": self.preset,
            "likelihood": self.likelihood_name,
            "obs_scale": self.obs_scale,
            "label_weight": self.label_weight,
            "label_in_guide": self.label_in_guide,
            "class_prior": self.class_prior,
            "logit_adjustment": self.logit_adjustment,
            "observe_x": self.observe_x,
            "custom_networks": list(self.custom_networks),
        }
        if self.latent_prior != "standard":
            # Only then: a standard model keeps the config it always had, which resuming compares with the
            # training states written before this option existed.
            config.update(
                latent_prior=self.latent_prior,
                covariance=self.covariance,
                shrinkage=self.shrinkage,
                class_counts=self.class_counts,
            )
        return config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DGC:
        """Rebuild a model with default networks from :attr:`config`."""
        if config.get("custom_networks"):
            raise ValueError(
                "this model was built with custom networks "
                f"({', '.join(config['custom_networks'])}); construct it yourself and load the state dict"
            )
        keys = ("input_shape", "num_classes", "latent_dim", "preset", "likelihood", "obs_scale", "label_weight")
        missing = [k for k in keys if k not in config]
        if missing:
            raise ValueError(f"model config lacks {missing}")
        return cls(
            **{k: config[k] for k in keys},
            label_in_guide=bool(config.get("label_in_guide", True)),
            class_prior=config.get("class_prior"),
            logit_adjustment=float(config.get("logit_adjustment", 1.0)),
            observe_x=bool(config.get("observe_x", True)),
            latent_prior=config.get("latent_prior", "standard"),
            covariance=config.get("covariance", "shared"),
            shrinkage=float(config.get("shrinkage", 10.0)),
            class_counts=config.get("class_counts"),
        )

    @property
    def device(self) -> torch.device:
        """The device of the model's parameters and buffers."""
        return self._zero.device

    @property
    def dtype(self) -> torch.dtype:
        """The floating-point dtype of the model (inputs are cast to it by ``fit`` and ``predict``)."""
        return self._zero.dtype

    # ------------------------------------------------------------------ building blocks
    def prior(self, batch_shape: torch.Size | tuple[int, ...]) -> dist.TorchDistribution:
        """p(z) with ``batch_shape`` batch dims: standard normal, or for the class-conditional prior the mixture
        sum_c p(y = c) N(mu_c, diag(sigma_c^2)); override for other priors."""
        if self.class_gaussians is not None:
            shape = tuple(batch_shape) + (self.num_classes,)
            g = self.class_gaussians
            comps = dist.Normal(g.loc, g.scale).to_event(1).expand(shape)
            return dist.MixtureSameFamily(dist.Categorical(logits=self.label_log_prior().expand(shape)), comps)
        loc = self._zero.new_zeros(tuple(batch_shape) + (self.latent_dim,))
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)

    def class_prior_log_density(self, z: torch.Tensor) -> torch.Tensor:
        """log p(z | y = c) for every class c, ``(..., k)`` -> ``(..., C)`` (class-conditional prior only)."""
        if self.class_gaussians is None:
            raise ValueError("class_prior_log_density needs a model built with latent_prior='class_conditional'")
        return self.class_gaussians.log_prob_all(z)

    def label_log_prior(self) -> torch.Tensor:
        """log p(y) ``(C,)`` of the class-conditional model: log softmax(tau * log pi), uniform without a class
        prior or inside :meth:`balanced_labels`."""
        offset = self.label_offset if self._offset_active else torch.zeros_like(self.label_offset)
        return torch.log_softmax(offset, dim=-1)

    def likelihood(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) with one event over the whole example."""
        return make_likelihood(self.likelihood_name, self.decoder(z), len(self.input_shape), self.obs_scale)

    def label_logits(self, z: torch.Tensor) -> torch.Tensor:
        """Logits of p(y | z): the classifier's, shifted by tau * log pi when a class prior is set
        (not inside :meth:`balanced_labels`)."""
        if self.class_gaussians is not None:  # p(y | z) by Bayes' rule on the class Gaussians
            return self.class_prior_log_density(z) + self.label_log_prior()
        logits = self.classifier(z)
        if self.class_prior is not None and self._offset_active:
            logits = logits + self.label_offset
        return logits

    @property
    def default_rule(self) -> str:
        """The scoring rule :func:`~dgc_pyro.inference.predict` uses unless told otherwise: ``"mixture"``
        (importance sampling over the C class-conditional proposals) for a label-conditioned guide,
        ``"latent"`` (p(y | z) averaged over q(z | x)) for a label-free one, ``"bayes"`` (p(y) p(x | y) by
        importance sampling on shared draws of q(z | x)) for the class-conditional prior."""
        if self.class_gaussians is not None:
            return "bayes"
        return "mixture" if self.label_in_guide else "latent"

    @property
    def has_label_head(self) -> bool:
        """True when p(y | z) is the classifier network (what the perturbation step trains); False for the
        class-conditional prior, whose p(y | z) follows from p(y) p(z | y)."""
        return self.class_gaussians is None

    @property
    def has_class_prior(self) -> bool:
        """True when p(y | z) carries the training class prior as a logit offset (``class_prior`` was given with
        ``logit_adjustment`` > 0). With tau = 0 the offset is zero, so the classifier's own logits carry the prior."""
        return self.class_prior is not None and self.logit_adjustment > 0

    @contextlib.contextmanager
    def balanced_labels(self) -> Iterator[None]:
        """Within the block p(y | z) = softmax(f(z)): the label likelihood under a uniform class prior.

        Only meaningful for models built with ``class_prior``; for others it changes nothing.
        """
        previous, self._offset_active = self._offset_active, False
        try:
            yield
        finally:
            self._offset_active = previous

    @torch.no_grad()
    def label_prior(self, num_samples: int = 4096, seed: int = 0) -> torch.Tensor:
        """The model's marginal label distribution p(y) = E_p(z)[p(y | z)], estimated from prior draws.

        Drawn with its own seed inside ``torch.random.fork_rng`` so the caller's random state is untouched.
        The class-conditional model has p(y) in closed form (:meth:`label_log_prior`), returned exactly.
        """
        if self.class_gaussians is not None:
            return self.label_log_prior().exp()
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.training
        self.eval()  # dropout or batch norm in a custom classifier would otherwise make p(y) depend on the mode
        try:
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                z = self.prior((num_samples,)).sample()
                return torch.softmax(self.label_logits(z), dim=-1).mean(0)
        finally:
            self.train(was_training)

    def one_hot(self, y: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        """One-hot labels for the encoder; all zeros when ``y`` is None (label-agnostic q(z | x))."""
        if y is None:
            return self._zero.new_zeros(batch_size, self.num_classes)
        # A comparison against arange instead of F.one_hot, which checks the labels' range on every call
        # (a host synchronisation on CUDA) and cannot be captured in a graph; labels are range-checked
        # where they enter (fit, predict), so an out-of-range label here would only give a zero row.
        classes = torch.arange(self.num_classes, device=y.device)
        return (y.long()[..., None] == classes).to(self._zero.dtype)

    def encode(self, x: torch.Tensor, y: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Location and scale of q(z | x, y) (of q(z | x) when the model was built with ``label_in_guide=False``)."""
        return self.encoder(x, self.one_hot(y if self.label_in_guide else None, x.shape[0]))

    # ------------------------------------------------------------------ Pyro model and guide
    @pyro_method
    def model(
        self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *, num_examples: int | None = None
    ) -> torch.Tensor:
        """Generative model. With ``x=None`` it samples ``num_examples`` new examples (prior predictive).

        Without the ``"x"`` site (``observe_x=False``) ``x`` is not scored and the prior predictive has labels only.
        """
        n = _batch_size(x, y, num_examples)
        if self.class_gaussians is not None:
            return self._class_conditional_model(x, y, n)
        with pyro.plate("data", n):
            z = pyro.sample("z", self.prior((n,)))
            if self.observe_x:
                pyro.sample("x", self.likelihood(z), obs=x)
            with poutine.scale(scale=self.label_weight):
                y = pyro.sample("y", dist.Categorical(logits=self.label_logits(z)), obs=y)
        return y

    def _class_conditional_model(self, x: torch.Tensor | None, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """p(y) p(z | y) p(x | z). With y observed, y comes first and z ~ N(mu_y, diag(sigma_y^2)), so that the
        closed-form KL of ``elbo-analytic`` is taken against the observed class's Gaussian. Without y the same joint
        is written as p(z) p(x | z) p(y | z) (z from the class mixture, y by Bayes' rule), so that y drawn in a
        posterior predictive follows the guide's z."""
        with pyro.plate("data", n):
            if y is not None:
                y = pyro.sample("y", dist.Categorical(logits=self.label_log_prior()), obs=y)
                loc, scale = self.class_gaussians.params(y)
                z = pyro.sample("z", dist.Normal(loc, scale).to_event(1))
                pyro.sample("x", self.likelihood(z), obs=x)
                if self.label_weight != 1.0:
                    # p(y) p(z | y) = p(z) p(y | z): label_weight multiplies log p(y | z) as in the standard model,
                    # the surplus (label_weight - 1) log p(y | z) entering as a factor beside the exact joint.
                    # (z may carry leading particle dims that the labels lack: broadcast them before the gather)
                    log_py = torch.log_softmax(self.label_logits(z), dim=-1)
                    log_py = log_py.gather(-1, y.long().expand(log_py.shape[:-1])[..., None]).squeeze(-1)
                    pyro.factor("label_weight", (self.label_weight - 1.0) * log_py)
            else:
                z = pyro.sample("z", self.prior((n,)))
                pyro.sample("x", self.likelihood(z), obs=x)
                y = pyro.sample("y", dist.Categorical(logits=self.label_logits(z)))
        if self.shrinkage > 0:
            # The hierarchical prior of the class parameters is one global term; a batch of n of the N training
            # examples carries n / N of it, so that the batches of an epoch add up to the whole term once.
            total = self._class_counts.sum()
            penalty = self.class_gaussians.shrinkage_penalty(self._class_counts, self.shrinkage)
            pyro.factor("class_shrinkage", -penalty * (n / total))
        return y

    @pyro_method
    def guide(
        self, x: torch.Tensor | None = None, y: torch.Tensor | None = None, *, num_examples: int | None = None
    ) -> torch.Tensor:
        """Recognition model q(z | x, y); with ``y=None`` the label input is zeroed."""
        if x is None:
            raise ValueError("the guide needs x: q(z | x, y) is a recognition model")
        n = x.shape[0]
        with pyro.plate("data", n):
            loc, scale = self.encode(x, y)
            return pyro.sample("z", dist.Normal(loc, scale).to_event(1))

    def extra_repr(self) -> str:
        return (
            f"input_shape={self.input_shape}, num_classes={self.num_classes}, latent_dim={self.latent_dim}, "
            f"preset={self.preset!r}, likelihood={self.likelihood_name!r}"
            + (
                f", latent_prior={self.latent_prior!r}, covariance={self.covariance!r}"
                if self.class_gaussians is not None
                else ""
            )
        )


def _is_number(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_model_options(
    *,
    latent_dim: Any,
    preset: Any,
    likelihood: Any,
    obs_scale: Any,
    label_weight: Any,
    logit_adjustment: Any,
    label_in_guide: Any,
    observe_x: Any,
    latent_prior: Any,
    covariance: Any,
    shrinkage: Any,
) -> None:
    """Raise ValueError naming the first bad option of a :class:`DGC` that does not depend on the data (the checks
    of ``DGC(...)`` and of :class:`dgc_pyro.config.ModelConfig`, in one place)."""
    if not _is_int(latent_dim) or latent_dim < 1:
        raise ValueError(f"latent_dim must be a positive integer, got {latent_dim!r}")
    for name, value in (("obs_scale", obs_scale), ("label_weight", label_weight)):
        if not _is_number(value) or not math.isfinite(value) or not value > 0:
            raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    if not _is_number(logit_adjustment) or not math.isfinite(logit_adjustment) or logit_adjustment < 0:
        raise ValueError(f"logit_adjustment must be a finite number >= 0, got {logit_adjustment!r}")
    if not isinstance(observe_x, (bool, np.bool_)):
        raise ValueError(f"observe_x must be True or False, got {observe_x!r}")
    if not observe_x and label_in_guide:
        raise ValueError(
            "observe_x=False needs label_in_guide=False: a label-conditioned guide is scored by "
            "weighing its draws with p(x | z), which a model without the x site lacks"
        )
    _check_latent_prior(latent_prior, covariance, shrinkage, None, 2, label_in_guide, observe_x, need_counts=False)
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {tuple(LIKELIHOODS)}, got {likelihood!r}")


def _check_class_prior(prior: Any, num_classes: int) -> list[float]:
    """Normalised class frequencies as a list; rejects wrong lengths and non-positive or non-finite entries."""
    values = np.asarray(prior.detach().cpu() if torch.is_tensor(prior) else prior, dtype=np.float64).reshape(-1)
    if values.shape != (num_classes,):
        raise ValueError(f"class_prior must have one entry per class ({num_classes}), got shape {values.shape}")
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise ValueError("class_prior entries must be positive and finite (an empty class has no prior frequency)")
    return (values / values.sum()).tolist()


def _check_latent_prior(
    latent_prior: Any,
    covariance: Any,
    shrinkage: Any,
    class_counts: Any,
    num_classes: int,
    label_in_guide: Any,
    observe_x: Any,
    *,
    need_counts: bool = True,
) -> list[float] | None:
    """Validate the latent-prior options; returns the class counts as a list (None without them)."""
    if latent_prior not in LATENT_PRIORS:
        raise ValueError(f"latent_prior must be one of {LATENT_PRIORS}, got {latent_prior!r}")
    if covariance not in COVARIANCES:
        raise ValueError(f"covariance must be one of {COVARIANCES}, got {covariance!r}")
    if (
        isinstance(shrinkage, bool)
        or not isinstance(shrinkage, (int, float, np.integer, np.floating))
        or not math.isfinite(shrinkage)
        or shrinkage < 0
    ):
        raise ValueError(f"shrinkage must be a finite number >= 0, got {shrinkage!r}")
    if latent_prior == "standard":
        if covariance != "shared" or class_counts is not None:
            raise ValueError("covariance and class_counts apply to latent_prior='class_conditional' only")
        return None
    if label_in_guide:
        raise ValueError(
            "latent_prior='class_conditional' needs label_in_guide=False: Bayes' rule weighs draws of "
            "the label-free q(z | x) against every class's p(z | y)"
        )
    if not observe_x:
        raise ValueError("latent_prior='class_conditional' needs observe_x=True: Bayes' rule scores p(x | z)")
    counts = None
    if class_counts is not None:
        values = np.asarray(
            class_counts.detach().cpu() if torch.is_tensor(class_counts) else class_counts, dtype=np.float64
        ).reshape(-1)
        if values.shape != (num_classes,):
            raise ValueError(f"class_counts must have one entry per class ({num_classes}), got shape {values.shape}")
        if not np.all(np.isfinite(values)) or np.any(values <= 0):
            raise ValueError("class_counts entries must be positive and finite")
        counts = values.tolist()
    if need_counts and shrinkage > 0 and counts is None:
        raise ValueError(
            f"shrinkage={shrinkage} needs class_counts (the n_c of n_c / (n_c + k)); pass the training "
            "class counts, or shrinkage=0"
        )
    return counts


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def unwrap_normal(fn: torch.distributions.Distribution | None) -> torch.distributions.Normal | None:
    """The Normal under ``Independent``/expanded wrappers of a site's distribution (None if there is none).

    The default guide's ``"z"`` is such a Normal; code that needs its loc and scale (the perturbation step,
    the mixture scoring rule) reads them through this one function.
    """
    while fn is not None and hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn if isinstance(fn, torch.distributions.Normal) else None


def _batch_size(x: torch.Tensor | None, y: torch.Tensor | None, num_examples: int | None) -> int:
    if x is not None:
        return x.shape[0]
    if y is not None:
        return y.shape[0]
    if num_examples is None:
        raise ValueError("model(x=None, y=None) needs num_examples")
    return int(num_examples)


__all__ = ["DGC", "LATENT_PRIORS", "Classifier", "Decoder", "Encoder", "unwrap_normal"]
