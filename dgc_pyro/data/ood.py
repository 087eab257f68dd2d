"""Out-of-distribution test sets for image classifiers, built from what is at hand (nothing is downloaded).

For a model trained on images of shape ``(C, H, W)`` (Fashion-MNIST: ``(1, 28, 28)``), :func:`ood_sets` returns:

* ``"digits"``: scikit-learn's bundled 8x8 digits (1,797 images), upscaled bilinearly to ``H x W`` and repeated over
  the channels: another domain of the same size and value range;
* ``"vflip"``: the in-distribution images flipped upside down (same pixels, another layout);
* ``"invert"``: the in-distribution images with inverted intensities, ``1 - x`` (same layout, other pixels);
* ``"noise"``: uniform noise in [0, 1], as many images as the in-distribution set, from a seeded generator.

Every set holds float32 values in [0, 1], as the models expect. The two sets built from the in-distribution images
have as many images as it has; pass the test split (never training images) as ``x_in``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from dgc_pyro.data.validation import check_features

OOD_SETS: tuple[str, ...] = ("digits", "vflip", "invert", "noise")


def upscaled_digits(shape: tuple[int, ...]) -> torch.Tensor:
    """scikit-learn's 1,797 digits as float32 images of ``shape`` = ``(C, H, W)`` in [0, 1]."""
    from sklearn.datasets import load_digits

    if len(shape) != 3:
        raise ValueError(f"upscaled_digits needs an image shape (C, H, W), got {tuple(shape)}")
    images = torch.from_numpy((load_digits().images / 16.0).astype(np.float32)).unsqueeze(1)
    c, h, w = (int(s) for s in shape)
    out = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
    return out.expand(-1, c, -1, -1).contiguous()


def ood_sets(x_in: Any, *, seed: int = 0, sets: tuple[str, ...] = OOD_SETS) -> dict[str, torch.Tensor]:
    """The out-of-distribution sets named in ``sets`` (default: all of :data:`OOD_SETS`) for images ``x_in``.

    ``x_in`` is the in-distribution evaluation set, ``(N, C, H, W)`` with values in [0, 1]; ``seed`` fixes the noise.
    """
    unknown = [s for s in sets if s not in OOD_SETS]
    if unknown:
        raise ValueError(f"unknown OOD set(s) {unknown}; choose from {list(OOD_SETS)}")
    x = check_features(x_in, name="x_in")
    if x.dim() != 4:
        raise ValueError(f"ood_sets needs images (N, C, H, W), got shape {tuple(x.shape)}")
    x = x.detach().to("cpu", torch.float32)
    out: dict[str, torch.Tensor] = {}
    for name in sets:
        if name == "digits":
            out[name] = upscaled_digits(tuple(x.shape[1:]))
        elif name == "vflip":
            out[name] = x.flip(-2)
        elif name == "invert":
            out[name] = 1.0 - x
        else:
            gen = torch.Generator().manual_seed(int(seed))
            out[name] = torch.rand(x.shape, generator=gen, dtype=torch.float32)
    return out
