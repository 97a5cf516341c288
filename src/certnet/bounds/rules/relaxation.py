"""CROWN's ReLU relaxation (Zhang et al. 2018, §3.2), its fused backward step and its
rounding: the maths every activation rule is written in."""

from __future__ import annotations

import torch

from certnet.bounds.rules.base import LayerInput, Slope
from certnet.floats import eta, gamma


def relaxation_error(inp: LayerInput, reach: torch.Tensor, relus: int) -> torch.Tensor:
    """rho of a backward step through ``relus`` nested ReLU relaxations (CROWN's lines),
    each of a difference of inputs and constants of magnitude at most ``reach`` per output
    (broadcastable to the outputs), with coefficients at most the incoming |lam|:
    ``relus`` gamma_{N+32} reach, N the outputs per point.

    One relaxation of lam . relu(d), d in a computed [l, h] (each end within 2u of reach of
    the exact one), is off by at most (gamma_N + 20u) |lam| reach: the lower lines
    (slopes 0, 1 or alpha in [0, 1]) hold for every d exactly; the upper line's slope
    h / (h - l) and intercept round (6u reach), and an end that rounded inward lets d leave
    [l, h] by 2u reach, where the line (slope <= 1) falls below relu by at most that; the
    coefficient lam- (s - l) + lam l rounds by 4u |lam|, and the constant is an N-term dot
    with intercepts below reach. Underflow: the slope and intercept each lose at most eta
    more, 8 eta (1 + reach) per relaxation; coefficients' products losing eta each, whatever
    lam, are charged by :class:`certnet.bounds.crown.Rounding` for every step."""
    dtype, n = inp.lo.dtype, inp.lo.shape[1:].numel()
    return relus * (gamma(n + 32, dtype) * reach + 8 * eta(dtype) * (1 + reach))


def pairs_max(t: torch.Tensor) -> torch.Tensor:
    """max over each channel pair (first half, second half), for both outputs of the pair."""
    half = t.shape[1] // 2
    top = torch.maximum(t[:, :half], t[:, half:])
    return torch.cat([top, top], dim=1)


