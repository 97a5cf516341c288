"""Backward linear relaxation: CROWN (Zhang et al. 2018, "Efficient Neural Network Robustness
Certification with General Activation Functions", Thm 3.2) and CROWN-IBP (Zhang et al. 2020,
"Towards Stable and Efficient Training of Verifiably Robust Neural Networks", §3: CROWN's
backward pass from the margin specification with IBP's intermediate bounds)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds.ibp import drift_walk, interval_walk, layer_interval
from certnet.bounds.rules import (
    BatchNormRule,
    ConvRule,
    IdentityRule,
    LayerInput,
    NormalizeRule,
    ReLURule,
    ResidualConvRule,
    Slope,
    relaxed_backward,
    relu_relaxation,
    rule_for,
)
from certnet.errors import UnsupportedLayerError
from certnet.floats import SQRT_TINY64, eta, gamma
from certnet.threat import ThreatModel, box_minimum

#: Coefficient-tensor elements one backward pass of full CROWN may hold (chunked beyond it).
CHUNK_ELEMENTS = 2 ** 25


def backward_bound(layers: nn.Sequential, seen: list[LayerInput], spec: torch.Tensor,
                   x: torch.Tensor, threat: ThreatModel, slope: Slope = "adaptive",
                   stop: int = 0, upto: int | None = None,
                   alphas: Mapping[int, torch.Tensor] | None = None,
                   rigorous: bool = False) -> torch.Tensor:
    """Lower bound (B, S) on spec . z over the threat model around ``x``, z the output of
    ``layers[:upto]``.

    ``spec`` has shape (B, S, *z.shape[1:]). The relaxation walks back from layer ``upto - 1``
    to layer ``stop`` (raised to :func:`relaxation_floor`), using ``seen`` (each layer's input
    interval) for the activations, and concretizes on the threat model (``stop == 0``) or on
    the interval of layer ``stop``'s input. ``alphas[i]`` (optional): the lower slopes of
    ReLU layer i per specification row (alpha-CROWN), in place of ``slope``.
    ``rigorous``: a bound on the exact z in floating point (``seen`` must be rigorous too):
    each step's rounding is charged to the bound (:class:`Rounding`)."""
    upto = len(layers) if upto is None else upto
    stop = max(stop, relaxation_floor(layers, upto))
    lam, const = spec, spec.new_zeros(spec.shape[:2])
    rounding = Rounding(const) if rigorous else None
    for i in range(upto - 1, stop - 1, -1):
        choice = alphas[i] if alphas is not None and i in alphas else slope
        rule = rule_for(layers[i])
        if rounding is not None:
            rounding.charge(lam, rule_rho(rule, layers[i], seen[i]), seen[i])
        lam, c = rule.backward(layers[i], lam, seen[i], choice)
        const = const + c
        if rounding is not None:
            rounding.constant(c)
    base = threat.concretize(x, lam, rigorous) if stop == 0 else \
        box_minimum(lam, seen[stop].lo, seen[stop].hi, rigorous)
    return base + const if rounding is None else rounding.settle(base, const)


def rule_rho(rule, m: nn.Module, inp: LayerInput) -> torch.Tensor | float:
    """The rule's ``backward_error`` (an UnsupportedLayerError where it has none)."""
    rho = rule.backward_error(m, inp)
    if rho is None:
        raise UnsupportedLayerError(f"{type(m).__name__}: no bound on the rounding of its "
                                    "backward relaxation")
    return rho


