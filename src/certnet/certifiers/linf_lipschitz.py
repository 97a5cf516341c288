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

from certnet.bounds.linf_lipschitz import ball_drift, linf_lipschitz, prefix_bounds
from certnet.certifiers.base import Certificate, Certifier, layers_problem, register_certifier
from certnet.floats import gamma, round_down
from certnet.nn.conv_algorithms import gemm_convolutions
from certnet.threat import ThreatModel


class LinfLipschitzCertifier(Certifier):
    name = "linf-lipschitz"
    gives_radius = True
    cost = 0

    def applies(self, model, norm):
        return layers_problem(model, linf_lipschitz, ValueError)

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
        gaps = lower_gaps(top, logits, drift.gather(1, pred.unsqueeze(1)) + drift)
        worst = gaps.scatter(1, pred.unsqueeze(1), torch.inf).amin(1) if \
            logits.shape[1] > 1 else torch.full_like(reach, -math.inf)
        worst = torch.where(torch.isnan(worst), -math.inf, worst)
        radius = torch.nextafter((worst / (2 * lipschitz)).clamp_min(0),
                                 torch.zeros_like(worst))  # the division rounds
        # NaN where 2 L overflows (inf / inf, -inf / inf): no radius (0 is always sound)
        radius = torch.where(torch.isnan(radius) | torch.isnan(reach), 0.0,
                             torch.minimum(radius, reach))
        # a lower bound on the exact margin over the eps-ball (the product rounded up)
        ball = worst - 2 * threat.eps * lipschitz * (1 + gamma(2))
        return Certificate(pred=pred, certified=radius > threat.eps,
                           radius=round_down(radius), margin=ball)


def lower_gaps(top: torch.Tensor, logits: torch.Tensor, spread: torch.Tensor) -> torch.Tensor:
    """top - logits - spread rounded down: the three subtractions (and this allowance's own
    evaluation) round by at most gamma_4 (|top| + |logits| + spread), spread >= 0."""
    return top - logits - spread - gamma(4) * (top.abs() + logits.abs() + spread)


register_certifier(LinfLipschitzCertifier())
