"""l_inf -> l_inf Lipschitz bounds of networks of l_p-dist and other layers (Zhang et al. 2021,
§3), rounded up, and the drift of the float64 forward pass over an l_inf ball: the maths of the
``linf-lipschitz`` certifier and of l_inf-dist training (docs/rounding.md).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certnet.bounds.ibp import layer_drift
from certnet.bounds.rules import LayerInput
from certnet.floats import gamma
from certnet.nn.conv_algorithms import gemm_convolutions
from certnet.nn.layer_types import layer_type


def linf_layer_bound(m: nn.Module) -> float | None:
    """An upper bound of the layer's l_inf -> l_inf Lipschitz constant (its registration's
    ``linf_bound``; 1 for exact layers), None if unknown; rounded up (each formula's float
    evaluation is covered by its gamma)."""
    known = layer_type(m)
    if known is None:
        return None
    if known.exact:
        return 1.0
    return None if known.linf_bound is None else known.linf_bound(m)


def linf_lipschitz(layers: nn.Sequential, dist_at_inf: bool = False) -> float:
    """Product of the layers' bounds (ValueError naming a layer without one); with
    ``dist_at_inf`` every l_p-dist layer counts as at p = inf (the training surrogate)."""
    return prefix_bounds(layers, dist_at_inf)[-1]


def prefix_bounds(layers: nn.Sequential, dist_at_inf: bool = False) -> list[float]:
    """L_{<i} for every i (the last: the whole network's), rounded up."""
    total = [1.0]
    for i, m in enumerate(layers):
        known = layer_type(m)
        bound = 1.0 if dist_at_inf and known is not None and known.annealed_p else \
            linf_layer_bound(m)
        if bound is None or not math.isfinite(bound):
            raise ValueError(f"layer {i} ({type(m).__name__}) has no l_inf Lipschitz bound")
        total.append(total[-1] * bound * (1 + gamma(1)))
    return total


def ball_drift(layers: nn.Sequential, outputs: list[torch.Tensor], prefix: list[float],
               reach: torch.Tensor) -> torch.Tensor:
    """Per logit, a bound on |float64 forward - exact forward| anywhere in the l_inf ball of
    radius ``reach`` (B,) around each point (module docstring): the rules' ``drift`` over
    intervals around the computed values ``outputs`` (every layer's input, then the logits)."""
    error = torch.zeros_like(outputs[0])
    with gemm_convolutions():
        for i, m in enumerate(layers):
            h = outputs[i]
            width = 2 * error + (prefix[i] * reach * (1 + gamma(2))).view(
                -1, *([1] * (h.dim() - 1)))
            error = layer_drift(m, error, LayerInput(h - width, h + width, h))
    return error
