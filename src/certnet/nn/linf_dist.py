"""l_p-dist neurons (Zhang et al. 2021, "Towards Certifying L-infinity Robustness using Neural
Networks with L-inf-dist Neurons", Eq. 1; v2: Zhang et al. 2022) and their companions.

A neuron computes u = ||x - w||_p: at p = inf it is 1-Lipschitz in l_inf, so a network of such
layers (with mean shifts, which are translations) has 1-Lipschitz outputs and is certified by
its margin (§3: a margin above 2 eps certifies the l_inf ball of radius eps). p is annealed
from 8 towards inf during training (:class:`certnet.methods.linf_dist.LinfDistNet` sets it);
checkpoints store it.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from certnet import distributed
from certnet.errors import ConfigError, InputError
from certnet.floats import gamma
from certnet.nn.layer_types import LayerType, register_layer_type, unit_bound
from certnet.nn.linf_dist_kernels import linf_dist
from certnet.schema import Count, Fraction, Positive

#: a p as a spec or method option states it: a number >= 1 or "inf"
P = Annotated[float, Field(ge=1)] | Literal["inf"]


def check_p(p: float | str) -> float:
    """p as a float in [1, inf] ("inf" allowed, as stored in JSON)."""
    try:
        value = float(p)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"p must be a number >= 1 or 'inf', got {p!r}") from err
    if math.isnan(value) or value < 1:
        raise ConfigError(f"p must be >= 1 (or inf), got {p!r}")
    return value


def p_to_json(p: float) -> float | str:
    return "inf" if math.isinf(p) else p


class LinfDist(nn.Module):
    """Fully-connected l_p-dist layer: u_o = ||x - w_o||_p (+ b_o if ``bias``; the papers put a
    bias on the last layer only). Input (B, in_features)."""

    def __init__(self, in_features: int, out_features: int, p: float | str = math.inf,
                 bias: bool = False) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ConfigError("LinfDist needs in_features, out_features >= 1")
        self.in_features, self.out_features = in_features, out_features
        self.p = check_p(p)
        self.weight = nn.Parameter(torch.randn(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or x.shape[1] != self.in_features:
            raise InputError(f"LinfDist expects (B, {self.in_features}), got {tuple(x.shape)}")
        u = linf_dist(x.to(self.weight.dtype), self.weight, self.p)  # autocast: fp32
        return u if self.bias is None else u + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"p={self.p}, bias={self.bias is not None}")


class LinfDistConv2d(nn.Module):
    """Convolutional l_p-dist layer: every output position is the l_p distance of its
    (zero-padded) input patch of ``in_channels * k * k`` values to each filter."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, p: float | str = math.inf, bias: bool = False) -> None:
        super().__init__()
        if min(in_channels, out_channels, kernel_size, stride) < 1 or padding < 0:
            raise ConfigError("LinfDistConv2d needs positive channels, kernel and stride and "
                              "padding >= 0")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.p = check_p(p)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels * kernel_size ** 2))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        k, s, pad = self.kernel_size, self.stride, self.padding
        return (height + 2 * pad - k) // s + 1, (width + 2 * pad - k) // s + 1

    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B * H' * W', C * k * k): every input patch as a row."""
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise InputError(f"LinfDistConv2d expects (B, {self.in_channels}, H, W), got "
                             f"{tuple(x.shape)}")
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.stride)
        return cols.transpose(1, 2).reshape(-1, cols.shape[1])

    def fold(self, rows: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """(B * H' * W', out) -> (B, out, H', W') for the input ``like``."""
        h, w = self.output_size(*like.shape[-2:])
        return rows.view(like.shape[0], h * w, -1).transpose(1, 2).reshape(
            like.shape[0], -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.fold(linf_dist(self.patches(x.to(self.weight.dtype)), self.weight, self.p), x)
        return u if self.bias is None else u + self.bias.view(1, -1, 1, 1)


def patch_kernel(channels: int, kernel_size: int, dtype: torch.dtype = torch.float32
                 ) -> torch.Tensor:
    """The one-hot convolution kernel (C k k, C, k, k) whose output channel c k k + i k + j
    copies input (c, i, j): :meth:`LinfDistConv2d.patches` as a convolution (unfold's order),
    how the ONNX export writes it and the ONNX reader recognises it."""
    k = kernel_size
    onehot = torch.zeros(channels * k * k, channels, k, k, dtype=dtype)
    rows = torch.arange(channels * k * k)
    onehot[rows, rows // (k * k), rows // k % k, rows % k] = 1
    return onehot


class MeanShift(nn.Module):
    """Mean-only batch normalisation (Zhang et al. 2021, §5: BatchNorm without the variance
    division and affine map): z = h - mu per channel, mu the batch mean in training (running
    mean updated with ``momentum``), the running mean in eval. A translation: 1-Lipschitz in
    every norm."""

    def __init__(self, num_features: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.momentum = num_features, momentum
        self.register_buffer("running_mean", torch.zeros(num_features))

    def batch_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Per-channel mean of the batch (of the global batch in a torchrun run)."""
        return distributed.batch_mean(x, [0, *range(2, x.dim())])

    def shift(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel mean this layer subtracts from the batch ``x`` (no state update)."""
        return self.batch_mean(x) if self.training else self.running_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise InputError(f"MeanShift expects (B, {self.num_features}, ...), got "
                             f"{tuple(x.shape)}")
        mean = self.shift(x)
        if self.training:
            with torch.no_grad():
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype),
                                        self.momentum)
        return x - mean.view(1, -1, *([1] * (x.dim() - 2)))


class Negate(nn.Module):
    """z = -h: the logits of an l_p-dist network are minus its last layer's distances."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return -x


def identity_init(layer: LinfDist | LinfDistConv2d, value: float = 10.0) -> None:
    """v2's identity initialisation (Zhang et al. 2022, §4): where a layer has at least as many
    outputs as inputs, output o gets weight -value on input o mod in (a conv: on the centre of
    channel o mod C), so u_o ~ x_{o mod in} + value at the start: an identity map plus a constant
    the mean shift removes."""
    with torch.no_grad():
        if isinstance(layer, LinfDist):
            if layer.in_features <= layer.out_features:
                rows = torch.arange(layer.out_features)
                layer.weight[rows, rows % layer.in_features] = -value
        elif layer.in_channels <= layer.out_channels:
            k = layer.kernel_size
            view = layer.weight.view(layer.out_channels, layer.in_channels, k, k)
            rows = torch.arange(layer.out_channels)
            view[rows, rows % layer.in_channels, k // 2, k // 2] = -value


def dist_layers(layers: nn.Module) -> list[LinfDist | LinfDistConv2d]:
    return [m for m in layers.modules() if type(m) in (LinfDist, LinfDistConv2d)]


def _dist_linf_bound(m: LinfDist | LinfDistConv2d) -> float | None:
    """||.||_p of n differences is n^(1/p)-Lipschitz in l_inf (Zhang et al. 2021, §3); n^(1/p)
    by pow, within 2 ulps (module docstring of certnet.bounds.rules.linf_dist)."""
    if m.bias is not None and not torch.isfinite(m.bias).all():
        return None
    n = m.weight.shape[1]
    return 1.0 if math.isinf(m.p) else float(n) ** (1 / m.p) * (1 + gamma(4))


register_layer_type(LayerType(LinfDist, "linf_dist", lambda m: {
    "in_features": m.in_features, "out_features": m.out_features, "p": p_to_json(m.p),
    "bias": m.bias is not None},
    {"in_features": Positive, "out_features": Positive, "p": P, "bias": bool},
    linf_bound=_dist_linf_bound, annealed_p=True))
register_layer_type(LayerType(LinfDistConv2d, "linf_dist_conv", lambda m: {
    "in_channels": m.in_channels, "out_channels": m.out_channels,
    "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
    "p": p_to_json(m.p), "bias": m.bias is not None},
    {"in_channels": Positive, "out_channels": Positive, "kernel_size": Positive,
     "stride": Positive, "padding": Count, "p": P, "bias": bool},
    linf_bound=_dist_linf_bound, annealed_p=True))
register_layer_type(LayerType(MeanShift, "mean_shift", lambda m: {
    "num_features": m.num_features, "momentum": m.momentum},
    {"num_features": Positive, "momentum": Fraction}, linf_bound=unit_bound, batch_statistics=True))
register_layer_type(LayerType(Negate, "negate", linf_bound=unit_bound))
