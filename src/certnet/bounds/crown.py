"""Backward linear relaxation: CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness
Certification with General Activation Functions", Thm 3.2) and CROWN-IBP (Zhang et al. 2020,
"Towards Stable and Efficient Training of Verifiably Robust Neural Networks", §3: CROWN's
backward pass from the margin specification with IBP's intermediate bounds)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from certnet.bounds.backward_rounding import Rounding, top_rho, top_sum_error
from certnet.bounds.crown_patches import patch_neuron_bounds, patch_plan
from certnet.bounds.ibp import extend_drifts, interval_walk, layer_interval
from certnet.bounds.rules import LayerInput, Slope, check_supported, rule_for
from certnet.errors import UnsupportedLayerError
from certnet.floats import outward
from certnet.threat import ThreatModel, box_minimum

#: Coefficient-tensor elements one backward pass of full CROWN may hold (chunked beyond it):
#: on full maps (dense layers, graph steps) few enough that a pass stays in cache, on patches
#: more (benchmarks/crown_chunks.py measured both; the bounds do not depend on them).
CHUNK_ELEMENTS = 2 ** 20
PATCH_CHUNK_ELEMENTS = 2 ** 25


def backward_bound(layers: nn.Sequential, seen: list[LayerInput], spec: torch.Tensor,
                   x: torch.Tensor, threat: ThreatModel, slope: Slope = "adaptive",
                   stop: int = 0, upto: int | None = None,
                   alphas: Mapping[int, torch.Tensor] | None = None,
                   rigorous: bool = False, offset: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Lower bound (B, S) on spec . z + offset over the threat model around ``x``, z the
    output of ``layers[:upto]`` (``offset``: exact constants (B, S), default 0).

    ``spec`` has shape (B, S, *z.shape[1:]). The relaxation walks back from layer ``upto - 1``
    to layer ``stop`` (raised to :func:`relaxation_floor`), using ``seen`` (each layer's input
    interval) for the activations, and concretizes on the threat model (``stop == 0``) or on
    the interval of layer ``stop``'s input. ``alphas[i]`` (optional): the lower slopes of
    ReLU layer i per specification row (alpha-CROWN), in place of ``slope``.
    ``rigorous``: a bound on the exact z in floating point (``seen`` must be rigorous too):
    each step's rounding is charged to the bound (:class:`Rounding`)."""
    return backward_bounds(layers, seen, spec, x, threat, (stop,), slope, upto, alphas,
                           rigorous, offset)[0]


def backward_bounds(layers: nn.Sequential, seen: list[LayerInput], spec: torch.Tensor,
                    x: torch.Tensor, threat: ThreatModel, stops: Sequence[int],
                    slope: Slope = "adaptive", upto: int | None = None,
                    alphas: Mapping[int, torch.Tensor] | None = None,
                    rigorous: bool = False, offset: torch.Tensor | None = None
                    ) -> list[torch.Tensor]:
    """:func:`backward_bound` for each of ``stops`` (e.g. CROWN's and IBP's, Gowal et al.'s
    elided tail), from one walk: the steps above a stop are shared by the passes that end
    below it (the same arithmetic, so each bound is bit for bit the one a pass of its own
    gives)."""
    upto = len(layers) if upto is None else upto
    floor = relaxation_floor(layers, upto)
    ends = [max(stop, floor) for stop in stops]
    mods = list(layers)  # indexing an nn.Sequential costs more than a step's small ops
    lam, const = spec, spec.new_zeros(spec.shape[:2]) if offset is None else offset
    rounding = Rounding(const) if rigorous else None
    if rounding is not None and offset is not None:
        rounding.constant(offset)
    found: dict[int, torch.Tensor] = {}

    def concretize(at: int) -> None:
        base = threat.concretize(x, lam, rigorous) if at == 0 else \
            box_minimum(lam, seen[at].lo, seen[at].hi, rigorous)
        found[at] = base + const if rounding is None else rounding.settle(base, const)

    for i in range(upto - 1, min(ends) - 1, -1):
        if i + 1 in ends:
            concretize(i + 1)
        choice = alphas[i] if alphas is not None and i in alphas else slope
        m = mods[i]
        rule = rule_for(m)
        if rounding is not None:
            rounding.charge(lam, top_rho(rule, m, seen[i]), seen[i])
        lam, c = rule.backward(m, lam, seen[i], choice)
        const = const + c
        if rounding is not None:
            rounding.constant(c)
            forked = top_sum_error(rule, m, seen[i])
            if forked is not None:
                rounding.charge(lam, forked, seen[i])
    concretize(min(ends))
    return [found[end] for end in ends]


