"""Margin bounds of a classifier over an input set: the specification C of margins
z_ref - z_j (Zhang et al. 2020, Eq. 3) bounded by IBP, CROWN-IBP, full CROWN or alpha-CROWN
(full CROWN's intermediate bounds, the last pass's ReLU slopes optimised)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from certnet.bounds.alpha_crown import optimized_bound
from certnet.bounds.crown import (
    affine_tail,
    backward_bound,
    backward_bounds,
    crown_walk,
    relaxation_floor,
)
from certnet.bounds.ibp import drift_walk, interval_walk
from certnet.bounds.rules import LayerInput, Slope
from certnet.bounds.rules.fixed_weights import fixed_weights
from certnet.floats import gamma
from certnet.threat import ThreatModel

BoundMethod = Literal["ibp", "crown-ibp", "crown", "alpha-crown"]
BOUND_METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")


def margin_spec(ref: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C of shape (B, K - 1, K): row j is e_ref - e_j for the K - 1 classes j != ref."""
    eye = torch.eye(num_classes, dtype=torch.get_default_dtype(), device=ref.device)
    others = torch.arange(num_classes, device=ref.device).expand(len(ref), -1)
    others = others[others != ref.unsqueeze(1)].view(len(ref), num_classes - 1)
    return eye[ref].unsqueeze(1) - eye[others]


def margin_bounds(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                  ref: torch.Tensor, method: BoundMethod = "ibp", slope: Slope = "adaptive"
                  ) -> torch.Tensor:
    """Lower bounds (B, K - 1) on z_ref - z_j over the threat model around ``x``, j != ref."""
    return margin_walk(layers, x, threat, ref, method, slope)[0]


def margin_walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                ref: torch.Tensor | None, method: BoundMethod = "ibp",
                slope: Slope = "adaptive", rigorous: bool = False
                ) -> tuple[torch.Tensor, list[LayerInput], torch.Tensor | None]:
    """:func:`margin_bounds` with the walk it used: ``(lower, seen, logits)``; ``ref=None``
    takes the argmax of the clean logits. Given ``ref``, IBP and CROWN-IBP skip the clean
    pass where their bounds do not use it (``logits`` is then None).

    ``rigorous`` (certificates; docs/rounding.md): ``lower`` bounds, in floating point, both
    the exact margins and those of the float forward pass, anywhere in the threat set: the
    bound on the exact margin, minus how far the float logits z_ref and z_j may drift from
    the exact ones from the point where the bound concretizes on (the input, or the box of
    the last layer the backward pass stops at, which holds the float values too)."""
    with fixed_weights():
        seen, logits, drifts = _walk(layers, x, threat, method, slope, rigorous,
                                     with_clean=ref is None)
        ref = logits.argmax(1) if ref is None else ref
        spec = margin_spec(ref, seen[-1].lo.shape[1]).to(seen[-1].lo.dtype)
        lower = _lower(layers, seen, spec, x, threat, method, slope, rigorous, drifts)
    return lower, seen, logits


def spec_bounds(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                spec: torch.Tensor, method: BoundMethod = "crown", slope: Slope = "adaptive",
                rigorous: bool = False) -> torch.Tensor:
    """Lower bounds (B, S) on spec . z over the threat set around ``x``, for any linear
    specification ``spec`` (B, S, K) of the outputs z (a VNN-LIB property's rows).
    ``rigorous``: below the exact value and that of the float forward pass, which differ by
    at most |spec| . drift (the drift per output, :func:`drift_walk`), rounded up."""
    with fixed_weights():
        seen, _, drifts = _walk(layers, x, threat, method, slope, rigorous, with_clean=False)
        return _lower(layers, seen, spec.to(seen[-1].lo.dtype), x, threat, method, slope,
                      rigorous, drifts)


def _minus_drift(lower: torch.Tensor, spec: torch.Tensor, drift: torch.Tensor) -> torch.Tensor:
    """lower - |spec| . drift (drift (B, K): how far each float output may be from the exact
    one), rounded down: the products and the sum round (gamma_{K+1} relative), the difference
    by one step down (for margins, |spec| . drift = drift_ref + drift_j)."""
    spread = (spec.abs() * drift.unsqueeze(1)).sum(2) * (1 + gamma(spec.shape[2] + 2,
                                                               lower.dtype))
    difference = lower - spread
    return torch.nextafter(difference, torch.full_like(difference, -torch.inf))


def _walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel, method: BoundMethod,
          slope: Slope, rigorous: bool, with_clean: bool
          ) -> tuple[list[LayerInput], torch.Tensor | None, list[torch.Tensor]]:
    """The forward walk a method's last pass needs: intermediate bounds by CROWN (crown,
    alpha-crown) or by intervals; with the drifts from the input where the walk has them
    (``drift_walk(layers, seen)``, else [])."""
    drifts: list[torch.Tensor] = []
    if method in ("crown", "alpha-crown"):
        return *crown_walk(layers, x, threat, slope, rigorous, drifts, with_clean), drifts
    return *interval_walk(layers, x, threat, with_clean=with_clean, rigorous=rigorous), drifts


