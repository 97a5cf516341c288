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
from certnet.floats import SQRT_TINY64, eta, gamma, outward, outward_to, unit_roundoff
from certnet.nn import branchless
from certnet.nn.conv_algorithms import gemm_convolutions
from certnet.threat import ThreatModel


def interval_walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                  radii: Mapping[int, torch.Tensor | float] | None = None,
                  box_layers: nn.Sequential | None = None,
                  outputs: list[torch.Tensor] | None = None, with_clean: bool = True,
                  rigorous: bool = False) -> tuple[list[LayerInput], torch.Tensor | None]:
    """Propagate the threat model's box around ``x`` and ``x`` itself through every layer.

    ``radii[i]`` (optional, l2 threats only) is a sound bound, per point or shared, on the l2
    distance of layer i's input from its clean value over the threat set; the input's is eps.
    ``rigorous``: every interval contains the layer's exact outputs and its float forward
    outputs for every input of the set (the input box rounded outward, each layer's interval
    widened by its rule's ``interval_error``, which covers the widening's own rounding;
    convolutions as im2col + GEMM, whose rounding those bounds cover), and
    each ball is widened by its own rounding and by how far the clean pass it is centred on
    may have drifted from the exact one.
    ``box_layers`` (optional; implies ``rigorous``): the same network with the same weights in
    a lower precision (float32 for a float64 ``layers``), in which the box is propagated.
    ``outputs`` (optional): every layer's clean output, if the caller has them.
    Returns what each layer sees (``LayerInput`` i is layer i's input interval and clean
    input; the list has one more entry, the output) and the clean output. The clean pass calls
    the layers themselves (so BatchNorm updates its running statistics in training).
    ``with_clean=False``: the caller needs no clean values, so the clean pass is skipped (clean
    inputs and output are None) unless the bounds use it (l2 balls; layers whose rule
    ``uses_batch_statistics``, e.g. BatchNorm in training)."""
    check_supported(layers)
    rigorous = rigorous or box_layers is not None
    lo, hi = threat.enclosure(x) if rigorous else threat.box(x)
    if box_layers is not None:
        lo, hi = outward_to(lo, hi, next(box_layers.parameters()).dtype)
    ball = threat.norm == "l2"
    known = {0: threat.eps, **(radii or {})} if ball else {}
    radius = known.get(0)
    batch = any(rule_for(m).uses_batch_statistics(m) for m in layers)
    clean = x if with_clean or ball or batch else None
    # |clean - exact clean| per input, while a ball may still be centred on the clean pass
    drift = torch.zeros_like(x) if rigorous and ball else None
    seen: list[LayerInput] = []
    with gemm_convolutions(rigorous):
        for i, m in enumerate(layers):
            inp = LayerInput(lo, hi, clean)
            seen.append(inp)
            rule = rule_for(m)
            if rigorous:
                lo, hi = _rigorous_interval(rule, m if box_layers is None else box_layers[i], inp)
            else:
                lo, hi = rule.interval(m, inp)
            out = None if clean is None else m(clean) if outputs is None else outputs[i]
            if drift is not None:
                drift = _clean_drift(rule, m, drift, clean, out) if radius is not None or \
                    any(k > i for k in known) else None
            if radius is not None and isinstance(rule, AffineRule):
                # row norms need only the input's shape and the clean pass's dtype
                like = LayerInput(clean, clean, clean)
                reach = _ball(rule, m, like, radius, rigorous)
                if reach is not None:
                    if drift is not None:
                        reach = reach + drift
                    ball_lo, ball_hi = out - reach, out + reach
                    if rigorous:
                        ball_lo, ball_hi = outward_to(*outward(ball_lo, ball_hi), lo.dtype)
                    lo, hi = branchless.maximum(lo, ball_lo), branchless.minimum(hi, ball_hi)
            clean = out
            if radius is not None:
                lipschitz = rule.l2_lipschitz(m, inp)
                radius = None if lipschitz is None else radius * lipschitz
                if radius is not None and rigorous:  # the product and L itself round
                    radius = radius * (1 + 16 * unit_roundoff(out.dtype))
            radius = known.get(i + 1, radius)
    seen.append(LayerInput(lo, hi, clean))
    return seen, clean


