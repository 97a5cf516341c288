"""The l_inf Lipschitz margin certificate of l_p-dist networks (Zhang et al. 2021, §3: every
l_inf-dist layer is 1-Lipschitz in l_inf, so a margin above 2 L eps certifies radius eps).

Applies to any network built from layers with a known l_inf -> l_inf Lipschitz bound:
l_p-dist layers (n^(1/p) for n inputs; 1 at p = inf), mean shifts, negation, flatten and the
1-Lipschitz elementwise activations, Normalize (max 1/|std|) and linear layers (the largest
row l1 norm). Each logit is then L-Lipschitz with L the product, and the margin
z_pred - z_j changes by at most 2 L ||delta||_inf: radius = margin / (2 L).

In l2 the same radius holds (the l2 ball lies in the l_inf ball of equal radius).

Rigorous in floating point (docs/rounding.md): L and every layer's bound are rounded up; the
float64 forward pass at x gives margins m_j; with R0 = min_j m_j / (2 L), every layer's
inputs, exact or float, anywhere in the l_inf ball of radius R0 lie within
2 e_i + L_{<i} R0 of the computed ones, e_i the drift of the float values from the exact
ones there (each rule's ``drift``, in turn, over those intervals). Then both the exact and
the float64 margin at any x' within r <= R0 are at least m_j - 2 (e_pred + e_j) - 2 L r:
radius = min_j (m_j - 2 (e_pred + e_j)) / (2 L), rounded down; ties are never certified.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certnet.bounds.ibp import layer_drift
from certnet.bounds.rules import LayerInput
from certnet.certifiers.base import Certificate, Certifier, register_certifier
from certnet.floats import gamma, round_down
from certnet.nn.conv_algorithms import gemm_convolutions
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate
from certnet.nn.lipschitz import ONE_LIPSCHITZ, LipschitzLinear, Normalize
from certnet.threat import ThreatModel

#: 1-Lipschitz in l_inf too: the exact l2 ones (elementwise or pairwise sorts) and these.
ONE_LIPSCHITZ_LINF = (*ONE_LIPSCHITZ, MeanShift, Negate, nn.Tanh)


def linf_layer_bound(m: nn.Module) -> float | None:
    """An upper bound of the layer's l_inf -> l_inf Lipschitz constant, None if unknown;
    rounded up (each formula's float evaluation is covered by its gamma)."""
    if type(m) in ONE_LIPSCHITZ_LINF:
        return 1.0
    if type(m) in (LinfDist, LinfDistConv2d):
        if m.bias is not None and not torch.isfinite(m.bias).all():
            return None
        n = m.weight.shape[1]
        # n^(1/p) by pow: within 2 ulps (module docstring of certnet.bounds.linf_dist_rules)
        return 1.0 if math.isinf(m.p) else float(n) ** (1 / m.p) * (1 + gamma(4))
    if type(m) is Normalize:
        return float((1 / m.std.detach().double().abs()).max()) * (1 + gamma(2))
    if type(m) in (LipschitzLinear, nn.Linear):
        rows = m.weight.detach().double().abs().sum(1).max()
        return float(rows) * (1 + gamma(m.weight.shape[1] + 1))
    return None


def linf_lipschitz(layers: nn.Sequential, dist_at_inf: bool = False) -> float:
    """Product of the layers' bounds (ValueError naming a layer without one); with
    ``dist_at_inf`` every l_p-dist layer counts as at p = inf (the training surrogate)."""
    return prefix_bounds(layers, dist_at_inf)[-1]


def prefix_bounds(layers: nn.Sequential, dist_at_inf: bool = False) -> list[float]:
    """L_{<i} for every i (the last: the whole network's), rounded up."""
    total = [1.0]
    for i, m in enumerate(layers):
        bound = 1.0 if dist_at_inf and type(m) in (LinfDist, LinfDistConv2d) else \
            linf_layer_bound(m)
        if bound is None or not math.isfinite(bound):
            raise ValueError(f"layer {i} ({type(m).__name__}) has no l_inf Lipschitz bound")
        total.append(total[-1] * bound * (1 + gamma(1)))
    return total


class LinfLipschitzCertifier(Certifier):
    name = "linf-lipschitz"
    gives_radius = True
    cost = 0

    def applies(self, model, norm):
        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.Sequential):
            return "it needs the model's network as an nn.Sequential in .layers"
        try:
            linf_lipschitz(layers)
        except ValueError as err:
            return str(err)
        return None

    @torch.no_grad()
    def certify(self, model, x: torch.Tensor, threat: ThreatModel) -> Certificate:
        twin = model.float64_copy("linf-lipschitz", prefix_bounds)
        prefix = twin.derived
        lipschitz = prefix[-1]
        outputs, h = [x.double()], x.double()
        with gemm_convolutions():
            for m in twin.layers:
                h = m(h)
                outputs.append(h)
        logits = h
        pred = logits.argmax(1)
        top = logits.gather(1, pred.unsqueeze(1))
        reach = (top - logits).scatter(1, pred.unsqueeze(1), torch.inf).amin(1) \
            .clamp_min(0) / (2 * lipschitz) * (1 + gamma(3))
        drift = ball_drift(twin.layers, outputs, prefix, reach)
        spread = drift.gather(1, pred.unsqueeze(1)) + drift
        # and the three subtractions' (and this one's) rounding
        gaps = top - logits - spread - gamma(4) * (top.abs() + logits.abs() + spread)
        worst = gaps.scatter(1, pred.unsqueeze(1), torch.inf).amin(1) if \
            logits.shape[1] > 1 else torch.full_like(reach, -math.inf)
        worst = torch.where(torch.isnan(worst), -math.inf, worst)
        radius = torch.nextafter((worst / (2 * lipschitz)).clamp_min(0),
                                 torch.zeros_like(worst))  # the division rounds
        radius = torch.minimum(radius, reach)
        # a lower bound on the exact margin over the eps-ball (the product rounded up)
        ball = worst - 2 * threat.eps * lipschitz * (1 + gamma(2))
        return Certificate(pred=pred, certified=radius > threat.eps,
                           radius=round_down(radius), margin=ball)


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


register_certifier(LinfLipschitzCertifier())
