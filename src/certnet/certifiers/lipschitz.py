"""The Lipschitz certificate (GloRo, Leino et al. 2021, Eq. 4-5; Tsuzuku et al. 2018): for any
network whose every layer has a sound l2 Lipschitz bound and whose last layer is linear,
radius = min_{i != j} (lower bound of y_j - y_i) / K_ji with K_ji = ||w_j - w_i||_2 *
prod(bounds of the layers before it).

Sound by construction: guaranteed float64 upper bounds only (:mod:`certnet.nn.spectral`), a
float64 forward pass whose rounding is bounded (:mod:`certnet.nn.rounding`), ties never
certified, the radius rounded down. In l_inf the l2 radius is divided by sqrt(d) (the l_inf
ball of radius r lies in the l2 ball of radius r sqrt(d)).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from certnet.certifiers.base import Certificate, Certifier, register_certifier
from certnet.errors import UnsupportedLayerError
from certnet.nn.lipschitz import LipschitzLinear, check_bounded, layer_bound, product
from certnet.nn.rounding import check_rounding, float64_forward
from certnet.nn.spectral import BOUND_SLACK
from certnet.threat import ThreatModel, from_l2_radius

#: Relative slack on logit gaps, on top of the rigorous bound on the float64 forward pass's
#: rounding: covers the final subtractions, and float32 evaluation of ordinary networks.
GAP_SLACK = 1e-5


def pairwise_lipschitz(head_weight: torch.Tensor, body_lipschitz: torch.Tensor) -> torch.Tensor:
    """K_ij = ||w_i - w_j||_2 * Lip(body): the Lipschitz constant of y_i - y_j (GloRo Eq. 4).
    The norms are taken of rows rescaled by the largest weight, so they do not underflow."""
    scale = head_weight.detach().abs().max().clamp_min(torch.finfo(head_weight.dtype).tiny)
    diff = (head_weight.unsqueeze(0) - head_weight.unsqueeze(1)) / scale
    return diff.norm(dim=-1) * scale * body_lipschitz


@dataclass
class SoundConstants:
    """Sound float64 Lipschitz bounds of a network: per layer, of the body, pairwise K."""

    layers: list[torch.Tensor]
    body: torch.Tensor
    pairwise: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, layers: nn.Sequential) -> SoundConstants:
        bounds = [layer_bound(m) for m in layers]
        body = product(bounds[:-1])
        pairwise = pairwise_lipschitz(layers[-1].weight.double(), body) * (1 + BOUND_SLACK)
        return cls(bounds, body, pairwise)


def round_down_float32(value: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding toward zero (values >= 0), so a radius never grows."""
    down = value.float()
    return torch.where(down.double() > value, torch.nextafter(down, torch.zeros_like(down)),
                       down)


class LipschitzCertifier(Certifier):
    name = "lipschitz"
    gives_radius = True
    cost = 0

    def applies(self, model, norm):
        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.Sequential) or type(layers[-1]) is not LipschitzLinear:
            return "it needs a network ending in a linear layer"
        try:
            for m in layers:
                check_bounded(m)
                check_rounding(m)
        except UnsupportedLayerError as err:
            return str(err)
        return None

    @torch.no_grad()
    def certify(self, model, x: torch.Tensor, threat: ThreatModel) -> Certificate:
        twin = model.float64_copy("lipschitz", SoundConstants.of)
        sound = twin.derived
        logits, error = float64_forward(twin.layers, x, sound.layers)
        pred = logits.argmax(1)
        top = logits.gather(1, pred.unsqueeze(1))
        # |error of y_j - y_i| <= |d_j| + |d_i| <= 2 ||d||_2 <= 2 E
        gap = top - logits - GAP_SLACK * (1 + top.abs() + logits.abs()) - 2 * error[:, None]
        k = sound.pairwise[pred]
        others = torch.ones_like(gap, dtype=torch.bool).scatter(1, pred.unsqueeze(1), False)
        valid = torch.isfinite(gap) & torch.isfinite(k) & (k > 0)
        pair_radius = torch.where(valid, gap / torch.where(valid, k, 1.0), 0.0).clamp_min(0)
        radius = torch.where(others, pair_radius, float("inf")).min(1).values
        radius = torch.nextafter(radius, torch.zeros_like(radius))  # the division rounds
        radius = from_l2_radius(radius, threat.norm, x[0].numel())
        # certified from the float64 radius; the reported float32 radius is rounded down, so
        # certifying at exactly the reported radius succeeds too
        return Certificate(pred=pred, certified=radius > threat.eps,
                           radius=round_down_float32(radius))


register_certifier(LipschitzCertifier())
