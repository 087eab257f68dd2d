"""Encoder, decoder and classifier networks of DGC, chosen from the input shape.

Every network accepts arbitrary leading batch dimensions (``(..., *input_shape)`` or
``(..., latent_dim)``) so that Pyro's vectorised particle plates can pass ``(S, N, ...)``
tensors straight through.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

PRESETS = ("small", "paper")


def _flatten_leading(t: torch.Tensor, event_dims: int) -> tuple[torch.Tensor, torch.Size]:
    batch_shape = t.shape[: t.dim() - event_dims]
    return t.reshape((-1,) + tuple(t.shape[t.dim() - event_dims :])), batch_shape


class Encoder(nn.Module):
    """q(z | x, y): a feature body, the one-hot label joined before the last hidden layer, Gaussian heads.

    ``forward(x, y_onehot)`` returns ``(loc, scale)``. ``y_onehot`` may be all zeros, which is how
    the label-agnostic q(z | x) is asked for.
    """

    def __init__(
        self,
        body: nn.Module,
        feature_dim: int,
        num_classes: int,
        latent_dim: int,
        hidden_dim: int,
        input_shape: Sequence[int],
        hidden_activation: bool = True,
    ) -> None:
        super().__init__()
        self.body = body
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.latent_dim = latent_dim
        self.feature_dim = feature_dim
        self.hidden_dim = hidden_dim
        layers: list[nn.Module] = [nn.Linear(feature_dim + num_classes, hidden_dim)]
        if hidden_activation:
            layers.append(nn.ReLU())
        self.joint = nn.Sequential(*layers)
        self.loc = nn.Linear(hidden_dim, latent_dim)
        self.log_var = nn.Linear(hidden_dim, latent_dim)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Label-free features of ``x`` (leading batch dims flattened)."""
        flat, _ = _flatten_leading(x, len(self.input_shape))
        return self.body(flat).flatten(1)

    def heads(self, features: torch.Tensor, y_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gaussian parameters from precomputed features and a (possibly zero) one-hot label."""
        h = self.joint(torch.cat([features, y_onehot.to(features.dtype)], dim=-1))
        return self.loc(h), torch.exp(0.5 * clamp_log_var(self.log_var(h)))

    def forward(self, x: torch.Tensor, y_onehot: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_shape = x.shape[: x.dim() - len(self.input_shape)]
        loc, scale = self.heads(self.features(x), y_onehot.reshape(-1, self.num_classes))
        return loc.reshape(batch_shape + (-1,)), scale.reshape(batch_shape + (-1,))


LOG_VAR_BOUNDS = (-30.0, 20.0)


def clamp_log_var(log_var: torch.Tensor, bounds: tuple[float, float] = LOG_VAR_BOUNDS) -> torch.Tensor:
    """Log-variance clipped to ``bounds`` in the forward pass, with an identity (straight-through) gradient.

    The reference code clips at +-50; the tighter bounds keep exp() finite in fp16/bf16. A plain clamp
    has zero gradient outside the bounds, which makes them a trap: once a latent dimension's log-variance
    passes the upper bound for every input (seen with the paper's 28x28 networks at lr 1e-3: the loss
    froze at ~7e8, three dimensions at KL 0.5 e^20 each), the KL term can no longer pull it back. With
    the gradient passed straight through, the KL keeps pushing it back inside.
    """
    # clipped + 0 in the forward pass (exactly the clamp); d/d log_var = 1 everywhere in the backward pass
    return log_var.clamp(*bounds).detach() + (log_var - log_var.detach())


class Decoder(nn.Module):
    """p(x | z): maps latents to the natural parameter (logits or mean) of each pixel/feature."""

    def __init__(self, net: nn.Module, output_shape: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        self.net = net
        self.output_shape = tuple(output_shape)
        self.latent_dim = latent_dim

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat, batch_shape = _flatten_leading(z, 1)
        out = self.net(flat)
        return out.reshape(batch_shape + self.output_shape)


class Classifier(nn.Module):
    """p(y | z): logits over classes."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        flat, batch_shape = _flatten_leading(z, 1)
        out = self.net(flat)
        return out.reshape(batch_shape + out.shape[-1:])


@dataclass(frozen=True)
class ConvSpec:
    """A convolutional architecture: encoder channels/kernel, decoder start grid and channels."""

    enc_channels: tuple[int, ...]
    enc_kernel: int
    hidden_dim: int
    hidden_activation: bool
    dec_start: int  # spatial size of the decoder's first grid
    dec_channels: tuple[int, ...]  # channels of each up-sampling stage, first = grid channels
    dec_kernel: int
    classifier_hidden: tuple[int, ...]


# The "paper" entries follow the reference code (DGC_METHOD.md, "Networks in the reference code");
# 3x32x32 has no reference network, so it is designed in the same style (4 stride-2 convs, 2 deconvs).
CONV_SPECS: dict[tuple[tuple[int, ...], str], ConvSpec] = {
    ((1, 28, 28), "small"): ConvSpec((32, 64, 128), 4, 256, True, 7, (64, 32), 4, ()),
    ((1, 28, 28), "paper"): ConvSpec((128, 256, 512, 1024), 4, 4096, False, 7, (1024, 512, 256), 4, ()),
    ((3, 32, 32), "small"): ConvSpec((32, 64, 128), 4, 256, True, 8, (128, 64, 32), 4, ()),
    ((3, 32, 32), "paper"): ConvSpec((128, 256, 512, 1024), 4, 4096, False, 8, (1024, 512, 256), 4, ()),
    ((3, 64, 64), "small"): ConvSpec((32, 64, 128, 256), 4, 256, True, 8, (128, 64, 32, 16), 4, (256,)),
    ((3, 64, 64), "paper"): ConvSpec(
        (64, 128, 256, 512, 1024), 5, 4096, False, 8, (1024, 512, 256, 128), 5, (500, 500)
    ),
}

MLP_HIDDEN = {"small": (256, 256), "paper": (512, 512)}


class Conv2dSame(nn.Conv2d):
    """Stride-2 convolution with TensorFlow's "same" padding (output = ceil(input / stride)).

    The reference networks were written in TensorFlow; matching its padding keeps the paper's
    grid sizes (28 -> 14 -> 7 -> 4 -> 2), which symmetric PyTorch padding would not.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(x.shape[-2:][::-1], self.kernel_size[::-1], self.stride[::-1]):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return super().forward(nn.functional.pad(x, pads))


def _conv_body(in_channels: int, channels: Sequence[int], kernel: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    prev = in_channels
    for ch in channels:
        layers += [Conv2dSame(prev, ch, kernel, stride=2), nn.BatchNorm2d(ch), nn.ReLU()]
        prev = ch
    return nn.Sequential(*layers)


def _conv_out_size(size: int, channels: Sequence[int]) -> int:
    for _ in channels:
        size = math.ceil(size / 2)
    return size


class _Unflatten(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t.reshape((t.shape[0],) + self.shape)


def _conv_decoder(out_shape: Sequence[int], latent_dim: int, spec: ConvSpec) -> nn.Sequential:
    channels, height, _ = out_shape
    start, chans = spec.dec_start, spec.dec_channels
    layers: list[nn.Module] = [
        nn.Linear(latent_dim, chans[0] * start * start),
        _Unflatten((chans[0], start, start)),
        nn.BatchNorm2d(chans[0]),
        nn.ReLU(),
    ]
    size, prev = start, chans[0]
    k = spec.dec_kernel
    for ch in chans[1:]:
        if size >= height:
            break
        # kernel k, stride 2: output = 2*size when padding and output_padding are chosen this way.
        pad = (k - 1) // 2
        layers += [
            nn.ConvTranspose2d(prev, ch, k, stride=2, padding=pad, output_padding=2 * pad + 2 - k),
            nn.BatchNorm2d(ch),
            nn.ReLU(),
        ]
        size, prev = size * 2, ch
    while size < height:
        pad = (k - 1) // 2
        layers += [
            nn.ConvTranspose2d(prev, prev, k, stride=2, padding=pad, output_padding=2 * pad + 2 - k),
            nn.BatchNorm2d(prev),
            nn.ReLU(),
        ]
        size *= 2
    if size != height:
        raise ValueError(f"decoder grid {size} does not reach the image size {height}")
    layers.append(nn.Conv2d(prev, channels, 3, padding=1))
    return nn.Sequential(*layers)


def _mlp(sizes: Sequence[int], final_activation: bool = False) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def build_networks(
    input_shape: Sequence[int], num_classes: int, latent_dim: int, preset: str = "small"
) -> tuple[Encoder, Decoder, Classifier]:
    """Default encoder, decoder and classifier for ``input_shape`` and ``preset``.

    Vectors and small images (e.g. 1x8x8 digits) get MLPs; 1x28x28, 3x32x32 and 3x64x64 get the
    convolutional networks of ``CONV_SPECS``. Other image shapes fall back to an MLP over the pixels.
    """
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    shape = tuple(int(s) for s in input_shape)
    key = (shape, preset)
    if key in CONV_SPECS:
        spec = CONV_SPECS[key]
        body = _conv_body(shape[0], spec.enc_channels, spec.enc_kernel)
        side = _conv_out_size(shape[1], spec.enc_channels)
        feature_dim = spec.enc_channels[-1] * side * side
        encoder = Encoder(body, feature_dim, num_classes, latent_dim, spec.hidden_dim, shape, spec.hidden_activation)
        decoder = Decoder(_conv_decoder(shape, latent_dim, spec), shape, latent_dim)
        classifier = Classifier(_mlp((latent_dim, *spec.classifier_hidden, num_classes)))
        return encoder, decoder, classifier
    dim = math.prod(shape)
    hidden = MLP_HIDDEN[preset]
    body = nn.Sequential(nn.Flatten(), _mlp((dim, *hidden), final_activation=True))
    encoder = Encoder(body, hidden[-1], num_classes, latent_dim, hidden[-1], shape)
    decoder = Decoder(nn.Sequential(_mlp((latent_dim, *reversed(hidden), dim)), _Unflatten(shape)), shape, latent_dim)
    classifier = Classifier(nn.Linear(latent_dim, num_classes))
    return encoder, decoder, classifier
