"""Certificates from bound propagation (:mod:`certnet.bounds`): IBP (Gowal et al. 2018), CROWN-IBP
(Zhang et al. 2020), full CROWN (Zhang et al. 2018) and alpha-CROWN (Xu et al. 2021)
lower-bound every margin z_pred - z_j over the threat model; a point is certified iff all of
them are > 0.

Rigorous in floating point (docs/rounding.md): a float64 copy of the network in eval mode,
every interval and backward step widened by a proven bound on its own rounding, and the
margins bound both the exact network's and the float64 forward pass's, anywhere in the set.
These certificates prove "eps or nothing": the radius is eps where certified, 0 elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from certnet.bounds.margins import BoundMethod, margin_walk
from certnet.bounds.rules import check_supported
from certnet.bounds.rules.fixed_weights import fixed_weights
from certnet.certifiers.base import Certificate, Certifier, layers_problem, register_certifier
from certnet.nn.conv_algorithms import gemm_chunk
from certnet.threat import ThreatModel

#: Coefficient-tensor elements one chunk of points may hold in a backward pass.
CHUNK_ELEMENTS = 2 ** 26
#: alpha-CROWN holds about this many coefficient-sized tensors per ReLU layer at once.
ALPHA_MEMORY = 8


@torch.no_grad()
def margin_certificate(layers64: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                       method: BoundMethod, slope: str = "adaptive") -> Certificate:
    """Certificate for a batch from a float64 eval-mode network ``layers64``: ``margin`` is a
    rigorous lower bound on min_j z_pred - z_j over the threat model, of the exact network
    and of its float64 forward pass (:func:`margin_walk`'s ``rigorous``). The
    prediction is the float64 forward pass's argmax; chunks of points bound the memory and, on
    the CPU, keep the convolutions' im2col buffers in cache (:func:`gemm_chunk`)."""
    x64 = x.double()
    outputs = layer_outputs(layers64, x64[:1])
    widest = max(x64[0].numel(), *(h[0].numel() for h in outputs))
    chunk = max(1, min(CHUNK_ELEMENTS // (max(1, outputs[-1].shape[1] - 1) * widest),
                       gemm_chunk(layers64, x64, outputs)))
    if method == "alpha-crown":  # slopes, their Adam moments and the graph of a pass
        chunk = max(1, chunk // ALPHA_MEMORY)
    preds, margins = [], []
    for i in range(0, len(x64), chunk):
        part = x64[i:i + chunk]
        lower, _, logits = margin_walk(layers64, part, threat, None, method, slope,
                                       rigorous=True)
        preds.append(logits.argmax(1))
        margins.append(lower.min(1).values)
    pred, margin = torch.cat(preds), torch.cat(margins)
    margin = torch.where(torch.isnan(margin), torch.full_like(margin, -torch.inf), margin)
    return Certificate.eps_or_nothing(pred, margin, threat.eps)


def layer_outputs(layers: nn.Sequential, x: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's output on ``x``."""
    outs = []
    for m in layers:
        x = m(x)
        outs.append(x)
    return outs


class BoundCertifier(Certifier):
    """One of the bounds engine's margin bounds, on any model whose layers all have rules."""

    gives_radius = False

    def __init__(self, name: str, method: BoundMethod, cost: int,
                 subsumes: tuple[str, ...] = ()) -> None:
        self.name = name
        self.method = method
        self.cost = cost
        self.subsumes = subsumes

    def applies(self, model, norm):
        return layers_problem(model, check_supported)

    def certify(self, model, x, threat):
        twin = model.float64_copy("bounds", lambda layers: None)
        with fixed_weights(twin.weight_memo):
            return margin_certificate(twin.layers, x, threat, self.method, model.slope)


for _cost, _name in enumerate(("ibp", "crown-ibp", "crown"), start=1):
    register_certifier(BoundCertifier(_name, _name, _cost))
# alpha-CROWN's bound starts from full CROWN's, on the same intermediate bounds and slack
register_certifier(BoundCertifier("alpha-crown", "alpha-crown", 4, subsumes=("crown",)))
