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
from certnet.errors import UnsupportedLayerError
from certnet.nn import branchless
from certnet.nn.conv_algorithms import gemm_convolutions
from certnet.threat import ThreatModel


def interval_walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                  radii: Mapping[int, torch.Tensor | float] | None = None,
                  box_layers: nn.Sequential | None = None,
                  outputs: list[torch.Tensor] | None = None, with_clean: bool = True
                  ) -> tuple[list[LayerInput], torch.Tensor | None]:
    """Propagate the threat model's box around ``x`` and ``x`` itself through every layer.

    ``radii[i]`` (optional, l2 threats only) is a sound bound, per point or shared, on the l2
    distance of layer i's input from its clean value over the threat set; the input's is eps.
    ``box_layers`` (optional): the same network with the same weights in a lower precision
    (float32 for a float64 ``layers``), in which the box is propagated, each layer's interval
    widened by its rule's ``interval_error`` and rounded outward, so it stays rigorous; on the
    CPU its convolutions run as im2col + GEMM (no Winograd, whose error that bound does not
    cover). ``outputs`` (optional): every layer's clean output, if the caller has them.
    Returns what each layer sees (``LayerInput`` i is layer i's input interval and clean
    input; the list has one more entry, the output) and the clean output. The clean pass calls
    the layers themselves (so BatchNorm updates its running statistics in training).
    ``with_clean=False``: the caller needs no clean values, so the clean pass is skipped (clean
    inputs and output are None) unless the bounds use it (l2 balls; layers whose rule
    ``uses_clean``, e.g. BatchNorm in training)."""
    check_supported(layers)
    lo, hi = threat.box(x)
    if box_layers is not None:
        lo, hi = _outward(lo, hi, next(box_layers.parameters()).dtype)
    ball = threat.norm == "l2"
    known = {0: threat.eps, **(radii or {})} if ball else {}
    radius = known.get(0)
    clean = x if with_clean or ball or any(rule_for(m).uses_clean(m) for m in layers) else None
    seen: list[LayerInput] = []
    with gemm_convolutions(box_layers is not None):
        for i, m in enumerate(layers):
            inp = LayerInput(lo, hi, clean)
            seen.append(inp)
            rule = rule_for(m)
            if box_layers is None:
                lo, hi = rule.interval(m, inp)
            else:
                lo, hi = _rigorous_interval(rule, box_layers[i], inp)
            out = None if clean is None else m(clean) if outputs is None else outputs[i]
            if radius is not None and isinstance(rule, AffineRule):
                # row norms need only the input's shape and the clean pass's dtype
                like = LayerInput(clean, clean, clean)
                ball = _ball(rule, m, like, out, radius)
                if ball is not None:
                    if box_layers is not None:
                        ball = _outward(*ball, lo.dtype)
                    lo, hi = branchless.maximum(lo, ball[0]), branchless.minimum(hi, ball[1])
            clean = out
            if radius is not None:
                lipschitz = rule.l2_lipschitz(m, inp)
                radius = None if lipschitz is None else radius * lipschitz
            radius = known.get(i + 1, radius)
    seen.append(LayerInput(lo, hi, clean))
    return seen, clean


def supports_low_precision(layers: nn.Sequential) -> bool:
    """Whether every layer's rule bounds its interval's rounding (see ``box_layers``)."""
    return all(rule_for(m).exact_interval or
               (isinstance(rule_for(m), AffineRule) and rule_for(m).fan_in(m) is not None)
               for m in layers)


def _rigorous_interval(rule, m: nn.Module, inp: LayerInput
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = rule.interval(m, inp)
    error = rule.interval_error(m, inp)
    if error is None:
        raise UnsupportedLayerError(f"{type(m).__name__}: no bound on its interval's rounding")
    if isinstance(error, torch.Tensor) or error:
        lo, hi = lo - error, hi + error
        # each of the two operations rounds by at most half an ulp: one ulp outward covers it
        lo = torch.nextafter(lo, torch.full_like(lo, -torch.inf))
        hi = torch.nextafter(hi, torch.full_like(hi, torch.inf))
    return lo, hi


def _outward(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] in ``dtype``, rounded outward (never narrower)."""
    low, high = lo.to(dtype), hi.to(dtype)
    low = torch.where(low.to(lo.dtype) > lo, torch.nextafter(low, torch.full_like(low, -torch.inf)),
                      low)
    high = torch.where(high.to(hi.dtype) < hi,
                       torch.nextafter(high, torch.full_like(high, torch.inf)), high)
    return low, high


def _ball(rule: AffineRule, m: nn.Module, inp: LayerInput, out: torch.Tensor,
          radius: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor] | None:
    """out +- radius * (l2 norm of each row), or None if the rule has no row norms."""
    try:
        norms = rule.row_norms(m, inp)
    except NotImplementedError:
        return None
    r = torch.as_tensor(radius, dtype=out.dtype, device=out.device)
    reach = r.view(-1, *([1] * (out.dim() - 1))) * norms if r.dim() else r * norms
    return out - reach, out + reach
