"""Synthetic minority augmentation: new examples decoded from perturbed latents of real ones.

For a class c, real class-c examples are encoded with the recognition model q(z | x, y = c), their
latents are perturbed as in the paper's data-perturbation step (fresh noise,
``z = loc + perturbation_scale * scale * eps``) and decoded through p(x | z) to the likelihood's mean
image, or (``output="residual"``) to the real example plus the decoded change of its latent. Unlike the
training-time perturbation (which only feeds the classifier head), this produces
images, so any downstream classifier can be trained on the rebalanced data.

How many examples each class gets follows imbalanced-learn's over-samplers exactly
(``imblearn.utils.check_sampling_strategy(..., "over-sampling")``). Optionally the samples are
filtered by the model's own class posterior p(y = c | x).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dgc_pyro.data.validation import check_features, check_labels
from dgc_pyro.inference.predict import predict_proba
from dgc_pyro.models.dgc import DGC
from dgc_pyro.models.likelihoods import likelihood_mean

SamplingStrategy = str | float | Mapping[int, int] | Callable[[np.ndarray], Mapping[int, int]]
OUTPUTS = ("mean", "residual")

__all__ = ["AugmentationWarning", "augment", "synthetic_counts"]


#: The named over-sampling strategies of imbalanced-learn.
SAMPLING_STRATEGY_NAMES = ("auto", "minority", "not majority", "not minority", "all")


class AugmentationWarning(UserWarning):
    """The posterior filter could not fill a class's quota within ``max_rounds`` rounds."""


def synthetic_counts(y: Any, sampling_strategy: SamplingStrategy = "auto") -> dict[int, int]:
    """Number of synthetic examples per class that ``sampling_strategy`` asks for on labels ``y``.

    Exactly imbalanced-learn's over-sampling semantics (``"auto"``, ``"not majority"``,
    ``"minority"``, ``"not minority"``, ``"all"``, a float for binary problems, a dict of target
    counts, or a callable returning one). Classes that need nothing are left out.
    """
    labels = check_labels(y).numpy()
    if isinstance(sampling_strategy, str) and sampling_strategy not in SAMPLING_STRATEGY_NAMES:
        # imbalanced-learn's own message lists its internal functions; name the choices instead
        raise ValueError(
            f"sampling_strategy must be one of {SAMPLING_STRATEGY_NAMES}, a float, a dict of target "
            f"counts or a callable, got {sampling_strategy!r}"
        )
    from imblearn.utils import check_sampling_strategy  # imported here: imblearn is slow to import

    wanted = check_sampling_strategy(sampling_strategy, labels, "over-sampling")
    return {int(c): int(n) for c, n in wanted.items() if int(n) > 0}


def _check_options(
    perturbation_scale: float,
    filter_threshold: float | None,
    num_samples_filter: int,
    batch_size: int,
    max_rounds: int,
    output: str = "mean",
) -> None:
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    if not (
        isinstance(perturbation_scale, (int, float)) and math.isfinite(perturbation_scale) and perturbation_scale >= 0
    ):
        raise ValueError(f"perturbation_scale must be a finite number >= 0, got {perturbation_scale!r}")
    if filter_threshold is not None and not (
        isinstance(filter_threshold, (int, float)) and 0.0 <= filter_threshold <= 1.0
    ):
        raise ValueError(f"filter_threshold must be None or a number in [0, 1], got {filter_threshold!r}")
    for name, value in (
        ("num_samples_filter", num_samples_filter),
        ("batch_size", batch_size),
        ("max_rounds", max_rounds),
    ):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _physical_memory() -> int | None:
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):  # not a POSIX system: no check
        return None


def _check_fits_in_memory(quota: dict[int, int], input_shape: tuple[int, ...]) -> None:
    """Refuse, before any drawing, a request whose float32 output alone would exceed half the machine's memory
    (e.g. a dict strategy with a typo of a few zeros), instead of failing or swapping hours later."""
    total = sum(quota.values())
    need = total * int(np.prod(input_shape)) * 4
    memory = _physical_memory()
    if memory is not None and need > memory // 2:
        raise ValueError(
            f"sampling_strategy asks for {total:,} synthetic examples, {need / 2**30:.1f} GiB as float32, more than "
            f"half of this machine's {memory / 2**30:.1f} GiB of memory; ask for fewer (or augment in several calls)"
        )


class _SourceCycler:
    """Indices of real class-c examples: successive random permutations, so each is used about equally."""

    def __init__(self, members: np.ndarray, rng: np.random.Generator) -> None:
        self.members = members
        self.rng = rng
        self.queue = np.zeros(0, dtype=np.int64)

    def take(self, k: int) -> np.ndarray:
        while len(self.queue) < k:
            self.queue = np.concatenate([self.queue, self.rng.permutation(self.members)])
        out, self.queue = self.queue[:k], self.queue[k:]
        return out


