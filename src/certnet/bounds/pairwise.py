"""The l2 margin maths of Lipschitz certificates (GloRo, Leino et al. 2021, Eq. 4-5; Tsuzuku et
al. 2018), shared by the ``lipschitz`` and ``local-lipschitz`` certifiers and GloRo training:
pairwise constants K_ij = ||w_i - w_j||_2 Lip(body), sound float64 constants of a network,
lower bounds on logit gaps and the radius min_j gap_j / K_j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from certnet.nn.lipschitz import layer_bound, product
from certnet.nn.spectral import BOUND_SLACK

#: Relative slack on logit gaps, on top of the rigorous bound on the float64 forward pass's
#: rounding: covers the final subtractions, and float32 evaluation of ordinary networks.
GAP_SLACK = 1e-5


def pairwise_lipschitz(head_weight: torch.Tensor, body_lipschitz: torch.Tensor) -> torch.Tensor:
    """K_ij = ||w_i - w_j||_2 * Lip(body): the Lipschitz constant of y_i - y_j (GloRo Eq. 4).
    The norms are taken of rows rescaled by the largest weight, so they do not underflow."""
    scale = head_weight.detach().abs().max().clamp_min(torch.finfo(head_weight.dtype).tiny)
    diff = (head_weight.unsqueeze(0) - head_weight.unsqueeze(1)) / scale
    return diff.norm(dim=-1) * scale * body_lipschitz


def masked_pairwise(head_weight: torch.Tensor, keep: torch.Tensor | None) -> torch.Tensor:
    """||(w_i - w_j) o keep_b||_2 per point (B, C, C) for 0/1 keep masks (B, n) of the head's
    inputs (the local head of Huang et al. 2021), rescaled like :func:`pairwise_lipschitz`;
    differentiable, without NaN gradients on the zero diagonal. ``keep=None`` (every input
    kept): the shared (C, C) ||w_i - w_j||_2."""
    if keep is None:
        return pairwise_lipschitz(head_weight, 1.0)
    scale = head_weight.detach().abs().max().clamp_min(torch.finfo(head_weight.dtype).tiny)
    diff = ((head_weight.unsqueeze(0) - head_weight.unsqueeze(1)) / scale).square()
    squares = keep.flatten(1).to(diff.dtype) @ diff.flatten(0, 1).T
    c = head_weight.shape[0]
    return squares.clamp_min(torch.finfo(squares.dtype).tiny).sqrt().view(-1, c, c) * scale


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


def logit_gaps(logits: torch.Tensor, error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The prediction and lower bounds (B, C) on the exact gaps y_pred - y_j from float64
    logits and the bound ``error`` on their rounding."""
    pred = logits.argmax(1)
    top = logits.gather(1, pred.unsqueeze(1))
    # |error of y_j - y_i| <= |d_j| + |d_i| <= 2 ||d||_2 <= 2 E
    return pred, top - logits - GAP_SLACK * (1 + top.abs() + logits.abs()) - 2 * error[:, None]


def others_than(pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, C) mask of the classes j != pred."""
    mask = torch.ones(len(pred), num_classes, dtype=torch.bool, device=pred.device)
    return mask.scatter(1, pred.unsqueeze(1), False)


def pairwise_radius(gap: torch.Tensor, k: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
    """min_{j != pred} gap_j / K_j per point (B,), rounded down; 0 where a gap or K is not
    usable (not finite, K <= 0)."""
    valid = torch.isfinite(gap) & torch.isfinite(k) & (k > 0)
    ratio = torch.where(valid, gap / torch.where(valid, k, 1.0), 0.0).clamp_min(0)
    radius = torch.where(others_than(pred, gap.shape[1]), ratio, float("inf")).min(1).values
    return torch.nextafter(radius, torch.zeros_like(radius))  # the division rounds
