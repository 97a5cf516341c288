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
Every such bound is linear in ||x||, ||y|| and sqrt(positions) with coefficients that depend on
the layer alone (:class:`RoundingBound`), computed once per pass. ReLU, MinMax, their clipped
forms, Flatten and Identity are exact and 1-Lipschitz. Each layer type's rule (exact match) is
the ``rounding`` of its registration (:mod:`certnet.nn.layer_types`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from certnet.errors import UnsupportedLayerError
from certnet.floats import eta, gamma
from certnet.nn.conv_algorithms import gemm_chunk, gemm_convolutions
from certnet.nn.layer_types import layer_type

#: Relative safety factor on the computed error bound: its own float64 evaluation takes a few
#: roundings per layer (under gamma_{5L} < 1e-6 for any L < 10^9 layers).
ERROR_SAFETY = 1 + 1e-6


def _norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


@dataclass(frozen=True)
class RoundingBound:
    """A layer's rounding bound per point, linear in the l2 norms of its float64 input x and
    output y: ``input ||x|| + output ||y|| + per_position sqrt(positions of y)`` (absent terms
    are 0). Its float64 coefficients depend on the layer only: computed once per pass."""

    input: torch.Tensor | float | None = None
    output: torch.Tensor | float | None = None
    per_position: float = 0.0
    #: per output entry (what products may lose to underflow, floats.py)
    per_entry: float = 0.0

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        positions = math.prod(y.shape[2:])
        fixed = self.per_position * positions**0.5 + self.per_entry * math.prod(y.shape[1:])**0.5
        error = torch.full((x.shape[0],), fixed, dtype=torch.float64, device=x.device)
        if self.input is not None:
            error = error + self.input * _norms(x)
        if self.output is not None:
            error = error + self.output * _norms(y)
        return error


def affine_rounding(magnitude: torch.Tensor, terms: int, bias: torch.Tensor | None
                    ) -> RoundingBound:
    """gamma_terms (||abs(W)|| ||x|| + ||b||) and, per output, terms * eta for products that
    underflow (floats.py)."""
    g = gamma(terms)
    bias_norm = 0.0 if bias is None else float(bias.detach().double().norm())
    return RoundingBound(input=g * magnitude, per_position=g * bias_norm,
                         per_entry=terms * eta())


def check_rounding(layer: nn.Module) -> None:
    """UnsupportedLayerError unless the layer's exact type has a rounding rule."""
    known = layer_type(layer)
    if known is None or not (known.exact or known.rounding is not None):
        raise UnsupportedLayerError(f"no rounding rule for layer {type(layer).__name__}")


def rounding_bound(layer: nn.Module) -> RoundingBound | None:
    """The bound on the l2 rounding error per point of ``layer`` computed in float64 (its
    registration's ``rounding``); None for an exact layer."""
    check_rounding(layer)
    rounding = layer_type(layer).rounding
    return None if rounding is None else rounding(layer)


@torch.no_grad()
def float64_forward(layers: nn.Sequential, x: torch.Tensor, lipschitz: list[torch.Tensor],
                    outputs: list[torch.Tensor] | None = None,
                    errors: list[torch.Tensor] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of the float64 ``layers`` on ``x`` and, per point, a bound on their l2 distance
    to the exact-arithmetic logits; ``lipschitz[i]`` is a sound bound of layer i. Every
    layer's output is appended to ``outputs`` if given, and the bound on its distance to the
    exact one (per point) to ``errors``.

    Convolutions run as im2col + GEMM (:func:`gemm_convolutions`: oneDNN, which has no
    float64 kernels anyway, and cuDNN off), so no FFT or Winograd algorithm (whose error the
    bound above does not cover) is chosen; on the CPU in chunks of points whose im2col
    buffers stay in cache (:func:`gemm_chunk`)."""
    x = x.double()
    bounds = [rounding_bound(layer) for layer in layers]
    with gemm_convolutions():
        parts = [_forward(layers, part, lipschitz, bounds, outputs is not None)
                 for part in x.split(gemm_chunk(layers, x))]
    if outputs is not None:
        outputs.extend(torch.cat(seen) for seen in zip(*(p[2] for p in parts), strict=True))
    if errors is not None:
        errors.extend(torch.cat(e) * ERROR_SAFETY for e in zip(*(p[3] for p in parts),
                                                                 strict=True))
    logits, error = (torch.cat(t) for t in zip(*(p[:2] for p in parts), strict=True))
    return logits, error * ERROR_SAFETY


def _forward(layers: nn.Sequential, x: torch.Tensor, lipschitz: list[torch.Tensor],
             bounds: list[RoundingBound | None], keep: bool
             ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """:func:`float64_forward` on one chunk: logits, error bound, and (if ``keep``) every
    layer's output, and every layer's error bound."""
    error = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    seen, errors = [], []
    for layer, lip, bound in zip(layers, lipschitz, bounds, strict=True):
        y = layer(x)
        error = lip * error if bound is None else lip * error + bound(x, y)
        x = y
        errors.append(error)
        if keep:
            seen.append(y)
    return x, error, seen, errors