def _clean_drift(rule, m: nn.Module, drift: torch.Tensor, clean: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
    """How far the clean pass's output ``out`` may be from the exact one (the rule's
    ``drift`` on the clean point); infinite where the rule does not know (no ball is then
    trusted)."""
    moved = rule.drift(m, drift, LayerInput(clean, clean, clean))
    return torch.full_like(out, torch.inf) if moved is None else moved


def supports_low_precision(layers: nn.Sequential) -> bool:
    """Whether every layer's rule bounds its interval's rounding (see ``box_layers``)."""
    return all(rule_for(m).exact_interval or
               (isinstance(rule_for(m), AffineRule) and rule_for(m).fan_in(m) is not None)
               for m in layers)


def layer_interval(m: nn.Module, inp: LayerInput, rigorous: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """The interval of ``m``'s outputs over ``inp`` (``rigorous``: see :func:`interval_walk`)."""
    rule = rule_for(m)
    return _rigorous_interval(rule, m, inp) if rigorous else rule.interval(m, inp)


def drift_walk(layers: nn.Sequential, seen: list[LayerInput], start: int = 0
               ) -> list[torch.Tensor]:
    """Per neuron of each layer's input from ``start`` on (the last entry: the output), a
    bound on |float forward - exact forward| over the rigorous intervals ``seen``, for inputs
    of layer ``start`` that are exact (the threat set's points, or any point of a box the
    bound holds on): each rule's ``drift`` in turn (docs/rounding.md)."""
    return extend_drifts(layers, seen, [torch.zeros_like(seen[start].lo)], len(layers), start)


def extend_drifts(layers: nn.Sequential, seen: list[LayerInput], drifts: list[torch.Tensor],
                  upto: int, start: int = 0) -> list[torch.Tensor]:
    """``drifts`` (:func:`drift_walk`'s from ``start``, as far as they go) extended in place
    to layer ``upto``'s input; returns them."""
    mods = list(layers)
    with gemm_convolutions():
        for i in range(start + len(drifts) - 1, upto):
            drifts.append(layer_drift(mods[i], drifts[-1], seen[i]))
    return drifts


def layer_drift(m: nn.Module, error: torch.Tensor, inp: LayerInput) -> torch.Tensor:
    """The rule's ``drift`` of ``m`` (an UnsupportedLayerError where it has none)."""
    moved = rule_for(m).drift(m, error, inp)
    if moved is None:
        raise UnsupportedLayerError(f"{type(m).__name__}: no bound on the rounding of its "
                                    "forward pass")
    return moved


def _rigorous_interval(rule, m: nn.Module, inp: LayerInput
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = rule.interval(m, inp)
    error = rule.interval_error(m, inp)
    if error is None:
        raise UnsupportedLayerError(f"{type(m).__name__}: no bound on its interval's rounding")
    if isinstance(error, torch.Tensor) or error:
        # every rule's error also covers these two roundings (u of the interval's magnitude)
        lo, hi = lo - error, hi + error
    return lo, hi


def _ball(rule: AffineRule, m: nn.Module, inp: LayerInput, radius: torch.Tensor | float,
          rigorous: bool) -> torch.Tensor | None:
    """radius * (l2 norm of each row): how far each output moves over an l2 ball of
    ``radius`` around the input, or None if the rule has no row norms. ``rigorous``: the
    norms (roots of sums of squares: gamma_{n+2}, plus what the squares lose to underflow) and
    the product rounded up."""
    try:
        norms = rule.row_norms(m, inp)
    except NotImplementedError:
        return None
    r = torch.as_tensor(radius, dtype=inp.lo.dtype, device=inp.lo.device)
    if rigorous:
        n = inp.lo.shape[1:].numel()
        norms = norms * (1 + gamma(n + 4, norms.dtype)) + n**0.5 * SQRT_TINY64
    reach = r.view(-1, *([1] * (inp.lo.dim() - 1))) * norms if r.dim() else r * norms
    return reach * (1 + gamma(1, reach.dtype)) + eta(reach.dtype) if rigorous else reach
