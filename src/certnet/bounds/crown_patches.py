"""CROWN's patches mode (auto_LiRPA's "patches"): behind a convolution the backward
coefficients of one neuron live on its receptive field only, so they are kept as patches over
it wherever that is smaller than the maps. Each rule says its patches form (its ``patches``
capability); a pass through a layer without one falls back to full coefficient maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds.backward_rounding import Rounding, l1_rows, top_rho
from certnet.bounds.rules import LayerInput, Slope, rule_for
from certnet.bounds.rules.relaxation import relaxed_backward, relu_lines
from certnet.floats import SQRT_TINY64, eta, gamma
from certnet.threat import ThreatModel


def patch_neuron_bounds(layers: nn.Sequential, seen: list[LayerInput], x: torch.Tensor,
                         threat: ThreatModel, slope: Slope, upto: int, rows: torch.Tensor,
                         plan: list[Level], chunk: int, rigorous: bool = False
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """_neuron_bounds on patches. The rows are laid out on a grid (positions x slots): the
    neurons at one spatial position share their windows, so the per-point maps are gathered
    once per position and broadcast over its channels (``chunk``: the elements one pass may
    hold); a slot past a position's own neurons
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
    cells = max(1, chunk // (2 * widest))  # (position, slot) cells per point
    slot_chunk = min(slots, cells)
    position_chunk = min(len(positions), max(1, cells // slot_chunk))
    point_chunk = max(1, chunk // (2 * widest * slot_chunk * position_chunk))
    lower = seen[upto].lo.new_empty(batch, len(rows))
    upper = torch.empty_like(lower)
    dense: dict = {}  # conv matrices of small patches, shared by the chunks
    weights = [rule_for(m).weight(m) if rule_for(m).patches == "conv" else None
               for m in layers[:upto]]  # computed once (effective weights are derived)
    for p in range(0, batch, point_chunk):
        points = slice(p, p + point_chunk)
        part = seen if point_chunk >= batch else \
            [s.rows(points) for s in seen]
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
class Level:
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


def patch_plan(layers: nn.Sequential, seen: list[LayerInput], threat: ThreatModel,
                upto: int) -> list[Level] | None:
    """The levels upto, upto - 1, ..., 0 of a patches backward pass from layer ``upto``'s
    input, or None where patches do not apply (a layer without a patch rule, no convolution,
    windows no smaller than the maps, a norm without a patch concretization)."""
    if threat.norm not in ("linf", "l2") or seen[upto].lo.dim() != 4:
        return None
    size, stride, offset = (1, 1), (1, 1), (0, 0)
    levels = [Level(tuple(seen[upto].lo.shape[1:]), size, stride, offset)]
    any_conv = False
    for i in range(upto - 1, -1, -1):
        m, rule = layers[i], rule_for(layers[i])
        if seen[i].lo.dim() != 4:
            return None
        if rule.patches is None:
            return None
        if rule.patches == "conv":
            k, s, pad = rule.weight(m).shape[-2:], m.stride, m.padding
            size = tuple((size[d] - 1) * s[d] + k[d] for d in range(2))
            offset = tuple(offset[d] * s[d] + pad[d] for d in range(2))
            stride = tuple(stride[d] * s[d] for d in range(2))
            any_conv = True
        level = Level(tuple(seen[i].lo.shape[1:]), size, stride, offset)
        if size[0] * size[1] >= level.shape[1] * level.shape[2]:
            return None
        levels.append(level)
    return levels[::-1] if any_conv else None


class _Windows:
    """The window of each of ``positions`` (flat spatial indices of the start level) at one
    level: the zero padding (left, right, top, bottom) that puts every window inside the padded
    maps, the (U, h, w) mask of window positions inside the unpadded maps, and flat indices
    (U, h, w, C) into the padded maps in (H, W, C) order."""

    def __init__(self, level: Level, positions: torch.Tensor, start: tuple[int, int, int]):
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
                 channels: torch.Tensor, plan: list[Level], dense: dict | None = None,
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
    mods = list(layers)
    rounding = Rounding(lam.new_zeros(n, u, 2 * g)) if rigorous else None
    for i in range(upto - 1, -1, -1):
        m, inp, win = mods[i], part[i], windows[i]
        rule = rule_for(m)
        c = None
        if rounding is not None:
            rounding.charge_sum(_patch_charge(lam, top_rho(rule, m, inp), n, shared),
                                lam.shape[2:].numel(), inp)
        if rule.patches == "conv":
            if m.bias is not None:
                c = (lam.sum((-2, -1)) @ m.bias.to(dtype)).view(-1, u, 2 * g)
            weight = rule.weight(m) if weights is None else weights[i]
            lam = _conv_patches(lam, weight, m.stride, dense, i)
            if not win.all_inside:
                mask = win.inside.to(dtype).view(1, u, 1, 1, *win.inside.shape[1:])
                lam = (lam.view(-1, u, *lam.shape[1:]) * mask).view(lam.shape)
        elif rule.patches == "relu":
            lo_w, up_w, bias_w = relu_lines(inp, slope)
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
                lower = lo_w.view(n, u, 1, *lo_w.shape[2:])
                if torch.is_grad_enabled():  # out= kernels do not differentiate (weights)
                    lam = neg * gap + lam.expand(full) * lower
                else:
                    out = lam.new_empty(*full[:3], *full[4:], full[3]).permute(0, 1, 2, 5, 3, 4)
                    torch.mul(neg, gap, out=out)
                    lam = out.addcmul_(lam.expand(full), lower)
                lam = lam.view(n * u, *lam.shape[2:])
            else:
                lam, c = relaxed_backward(lam, lo_w, up_w, bias_w)
                c = c.view(n, u, 2 * g)
        elif rule.patches == "channel":
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
    terms = lam.shape[2:].numel()
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


def _patch_charge(lam: torch.Tensor, top: torch.Tensor | float, n: int, shared: bool
                  ) -> torch.Tensor:
    """An upper bound on sum_j |lam_j| rho_j over each window (n, U, 2G) (as
    :class:`Rounding`'s: ||lam||_1 max rho), lam the patches (U, 2G, C, h, w) when ``shared``
    by the points, else (n * U, 2G, C, h, w), ``top`` the step's largest rho per point (B, 1)
    or one for all (a float: an identity's 0.0)."""
    total = l1_rows(lam)
    top = top.view(-1, 1, 1) if isinstance(top, torch.Tensor) else top  # a scalar: any step
    return total.unsqueeze(0) * top if shared else total.view(n, -1, lam.shape[1]) * top