def relaxation_floor(layers: nn.Sequential, upto: int) -> int:
    """Index just past the last layer below ``upto`` without a linear relaxation (an
    interval-only rule, e.g. l_p-dist neurons), 0 if every layer has one: backward passes
    from ``upto`` concretize there, on that layer's output interval."""
    return max((i + 1 for i, m in enumerate(list(layers)[:upto])
                if not rule_for(m).is_relaxable(m)), default=0)


def affine_tail(layers: nn.Sequential) -> int:
    """Index where the trailing run of layers without activation relaxations begins (IBP's
    elision of the last affine layers into the specification, Gowal et al. 2018, §3)."""
    stop = len(layers)
    while stop > 0 and not needs_bounds(layers[stop - 1]):
        stop -= 1
    return stop


def needs_bounds(m: nn.Module) -> bool:
    """Whether the layer's backward relaxation depends on its input interval."""
    return rule_for(m).needs_bounds(m)


def crown_walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
               slope: Slope = "adaptive", rigorous: bool = False,
               drifts: list[torch.Tensor] | None = None, with_clean: bool = True
               ) -> tuple[list[LayerInput], torch.Tensor | None]:
    """Full CROWN: IBP intervals, then every activation's input interval tightened (in layer
    order) by a backward pass from that layer, for the neurons IBP leaves unstable; the
    intervals after it are re-propagated from the tightened ones. Returns like
    :func:`interval_walk` (``rigorous``: as there, every interval holds the exact and the
    float forward values). ``drifts`` (rigorous only; optional): filled with
    ``drift_walk(layers, seen)`` of the returned intervals, which the walk computes anyway.
    ``with_clean=False``: no clean pass (the clean inputs and output are None), as there."""
    check_supported(layers)
    if any(rule_for(m).uses_batch_statistics(m) for m in layers):
        raise UnsupportedLayerError("full CROWN bounds chunks of points, and a training-mode "
                                    "BatchNorm (or mean shift) normalises by its batch: put the "
                                    "network in eval mode (certificates always are)")
    seen, clean = interval_walk(layers, x, threat, rigorous=rigorous, with_clean=with_clean)
    mods = list(layers)
    # float forward - exact forward per neuron (drift_walk), extended to each layer once the
    # intervals before it are final: those below a tightened layer never change again
    drift = [torch.zeros_like(seen[0].lo)] if rigorous else []
    tightened = None  # the last layer tightened: the intervals after it are re-propagated
    for i, m in enumerate(mods):
        if not needs_bounds(m) or _range_by_intervals(mods, threat, i):
            continue
        if tightened is not None:  # only as far as this layer: the next tightening restarts
            _propagate(layers, seen, tightened, i, rigorous)
            tightened = None
        unstable = rule_for(m).unstable(m, seen[i].lo, seen[i].hi).flatten(1)
        rows = unstable.any(0).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        mine = unstable[:, rows]
        lower, upper = _neuron_bounds(layers, seen, x, threat, slope, i, rows, rigorous, mine)
        if rigorous:  # the float forward value lies within the drift of the exact one
            extend_drifts(layers, seen, drift, i)
            off = drift[i].expand_as(seen[i].lo).flatten(1)[:, rows]
            lower, upper = outward(lower - off, upper + off)  # (each one rounding)
        # tighten only where IBP left the neuron unstable for that point, so a point's bounds
        # never depend on the other points of its batch
        lo, hi = seen[i].lo.flatten(1).clone(), seen[i].hi.flatten(1).clone()
        lo[:, rows] = torch.where(mine, torch.maximum(lo[:, rows], lower), lo[:, rows])
        hi[:, rows] = torch.where(mine, torch.minimum(hi[:, rows],
                                                      torch.maximum(upper, lo[:, rows])),
                                  hi[:, rows])
        seen[i] = LayerInput(lo.view_as(seen[i].lo), hi.view_as(seen[i].hi), seen[i].clean)
        tightened = i
    if tightened is not None:
        _propagate(layers, seen, tightened, len(layers), rigorous)
    if rigorous and drifts is not None:
        drifts[:] = extend_drifts(layers, seen, drift, len(mods))
    return seen, clean


