"""Local Lipschitz bounds of a network on a threat set, per point (Huang et al. 2021, "Training
Certifiably Robust Neural Networks with Efficient Local Lipschitz Bounds", §3, Eq. 6-7).

Interval bounds from the engine (:func:`certnet.bounds.interval_walk`) show which activations
are constant on the set; each activation rule's ``jacobian_masks`` turns them into keep masks,
so that anywhere in the (convex) set the network's Jacobian is a product of factors
diag(r_i) W_i diag(c_i) and of factors of norm <= 1. The product of sound upper bounds on
||diag(r_i) W_i diag(c_i)||_2 (:mod:`certnet.nn.masked_spectral`), each at most the layer's
global bound, bounds the Lipschitz constant of the network on the set.

In l2, the radius of every layer's input is known from the bounds of the layers before it;
further passes feed the local radii back into the interval walk, which tightens the intervals
and so the masks (on tiny nets; on the MNIST nets measured it changed no certificate, so one
pass is the default).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from certnet.bounds.ibp import interval_walk
from certnet.bounds.rules import AffineRule, BoundRule, LayerInput, rule_for
from certnet.nn.layer_types import layer_type
from certnet.nn.masked_spectral import GramTail
from certnet.threat import ThreatModel

#: Interval walks per certificate (later ones use the local radii of the earlier one).
PASSES = 1

Masks = list[torch.Tensor | None]


def has_masks(layers: nn.Sequential) -> bool:
    """Whether some layer's rule can drop neurons (else local bounds equal global ones)."""
    return any(type(rule_for(m)).jacobian_masks is not BoundRule.jacobian_masks for m in layers)


def keep_masks(layers: nn.Sequential, seen: list[LayerInput]) -> tuple[Masks, Masks]:
    """Per layer, 0/1 keep masks of its input and of its output (None: all kept), from the
    intervals ``seen`` of :func:`interval_walk` (rigorous, for certificates: they hold every
    exact value of the set). A mask reaches an affine layer only through reshaping layers;
    elsewhere it is dropped (sound)."""
    ins: Masks = [None] * len(layers)
    outs: Masks = [None] * len(layers)
    pending = None  # keep mask of the last activation's output, in the current shape
    feeder = None  # the layer whose output reaches the next activation through reshapes only
    for i, m in enumerate(layers):
        if (known := layer_type(m)) is not None and known.reshape_only:
            if pending is not None:
                pending = pending.reshape(seen[i + 1].clean.shape)
            continue
        masks = rule_for(m).jacobian_masks(m, seen[i].lo, seen[i].hi)
        if masks is None:
            ins[i], pending, feeder = pending, None, i
            continue
        keep_in, keep_out = masks
        if feeder is not None:
            outs[feeder] = keep_in.reshape(seen[feeder + 1].clean.shape)
        pending, feeder = keep_out, None
    return ins, outs


def masked_bound(m: nn.Module, rows: torch.Tensor, cols: torch.Tensor,
                 tails: tuple[GramTail, GramTail] | None) -> torch.Tensor | None:
    """The smallest sound bound on ||diag(rows) A diag(cols)||_2 per point for the linear
    part A of layer ``m`` (masks shaped as its output and input; its registration's
    ``masked_bound``), or None where none is known (the global bound applies)."""
    known = layer_type(m)
    return None if known is None or known.masked_bound is None else \
        known.masked_bound(m, rows, cols, tails)


def affine_input_radii(layers: nn.Sequential, eps: torch.Tensor,
                       bounds: list[torch.Tensor]) -> dict[int, torch.Tensor]:
    """eps * prod(bounds[:i]) for every affine layer i > 0: the l2 radius its input stays in
    (the radii :func:`interval_walk` takes). An affine layer's input follows every activation
    whose masks shaped the bounds before it, so row-masked bounds are valid there."""
    radii, prefix = {}, eps
    for i, m in enumerate(layers):
        if i and isinstance(rule_for(m), AffineRule):
            radii[i] = prefix
        prefix = prefix * bounds[i]
    return radii