class Rounding:
    """What a backward pass's float evaluation may have lost, per point and specification row
    (docs/rounding.md): sum over the steps of sum_j |lam_j| rho_j <= ||lam||_1 max_j rho_j
    (the rules' ``backward_error``; the l1 norm is one read of lam, with no temporary, and
    the charges are ~1e-13 of the bounds, so the max costs nothing that matters), and the
    magnitudes of the constants, whose L additions and the final one with the concretized term
    round by at most gamma_{L+1} of their sum."""

    def __init__(self, like: torch.Tensor) -> None:
        self.error = torch.zeros_like(like)
        self.size = torch.zeros_like(like)
        self.steps = 0
        self.terms = 1

    def charge(self, lam: torch.Tensor, rho: torch.Tensor | float, inp: LayerInput) -> None:
        """Add sum_j |lam_j| rho_j over the step's outputs (lam (B, S, *z)), and
        :meth:`underflow` for its input ``inp``."""
        exact = not isinstance(rho, torch.Tensor) and not rho  # no read of lam for nothing
        self.charge_sum(0.0 if exact else l1_rows(lam) * largest(rho), lam[0, 0].numel(), inp)

    def charge_sum(self, error: torch.Tensor | float, terms: int, inp: LayerInput) -> None:
        """Add a step's charge computed by the caller (patches mode), on coefficients of
        ``terms`` entries per row."""
        self.steps += 1
        self.terms = max(self.terms, terms)
        self.underflow(terms, inp)
        self.error = self.error + error

    def underflow(self, terms: int, inp: LayerInput) -> None:
        """What products may lose to underflow whatever lam: each new coefficient sums at most
        ``terms`` + 16 products (eta each), and so does the constant, against inputs of size
        at most the interval's magnitudes (sum_k H_k <= their number times the largest)."""
        reach = inp.largest.flatten() * inp.lo[0].numel() + 1
        lost = (terms + 16) * eta(reach.dtype) * reach
        self.error = self.error + lost.view(-1, *([1] * (self.error.dim() - 1)))

    def constant(self, c: torch.Tensor) -> None:
        self.size = self.size + c.abs()

    def settle(self, base: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """base + const minus everything the evaluation may have lost, itself rounded up:
        the charges (sums of at most ``terms`` products each, ``steps`` of them added) and
        the additions of the constants and of the slack itself."""
        error = self.error * (1 + 2 * gamma(self.terms + self.steps + 2, base.dtype))
        slack = error + gamma(self.steps + 6, base.dtype) * (base.abs() + self.size + error)
        return base + const - slack


def relaxation_floor(layers: nn.Sequential, upto: int) -> int:
    """Index just past the last layer below ``upto`` without a linear relaxation (an
    interval-only rule, e.g. l_p-dist neurons), 0 if every layer has one: backward passes
    from ``upto`` concretize there, on that layer's output interval."""
    return max((i + 1 for i in range(upto) if not rule_for(layers[i]).relaxable), default=0)


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
               slope: Slope = "adaptive", rigorous: bool = False
               ) -> tuple[list[LayerInput], torch.Tensor]:
    """Full CROWN: IBP intervals, then every activation's input interval tightened (in layer
    order) by a backward pass from that layer, for the neurons IBP leaves unstable; the
    intervals after it are re-propagated from the tightened ones. Returns like
    :func:`interval_walk` (``rigorous``: as there, every interval holds the exact and the
    float forward values)."""
    if any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) and m.training for m in layers):
        raise UnsupportedLayerError("full CROWN bounds chunks of points, and a training-mode "
                                    "BatchNorm normalises by its batch: put the network in "
                                    "eval mode (certificates always are)")
    seen, clean = interval_walk(layers, x, threat, rigorous=rigorous)
    # float forward - exact forward per neuron; the tightenings below only shrink the
    # intervals these bounds were computed on, so they stay valid
    drifts = drift_walk(layers, seen) if rigorous else []
    for i, m in enumerate(layers):
        if not needs_bounds(m):
            continue
        unstable = rule_for(m).unstable(m, seen[i].lo, seen[i].hi).flatten(1)
        rows = unstable.any(0).nonzero().squeeze(1)
        if len(rows) == 0:
            continue
        lower, upper = _neuron_bounds(layers, seen, x, threat, slope, i, rows, rigorous)
        if rigorous:  # the float forward value lies within the drift of the exact one
            drift = drifts[i].expand_as(seen[i].lo).flatten(1)[:, rows]
            lower, upper = lower - drift, upper + drift
        # tighten only where IBP left the neuron unstable for that point, so a point's bounds
        # never depend on the other points of its batch
        mine = unstable[:, rows]
        lo, hi = seen[i].lo.flatten(1).clone(), seen[i].hi.flatten(1).clone()
        lo[:, rows] = torch.where(mine, torch.maximum(lo[:, rows], lower), lo[:, rows])
        hi[:, rows] = torch.where(mine, torch.minimum(hi[:, rows],
                                                      torch.maximum(upper, lo[:, rows])),
                                  hi[:, rows])
        seen[i] = LayerInput(lo.view_as(seen[i].lo), hi.view_as(seen[i].hi), seen[i].clean)
        for j in range(i, len(layers)):  # re-propagate the intervals after the tightening
            lo_j, hi_j = layer_interval(layers[j], seen[j], rigorous)
            nxt = seen[j + 1]
            seen[j + 1] = LayerInput(torch.maximum(lo_j, nxt.lo), torch.minimum(hi_j, nxt.hi),
                                     nxt.clean)
    return seen, clean


