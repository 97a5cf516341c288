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

import torch
from torch import nn

from certnet.bounds.pairwise import SoundConstants, logit_gaps, pairwise_radius
from certnet.certifiers.base import Certificate, Certifier, register_certifier
from certnet.errors import UnsupportedLayerError
from certnet.floats import round_down
from certnet.nn.layer_types import is_dense
from certnet.nn.lipschitz import check_bounded
from certnet.nn.rounding import check_rounding, float64_forward
from certnet.threat import ThreatModel, from_l2_radius


class LipschitzCertifier(Certifier):
    name = "lipschitz"
    gives_radius = True
    cost = 0

    def applies(self, model, norm):
        layers = getattr(model, "layers", None)
        if not isinstance(layers, nn.Sequential) or not is_dense(layers[-1]):
            last = type(layers[-1]).__name__ if isinstance(layers, nn.Sequential) else None
            return ("it needs a chain of layers ending in a dense layer with a sound l2 bound "
                    f"(this one ends in {last}; a plain torch Sequential converts with "
                    "certnet.nn.convert_sequential, or GloroNet.from_sequential)")
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
        pred, gap = logit_gaps(logits, error)
        radius = pairwise_radius(gap, sound.pairwise[pred], pred)
        radius = from_l2_radius(radius, threat.norm, x[0].numel())
        # certified from the float64 radius; the reported float32 radius is rounded down, so
        # certifying at exactly the reported radius succeeds too
        return Certificate(pred=pred, certified=radius > threat.eps,
                           radius=round_down(radius))


register_certifier(LipschitzCertifier())
