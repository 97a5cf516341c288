"""A float64 forward pass with a rigorous bound on its rounding error.

Certificates are about the network in exact arithmetic. The float64 logits differ from the
exact ones by rounding, which is tiny for ordinary weights but not when large intermediate
values cancel later (biases of 1e16, say). :func:`float64_forward` returns, per point, a bound
E on the l2 distance between the computed and the exact logits, propagated layer by layer:

    e_out <= Lip(layer) * e_in + r(layer, x_computed)

where r bounds the rounding of the layer itself. For an affine layer with fan-in n (Higham,
"Accuracy and Stability of Numerical Algorithms", §3.1: any summation order, FMA or not),
|fl(W x + b) - (W x + b)| <= gamma_{n+1} (|W| |x| + |b|) per entry, gamma_k = k u / (1 - k u),
whose l2 norm is at most gamma_{n+1} (||abs(W)||_2 ||x||_2 + ||b||_2 sqrt(positions)).
ReLU, MinMax, their clipped forms, Flatten and Identity are exact and 1-Lipschitz. One rule per
exact layer type; a method's own layer registers its rule with :func:`register_rounding_rule`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from certnet.errors import UnsupportedLayerError
from certnet.nn.conv_algorithms import gemm_convolutions
from certnet.nn.lipschitz import (
    ONE_LIPSCHITZ,
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    ResidualConv2d,
    batchnorm_affine,
)
from certnet.nn.spectral import FLOAT64_UNIT_ROUNDOFF, magnitude_bound

Rule = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
ROUNDING_RULES: dict[type[nn.Module], Rule] = {}
#: Relative safety factor on the computed error bound (its own float64 evaluation rounds).
ERROR_SAFETY = 1 + 1e-6
#: Relative slack on float64 margins and interval bounds whose rounding is not tracked
#: rigorously: ``ROUNDING_SLACK * (1 + M)``, M the largest magnitude of any value computed for
#: the point. Rounding is ~1e-16 relative per operation, accumulated over fan-ins up to ~1e5 and
#: a few dozen layers; this is orders of magnitude above it.
ROUNDING_SLACK = 1e-9


def gamma(n: int) -> float:
    """gamma_n = n u / (1 - n u): the relative error bound of an n-term float64 dot product."""
    nu = n * FLOAT64_UNIT_ROUNDOFF
    return nu / (1 - nu)


def register_rounding_rule(cls: type[nn.Module]) -> Callable[[Rule], Rule]:
    """Decorator: ``rule(layer, x, y)`` bounds the l2 rounding error per point that
    ``y = layer(x)``, computed in float64, adds (exact type match)."""
    def decorator(rule: Rule) -> Rule:
        ROUNDING_RULES[cls] = rule
        return rule
    return decorator


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _affine(magnitude: torch.Tensor, terms: int, bias: torch.Tensor | None,
            x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    positions = y[0, 0].numel() if y.dim() > 2 else 1
    bias_norm = 0.0 if bias is None else bias.detach().double().norm() * positions**0.5
    return gamma(terms) * (magnitude * _norms(x) + bias_norm)


@register_rounding_rule(LipschitzLinear)
def _linear(layer: LipschitzLinear, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _affine(magnitude_bound(layer.weight), layer.in_features + 1, layer.bias, x, y)


@register_rounding_rule(LipschitzConv2d)
def _conv(layer: LipschitzConv2d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return _affine(magnitude_bound(layer.weight), layer.weight[0].numel() + 1, layer.bias, x, y)


@register_rounding_rule(ResidualConv2d)
def _residual_conv(layer: ResidualConv2d, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # the kernel alpha * W + I is itself rounded (2u per entry): 2 more terms in gamma
    return _affine(magnitude_bound(layer.kernel_majorant()), layer.weight[0].numel() + 3,
                   layer.bias, x, y)


@register_rounding_rule(Normalize)
def _normalize(layer: Normalize, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # fl(fl(x - m) / s) = (x - m) / s * (1 + d), |d| <= 2u + u^2
    return 3 * FLOAT64_UNIT_ROUNDOFF * _norms(y)


@register_rounding_rule(nn.BatchNorm1d)
@register_rounding_rule(nn.BatchNorm2d)
def _batchnorm(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # y = x * a + c with a, c computed in a few float64 steps from the running statistics:
    # each entry is off by at most 8u (|x a| + |m a| + |beta|) (generous for any order)
    scale, shift = batchnorm_affine(layer)
    mean_part = (layer.running_mean.double() * scale).abs()
    beta = layer.bias.detach().double().abs() if layer.bias is not None else 0.0
    positions = y[0, 0].numel() if y.dim() > 2 else 1
    constant = (mean_part + beta).norm() * positions**0.5
    return 8 * FLOAT64_UNIT_ROUNDOFF * (scale.abs().max() * _norms(x) + constant)


def check_rounding(layer: nn.Module) -> None:
    """UnsupportedLayerError unless the layer's exact type has a rounding rule."""
    if type(layer) not in ONE_LIPSCHITZ and type(layer) not in ROUNDING_RULES:
        raise UnsupportedLayerError(f"no rounding rule for layer {type(layer).__name__}")


def rounding_error(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-point bound on the l2 rounding error of ``y = layer(x)`` computed in float64."""
    check_rounding(layer)
    if type(layer) in ONE_LIPSCHITZ:
        return torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    return ROUNDING_RULES[type(layer)](layer, x, y)


@torch.no_grad()
def float64_forward(layers: nn.Sequential, x: torch.Tensor, lipschitz: list[torch.Tensor],
                    outputs: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the float64 ``layers`` on ``x`` and, per point, a bound on their l2 distance
    to the exact-arithmetic logits; ``lipschitz[i]`` is a sound bound of layer i. Every
    layer's output is appended to ``outputs`` if given.

    Convolutions run as im2col + GEMM (:func:`gemm_convolutions`: oneDNN, which has no
    float64 kernels anyway, and cuDNN off), so no FFT or Winograd algorithm (whose error the
    bound above does not cover) is chosen."""
    x = x.double()
    error = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    with gemm_convolutions():
        for layer, lip in zip(layers, lipschitz, strict=True):
            y = layer(x)
            error = lip * error + rounding_error(layer, x, y)
            x = y
            if outputs is not None:
                outputs.append(y)
    return x, error * ERROR_SAFETY