def _lower(layers: nn.Sequential, seen: list[LayerInput], spec: torch.Tensor, x: torch.Tensor,
           threat: ThreatModel, method: BoundMethod, slope: Slope, rigorous: bool,
           drifts: list[torch.Tensor] | None = None) -> torch.Tensor:
    """The method's lower bound on spec . z (``rigorous``: of the exact network and of its
    float forward pass, minus how far the float outputs may drift from the exact ones from
    where the bound concretizes on). A backward pass to the input is never looser than IBP's
    bound on the same intervals (through the affine tail, concretized on its input interval):
    the larger of the two is taken, so CROWN and CROWN-IBP are never looser than IBP.
    ``drifts``: ``drift_walk(layers, seen)`` if the caller has it."""
    # where each pass concretizes: backward passes stop at the relaxation floor at the
    # latest, so where the floor is past the affine tail the two passes are one
    floor = relaxation_floor(layers, len(layers))
    tail = max(affine_tail(layers), floor)
    stops = [tail] if method == "ibp" else sorted({floor, tail})
    passes = {}
    if method == "alpha-crown":
        passes[floor] = optimized_bound(layers, seen, spec, x, threat, slope, rigorous=rigorous)
        stops.remove(floor)
    if stops:  # the passes share their steps through the tail
        passes.update(zip(stops, backward_bounds(layers, seen, spec, x, threat, stops, slope,
                                                 rigorous=rigorous), strict=True))
    best = None
    for stop, lower in passes.items():
        if rigorous:
            drift = drifts[-1] if drifts and stop == 0 else drift_walk(layers, seen, stop)[-1]
            lower = _minus_drift(lower, spec, drift)
        best = lower if best is None else torch.maximum(best, lower)
    return best


def training_bounds(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                    y: torch.Tensor, beta: float, slope: Slope = "adaptive"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN-IBP's training bound (Zhang et al. 2020, Eq. 9): beta * lb_CROWN-IBP +
    (1 - beta) * lb_IBP from one interval walk (CROWN skipped when beta == 0), and the
    clean logits of that walk."""
    seen, logits = interval_walk(layers, x, threat)
    spec = margin_spec(y, logits.shape[1]).to(logits.dtype)
    parts = [(stop, w) for stop, w in ((affine_tail(layers), 1 - beta), (0, beta)) if w > 0]
    lower = 0.0
    bounds = backward_bounds(layers, seen, spec, x, threat, [stop for stop, _ in parts], slope)
    for (_, w), bound in zip(parts, bounds, strict=True):
        lower = lower + w * bound
    return lower, logits


def fused_training_loss(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                        y: torch.Tensor, beta: float, slope: Slope = "adaptive"
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss fusion (Xu et al. 2020, "Automatic Perturbation Analysis for Scalable Certified
    Robustness and Beyond", §3.3): an upper bound, per point, on the cross-entropy
    CE(z, y) = log sum_j exp(z_j - z_y) over the threat set, from ONE backward pass instead of
    one per margin. With d_j = z_j - z_y in [l_j, u_j] (IBP, both ends), convexity gives
    exp(d_j) <= exp(l_j) + s_j (d_j - l_j), s_j the chord's slope, so
    sum_j exp(d_j) <= sum_j (exp(l_j) - s_j l_j) - sum_j s_j m_j, m_j = z_y - z_j, whose last
    term CROWN-IBP bounds with the single specification sum_j s_j (e_y - e_j). IBP's own bound
    is sum_j exp(u_j); the two sums are mixed as beta * CROWN-IBP + (1 - beta) * IBP (beta = 0:
    exactly CE(-lb_IBP)), everything scaled by exp(-max u) against overflow. Returns the
    bounds (B,), IBP's margin lower bounds (B, K - 1) and the clean logits."""
    seen, logits = interval_walk(layers, x, threat)
    spec = margin_spec(y, logits.shape[1]).to(logits.dtype)
    rows = spec.shape[1]
    both = backward_bound(layers, seen, torch.cat([spec, -spec], dim=1), x, threat, slope,
                          stop=affine_tail(layers))
    lower_ibp, upper_ibp = both[:, :rows], -both[:, rows:]
    lo, hi = -upper_ibp, -lower_ibp  # d_j = -m_j
    top = hi.detach().amax(1, keepdim=True).clamp_min(0)  # d_y = 0 is in the sum too
    exp_lo, exp_hi = torch.exp(lo - top), torch.exp(hi - top)
    label = torch.exp(-top.squeeze(1))
    total = (1 - beta) * (label + exp_hi.sum(1)) if beta < 1 else 0.0
    if beta > 0:
        width = hi - lo
        # the chord's slope; on a degenerate interval the largest slope, also an upper bound
        chord = torch.where(width > 1e-6, (exp_hi - exp_lo) / width.clamp_min(1e-6), exp_hi)
        fused = backward_bound(layers, seen, (chord.unsqueeze(2) * spec).sum(1, keepdim=True),
                               x, threat, slope).squeeze(1)
        crown = label + (exp_lo - chord * lo).sum(1) - fused
        total = total + beta * crown.clamp_min(torch.finfo(crown.dtype).tiny)
    return top.squeeze(1) + torch.log(total), lower_ibp, logits
