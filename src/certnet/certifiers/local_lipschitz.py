"""The local Lipschitz certificate (Huang et al. 2021, "Training Certifiably Robust Neural
Networks with Efficient Local Lipschitz Bounds", §3) on GloRo's pairwise head (Leino et al.
2021, Eq. 4): per point, K_ij = ||(w_i - w_j) o c||_2 * prod of the local layer bounds on the
threat set (:mod:`certnet.bounds.local`; c keeps the head inputs that can change there), and
the point is certified iff every gap y_pred - y_j exceeds r K_ij, r the l2 radius of the
threat ball (eps, or eps sqrt(d) in l_inf, whose ball lies in that l2 ball), or exceeds the
largest change of the margin when the head's input moves in the intersection of its l2 ball
(radius r * the body's local bound) and its interval bounds (the paper's box-constrained head,
§4, bounded by Lagrangian duality instead of the reference's estimate from below).

Applies to every model the global ``lipschitz`` certificate applies to, trained with local
bounds or not. Sound by construction: masks from interval bounds widened by the rounding slack,
guaranteed float64 upper bounds only (never a power-iteration estimate), every local constant
at most the global one, and the same float64 forward pass and gap slack as ``lipschitz``, so
it certifies every point ``lipschitz`` certifies at eps. It proves "eps or nothing" (the masks
hold on the eps-ball only) and a margin lower bound min_j gap_j - r K_ij.
"""

from __future__ import annotations

import math
from copy import deepcopy
from dataclasses import dataclass

import torch
from torch import nn

from certnet.bounds.ibp import supports_low_precision
from certnet.bounds.local import ball_box_shift, has_masks, local_layer_bounds
from certnet.bounds.pairwise import SoundConstants, logit_gaps, masked_pairwise, others_than
from certnet.bounds.rules import LayerInput, check_supported
from certnet.certifiers.base import Certificate, Certifier, layers_problem, register_certifier
from certnet.certifiers.bound_prop import layer_outputs
from certnet.certifiers.lipschitz import LipschitzCertifier
from certnet.floats import eta, gamma, outward
from certnet.nn.conv_algorithms import gemm_chunk
from certnet.nn.layer_types import is_dense
from certnet.nn.lipschitz import product
from certnet.nn.masked_spectral import GRAM_RANK, GramTail, dense_gram_tails
from certnet.nn.rounding import float64_forward
from certnet.nn.spectral import BOUND_SLACK
from certnet.threat import ThreatModel

#: Interval-bound elements one chunk of points may hold.
CHUNK_ELEMENTS = 2 ** 24


@dataclass
class LocalConstants:
    """What the local certificate computes once per model: the global sound constants, the
    Gram splits of every dense layer of the body, and a float32 copy of the network for a
    rigorous, faster interval walk (None unless every weight is exactly a float32 number and
    every rule bounds its rounding)."""

    sound: SoundConstants
    tails: dict[int, tuple[GramTail, GramTail]]
    box: nn.Sequential | None

    @classmethod
    @torch.no_grad()
    def of(cls, layers: nn.Sequential, rank: int = GRAM_RANK) -> LocalConstants:
        tails = {i: dense_gram_tails(m.weight, rank) for i, m in enumerate(layers[:-1])
                 if is_dense(m)}
        return cls(SoundConstants.of(layers), tails, float32_copy(layers))


def float32_copy(layers: nn.Sequential) -> nn.Sequential | None:
    """A float32 copy of float64 ``layers`` if it has exactly the same weights and every
    rule bounds its interval's rounding, else None."""
    if not supports_low_precision(layers):
        return None
    copy = deepcopy(layers).float()
    originals = dict(layers.state_dict())
    for name, value in copy.state_dict().items():
        if value.is_floating_point() and not torch.equal(value.double(), originals[name]):
            return None
    return copy


