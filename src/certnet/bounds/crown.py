"""Backward linear relaxation: CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness
Certification with General Activation Functions", Thm 3.2) and CROWN-IBP (Zhang et al. 2020,
"Towards Stable and Efficient Training of Verifiably Robust Neural Networks", §3: CROWN's
backward pass from the margin specification with IBP's intermediate bounds)."""

from __future__ import annotations

import torch
from torch import nn

from certnet.bounds.ibp import interval_walk
from certnet.bounds.rules import LayerInput, Slope, rule_for
from certnet.threat import ThreatModel, box_minimum

#: Coefficient-tensor elements one backward pass of full CROWN may hold (chunked beyond it).
CHUNK_ELEMENTS = 2 ** 25


def backward_bound(layers: nn.Sequential, seen: list[LayerInput], spec: torch.Tensor,
                   x: torch.Tensor, threat: ThreatModel, slope: Slope = "adaptive",
                   stop: int = 0, upto: int | None = None) -> torch.Tensor:
    """Lower bound (B, S) on spec . z over the threat model around ``x``, z the output of
    ``layers[:upto]``.

    ``spec`` has shape (B, S, *z.shape[1:]). The relaxation walks back from layer ``upto - 1``
    to layer ``stop``, using ``seen`` (each layer's input interval) for the activations, and
    concretizes on the threat model (``stop == 0``) or on the interval of layer ``stop``'s input."""
    upto = len(layers) if upto is None else upto
    lam, const = spec, spec.new_zeros(spec.shape[:2])
    for i in range(upto - 1, stop - 1, -1):
        lam, c = rule_for(layers[i]).backward(layers[i], lam, seen[i], slope)
        const = const + c
    base = threat.concretize(x, lam) if stop == 0 else \
        box_minimum(lam, seen[stop].lo, seen[stop].hi)
    return base + const


def affine_tail(layers: nn.Sequential) -> int:
    """Index where the trailing run of layers without activation relaxations begins (IBP's
    elision of the last affine layers into the specification, Gowal et al. 2018, §3)."""
    stop = len(layers)
    while stop > 0 and not needs_bounds(layers[stop - 1]):
        stop -= 1
    return stop


def needs_bounds(m: nn.Module) -> bool:
    """Whether the layer's backward relaxation depends on its input interval."""
    return rule_for(m).activation


def crown_walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
               slope: Slope = "adaptive") -> tuple[list[LayerInput], torch.Tensor]:
    """Full CROWN: IBP intervals, then every activation's input interval tightened (in layer
    order) by a backward pass from that layer, for the neurons IBP leaves unstable; the
    intervals after it are re-propagated from the tightened ones. Returns like
    :func:`interval_walk`."""
    seen, clean = interval_walk(layers, x, threat)
    for i, m in enumerate(layers):
        if not needs_bounds(m):
            continue
        unstable = rule_for(m).unstable(seen[i].lo, seen[i].hi)
        rows = unstable.flatten(1).any(0).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        lower, upper = _neuron_bounds(layers, seen, x, threat, slope, i, rows)
        lo, hi = seen[i].lo.flatten(1).clone(), seen[i].hi.flatten(1).clone()
        lo[:, rows] = torch.maximum(lo[:, rows], lower)
        hi[:, rows] = torch.minimum(hi[:, rows], torch.maximum(upper, lo[:, rows]))
        seen[i] = LayerInput(lo.view_as(seen[i].lo), hi.view_as(seen[i].hi), seen[i].clean)
        for j in range(i, len(layers)):  # re-propagate the intervals after the tightening
            lo_j, hi_j = rule_for(layers[j]).interval(layers[j], seen[j])
            nxt = seen[j + 1]
            seen[j + 1] = LayerInput(torch.maximum(lo_j, nxt.lo), torch.minimum(hi_j, nxt.hi),
                                     nxt.clean)
    return seen, clean


def _neuron_bounds(layers: nn.Sequential, seen: list[LayerInput], x: torch.Tensor,
                   threat: ThreatModel, slope: Slope, upto: int, rows: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN lower and upper bounds (B, len(rows)) of the flattened neurons ``rows`` of layer
    ``upto``'s input, in chunks of points and neurons that bound the memory used."""
    batch, shape = seen[upto].lo.shape[0], seen[upto].lo.shape[1:]
    widest = max(s.lo[0].numel() for s in seen[:upto + 1])
    per_point = max(1, CHUNK_ELEMENTS // (2 * widest))
    row_chunk = min(len(rows), per_point)
    point_chunk = max(1, CHUNK_ELEMENTS // (2 * widest * row_chunk))
    lower = seen[upto].lo.new_empty(batch, len(rows))
    upper = torch.empty_like(lower)
    for p in range(0, batch, point_chunk):
        points = slice(p, p + point_chunk)
        part = [LayerInput(s.lo[points], s.hi[points], s.clean[points]) for s in seen]
        n = part[0].lo.shape[0]
        for r in range(0, len(rows), row_chunk):
            idx = rows[r:r + row_chunk]
            unit = lower.new_zeros(len(idx), shape.numel())
            unit[torch.arange(len(idx)), idx] = 1.0
            unit = unit.view(1, len(idx), *shape)
            spec = torch.cat([unit, -unit], dim=1).expand(n, -1, *shape)
            bound = backward_bound(layers, part, spec, x[points], threat, slope, upto=upto)
            lower[points, r:r + len(idx)] = bound[:, :len(idx)]
            upper[points, r:r + len(idx)] = -bound[:, len(idx):]
    return lower, upper