@torch.no_grad()
def _decode_perturbed(
    model: DGC,
    x: torch.Tensor,
    y: torch.Tensor,
    scale_factor: float,
    generator: torch.Generator,
    batch_size: int,
    output: str = "mean",
    bar: tqdm | None = None,
) -> torch.Tensor:
    """Images decoded from z = loc + scale_factor * scale * eps, z's from q(z | x, y): the mean of p(x | z)
    (``output="mean"``), or ``x + mean(z) - mean(loc)`` (``"residual"``), clipped to [0, 1]; ``bar`` counts
    the decoded examples."""
    out = []
    for start in range(0, x.shape[0], batch_size):
        xb = x[start : start + batch_size].to(model.device)
        yb = y[start : start + batch_size].to(model.device)
        loc, scale = model.encode(xb, yb)
        # Noise is drawn on the CPU from a seeded generator, so a seed gives the same samples on any device.
        eps = torch.randn(loc.shape, generator=generator, dtype=loc.dtype).to(loc.device)
        z = loc + scale_factor * scale * eps
        mean = likelihood_mean(model.likelihood_name, model.decoder(z))
        if output == "residual":
            mean = xb + mean - likelihood_mean(model.likelihood_name, model.decoder(loc))
        out.append(mean.clamp(0.0, 1.0).to(torch.float32).cpu())
        if bar is not None:
            bar.update(xb.shape[0])
    return torch.cat(out)


def _round_cap(need: int, rate: float) -> int:
    """Draws of one filtering round for a class: the need over the acceptance rate so far, with slack, capped."""
    return min(math.ceil(1.2 * need / rate) + 1, 10 * need + 10)


def _hopeless(need: int, passed: int, drawn: int, rounds_left: int) -> bool:
    """Whether even an optimistic acceptance rate, ``(passed + 3) / drawn`` (the "rule of three" 95% upper
    bound when nothing passed), could not fill ``need`` in the draws the remaining rounds allow."""
    if need <= 0:
        return False
    capacity = rounds_left * _round_cap(need, 0.1)
    return (passed + 3) / drawn * capacity < need


