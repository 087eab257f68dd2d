"""Random training-time transforms of image batches, applied on the batch's device.

A transform is a callable ``transform(x, generator) -> x`` over a batch ``(B, C, H, W)`` that draws
its randomness from ``generator`` only, so a seeded fit stays reproducible (and a resumed one
bit-identical). :func:`dgc_pyro.inference.fit` and :func:`dgc_pyro.baselines.fit_baseline` take one
as ``transform=``, either a callable or one of the names in :data:`TRANSFORMS`:

- ``"shift"``: a random translation of up to 2 pixels in each direction, zero-filled (pad and crop);
- ``"shift-flip"``: the same, and a horizontal flip with probability 1/2 (clothes, faces and house
  numbers' surroundings are mirror-symmetric; digits are not, use ``"shift"`` there).

Whole batches are transformed with one gather, never a Python loop over examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Translate every image of ``x`` ``(B, C, H, W)`` by its own random offset in ``[-max_shift, max_shift]``."""
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift, max_shift, max_shift, max_shift))
    offsets = torch.randint(0, 2 * max_shift + 1, (2, b), device=x.device, generator=generator)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indexing on dims 0, 2, 3 puts the channel dim last: (B, H, W, C).
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each image of ``x`` ``(B, C, H, W)`` left-right with probability ``p``."""
    flip = torch.rand(x.shape[0], device=x.device, generator=generator) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def shift_flip(x: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """:func:`random_shift` then :func:`random_hflip`."""
    return random_hflip(random_shift(x, generator, max_shift), generator)


TRANSFORMS: dict[str, Transform] = {
    "shift": random_shift,
    "shift-flip": shift_flip,
}
#: what a command line offers (``--transform``): "none" or a name of :data:`TRANSFORMS`
TRANSFORM_CHOICES = ("none", *TRANSFORMS)


def transform_option(choice: str | None) -> str | None:
    """The recipe value of a ``--transform`` choice: None for ``"none"`` (and for None), else the name."""
    return None if choice is None or choice == "none" else choice


class CheckedTransform:
    """A user's transform whose output is checked, so that a wrong one fails with a message naming it rather
    than as a shape error deep inside the networks, or as silent training on out-of-range pixels.

    Every call: the output must be a tensor with the batch's shape and dtype (no host synchronisation).
    The first call also checks that it is finite and within [0, 1], as the data were.
    """

    def __init__(self, fn: Transform) -> None:
        self.fn = fn
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)
        self._values_checked = False

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        out = self.fn(x, generator)
        if not torch.is_tensor(out):
            raise ValueError(f"transform {self.__name__} returned {type(out).__name__}, not a tensor")
        if out.shape != x.shape or out.dtype != x.dtype:
            raise ValueError(
                f"transform {self.__name__} must keep the batch's shape {tuple(x.shape)} and dtype "
                f"{x.dtype}; it returned shape {tuple(out.shape)}, dtype {out.dtype}"
            )
        if not self._values_checked:
            lo, hi = float(out.min()), float(out.max())
            if not (lo >= 0.0 and hi <= 1.0):  # also false for NaN
                raise ValueError(
                    f"transform {self.__name__} returned values in [{lo:g}, {hi:g}]; transformed "
                    "inputs must stay finite and within [0, 1], like the data"
                )
            self._values_checked = True
        return out


def resolve_transform(spec: str | Transform | None, input_shape: tuple[int, ...]) -> Transform | None:
    """The transform named or given by ``spec`` for inputs of ``input_shape`` (None: no transform).

    Raises:
        ValueError: an unknown name, or a named image transform for inputs that are not images
            ``(C, H, W)`` (flat features have no pixels to shift).
    """
    if spec is None or spec == "none":
        return None
    if callable(spec):
        return spec if spec in TRANSFORMS.values() else CheckedTransform(spec)
    if not isinstance(spec, str) or spec not in TRANSFORMS:
        raise ValueError(f"transform must be a callable, None or one of {sorted(TRANSFORMS)}, got {spec!r}")
    if len(input_shape) != 3:
        raise ValueError(
            f"transform {spec!r} shifts image pixels and needs inputs shaped (C, H, W); these are shaped "
            f"{tuple(input_shape)} (flat features: use transform=None, or an image backbone)"
        )
    return TRANSFORMS[spec]


def transform_name(spec: str | Transform | None) -> str | None:
    """A JSON-able name of ``spec`` for configs and checkpoints (``"none"`` and None both give None)."""
    if spec is None or isinstance(spec, str):
        return transform_option(spec)
    return getattr(spec, "__name__", type(spec).__name__)
