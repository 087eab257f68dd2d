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


def resolve_transform(spec: str | Transform | None, input_shape: tuple[int, ...]) -> Transform | None:
    """The transform named or given by ``spec`` for inputs of ``input_shape`` (None: no transform).

    Raises:
        ValueError: an unknown name, or a named image transform for inputs that are not images
            ``(C, H, W)`` (flat features have no pixels to shift).
    """
    if spec is None or spec == "none":
        return None
    if callable(spec):
        return spec
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