def _neuron_bounds(layers: nn.Sequential, seen: list[LayerInput], x: torch.Tensor,
                   threat: ThreatModel, slope: Slope, upto: int, rows: torch.Tensor,
                   rigorous: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN lower and upper bounds (B, len(rows)) of the flattened neurons ``rows`` of layer
    ``upto``'s input, in chunks of points and neurons that bound the memory used. Behind a
    convolution the coefficients of a neuron live on its receptive field only: they are kept
    as patches over it (auto_LiRPA's "patches" mode) wherever that is smaller than the maps."""
    plan = _patch_plan(layers, seen, threat, upto)
    if plan is not None:
        return _patch_neuron_bounds(layers, seen, x, threat, slope, upto, rows, plan, rigorous)
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
            bound = backward_bound(layers, part, spec, x[points], threat, slope, upto=upto,
                                   rigorous=rigorous)
            lower[points, r:r + len(idx)] = bound[:, :len(idx)]
            upper[points, r:r + len(idx)] = -bound[:, len(idx):]
    return lower, upper


def _patch_neuron_bounds(layers: nn.Sequential, seen: list[LayerInput], x: torch.Tensor,
                         threat: ThreatModel, slope: Slope, upto: int, rows: torch.Tensor,
                         plan: list[_Level], rigorous: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """_neuron_bounds on patches. The rows are laid out on a grid (positions x slots): the
    neurons at one spatial position share their windows, so the per-point maps are gathered
    once per position and broadcast over its channels; a slot past a position's own neurons
    is padding (computed on channel 0, dropped)."""
    batch = seen[upto].lo.shape[0]
    spatial = plan[upto].shape[1] * plan[upto].shape[2]
    order = torch.argsort(rows % spatial, stable=True)
    position = rows[order] % spatial
    positions, counts = torch.unique_consecutive(position, return_counts=True)
    first = torch.cumsum(counts, 0) - counts
    which = torch.repeat_interleave(torch.arange(len(positions), device=rows.device), counts)
    slot = torch.arange(len(rows), device=rows.device) - first[which]
    slots = int(counts.max())
    table = torch.zeros(len(positions), slots, dtype=torch.long, device=rows.device)
    table[which, slot] = rows[order] // spatial
    # where each requested row sits on the grid
    row_position, row_slot = torch.empty_like(which), torch.empty_like(slot)
    row_position[order], row_slot[order] = which, slot

    widest = max(level.elements for level in plan)
    cells = max(1, CHUNK_ELEMENTS // (2 * widest))  # (position, slot) cells per point
    slot_chunk = min(slots, cells)
    position_chunk = min(len(positions), max(1, cells // slot_chunk))
    point_chunk = max(1, CHUNK_ELEMENTS // (2 * widest * slot_chunk * position_chunk))
    lower = seen[upto].lo.new_empty(batch, len(rows))
    upper = torch.empty_like(lower)
    dense: dict = {}  # conv matrices of small patches, shared by the chunks
    weights = [rule_for(m).weight(m) if isinstance(rule_for(m), ConvRule) else None
               for m in layers[:upto]]  # computed once (effective weights are derived)
    for p in range(0, batch, point_chunk):
        points = slice(p, p + point_chunk)
        part = [LayerInput(s.lo[points], s.hi[points], s.clean[points]) for s in seen]
        for q in range(0, len(positions), position_chunk):
            for g in range(0, slots, slot_chunk):
                channels = table[q:q + position_chunk, g:g + slot_chunk]
                bound = _patch_bound(layers, part, x[points], threat, slope, upto,
                                     positions[q:q + position_chunk], channels, plan, dense,
                                     weights, rigorous)
                here = (row_position >= q) & (row_position < q + len(channels)) & \
                    (row_slot >= g) & (row_slot < g + channels.shape[1])
                cols = here.nonzero().squeeze(1)
                at_pos, at_slot = row_position[cols] - q, row_slot[cols] - g
                lower[points, cols] = bound[:, at_pos, at_slot]
                upper[points, cols] = -bound[:, at_pos, channels.shape[1] + at_slot]
    return lower, upper


@dataclass(frozen=True)
class _Level:
    """Where the patches stand at one layer's input (level i = layers[i]'s input): windows of
    ``size`` over maps of ``shape`` (C, H, W), the window of output neuron (y, x) of the start
    level beginning at (y * stride - offset) per spatial dim."""

    shape: tuple[int, int, int]
    size: tuple[int, int]
    stride: tuple[int, int]
    offset: tuple[int, int]

    @property
    def elements(self) -> int:
        return self.shape[0] * self.size[0] * self.size[1]


#: Rules with a patches form (the folded residual conv's is its conv's).
_PATCH_RULES = (ConvRule, ResidualConvRule, ReLURule, NormalizeRule, BatchNormRule,
                IdentityRule)


def _patch_plan(layers: nn.Sequential, seen: list[LayerInput], threat: ThreatModel,
                upto: int) -> list[_Level] | None:
    """The levels upto, upto - 1, ..., 0 of a patches backward pass from layer ``upto``'s
    input, or None where patches do not apply (a layer without a patch rule, no convolution,
    windows no smaller than the maps, a norm without a patch concretization)."""
    if threat.norm not in ("linf", "l2") or seen[upto].lo.dim() != 4:
        return None
    size, stride, offset = (1, 1), (1, 1), (0, 0)
    levels = [_Level(tuple(seen[upto].lo.shape[1:]), size, stride, offset)]
    any_conv = False
    for i in range(upto - 1, -1, -1):
        m, rule = layers[i], rule_for(layers[i])
        if seen[i].lo.dim() != 4:
            return None
        if type(rule) not in _PATCH_RULES:
            return None
        if isinstance(rule, ConvRule):
            k, s, pad = rule.weight(m).shape[-2:], m.stride, m.padding
            size = tuple((size[d] - 1) * s[d] + k[d] for d in range(2))
            offset = tuple(offset[d] * s[d] + pad[d] for d in range(2))
            stride = tuple(stride[d] * s[d] for d in range(2))
            any_conv = True
        level = _Level(tuple(seen[i].lo.shape[1:]), size, stride, offset)
        if size[0] * size[1] >= level.shape[1] * level.shape[2]:
            return None
        levels.append(level)
    return levels[::-1] if any_conv else None


class _Windows:
    """The window of each of ``positions`` (flat spatial indices of the start level) at one
    level: the zero padding (left, right, top, bottom) that puts every window inside the padded
    maps, the (U, h, w) mask of window positions inside the unpadded maps, and flat indices
    (U, h, w, C) into the padded maps in (H, W, C) order."""

    def __init__(self, level: _Level, positions: torch.Tensor, start: tuple[int, int, int]):
        _, height, width = start
        channels, map_h, map_w = level.shape
        h, w = level.size
        top, left = level.offset
        bottom = max(0, (height - 1) * level.stride[0] - top + h - map_h)
        right = max(0, (width - 1) * level.stride[1] - left + w - map_w)
        self.pads = (left, right, top, bottom)
        ys = (positions // width) * level.stride[0]  # window tops in padded coordinates
        xs = (positions % width) * level.stride[1]
        Y = ys.view(-1, 1, 1) + torch.arange(h, device=positions.device).view(1, -1, 1)
        X = xs.view(-1, 1, 1) + torch.arange(w, device=positions.device).view(1, 1, -1)
        self.inside = (Y >= top) & (Y < top + map_h) & (X >= left) & (X < left + map_w)
        self.all_inside = bool(self.inside.all())
        padded_w = left + map_w + right
        pixel = (Y * padded_w + X).unsqueeze(-1)
        self.index = pixel * channels + torch.arange(channels, device=positions.device)

    def gather(self, maps: torch.Tensor) -> torch.Tensor:
        """Windows (B * U, 1, C, h, w) of ``maps`` (B, C, H, W), zero outside the maps, in
        channels-last memory order, point-major."""
        padded = F.pad(maps, self.pads) if any(self.pads) else maps
        flat = padded.permute(0, 2, 3, 1).reshape(padded.shape[0], -1)
        out = flat[:, self.index]  # (B, U, h, w, C)
        return out.view(-1, 1, *out.shape[2:]).permute(0, 1, 4, 2, 3)


def _to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """(B, R, C, h, w) in memory order (B, R, h, w, C)."""
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def _conv_patches(lam: torch.Tensor, weight: torch.Tensor, stride: tuple[int, int],
                  dense: dict | None = None, key: object = None) -> torch.Tensor:
    """conv^T of the patches lam (B, R, C, h, w) (channels-last memory order): windows
    (B, R, C_in, (h - 1) s + k, (w - 1) s + k), same order. 1 x 1 patches, and small ones with
    few input channels, go as one matrix product with the dense map window -> patch (oneDNN's
    transposed convolution is slow on those shapes); the rest as a batched transposed
    convolution. ``dense`` caches those matrices across calls, under ``key`` (the weight's)."""
    n, r, c, h, w = lam.shape
    c_in, k_h, k_w = weight.shape[1:]
    out_h, out_w = (h - 1) * stride[0] + k_h, (w - 1) * stride[1] + k_w
    inputs = c_in * out_h * out_w
    if (h * w == 1 or (c_in <= 4 and out_h * out_w <= 16 * k_h * k_w)) and \
            inputs <= 2048 and inputs * c * h * w <= 2 ** 22:
        key = (key, h, w)
        matrix = None if dense is None else dense.get(key)
        if matrix is None:  # the conv on the basis of its input window, (H', W', C_in) order
            basis = torch.eye(inputs, dtype=lam.dtype, device=lam.device)
            basis = basis.view(inputs, out_h, out_w, c_in).permute(0, 3, 1, 2)
            matrix = F.conv2d(basis, weight.to(lam.dtype), None, stride)  # (inputs, C, h, w)
            matrix = matrix.permute(0, 2, 3, 1).reshape(inputs, h * w * c).t()
            if dense is not None:
                dense[key] = matrix
        flat = lam.permute(0, 1, 3, 4, 2).reshape(n * r, -1)
        return (flat @ matrix).view(n, r, out_h, out_w, c_in).permute(0, 1, 4, 2, 3)
    flat = lam.reshape(n * r, c, h, w)  # a view: channels-last 4-d
    back = F.conv_transpose2d(flat, weight, None, stride)
    back = back.view(n, r, *back.shape[1:])
    return back if back.stride(2) == 1 or c_in == 1 else _to_channels_last(back)


def _patch_bound(layers: nn.Sequential, part: list[LayerInput], x: torch.Tensor,
                 threat: ThreatModel, slope: Slope, upto: int, positions: torch.Tensor,
                 channels: torch.Tensor, plan: list[_Level], dense: dict | None = None,
                 weights: list | None = None, rigorous: bool = False) -> torch.Tensor:
    """backward_bound, on patches, of the unit rows (neurons (channels[u, g], positions[u]) of
    layer ``upto``'s input) and their negatives: (B, U, 2G), the negatives last. The
    coefficients are (B * U, 2G, C, h, w): a batch of (point, position) pairs whose windows
    coincide, kept zero outside the maps (padding) and in channels-last memory order. They
    stay one copy for all points until the first layer that depends on the point.
    ``rigorous``: as :func:`backward_bound`'s, each step charged on its windows."""
    start = plan[upto].shape
    n, (u, g) = part[upto].lo.shape[0], channels.shape
    dtype = part[upto].lo.dtype
    lam = part[upto].lo.new_zeros(u, 2 * g, start[0], 1, 1)
    at_u = torch.arange(u, device=lam.device).view(-1, 1).expand(u, g)
    at_g = torch.arange(g, device=lam.device).view(1, -1).expand(u, g)
    lam[at_u, at_g, channels] = 1.0
    lam[at_u, at_g + g, channels] = -1.0
    const = lam.new_zeros(1, u, 2 * g)
    shared = True  # lam is (U, 2G, ...), the same for every point

    def per_point(lam: torch.Tensor) -> torch.Tensor:  # (U, 2G, ...) -> (B * U, 2G, ...)
        rows = lam.permute(0, 1, 3, 4, 2).unsqueeze(0).expand(n, *lam.shape[:2],
                                                               *lam.shape[3:], lam.shape[2])
        return rows.reshape(n * u, *rows.shape[2:]).permute(0, 1, 4, 2, 3)

    windows = [_Windows(level, positions, start) for level in plan]
    rounding = Rounding(lam.new_zeros(n, u, 2 * g)) if rigorous else None
    for i in range(upto - 1, -1, -1):
        m, rule, inp, win = layers[i], rule_for(layers[i]), part[i], windows[i]
        c = None
        if rounding is not None:
            rounding.charge_sum(_patch_charge(lam, rule_rho(rule, m, inp), n, shared),
                                lam[0, 0].numel(), inp)
        if isinstance(rule, ConvRule):
            if m.bias is not None:
                c = (lam.sum((-2, -1)) @ m.bias.to(dtype)).view(-1, u, 2 * g)
            weight = rule.weight(m) if weights is None else weights[i]
            lam = _conv_patches(lam, weight, m.stride, dense, i)
            if not win.all_inside:
                mask = win.inside.to(dtype).view(1, u, 1, 1, *win.inside.shape[1:])
                lam = (lam.view(-1, u, *lam.shape[1:]) * mask).view(lam.shape)
        elif type(rule) is ReLURule:
            lo_w, up_w, bias_w = relu_relaxation(inp.lo, inp.hi, slope)
            lo_w, up_w, bias_w = win.gather(lo_w), win.gather(up_w), win.gather(bias_w)
            if shared:  # lam+ l + lam- u = lam- (u - l) + lam l, broadcast over the points
                shared = False
                neg = lam.clamp(max=0)
                hwc = (u, 2 * g, -1)
                dot = torch.bmm(bias_w.permute(0, 1, 3, 4, 2).reshape(n, u, -1).transpose(0, 1),
                                neg.permute(0, 1, 3, 4, 2).reshape(hwc).transpose(1, 2))
                c = dot.transpose(0, 1)
                full = (n, u, *lam.shape[1:])
                gap = (up_w - lo_w).view(n, u, 1, *lo_w.shape[2:])
                out = lam.new_empty(*full[:3], *full[4:], full[3]).permute(0, 1, 2, 5, 3, 4)
                torch.mul(neg, gap, out=out)
                lam = out.addcmul_(lam.expand(full), lo_w.view(n, u, 1, *lo_w.shape[2:]))
                lam = lam.view(n * u, *lam.shape[2:])
            else:
                lam, c = relaxed_backward(lam, lo_w, up_w, bias_w)
                c = c.view(n, u, 2 * g)
        elif type(rule) in (NormalizeRule, BatchNormRule):
            scale, shift = rule.scale_shift(m, inp)
            c = (lam.sum((-2, -1)) @ shift.to(dtype)).view(-1, u, 2 * g)
            lam = lam * scale.view(1, 1, -1, 1, 1)
        if c is not None:
            const = const + c
            if rounding is not None:
                rounding.constant(c)
    if shared:
        lam = per_point(lam)
    win = windows[0]
    terms = lam[0, 0].numel()
    if threat.norm == "linf":
        lo, hi = threat.enclosure(x) if rigorous else threat.box(x)
        center, radius = win.gather((hi + lo) / 2), win.gather((hi - lo) / 2)
        base = (lam * center).sum((2, 3, 4))
        if rigorous:  # as box_minimum's
            radius = radius + gamma(terms + 5, dtype) * (center.abs() + radius)
            base = base - 2 * (terms + 2) * eta(dtype)
        base = base - (lam.abs() * radius).sum((2, 3, 4))
    else:
        norm = lam.square().sum((2, 3, 4)).sqrt()
        base = (lam * win.gather(x)).sum((2, 3, 4))
        if rigorous:  # as ThreatModel.concretize's
            norm = norm + terms**0.5 * SQRT_TINY64
            base = base - gamma(terms + 6, dtype) * (
                lam.abs() * (win.gather(x).abs() + threat.eps)).sum((2, 3, 4)) - \
                3 * (terms + 2) * eta(dtype)
        base = base - threat.eps * norm
    base = base.view(n, u, 2 * g)
    return base + const if rounding is None else rounding.settle(base, const)


def _patch_charge(lam: torch.Tensor, rho: torch.Tensor | float, n: int, shared: bool
                  ) -> torch.Tensor:
    """An upper bound on sum_j |lam_j| rho_j over each window (n, U, 2G) (as
    :class:`Rounding`'s: ||lam||_1 max rho), lam the patches (U, 2G, C, h, w) when ``shared``
    by the points, else (n * U, 2G, C, h, w), rho the step's, per point."""
    top = largest(rho)
    total = l1_rows(lam)
    return total.unsqueeze(0) * top.view(-1, 1, 1) if shared else \
        total.view(n, -1, lam.shape[1]) * top.view(-1, 1, 1)


def l1_rows(lam: torch.Tensor) -> torch.Tensor:
    """||lam[b, s]||_1 (B, S), one read of lam whatever its strides, no temporary; rounded
    up (n-term sums of non-negative terms: gamma_n)."""
    norm = torch.linalg.vector_norm(lam, 1, dim=tuple(range(2, lam.dim())))
    return norm * (1 + gamma(lam[0, 0].numel() + 1, lam.dtype))


def largest(rho: torch.Tensor | float) -> torch.Tensor | float:
    """max_j rho_j per point (B, 1) (rho (B, ...)), or the scalar."""
    if not isinstance(rho, torch.Tensor):
        return rho
    return rho.flatten(1).amax(1, keepdim=True) if rho.dim() > 1 else rho.amax().view(1, 1)
