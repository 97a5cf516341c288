"""The l_inf Lipschitz margin certificate of l_p-dist networks (Zhang et al. 2021, §3: every
l_inf-dist layer is 1-Lipschitz in l_inf, so a margin above 2 L eps certifies radius eps).

Applies to any network built from layers with a known l_inf -> l_inf Lipschitz bound:
l_p-dist layers (n^(1/p) for n inputs; 1 at p = inf), mean shifts, negation, flatten and the
1-Lipschitz elementwise activations, Normalize (max 1/|std|) and linear layers (the largest
row l1 norm). Each logit is then L-Lipschitz with L the product, and the margin
z_pred - z_j changes by at most 2 L ||delta||_inf: radius = margin / (2 L).

In l2 the same radius holds (the l2 ball lies in the l_inf ball of equal radius). Sound: a
float64 eval-mode forward pass, the margin reduced by a relative slack far above its rounding,
L rounded up, ties never certified, the radius rounded down.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from certnet.certifiers.base import Certificate, Certifier, register_certifier
from certnet.certifiers.lipschitz import round_down_float32
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate
from certnet.nn.lipschitz import ONE_LIPSCHITZ, LipschitzLinear, Normalize
from certnet.nn.rounding import ROUNDING_SLACK
from certnet.threat import ThreatModel

#: Relative slack on the Lipschitz constant (pow and products round in float64).
CONSTANT_SLACK = 1e-12

#: 1-Lipschitz in l_inf too: the exact l2 ones (elementwise or pairwise sorts) and these.
ONE_LIPSCHITZ_LINF = (*ONE_LIPSCHITZ, MeanShift, Negate, nn.Tanh)


def linf_layer_bound(m: nn.Module) -> float | None:
    """An upper bound of the layer's l_inf -> l_inf Lipschitz constant, None if unknown."""
    if type(m) in ONE_LIPSCHITZ_LINF:
        return 1.0
    if type(m) in (LinfDist, LinfDistConv2d):
        if m.bias is not None and not torch.isfinite(m.bias).all():
            return None
        return 1.0 if math.isinf(m.p) else float(m.weight.shape[1]) ** (1 / m.p)
    if type(m) is Normalize:
        return float((1 / m.std.detach().double().abs()).max())
    if type(m) in (LipschitzLinear, nn.Linear):
        return float(m.weight.detach().double().abs().sum(1).max())
    return None


def linf_lipschitz(layers: nn.Sequential, dist_at_inf: bool = False) -> float:
    """Product of the layers' bounds (ValueError naming a layer without one); with
    ``dist_at_inf`` every l_p-dist layer counts as at p = inf (the training surrogate)."""
    total = 1.0
    for i, m in enumerate(layers):
        bound = 1.0 if dist_at_inf and type(m) in (LinfDist, LinfDistConv2d) else \
            linf_layer_bound(m)
        if bound is None or not math.isfinite(bound):
            raise ValueError(f"layer {i} ({type(m).__name__}) has no l_inf Lipschitz bound")
        total *= bound
    return total


def sound_linf_lipschitz(layers: nn.Sequential) -> float:
    """:func:`linf_lipschitz`, rounded up."""
    return linf_lipschitz(layers) * (1 + CONSTANT_SLACK)


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
        twin = model.float64_copy("linf-lipschitz", sound_linf_lipschitz)
        h, size = x.double(), torch.zeros(len(x), dtype=torch.float64, device=x.device)
        for m in twin.layers:
            h = m(h)
            size = torch.maximum(size, h.abs().flatten(1).amax(1))
        logits = h
        pred = logits.argmax(1)
        top = logits.gather(1, pred.unsqueeze(1)).squeeze(1)
        others = logits.scatter(1, pred.unsqueeze(1), -math.inf).amax(1) if \
            logits.shape[1] > 1 else torch.full_like(top, -math.inf)
        margin = top - others - ROUNDING_SLACK * (1 + size)
        radius = (margin / (2 * twin.derived)).clamp_min(0)
        radius = torch.where(torch.isnan(radius), torch.zeros_like(radius), radius)
        radius = torch.nextafter(radius, torch.zeros_like(radius))  # the division rounds
        # the margin's lower bound over the ball (the eps-scaled constant rounded up)
        ball = margin - 2 * threat.eps * twin.derived * (1 + CONSTANT_SLACK)
        return Certificate(pred=pred, certified=radius > threat.eps,
                           radius=round_down_float32(radius), margin=ball)


register_certifier(LinfLipschitzCertifier())