def local_pairwise(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                   constants: LocalConstants, outputs: list[torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, LayerInput]:
    """Sound pairwise K_ij (B, C, C) on the threat set around each point, at most the global
    pairwise constants, with the body's local bound (B,) and the head's input interval
    (``outputs``: the layers' clean outputs, if at hand)."""
    bounds, ins, head = local_layer_bounds(layers, x, threat, constants.sound.layers,
                                           constants.tails, box_layers=constants.box,
                                           outputs=outputs)
    body = product([torch.ones(len(x), dtype=torch.float64, device=x.device), *bounds[:-1]])
    local = masked_pairwise(layers[-1].weight, ins[-1]) * body[:, None, None] * (1 + BOUND_SLACK)
    return torch.minimum(local, constants.sound.pairwise), body, head


def local_margin(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                 constants: LocalConstants, gap: torch.Tensor, pred: torch.Tensor,
                 drift: torch.Tensor, outputs: list[torch.Tensor] | None = None
                 ) -> torch.Tensor:
    """Lower bound on min_{j != pred} of the margin over the threat set around each point:
    the gap minus the smaller of r K_j (local constants) and the shift of the margin when the
    head's input moves in its l2 ball (radius r * the body's local bound) and its interval
    (:func:`ball_box_shift`). The box and ball are widened by ``drift`` (B,), an l2 bound on
    how far the clean head input they are centred on is from the exact one; the shift by its
    own rounding and that of its direction a = w_j - w_pred (docs/rounding.md): in exact
    arithmetic it is a sum of n non-negative terms, each computed within 9u of itself (their
    parts are at most 3 times the term) plus 3 eta, summed within gamma_n; a rounds by u |a|,
    which moves a . d by at most u ||a|| ||d||, ||d|| <= the radius."""
    k, body, head = local_pairwise(layers, x, threat, constants, outputs)
    rows = torch.arange(len(x), device=x.device)
    r = l2_radius_of(threat, x[0].numel())
    weight = layers[-1].weight
    moves = weight.unsqueeze(0) - weight[pred].unsqueeze(1)  # (B, C, n): w_j - w_pred
    pad = drift.unsqueeze(1)  # each coordinate's drift is at most the l2 one
    clean = head.clean.flatten(1)
    radius = (r * body * (1 + BOUND_SLACK) + drift) * (1 + gamma(2))
    low, high = outward(head.lo.flatten(1) - clean - pad, head.hi.flatten(1) - clean + pad)
    shift = ball_box_shift(moves, radius, low.clamp(max=0), high.clamp(min=0))
    n = clean.shape[1]
    # + ||a|| times the drift (the centre's offset from the exact one) and the rounding of
    # the shift and of a = w_j - w_pred (module docstring)
    shift = shift * (1 + gamma(n + 16)) + (3 * n + 8) * eta() + \
        moves.norm(dim=-1) * (1 + gamma(n + 2)) * (drift + 2 * gamma(1) * radius).unsqueeze(1)
    return worst_margin(gap, torch.minimum(r * k[rows, pred] * (1 + BOUND_SLACK), shift), pred)


def ball_margin(gap: torch.Tensor, k: torch.Tensor, pred: torch.Tensor, r: float
                ) -> torch.Tensor:
    """Lower bound min_{j != pred} gap_j - r K_j on the margin over an l2 ball of radius r."""
    return worst_margin(gap, r * k * (1 + BOUND_SLACK), pred)


def worst_margin(gap: torch.Tensor, reach: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """min_{j != pred} gap_j - reach_j (-inf where not a number)."""
    worst = gap - reach
    worst = torch.where(torch.isnan(worst), -torch.inf, worst)
    return torch.where(others_than(pred, gap.shape[1]), worst, torch.inf).amin(1)


def l2_radius_of(threat: ThreatModel, dim: int) -> float:
    """The l2 radius of a ball containing the threat ball, rounded up."""
    if threat.norm == "l2":
        return threat.eps
    return math.nextafter(threat.eps * math.sqrt(dim), math.inf) * (1 + 1e-15)


class LocalLipschitzCertifier(Certifier):
    name = "local-lipschitz"
    gives_radius = False
    cost = 1

    def applies(self, model, norm):
        return LipschitzCertifier().applies(model, norm) or layers_problem(model, check_supported)

    @torch.no_grad()
    def certify(self, model, x: torch.Tensor, threat: ThreatModel) -> Certificate:
        twin = model.float64_copy("local-lipschitz", LocalConstants.of)
        constants: LocalConstants = twin.derived
        x64 = x.double()
        probe = layer_outputs(twin.layers, x64[:1])
        widest = max(x[0].numel(), *(h[0].numel() for h in probe))
        chunk = max(1, min(CHUNK_ELEMENTS // widest, gemm_chunk(twin.layers, x64, probe)))
        r = l2_radius_of(threat, x[0].numel())
        preds, margins = [], []
        for i in range(0, len(x64), chunk):
            part = x64[i:i + chunk]
            outputs: list[torch.Tensor] = []
            errors: list[torch.Tensor] = []
            logits, error = float64_forward(twin.layers, part, constants.sound.layers, outputs,
                                            errors)
            pred, gap = logit_gaps(logits, error)
            margin = ball_margin(gap, constants.sound.pairwise[pred], pred, r)
            # local constants never exceed the global ones: only the points the global
            # constants leave open need them
            todo = (margin <= 0).nonzero().squeeze(1)
            if len(todo) and has_masks(twin.layers):
                every = len(todo) == len(part)
                margin[todo] = local_margin(
                    twin.layers, part if every else part[todo], threat, constants,
                    gap[todo], pred[todo], errors[-2][todo],
                    outputs if every else [h[todo] for h in outputs])
            preds.append(pred)
            margins.append(margin)
        return Certificate.eps_or_nothing(torch.cat(preds), torch.cat(margins), threat.eps)


register_certifier(LocalLipschitzCertifier())