def relu_relaxation(lo: torch.Tensor, hi: torch.Tensor, slope: Slope | torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Linear bounds a_l h <= relu(h) <= a_u h + b_u on [lo, hi] (CROWN, Zhang et al. 2018,
    §3.2): the upper line through (lo, 0) and (hi, hi); the lower slope in [0, 1] for unstable
    neurons is chosen by ``slope`` (adaptive: 1 if hi > -lo else 0), or given as a tensor
    (alpha-CROWN's, per specification row: (B, S, *h), values in [0, 1]; the lower slope then
    has that shape).

    Stable neurons get slopes 1 (lo >= 0) or 0 (hi <= 0) through the same arithmetic, without
    torch.where, whose branch per element this unpredictable mask mispredicts on the CPU (a
    fifth of a CROWN-IBP loss-fusion step): hi+ / (hi+ - lo-) is hi / (hi - lo) where unstable,
    1 where active and 0 where inactive; lo = hi = 0, where the width is 0, gets 1 / 1."""
    unstable = (lo < 0) & (hi > 0)
    active = lo >= 0
    positive, negative = hi.clamp(min=0), lo.clamp(max=0)
    width = positive - negative
    point = (width == 0).to(hi.dtype)
    upper = (positive + point) / (width + point)
    upper_bias = -upper * negative
    if isinstance(slope, torch.Tensor):
        lower = torch.where(unstable.unsqueeze(1), slope, active.to(hi.dtype).unsqueeze(1))
        return lower, upper, upper_bias
    if slope == "adaptive":
        lower = (unstable & (hi > -lo) | active).to(hi.dtype)
    elif slope == "zero":
        lower = active.to(hi.dtype)
    elif slope == "one":
        lower = (unstable | active).to(hi.dtype)
    else:  # the upper line's slope
        lower = upper
    return lower, upper, upper_bias


def relu_lines(inp: LayerInput, slope: Slope | torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`relu_relaxation` on the interval ``inp``, kept with it for a fixed slope choice
    (every backward pass through the layer on this interval reads the same lines)."""
    if isinstance(slope, torch.Tensor):  # alpha-CROWN's, new each step
        return relu_relaxation(inp.lo, inp.hi, slope)
    return inp.memo(("relu_lines", slope), lambda: relu_relaxation(inp.lo, inp.hi, slope))


def relu_backward(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  slope: Slope | torch.Tensor,
                  lines: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients on h and constant of a lower bound of lam . relu(h), h in [lo, hi]
    (``lines``: :func:`relu_relaxation`'s of them, if the caller has them)."""
    lower, upper, upper_bias = relu_relaxation(lo, hi, slope) if lines is None else lines
    if not isinstance(slope, torch.Tensor):  # one lower slope for every specification row
        lower = _like(lower.unsqueeze(1), lam)
    return relaxed_backward(lam, lower, _like(upper.unsqueeze(1), lam),
                            _like(upper_bias.unsqueeze(1), lam))


def _like(t: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """``t`` (B, 1, C, H, W) in the channels-last order of a 5-d ``lam`` (same values), so that
    elementwise ops on the two run over matching strides."""
    if lam.dim() == 5 and t.dim() == 5 and t.shape[1] == 1 and lam.shape[2] > 1 and \
            lam.stride(2) == 1 and t.stride(2) != 1:
        return t.squeeze(1).contiguous(memory_format=torch.channels_last).unsqueeze(1)
    return t


def relaxed_backward(lam: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                     upper_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam+ * lower + lam- * upper and the constant sum(lam- * upper_bias) over all but the
    first two dims, for slopes broadcastable to lam, with the gradient autograd gives that
    clamp formula. Fused: on CPU a fresh lam-sized tensor costs far more (page faults) than an
    in-place pass over it, so the forward makes one and the backward two. Where autograd
    records nothing, the forward alone (the autograd.Function's call costs a third of it)."""
    if torch.is_grad_enabled() and any(
            t.requires_grad for t in (lam, lower, upper, upper_bias)):
        return _RelaxedBackward.apply(lam, lower, upper, upper_bias)
    return _relaxed_forward(lam, lower, upper, upper_bias)


def _relaxed_forward(lam: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                     upper_bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lam- * (upper - lower) + lam * lower, which is lam+ * lower + lam- * upper up to one
    rounding (upper - lower is exact for the fixed slope choices; an alpha-CROWN slope adds
    one more, relative to lam's terms, which the certificates' rounding slack covers many
    times over), and the constant."""
    coef = lam.clamp(max=0)
    const = per_row_dot(coef, upper_bias)
    gap = upper - lower
    coef = coef.mul_(gap) if fits(gap.shape, coef.shape) else coef * gap
    coef = coef.addcmul_(lam, lower) if fits(lower.shape, coef.shape) else coef + lam * lower
    return coef, const


def _memory_flat(t: torch.Tensor, order: list[int]) -> torch.Tensor:
    """(B, S, *z) -> (B, S, prod z) with z's dims taken in ``order`` (a view when that is the
    memory order)."""
    return t.permute(0, 1, *order).reshape(t.shape[0], t.shape[1], -1)


def _order(t: torch.Tensor) -> list[int]:
    """t's dims past the first two, outermost in memory first."""
    return sorted(range(2, t.dim()), key=lambda d: -t.stride(d))


def per_row_dot(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """sum over all but the first two dims of t * v, t (B, S, *z), v (B or 1, 1, *z) or any
    shape broadcastable to t, as a matrix product where the shapes allow (no t-sized product)."""
    if t.dim() > 2 and v.dim() == t.dim() and v.shape[1] == 1 and \
            v.shape[0] in (1, t.shape[0]) and v.shape[2:] == t.shape[2:]:
        if t.dim() == 3:  # already (B, S, n): the same product, without the reshapes
            return (t @ v.transpose(1, 2)).squeeze(2)
        order = _order(t)
        return (_memory_flat(t, order) @ _memory_flat(v, order).transpose(1, 2)).squeeze(2)
    return sum_over(t * v)


def fits(shape: torch.Size, target: torch.Size) -> bool:
    """Whether ``shape`` broadcasts to ``target`` without enlarging it (an in-place op of a
    ``target``-shaped tensor with it is then possible); torch.broadcast_shapes' test, at a
    fraction of its cost per call."""
    return len(shape) <= len(target) and \
        all(s in (1, t) for s, t in zip(reversed(shape), reversed(target), strict=False))


def sum_over(t: torch.Tensor) -> torch.Tensor:
    return t.sum(list(range(2, t.dim()))) if t.dim() > 2 else t


def _rows_weighted(w: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """sum over S of w[:, s] * t[:, s], w (B, S), t (B, S, *z), reduced to ``shape``."""
    if t.dim() > 2 and len(shape) == t.dim() and shape[1] == 1 and shape[2:] == t.shape[2:]:
        order = _order(t)
        flat = w.unsqueeze(1) @ _memory_flat(t, order)  # (B, 1, prod z)
        dims = [t.shape[d] for d in order]
        inverse = [0, 1, *[2 + order.index(d) for d in range(2, t.dim())]]
        return flat.view(flat.shape[0], 1, *dims).permute(*inverse).sum_to_size(shape)
    return (w.view(*w.shape, *([1] * (t.dim() - 2))) * t).sum_to_size(shape)


class _RelaxedBackward(torch.autograd.Function):
    """Forward: :func:`_relaxed_forward`. Backward: the gradient autograd takes through the
    clamp formula, kink included (at lam == 0 clamp passes the gradient to both terms: slope
    lower + upper, and the upper bias); out of place, hence differentiable again, under
    create_graph."""

    @staticmethod
    def forward(ctx, lam, lower, upper, upper_bias):
        ctx.save_for_backward(lam, lower, upper, upper_bias)
        return _relaxed_forward(lam, lower, upper, upper_bias)

    @staticmethod
    def backward(ctx, g_coef, g_const):
        lam, lower, upper, upper_bias = ctx.saved_tensors
        need_lam, need_lower, need_upper, need_bias = ctx.needs_input_grad
        g_lam = g_lower = g_upper = g_bias = None
        full = torch.broadcast_shapes(lam.shape, lower.shape, upper.shape, upper_bias.shape)
        gc = g_const.view(*g_const.shape, *([1] * (lam.dim() - 2)))
        if need_lam:
            if full == lam.shape and not torch.is_grad_enabled():  # in place, two buffers
                g_lam = torch.ge(lam, 0, out=torch.empty_like(lam)).mul_(lower)
                rest = torch.le(lam, 0, out=torch.empty_like(lam))
                g_lam.addcmul_(rest, upper).mul_(g_coef)
                g_lam.addcmul_(rest.mul_(upper_bias), gc)
                del rest
            else:
                nonneg, nonpos = (lam >= 0).to(lam.dtype), (lam <= 0).to(lam.dtype)
                g_lam = (g_coef * (nonneg * lower + nonpos * upper) +
                         gc * upper_bias * nonpos).sum_to_size(lam.shape)
        if need_upper or need_bias:
            neg = lam.clamp(max=0)
            if need_bias:
                g_bias = _rows_weighted(g_const, neg, upper_bias.shape)
            if need_upper:
                g_upper = neg.mul_(g_coef).sum_to_size(upper.shape) if \
                    fits(g_coef.shape, neg.shape) and not torch.is_grad_enabled() else \
                    (neg * g_coef).sum_to_size(upper.shape)
            del neg
        if need_lower:
            g_lower = (g_coef * lam.clamp(min=0)).sum_to_size(lower.shape)
        return g_lam, g_lower, g_upper, g_bias