def layer_masks(i: int, ins: Masks, outs: Masks, seen: list[LayerInput]
                ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(rows, cols) keep masks of layer i, all-kept where one side has none; None where
    neither side has one."""
    if ins[i] is None and outs[i] is None:
        return None

    def everything(like: torch.Tensor) -> torch.Tensor:
        return torch.ones(1, dtype=torch.bool, device=like.device).expand(like.shape)

    return (outs[i] if outs[i] is not None else everything(seen[i + 1].clean),
            ins[i] if ins[i] is not None else everything(seen[i].clean))


def local_layer_bounds(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                       global_bounds: list[torch.Tensor],
                       tails: Mapping[int, tuple[GramTail, GramTail]],
                       passes: int = PASSES, box_layers: nn.Sequential | None = None,
                       outputs: list[torch.Tensor] | None = None
                       ) -> tuple[list[torch.Tensor], Masks, LayerInput]:
    """Per layer, a (B,) float64 bound on its Lipschitz constant on the threat set around each
    point of ``x`` (never above ``global_bounds``), the input keep masks (the last entry is
    what the head sees) and the last layer's input interval. ``tails[i]``: the Gram splits of
    dense layer i (optional);
    ``box_layers``, ``outputs``: passed to :func:`interval_walk` (a rigorous float32 box and
    the clean outputs the caller has)."""
    bounds = [g.expand(len(x)) for g in global_bounds]
    ins: Masks = [None] * len(layers)
    for _ in range(passes):
        radii = None if threat.norm != "l2" else affine_input_radii(
            layers, torch.full((len(x),), threat.eps, dtype=torch.float64, device=x.device),
            bounds)
        seen, _ = interval_walk(layers, x, threat, radii, box_layers, outputs, rigorous=True)
        ins, outs = keep_masks(layers, seen)
        for i, m in enumerate(layers):
            masks = layer_masks(i, ins, outs, seen)
            if masks is None:
                continue
            local = masked_bound(m, *masks, tails.get(i))
            if local is not None:
                bounds[i] = torch.minimum(bounds[i], local)
    return bounds, ins, seen[-2]


def ball_box_shift(a: torch.Tensor, r: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
                   ) -> torch.Tensor:
    """Upper bound on max a . d over the l2 ball ||d|| <= r intersected with the box
    lo <= d <= hi (lo <= 0 <= hi), per row: how far a margin with gradient ``a`` can move when
    the head's input moves inside both its l2 ball and its interval (Huang et al. 2021, §4,
    "box constrained propagation"; the reference clips a candidate d, an estimate from below).

    The bound is Lagrangian: for every mu > 0, D(mu) = mu r^2 + sum_k max over
    d_k in [lo_k, hi_k] of (a_k d_k - mu d_k^2) >= the maximum (weak duality), the inner maxima
    at d_k = clip(a_k / (2 mu), lo_k, hi_k). The multiplier that makes it exact, mu = 1/(2 lam)
    with ||clip(lam a, lo, hi)|| = r, comes from sorting the coordinates' saturation points
    c_k / |a_k| (no gradient through the search: D is sound at any mu); the box maximum
    sum max(a lo, a hi) is the other bound. Shapes: a (B, S, k), r (B,), lo and hi (B, k);
    returns (B, S)."""
    lo, hi = lo.unsqueeze(1), hi.unsqueeze(1)
    radius = r.view(-1, 1, 1)
    with torch.no_grad():
        size = a.abs()
        reach = torch.where(a > 0, hi, -lo).expand_as(a)  # how far d_k may go along a_k
        saturate = torch.where(size > 0, reach / size, torch.inf)
        order = saturate.argsort(dim=-1)
        at = saturate.gather(-1, order)
        squares = reach.gather(-1, order).square()
        weights = size.gather(-1, order).square()
        zero = squares[..., :1] * 0
        # first m coordinates saturated: ||d||^2 = S_m + lam^2 A_m for lam in [t_m, t_m+1]
        saturated = torch.cat([zero, squares.cumsum(-1)], -1)
        free = (weights.sum(-1, keepdim=True) - torch.cat([zero, weights.cumsum(-1)], -1)) \
            .clamp_min(0)
        start = torch.cat([zero, at], -1)
        norm2 = saturated + torch.where(free > 0, start.square() * free, 0.0)
        m = ((norm2 <= radius.square()).sum(-1, keepdim=True) - 1).clamp_min(0)
        rest = (radius.square() - saturated.gather(-1, m)).clamp_min(0)
        lam = (rest / free.gather(-1, m)).sqrt()  # inf where nothing is free: the box binds
        # the dual only where the ball binds at a finite, positive multiplier; elsewhere it is
        # evaluated at mu = 1 (finite, so no NaN reaches the gradient) and not used
        ball = torch.isfinite(lam) & (lam > 0)
        mu = torch.where(ball, 0.5 / lam.clamp_min(torch.finfo(a.dtype).tiny), 1.0)
    d = torch.minimum(torch.maximum(a / (2 * mu), lo), hi)
    dual = (mu * radius.square()).squeeze(-1) + (a * d - mu * d.square()).sum(-1)
    box = torch.maximum(a * lo, a * hi).sum(-1)
    shift = torch.where(ball.squeeze(-1), torch.minimum(dual, box), box)
    return torch.where(r.view(-1, 1) > 0, shift, 0.0)  # a ball of radius 0 moves nothing


# -- training: differentiable estimates on the same masks ------------------------------------
def masked_estimate(m: nn.Module, inp: LayerInput, rows: torch.Tensor, cols: torch.Tensor,
                    start: torch.Tensor, iterations: int) -> torch.Tensor:
    """Power-iteration estimate of ||diag(rows) A diag(cols)||_2 per point (Huang et al. 2021,
    Alg. 1), differentiable in the weights: an estimate from *below*, for training only.
    Every point starts from ``start`` (the layer's global iterate), masked."""
    rule = rule_for(m)
    # 0/1 in the iterate's dtype once: a bool mask in a product is converted anew each time
    rows, cols = rows.to(start.dtype), cols.to(start.dtype)

    def forward(v: torch.Tensor) -> torch.Tensor:
        return rule.linear(m, v, inp) * rows

    def unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.flatten(1).norm(dim=1).clamp_min(1e-30).view(-1, *[1] * (v.dim() - 1))

    with torch.no_grad():
        v = start.expand_as(inp.clean) * cols
        for _ in range(iterations):
            v = rule.transpose(m, forward(unit(v)).unsqueeze(1), inp).squeeze(1) * cols
        v = unit(v)
    return (forward(v).flatten(1).square().sum(1) + 1e-30).sqrt()


def local_training_constants(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                             estimates: list[torch.Tensor | float], iterations: int
                             ) -> tuple[torch.Tensor, list[torch.Tensor | float], Masks,
                                        torch.Tensor, LayerInput]:
    """What local-Lipschitz training needs in one interval walk (l2 radii from the global
    ``estimates``): the logits, per-layer local estimates (each at most the global one), the
    input keep masks (the last is the head's), the mean constancy gap of the activations
    (the sparsity penalty, differentiable through the intervals) and the head's input
    interval (differentiable)."""
    radii = affine_input_radii(layers, torch.as_tensor(threat.eps, dtype=x.dtype, device=x.device),
                               [torch.as_tensor(e).detach() for e in estimates])
    seen, logits = interval_walk(layers, x, threat, radii)
    lows = [s.lo.detach() for s in seen]
    highs = [s.hi.detach() for s in seen]
    ins, outs = keep_masks(layers, [LayerInput(lo, hi, s.clean)
                                    for lo, hi, s in zip(lows, highs, seen, strict=True)])
    bounds = list(estimates)
    gaps = []
    for i, m in enumerate(layers):
        gap = rule_for(m).constancy_gap(m, seen[i].lo, seen[i].hi)
        if gap is not None:
            gaps.append(gap.mean())
        masks = layer_masks(i, ins, outs, seen)
        if masks is None or layer_type(m).masked_bound is None:  # no power iterate
            continue
        local = masked_estimate(m, seen[i], *masks, m.power_iterate, iterations)
        bounds[i] = torch.minimum(local, torch.as_tensor(estimates[i]))
    penalty = torch.stack(gaps).mean() if gaps else logits.new_zeros(())
    return logits, bounds, ins, penalty, seen[-2]
