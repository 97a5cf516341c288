"""Interval bound propagation (Gowal et al. 2018, "On the Effectiveness of Interval Bound
Propagation for Training Verifiably Robust Models", Eqs. 5-6), refined by norm balls.

IBP propagates a box; the threat model's set is a ball. Where a sound radius r of the ball
that a layer's input stays in is known (the threat's eps at the input, carried through layers
with a cheap Lipschitz bound, or given by the caller, e.g. from sound spectral bounds), an
affine layer's output also lies in z(clean) +- r ||row||_2, exact for the ball; the walk
intersects the two.
In l2 this is what makes the first layer's interval exact (the box around an l2 ball is sqrt(d)
times too wide); in l_inf the clipped box is already at least as tight, so nothing is done.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from certnet.bounds.rules import AffineRule, LayerInput, check_supported, rule_for
from certnet.threat import ThreatModel


def interval_walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                  radii: Mapping[int, torch.Tensor | float] | None = None
                  ) -> tuple[list[LayerInput], torch.Tensor]:
    """Propagate the threat model's box around ``x`` and ``x`` itself through every layer.

    ``radii[i]`` (optional, l2 threats only) is a sound bound, per point or shared, on the l2
    distance of layer i's input from its clean value over the threat set; the input's is eps.
    Returns what each layer sees (``LayerInput`` i is layer i's input interval and clean
    input; the list has one more entry, the output) and the clean output. The clean pass calls
    the layers themselves (so BatchNorm updates its running statistics in training)."""
    check_supported(layers)
    lo, hi = threat.box(x)
    clean = x
    ball = threat.norm == "l2"
    known = {0: threat.eps, **(radii or {})} if ball else {}
    radius = known.get(0)
    seen: list[LayerInput] = []
    for i, m in enumerate(layers):
        inp = LayerInput(lo, hi, clean)
        seen.append(inp)
        rule = rule_for(m)
        lo, hi = rule.interval(m, inp)
        out = m(clean)
        if radius is not None and isinstance(rule, AffineRule):
            lo, hi = _within_ball(rule, m, inp, out, radius, lo, hi)
        clean = out
        if radius is not None:
            lipschitz = rule.l2_lipschitz(m, inp)
            radius = None if lipschitz is None else radius * lipschitz
        radius = known.get(i + 1, radius)
    seen.append(LayerInput(lo, hi, clean))
    return seen, clean


def _within_ball(rule: AffineRule, m: nn.Module, inp: LayerInput, out: torch.Tensor,
                 radius: torch.Tensor | float, lo: torch.Tensor, hi: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] intersected with out +- radius * (l2 norm of each row)."""
    try:
        norms = rule.row_norms(m, inp)
    except NotImplementedError:
        return lo, hi
    r = torch.as_tensor(radius, dtype=out.dtype, device=out.device)
    reach = r.view(-1, *([1] * (out.dim() - 1))) * norms if r.dim() else r * norms
    return torch.maximum(lo, out - reach), torch.minimum(hi, out + reach)