def augment(
    model: DGC,
    x: Any,
    y: Any,
    sampling_strategy: SamplingStrategy = "auto",
    *,
    perturbation_scale: float = 1.0,
    filter_threshold: float | None = None,
    num_samples_filter: int = 10,
    filter_balanced: bool = True,
    max_rounds: int = 10,
    seed: int | None = None,
    batch_size: int = 256,
    output: str = "mean",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic examples that rebalance ``(x, y)``, drawn from the fitted ``model``.

    For every class c that ``sampling_strategy`` asks to grow by n_c examples, n_c real class-c
    examples are picked (successive random permutations of the class, so each is reused about
    equally), encoded with q(z | x, c), perturbed with fresh noise
    ``z = loc + perturbation_scale * scale * eps`` and decoded to the mean image of p(x | z).

    Args:
        model: a fitted :class:`~dgc_pyro.models.DGC`.
        x, y: the (imbalanced) training data, ``(N, *model.input_shape)`` in [0, 1] and labels in
            ``[0, model.num_classes)``.
        sampling_strategy: imbalanced-learn's over-sampling semantics, validated by
            ``imblearn.utils.check_sampling_strategy``: ``"auto"`` (= ``"not majority"``),
            ``"minority"``, ``"not minority"``, ``"all"``, a float (binary problems only: the
            minority/majority ratio after resampling), a dict ``{class: target_count}``, or a callable
            ``y -> dict``.
        perturbation_scale: multiplies the posterior scale of the noise (0 decodes the posterior means;
            1 samples q(z | x, c)).
        filter_threshold: if given, keep only samples whose class posterior under the model,
            ``predict_proba(model, x_new)[:, c]``, is at least this; more are drawn until the quota is
            met or ``max_rounds`` rounds have passed (then an :class:`AugmentationWarning` is issued and
            the class gets fewer samples). A class stops early when even an optimistic bound on its
            acceptance rate could not fill its quota in the rounds left, so a model that cannot pass its
            own filter does not spend all ``max_rounds`` rounds at ten times the quota each.
        num_samples_filter: latent draws per class when scoring samples for the filter.
        filter_balanced: score the filter with the class-balanced posterior (``predict(...,
            balanced=True)``), which asks whether a sample looks like class c rather than whether c is
            likely a priori; with the training prior (False) a minority class's own samples rarely reach
            a high threshold.
        max_rounds: most rounds of drawing per class when filtering.
        seed: makes the choice of source examples and the noise reproducible (None: fresh randomness).
        batch_size: examples per pass through the networks.
        output: ``"mean"`` returns the mean image of p(x | z); ``"residual"`` returns the source example
            plus the decoded change of its latent, ``x + E[x | z] - E[x | loc]``, which keeps the detail of
            the real image that the (blurry) mean image loses, and varies it along the decoder.
        progress: a tqdm bar on stderr counting the decoded draws (with the filter, its total grows by each
            round's draws, and the postfix shows the round, whether the round's draws are being scored by the
            filter, and how many samples have been kept).

    Returns:
        ``(x_synthetic, y_synthetic)``: only the new examples, a float32 tensor
        ``(n, *model.input_shape)`` with values in [0, 1] and int64 labels, grouped by class in
        increasing class order, on the CPU.
    """
    if not isinstance(model, DGC):
        raise TypeError(f"model must be a dgc_pyro.models.DGC, got {type(model).__name__}")
    _check_options(perturbation_scale, filter_threshold, num_samples_filter, batch_size, max_rounds, output)
    x = check_features(x, input_shape=model.input_shape)
    y = check_labels(y, num_classes=model.num_classes)
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y have different numbers of examples: {x.shape[0]} and {y.shape[0]}")
    quota = synthetic_counts(y, sampling_strategy)
    _check_fits_in_memory(quota, model.input_shape)

    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
    filter_seed = None if seed is None else int(np.random.default_rng([seed, 2]).integers(2**62))
    labels = y.numpy()
    cyclers = {c: _SourceCycler(np.flatnonzero(labels == c), rng) for c in quota}
    kept: dict[int, list[torch.Tensor]] = {c: [] for c in quota}
    have = {c: 0 for c in quota}
    drawn = {c: 0 for c in quota}
    passed = {c: 0 for c in quota}
    given_up: dict[int, int] = {}  # class -> the round after which drawing stopped
    rounds = 1 if filter_threshold is None else max_rounds

    was_training = model.training
    model.eval()
    bar = tqdm(total=0, desc="augment", unit="draw", disable=not progress, leave=False)
    try:
        for done in range(rounds):
            pending = {c: quota[c] - have[c] for c in quota if have[c] < quota[c] and c not in given_up}
            if not pending:
                break
            plan = {}
            for c, need in pending.items():
                if filter_threshold is None:
                    plan[c] = need
                else:
                    # Draw in proportion to the acceptance rate seen so far (at least 10%), with some slack.
                    rate = max(passed[c] / drawn[c], 0.1) if drawn[c] else 1.0
                    plan[c] = _round_cap(need, rate)
            src = np.concatenate([cyclers[c].take(k) for c, k in plan.items()])
            ys = torch.cat([torch.full((k,), c, dtype=torch.int64) for c, k in plan.items()])
            bar.total += len(src)
            if filter_threshold is not None:
                bar.set_postfix_str(f"round {done + 1}, kept {sum(have.values())} of {sum(quota.values())}")
            bar.refresh()
            xs = _decode_perturbed(
                model, x[torch.from_numpy(src)], ys, float(perturbation_scale), generator, batch_size, output, bar
            )
            if filter_threshold is not None:
                bar.set_postfix_str(f"round {done + 1}, filtering, kept {sum(have.values())} of {sum(quota.values())}")
                # The filter's latent draws come from torch's global generator: seed them too, without
                # touching the caller's random state, so that a seed fixes which samples pass.
                devices = [model.device] if model.device.type == "cuda" else []
                with torch.random.fork_rng(devices=devices, enabled=filter_seed is not None):
                    if filter_seed is not None:
                        torch.manual_seed(filter_seed + done)
                    proba = predict_proba(model, xs, num_samples_filter, balanced=bool(filter_balanced)).cpu()
                ok = proba[torch.arange(len(ys)), ys] >= filter_threshold
            else:
                ok = torch.ones(len(ys), dtype=torch.bool)
            for c, k in plan.items():
                drawn[c] += k
                passing = xs[(ys == c) & ok]
                passed[c] += passing.shape[0]
                accepted = passing[: quota[c] - have[c]]
                kept[c].append(accepted)
                have[c] += accepted.shape[0]
                if filter_threshold is not None and _hopeless(
                    quota[c] - have[c], passed[c], drawn[c], rounds - done - 1
                ):
                    given_up[c] = done + 1
    finally:
        bar.close()
        model.train(was_training)

    short = {c: (have[c], quota[c]) for c in quota if have[c] < quota[c]}
    if short:
        detail = ", ".join(
            f"class {c}: {h} of {q}"
            + (
                f", stopped after round {given_up[c]} of {max_rounds} with {passed[c]} of {drawn[c]} draws passing"
                if c in given_up
                else ""
            )
            for c, (h, q) in short.items()
        )
        warnings.warn(
            f"augment: too few synthetic samples reached p(y=c | x) >= {filter_threshold} within {max_rounds} rounds "
            f"({detail}); lower filter_threshold or raise max_rounds",
            AugmentationWarning,
            stacklevel=2,
        )
    parts = [t for c in sorted(kept) for t in kept[c]]
    if not parts:
        return torch.zeros((0, *model.input_shape), dtype=torch.float32), torch.zeros(0, dtype=torch.int64)
    x_syn = torch.cat(parts)
    y_syn = torch.cat([torch.full((have[c],), c, dtype=torch.int64) for c in sorted(kept)])
    return x_syn, y_syn