def _range_by_intervals(mods: list[nn.Module], threat: ThreatModel, upto: int) -> bool:
    """Whether the interval of layer ``upto``'s input is already the exact range over an
    l_inf threat's box, rounding aside: the layer before it has a range interval and every
    one below maps boxes onto boxes. A backward pass could then only round differently
    (over an l2 ball, CROWN's dual norm through a non-isometric diagonal layer is tighter
    than the intervals' ball bound: never skipped)."""
    return threat.norm == "linf" and upto > 0 and \
        rule_for(mods[upto - 1]).has_range_interval(mods[upto - 1]) and \
        all(rule_for(m).maps_boxes_to_boxes(m) for m in mods[:upto - 1])


def _propagate(layers: nn.Sequential, seen: list[LayerInput], start: int, stop: int,
               rigorous: bool) -> None:
    """Intersect the intervals of layers start + 1 .. stop's inputs with those propagated
    from layer ``start``'s (tightened) input interval."""
    for j, m in enumerate(list(layers)[start:stop], start):
        lo_j, hi_j = layer_interval(m, seen[j], rigorous)
        nxt = seen[j + 1]
        seen[j + 1] = LayerInput(torch.maximum(lo_j, nxt.lo), torch.minimum(hi_j, nxt.hi),
                                 nxt.clean)


def _neuron_bounds(layers: nn.Sequential, seen: list[LayerInput], x: torch.Tensor,
                   threat: ThreatModel, slope: Slope, upto: int, rows: torch.Tensor,
                   rigorous: bool = False, mine: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN lower and upper bounds (B, len(rows)) of the flattened neurons ``rows`` of layer
    ``upto``'s input, in chunks of points and neurons that bound the memory used. Behind a
    convolution the coefficients of a neuron live on its receptive field only: they are kept
    as patches over it (auto_LiRPA's "patches" mode) wherever that is smaller than the maps.
    ``mine`` (B, len(rows), optional): the rows each point needs; on full maps each point's
    passes then carry only those (padded with others of the rows to the most any point
    needs), and a row a point does not need may be left at -inf / +inf."""
    plan = patch_plan(layers, seen, threat, upto)
    if plan is not None:
        return patch_neuron_bounds(layers, seen, x, threat, slope, upto, rows, plan,
                                   PATCH_CHUNK_ELEMENTS, rigorous)
    batch, shape = seen[upto].lo.shape[0], seen[upto].lo.shape[1:]
    if mine is None or bool(mine.all()):  # every point needs every row (one point always)
        width, table = len(rows), torch.arange(len(rows), device=rows.device).expand(batch, -1)
    else:  # each point's own rows first (positions in ``rows``), then the others
        width = int(mine.sum(1).max())
        table = torch.argsort((~mine).to(torch.uint8), dim=1, stable=True)[:, :width]
    widest = max(s.lo.shape[1:].numel() for s in seen[:upto + 1])
    per_point = max(1, CHUNK_ELEMENTS // (2 * widest))
    row_chunk = min(width, per_point)
    point_chunk = max(1, CHUNK_ELEMENTS // (2 * widest * row_chunk))
    lower = seen[upto].lo.new_full((batch, len(rows)), -torch.inf)
    upper = torch.full_like(lower, torch.inf)
    select = None if upto == 0 else rule_for(layers[upto - 1])
    for p in range(0, batch, point_chunk):
        points = slice(p, p + point_chunk)
        # the whole batch: the intervals themselves, with what their charges keep (memo)
        part = seen if point_chunk >= batch else \
            [s.rows(points) for s in seen]
        n = part[0].lo.shape[0]
        for r in range(0, width, row_chunk):
            cols = table[points, r:r + row_chunk]  # (n, k): each point's rows of this chunk
            idx, k = rows[cols], cols.shape[1]
            # the first step back, where the layer's rule selects its rows exactly (a gather,
            # not a product of one-hot rows: a dense layer's rows of W and b)
            first = None if select is None else \
                select.output_rows(layers[upto - 1], idx.flatten(), part[upto - 1])
            if first is None:
                unit = lower.new_zeros(n, k, shape.numel())
                unit.scatter_(2, idx.unsqueeze(2), 1.0)
                unit = unit.view(n, k, *shape)
                bound = backward_bound(layers, part, torch.cat([unit, -unit], dim=1),
                                       x[points], threat, slope, upto=upto, rigorous=rigorous)
            else:
                a, b = first[0].view(n, k, *first[0].shape[1:]), first[1].view(n, k)
                bound = backward_bound(layers, part, torch.cat([a, -a], dim=1), x[points],
                                       threat, slope, upto=upto - 1, rigorous=rigorous,
                                       offset=torch.cat([b, -b], dim=1))
            lower[points].scatter_(1, cols, bound[:, :k])
            upper[points].scatter_(1, cols, -bound[:, k:])
    return lower, upper
