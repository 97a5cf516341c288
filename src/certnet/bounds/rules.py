"""One bound rule per layer type, dispatched by exact type (auto_LiRPA's ``operators/`` idea).

A rule knows two things about its layer h -> z:

* ``interval(m, inp)``: an interval containing z for every h in [inp.lo, inp.hi] (IBP, Gowal et
  al. 2018, Eq. 6: centre/radius form for affine maps, endpoints for monotone activations);
* ``backward(m, lam, inp, slope)``: given coefficients ``lam`` (B, S, *z.shape) of a linear lower
  bound lam . z, coefficients on h and a constant (B, S) with lam . z >= lam_h . h + const
  for every h in the interval (CROWN, Zhang et al. 2018, Thm 3.2; CROWN-IBP, Zhang et al. 2020).

Affine layers use their *effective* weight (e.g. the folded residual conv). Convolutions go
backward as transposed convolutions on the coefficient tensors, never as dense matrices.
Adding a layer type is one :func:`register_bound_rule` call.

Rigorous in floating point (certificates; docs/rounding.md): every rule also bounds its own
rounding, from the magnitudes that enter its operations (:mod:`certnet.floats`):

* ``interval_error``: how far the computed interval may fall inside the exact one, and the
  float forward pass of any input in it outside it: widened by it (and one ulp), the interval
  holds the layer's exact AND float outputs;
* ``backward_error``: rho (per output neuron) such that one ``backward`` step with any
  coefficients lam is off by at most sum_j |lam_j| rho_j, over the input interval;
* ``drift``: a bound on |float forward - exact forward| of the outputs, given that of the inputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from certnet.distributed import batch_mean, batch_variance, distributed_run
from certnet.errors import UnsupportedLayerError
from certnet.floats import eta, gamma, unit_roundoff
from certnet.nn import branchless
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, Normalize, ResidualConv2d

Slope = Literal["adaptive", "zero", "one", "same"]
SLOPES = ("adaptive", "zero", "one", "same")


@dataclass
class LayerInput:
    """What a layer sees: an interval [lo, hi] of its inputs and the unperturbed input."""

    lo: torch.Tensor
    hi: torch.Tensor
    clean: torch.Tensor

    @property
    def magnitude(self) -> torch.Tensor:
        """max(|lo|, |hi|): the largest |h| of each input over the interval (exact)."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @property
    def largest(self) -> torch.Tensor:
        """Each point's largest |h| over the interval, shaped (B, 1, ...) to broadcast."""
        top = torch.maximum(self.hi.flatten(1).amax(1), self.lo.flatten(1).amin(1).neg())
        return top.view(-1, *([1] * (self.lo.dim() - 1)))


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-d float32 / half coefficient tensor in channels-last memory order (same values):
    oneDNN's transposed convolutions run about twice as fast on it, and the elementwise rules
    keep the order, so a backward pass converts once. float64 (no oneDNN kernel) is left as is."""
    if t.dim() == 4 and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return t.contiguous(memory_format=torch.channels_last)
    return t


def _flat(lam: torch.Tensor, batch: int) -> torch.Tensor:
    """(B, S, *shape) -> (B * S, *shape)."""
    return lam.reshape(-1, *lam.shape[2:]) if lam.shape[0] == batch else lam.flatten(0, 1)


class BoundRule:
    """Interface of a layer's bound rules. Activation rules (``activation = True``) relax
    using their input interval and say which neurons are ``unstable`` on it (where tighter
    intermediate bounds would help). A rule without a linear relaxation (``relaxable =
    False``: interval only) ends every backward pass at its output's interval.
    ``l2_lipschitz`` is a cheap l2 Lipschitz bound of the layer where one is known (else None):
    a ball of radius r around its clean input maps into one of radius r * L around its clean
    output; it is 1 for ``nonexpansive`` layers."""

    activation: bool = False
    relaxable: bool = True
    nonexpansive: bool = False
    #: ``interval`` is computed without rounding in any dtype (comparisons, clamps, reshapes).
    exact_interval: bool = False

    def l2_lipschitz(self, m: nn.Module, inp: LayerInput) -> torch.Tensor | float | None:
        return 1.0 if self.nonexpansive else None

    def uses_clean(self, m: nn.Module) -> bool:
        """Whether the rules read ``LayerInput.clean`` (e.g. batch statistics in training)."""
        return False

    def unstable(self, m: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(lo, dtype=torch.bool)

    def interval_error(self, m: nn.Module, inp: LayerInput) -> torch.Tensor | float | None:
        """A bound, per output, on how far ``interval(m, inp)`` computed in the dtype of
        ``inp`` may fall inside the exact interval of its input box, and the layer's float
        forward pass of any input in the box outside it, plus the rounding of the widening
        itself (u of the interval's magnitude): widening by it makes a walk rigorous. 0 for
        rules computed exactly (and exact forward passes); None if unknown."""
        return 0.0 if self.exact_interval else None

    def backward_error(self, m: nn.Module, inp: LayerInput) -> torch.Tensor | float | None:
        """rho, broadcastable to (B, *z): one ``backward`` step computed in the dtype of
        ``inp``, for any coefficients lam, satisfies lam . z >= lam_h . h + const - sum_j
        |lam_j| rho_j for every h in the interval (its slopes, products and constant round).
        None if unknown."""
        return None

    def drift(self, m: nn.Module, error: torch.Tensor, inp: LayerInput
              ) -> torch.Tensor | None:
        """Per output, a bound on |float forward - exact forward| of the layer at any input
        in the interval whose float value is off by at most ``error`` (per input). None if
        unknown."""
        return None

    def jacobian_masks(self, m: nn.Module, lo: torch.Tensor, hi: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep masks (of the input, of the output) such that the layer's Jacobian anywhere
        in the box [lo, hi] is diag(keep_out) A diag(keep_in) with ||A||_2 <= 1: outputs that
        are constant on the box, and inputs that only feed them, drop out of the local
        Lipschitz bound (Huang et al. 2021, §3). None where no such form is known."""
        return None

    def constancy_gap(self, m: nn.Module, lo: torch.Tensor, hi: torch.Tensor
                      ) -> torch.Tensor | None:
        """A differentiable distance of each output from being constant on the box [lo, hi]
        (0 where it is): the sparsity penalty of local-Lipschitz training. None if unknown."""
        return None

    def interval(self, m: nn.Module, inp: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, m: nn.Module, lam: torch.Tensor, inp: LayerInput, slope: Slope
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class AffineRule(BoundRule):
    """z = A h + b. Subclasses give A h (``linear``), |A| r (``linear_abs``), A^T lam
    (``transpose``), the bias (``bias``, broadcastable to z) and the l2 norm of each row of A
    (``row_norms``: the exact range of z over an l2 ball of h)."""

    def row_norms(self, m: nn.Module, inp: LayerInput) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, m: nn.Module, h: torch.Tensor, inp: LayerInput) -> torch.Tensor:
        raise NotImplementedError

    def linear_abs(self, m: nn.Module, r: torch.Tensor, inp: LayerInput) -> torch.Tensor:
        raise NotImplementedError

    def transpose(self, m: nn.Module, lam: torch.Tensor, inp: LayerInput) -> torch.Tensor:
        raise NotImplementedError

    def bias(self, m: nn.Module, inp: LayerInput) -> torch.Tensor | None:
        return m.bias

    def fan_in(self, m: nn.Module) -> int | None:
        """Products summed per output (None: the weights themselves are rounded)."""
        return None

    def abs_row_sums(self, m: nn.Module, inp: LayerInput) -> torch.Tensor:
        """|A| 1 (rounded up), or an upper bound broadcastable to (1, *z): one single-row
        product."""
        rows = self.linear_abs(m, torch.ones_like(inp.lo[:1]), inp)
        return rows * (1 + gamma(inp.lo[0].numel(), rows.dtype))

    def outputs(self, m: nn.Module, inp: LayerInput) -> int:
        """The number of outputs per point."""
        return self.linear(m, inp.lo[:1], inp)[0].numel()

    def size(self, m: nn.Module, inp: LayerInput) -> torch.Tensor:
        """M |A| 1 + |b| (B, *z), M each point's largest |h| on the interval: at least
        |A| |h| + |b| for every h in it, the magnitude that enters each output's dot product."""
        rows = self.abs_row_sums(m, inp)
        size = inp.largest.flatten().view(-1, *([1] * (rows.dim() - 1))) * rows
        bias = self.bias(m, inp)
        return size if bias is None else size + bias.abs()

    def interval_error(self, m, inp):
        """``interval`` rounds c, r (or hi + lo, hi - lo), A c + b, |A| r and their sum: at
        most 2 gamma_{n+3} |A| (|c| + r) + |b| (n the fan-in, any summation order: Higham
        §3.1) and the widening rounds by u of the ends, which are below size: below
        2 gamma_{n+8} of :meth:`size`'s computed value (whose own rounding the extra terms pay
        for), in the walk's dtype; the float64 forward pass of any h in the interval is off by
        at most gamma_{n+1} (|A| |h| + |b|) (float64's u, whatever the walk's dtype); plus what
        products lose to underflow."""
        n = self.fan_in(m)
        if n is None:
            return None
        dtype = inp.lo.dtype
        factor = 2 * gamma(n + 8, dtype) + gamma(n + 2)
        return factor * self.size(m, inp) + 3 * (n + 8) * eta(dtype)

    def backward_error(self, m, inp):
        """``transpose`` sums at most N = z's size products per coefficient and the bias
        constant N more: |lam A - lam_h| . |h| + |lam . b - const| <= gamma_N |lam| . size."""
        if self.fan_in(m) is None:
            return None
        return gamma(self.outputs(m, inp) + 5, inp.lo.dtype) * self.size(m, inp)

    def drift(self, m, error, inp):
        """|A| e (a product, rounded up: the l_inf operator norm max(e) |A| 1 compounds over
        the layers, to 1e-2 on IBP-trained nets) plus the rounding of this layer's own forward
        pass."""
        n = self.fan_in(m)
        if n is None:
            return None
        dtype = inp.lo.dtype
        spread = self.linear_abs(m, error.expand_as(inp.lo), inp) * (1 + gamma(n + 2, dtype))
        return spread + gamma(n + 4, dtype) * self.size(m, inp) + (2 * n + 4) * eta(dtype)

    def interval(self, m, inp):
        center, radius = (inp.hi + inp.lo) / 2, (inp.hi - inp.lo) / 2
        z = self.linear(m, center, inp)
        bias = self.bias(m, inp)
        if bias is not None:
            z = z + bias
        r = self.linear_abs(m, radius, inp)
        return z - r, z + r

    def backward(self, m, lam, inp, slope):
        bias = self.bias(m, inp)
        const = bias_term(lam, bias) if bias is not None else lam.new_zeros(lam.shape[:2])
        return self.transpose(m, lam, inp), const


def bias_term(lam: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """(lam * bias) summed over all but the first two dims, lam (B, S, *z) and ``bias``
    broadcastable to it: lam is first summed over the dims where the bias is constant (a conv's
    spatial dims), so no product as large as lam is made."""
    shape = (1,) * (lam.dim() - bias.dim()) + tuple(bias.shape)
    dims = [d for d in range(2, lam.dim()) if shape[d] == 1 and lam.shape[d] != 1]
    if dims:
        lam = lam.sum(dims, keepdim=True)
    return (lam * bias).sum(list(range(2, lam.dim()))) if lam.dim() > 2 else lam * bias


class WeightRule(AffineRule):
    """z = W h + b with a weight tensor W that ``apply`` uses (a matrix product, a convolution).
    The interval is IBP's centre/radius form computed as (W/2)(hi + lo) + b -/+ (|W|/2)(hi - lo):
    halving the weight is exact, so it rounds as the centre/radius form does (``interval_error``
    holds), with three elementwise passes over the activations fewer."""

    @staticmethod
    def weight(m: nn.Module) -> torch.Tensor:
        return m.weight

    def apply(self, m: nn.Module, h: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, m, h, inp):
        return self.apply(m, h, self.weight(m), None)

    def linear_abs(self, m, r, inp):
        return self.apply(m, r, self.weight(m).abs(), None)

    def interval(self, m, inp):
        weight = self.weight(m)
        z = self.apply(m, inp.hi + inp.lo, weight * 0.5, m.bias)
        r = self.apply(m, inp.hi - inp.lo, weight.abs() * 0.5, None)
        return z - r, z + r


class LinearRule(WeightRule):
    def fan_in(self, m):
        return m.in_features

    def abs_row_sums(self, m, inp):
        return m.weight.abs().sum(1, keepdim=True).T * (1 + gamma(m.in_features, m.weight.dtype))

    def outputs(self, m, inp):
        return m.out_features

    def row_norms(self, m, inp):
        return m.weight.norm(dim=1)

    def apply(self, m, h, weight, bias):
        return F.linear(h, weight, bias)

    def transpose(self, m, lam, inp):
        return lam @ m.weight


class ConvRule(WeightRule):
    """Zero-padded convolution, any stride; the transpose is ``conv_transpose2d`` with the
    output padding that restores the input size."""

    def fan_in(self, m):
        return m.weight[0].numel()

    def abs_row_sums(self, m, inp):
        """Each output channel's sum of |W| (the zero padding only drops terms): no conv."""
        weight = self.weight(m)
        rows = weight.abs().flatten(1).sum(1) * (1 + gamma(weight[0].numel(), weight.dtype))
        return rows.view(1, -1, 1, 1)

    def outputs(self, m, inp):
        size = [(n + 2 * p - k) // s + 1 for n, p, k, s in
                zip(inp.lo.shape[-2:], m.padding, m.weight.shape[-2:], m.stride, strict=True)]
        return m.weight.shape[0] * size[0] * size[1]

    def apply(self, m, h, weight, bias):
        return F.conv2d(h, weight, bias, m.stride, m.padding)

    def row_norms(self, m, inp):
        """Each output's receptive field inside the zero-padded image: a conv of ones."""
        ones = inp.lo.new_ones(1, *inp.lo.shape[1:])
        return F.conv2d(ones, self.weight(m).square(), None, m.stride, m.padding).sqrt()

    def bias(self, m, inp):
        return None if m.bias is None else m.bias.view(-1, 1, 1)

    def transpose(self, m, lam, inp):
        weight = self.weight(m)
        out_h, out_w = lam.shape[-2:]
        in_h, in_w = inp.lo.shape[-2:]
        pad = (out_h - 1) * m.stride[0] - 2 * m.padding[0] + weight.shape[-2]
        pad_w = (out_w - 1) * m.stride[1] - 2 * m.padding[1] + weight.shape[-1]
        flat = channels_last(lam.reshape(-1, *lam.shape[2:]))
        back = F.conv_transpose2d(flat, weight, None, m.stride, m.padding,
                                  output_padding=(in_h - pad, in_w - pad_w))
        return back.view(*lam.shape[:2], *back.shape[1:])


class ResidualConvRule(ConvRule):
    """The folded residual conv x + alpha conv(x) (LiResNet) as the conv with kernel
    alpha W + I. That kernel is itself computed (two roundings per entry, at most 2u of
    |alpha W| + I, the layer's ``kernel_majorant``): the size takes the majorant, and n + 2
    terms in gamma pay for it."""

    @staticmethod
    def weight(m: nn.Module) -> torch.Tensor:
        return m.effective_weight()

    def fan_in(self, m):
        return m.weight[0].numel() + 2

    def abs_row_sums(self, m, inp):
        majorant = m.kernel_majorant().to(inp.lo.dtype)
        rows = majorant.flatten(1).sum(1) * (1 + gamma(majorant[0].numel() + 2, majorant.dtype))
        return rows.view(1, -1, 1, 1)


class ChannelAffineRule(AffineRule):
    """z = h * scale + shift per channel (Normalize; BatchNorm)."""

    def scale_shift(self, m: nn.Module, inp: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    @staticmethod
    def _view(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.reshape(1, -1, *([1] * (like.dim() - 2)))

    def linear(self, m, h, inp):
        return h * self._view(self.scale_shift(m, inp)[0], h)

    def linear_abs(self, m, r, inp):
        return r * self._view(self.scale_shift(m, inp)[0].abs(), r)

    def row_norms(self, m, inp):
        return self._view(self.scale_shift(m, inp)[0].abs(), inp.lo)

    def l2_lipschitz(self, m, inp):
        return self.scale_shift(m, inp)[0].abs().max()

    def bias(self, m, inp):
        return self._view(self.scale_shift(m, inp)[1], inp.lo)

    def transpose(self, m, lam, inp):
        return lam * self._view(self.scale_shift(m, inp)[0], inp.lo).unsqueeze(0)

    def magnitudes(self, m: nn.Module, inp: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
        """(|a|, s) per channel for the exact map y = a (h - mu) + beta the layer stands for:
        |a| and a bound s >= |a mu| + |beta| (here from the computed scale and shift)."""
        scale, shift = self.scale_shift(m, inp)
        return scale.abs(), shift.abs()

    def size(self, m, inp):
        """S = M |a| + |a mu| + |beta| per output (B, C, ...), M each point's largest |h|:
        every computed value below is within a few u of S of its exact value."""
        scale, shift = self.magnitudes(m, inp)
        return inp.largest * self._view(scale, inp.lo) + self._view(shift, inp.lo)

    def interval_error(self, m, inp):
        """The scale a (a square root, a division, a product: 4u relative) and shift
        (-mu a + beta: 7u of |a mu| + |beta|) are computed, and so are c a + shift, |a| r and
        their sum; the layer's own forward pass ((h - mu) a + beta in any grouping) is within
        8u S too: 32u S covers both with room for the evaluation of this bound (and 32 eta
        what its products may lose to underflow)."""
        dtype = inp.lo.dtype
        return 32 * (unit_roundoff(dtype) * self.size(m, inp) + eta(dtype))

    def backward_error(self, m, inp):
        """lam a' (a' within 4u of a: 5u |lam| |a| |h|) and the constant's N-term dot with the
        shift: gamma_{N+16} |lam| . S."""
        size = self.size(m, inp)
        return gamma(size[0].numel() + 16, inp.lo.dtype) * size

    def drift(self, m, error, inp):
        scale, _ = self.magnitudes(m, inp)
        u, tiny = unit_roundoff(inp.lo.dtype), eta(inp.lo.dtype)
        return error * self._view(scale, error) * (1 + 8 * u) + 32 * (u * self.size(m, inp) + tiny)


class NormalizeRule(ChannelAffineRule):
    def scale_shift(self, m, inp):
        scale = (1 / m.std).flatten()
        shift = (-m.mean / m.std).flatten()
        channels = inp.lo.shape[1]
        return scale.expand(channels), shift.expand(channels)


class BatchNormRule(ChannelAffineRule):
    """BatchNorm as the affine map it applies: running statistics in eval mode; in training
    mode the statistics of the clean batch (Shi et al. 2021, §3.3), so the bounds hold for the
    map the network computes on that batch."""

    def uses_clean(self, m):
        return m.training or not m.track_running_stats

    def scale_shift(self, m, inp):
        if self.uses_clean(m):
            dims = [0, *range(2, inp.clean.dim())]
            if distributed_run():  # the statistics of the global batch, as its forward uses
                mean = batch_mean(inp.clean, dims)
                var = batch_variance(inp.clean, mean, dims)
            else:
                mean = inp.clean.mean(dims)
                var = inp.clean.var(dims, unbiased=False)
        else:
            mean, var = m.running_mean, m.running_var
        scale = torch.rsqrt(var + m.eps)
        if m.weight is not None:
            scale = scale * m.weight
        shift = -mean * scale
        if m.bias is not None:
            shift = shift + m.bias
        return scale, shift

    def magnitudes(self, m, inp):
        scale, _ = self.scale_shift(m, inp)
        mean = inp.clean.mean([0, *range(2, inp.clean.dim())]) if self.uses_clean(m) else \
            m.running_mean
        shift = (mean * scale).abs()
        if m.bias is not None:
            shift = shift + m.bias.abs()
        return scale.abs(), shift


class AvgPoolRule(AffineRule):
    """Average pooling (zero padding counted, no ceil mode): a depthwise conv with weights
    1/k^2, transposed as such."""

    @staticmethod
    def kernel(m: nn.Module, channels: int, like: torch.Tensor) -> torch.Tensor:
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
        return like.new_full((channels, 1, *k), 1.0 / (k[0] * k[1]))

    @staticmethod
    def _check(m: nn.Module) -> None:
        if m.ceil_mode or not m.count_include_pad or m.divisor_override:
            raise UnsupportedLayerError("AvgPool2d bounds need ceil_mode=False, "
                                        "count_include_pad=True and no divisor_override")

    def linear(self, m, h, inp):
        self._check(m)
        return F.avg_pool2d(h, m.kernel_size, m.stride, m.padding)

    linear_abs = linear

    def fan_in(self, m):
        k = m.kernel_size if isinstance(m.kernel_size, tuple) else (m.kernel_size,) * 2
        return k[0] * k[1] + 1  # the k^2 terms and the division (or a rounded 1/k^2)

    def bias(self, m, inp):
        return None

    def transpose(self, m, lam, inp):
        channels = inp.lo.shape[1]
        weight = self.kernel(m, channels, lam)
        stride = m.stride if isinstance(m.stride, tuple) else (m.stride,) * 2
        padding = m.padding if isinstance(m.padding, tuple) else (m.padding,) * 2
        out_h, out_w = lam.shape[-2:]
        in_h, in_w = inp.lo.shape[-2:]
        extra = (in_h - ((out_h - 1) * stride[0] - 2 * padding[0] + weight.shape[-2]),
                 in_w - ((out_w - 1) * stride[1] - 2 * padding[1] + weight.shape[-1]))
        flat = lam.reshape(-1, *lam.shape[2:])
        back = F.conv_transpose2d(flat, weight, None, stride, padding, output_padding=extra,
                                  groups=channels)
        return back.view(*lam.shape[:2], *back.shape[1:])


class FlattenRule(BoundRule):
    nonexpansive = True
    exact_interval = True

    def interval(self, m, inp):
        return m(inp.lo), m(inp.hi)

    def backward(self, m, lam, inp, slope):
        return lam.reshape(*lam.shape[:2], *inp.lo.shape[1:]), lam.new_zeros(lam.shape[:2])

    def backward_error(self, m, inp):
        return 0.0

    def drift(self, m, error, inp):
        return m(error.expand_as(inp.lo))


def _relaxation_error(inp: LayerInput, reach: torch.Tensor, relus: int) -> torch.Tensor:
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
    dtype = inp.lo.dtype
    return relus * (gamma(inp.lo[0].numel() + 32, dtype) * reach + 8 * eta(dtype) * (1 + reach))


def _pairs_max(t: torch.Tensor) -> torch.Tensor:
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


def relu_backward(lam: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                  slope: Slope | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Coefficients on h and constant of a lower bound of lam . relu(h), h in [lo, hi]."""
    lower, upper, upper_bias = relu_relaxation(lo, hi, slope)
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
    in-place pass over it, so the forward makes one and the backward two."""
    return _RelaxedBackward.apply(lam, lower, upper, upper_bias)


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
        order = _order(t)
        return (_memory_flat(t, order) @ _memory_flat(v, order).transpose(1, 2)).squeeze(2)
    return sum_over(t * v)


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
    """Forward: lam- * (upper - lower) + lam * lower, which is lam+ * lower + lam- * upper up
    to one rounding (upper - lower is exact for the fixed slope choices; an alpha-CROWN slope
    adds one more, relative to lam's terms, which the certificates' rounding slack covers
    many times over). Backward: the
    gradient autograd takes through the clamp formula, kink included (at lam == 0 clamp passes
    the gradient to both terms: slope lower + upper, and the upper bias); out of place, hence
    differentiable again, under create_graph."""

    @staticmethod
    def forward(ctx, lam, lower, upper, upper_bias):
        coef = lam.clamp(max=0)
        const = per_row_dot(coef, upper_bias)
        gap = upper - lower
        coef = coef.mul_(gap) if torch.broadcast_shapes(coef.shape, gap.shape) == coef.shape \
            else coef * gap
        coef = coef.addcmul_(lam, lower) if \
            torch.broadcast_shapes(coef.shape, lower.shape) == coef.shape else coef + lam * lower
        ctx.save_for_backward(lam, lower, upper, upper_bias)
        return coef, const

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
                    torch.broadcast_shapes(neg.shape, g_coef.shape) == neg.shape and \
                    not torch.is_grad_enabled() else (neg * g_coef).sum_to_size(upper.shape)
            del neg
        if need_lower:
            g_lower = (g_coef * lam.clamp(min=0)).sum_to_size(lower.shape)
        return g_lam, g_lower, g_upper, g_bias


class ReLURule(BoundRule):
    activation = True
    nonexpansive = True
    exact_interval = True

    def unstable(self, m, lo, hi):
        return (lo < 0) & (hi > 0)

    def jacobian_masks(self, m, lo, hi):
        keep = hi > 0  # off on the whole box: constant 0
        return keep, keep

    def constancy_gap(self, m, lo, hi):
        return hi.clamp(min=0) * (lo < 0)  # pushes unstable neurons off; active ones stay

    def interval(self, m, inp):
        return torch.relu(inp.lo), torch.relu(inp.hi)

    def backward(self, m, lam, inp, slope):
        return relu_backward(lam, inp.lo, inp.hi, slope)

    def backward_error(self, m, inp):
        return _relaxation_error(inp, inp.magnitude, 1)

    def drift(self, m, error, inp):
        return error  # |relu(a) - relu(b)| <= |a - b|, and relu itself is exact


class MinMaxRule(BoundRule):
    """MinMax on channel pairs (a, b): min = a - relu(a - b), max = b + relu(a - b), with
    relu(a - b) relaxed on the interval [lo_a - hi_b, hi_a - lo_b]. Both outputs are
    monotone in both inputs, so the interval is the map applied to the endpoints."""

    activation = True
    nonexpansive = True
    exact_interval = True

    def unstable(self, m, lo, hi):
        half = lo.shape[1] // 2
        pair = (lo[:, :half] - hi[:, half:] < 0) & (hi[:, :half] - lo[:, half:] > 0)
        return torch.cat([pair, pair], dim=1)

    def interval(self, m, inp):
        return m(inp.lo), m(inp.hi)

    def backward(self, m, lam, inp, slope):
        half = inp.lo.shape[1] // 2
        lam_min, lam_max = lam[:, :, :half], lam[:, :, half:]
        lo_d = inp.lo[:, :half] - inp.hi[:, half:]
        hi_d = inp.hi[:, :half] - inp.lo[:, half:]
        lam_d, const = relu_backward(lam_max - lam_min, lo_d, hi_d, slope)
        return torch.cat([lam_min + lam_d, lam_max - lam_d], dim=2), const

    def backward_error(self, m, inp):
        """relu(a - b) with |a - b| <= 2 H of the pair, its coefficient lam_max - lam_min
        (at most |lam_min| + |lam_max|, rounded) and the two output sums: twice one ReLU's."""
        return _relaxation_error(inp, 2 * _pairs_max(inp.magnitude), 2)

    def drift(self, m, error, inp):
        return _pairs_max(error)  # min and max are 1-Lipschitz in the pair's l_inf norm


class ClippedReLURule(BoundRule):
    """clamp(h, 0, t) = relu(h) - relu(h - t+) with t+ = max(t, 0) (the layer's function for
    every t): both ReLUs relaxed on their own intervals (CROWN's ReLU bounds, summed)."""

    activation = True
    nonexpansive = True
    exact_interval = True

    def unstable(self, m, lo, hi):
        t = m.threshold.clamp(min=0)
        return ((lo < 0) & (hi > 0)) | ((lo < t) & (hi > t))

    def jacobian_masks(self, m, lo, hi):
        keep = (hi > 0) & (lo < m.threshold.clamp(min=0))  # else constant 0 or t
        return keep, keep

    def constancy_gap(self, m, lo, hi):
        return branchless.minimum(branchless.clamp(hi, min=0),
                                  branchless.clamp(m.threshold - lo, min=0))

    def interval(self, m, inp):
        return m(inp.lo), m(inp.hi)

    def backward(self, m, lam, inp, slope):
        t = m.threshold.clamp(min=0)
        first, const = relu_backward(lam, inp.lo, inp.hi, slope)
        second, const2 = relu_backward(-lam, inp.lo - t, inp.hi - t, slope)
        return first + second, const + const2 - per_row_dot(second, t.expand_as(inp.lo[:1])
                                                              .unsqueeze(1))

    def backward_error(self, m, inp):
        """Two relaxations, of h and of h - t (both within H + t), and the dot with t."""
        reach = inp.magnitude + m.threshold.clamp(min=0).abs()
        return _relaxation_error(inp, reach, 3)

    def drift(self, m, error, inp):
        return error


class ClippedMinMaxRule(BoundRule):
    """Pairs (a, b) -> (max(min(a, b), L), min(max(a, b), U)), written with three ReLUs:
    min(a, b) = a - r, max(a, b) = b + r, r = relu(a - b); the clipped min is
    L + relu(min - L) and the clipped max U - relu(U - max). Each ReLU is relaxed on the interval
    its argument provably lies in; the two uses of r are merged into one relaxation."""

    activation = True
    nonexpansive = True
    exact_interval = True

    @staticmethod
    def _parts(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor):
        half = lo.shape[1] // 2
        lo_a, lo_b, hi_a, hi_b = lo[:, :half], lo[:, half:], hi[:, :half], hi[:, half:]
        low_min = branchless.minimum(lo_a, lo_b) - m.lower  # min(a, b) - L
        high_min = branchless.minimum(hi_a, hi_b) - m.lower
        low_max = m.upper - branchless.maximum(hi_a, hi_b)  # U - max(a, b)
        high_max = m.upper - branchless.maximum(lo_a, lo_b)
        return (lo_a - hi_b, hi_a - lo_b), (low_min, high_min), (low_max, high_max)

    def unstable(self, m, lo, hi):
        pair = torch.zeros_like(lo[:, :lo.shape[1] // 2], dtype=torch.bool)
        for low, high in self._parts(m, lo, hi):
            pair = pair | ((low < 0) & (high > 0))
        return torch.cat([pair, pair], dim=1)

    def jacobian_masks(self, m, lo, hi):
        # the clipped min is constant where min(a, b) <= L on the whole box, the clipped max
        # where max(a, b) >= U; each output copies one input of its pair, so a pair's inputs
        # drop out only when both of its outputs are constant
        _, (_, high_min), (_, high_max) = self._parts(m, lo, hi)
        keep_min, keep_max = high_min > 0, high_max > 0
        pair = keep_min | keep_max
        return torch.cat([pair, pair], dim=1), torch.cat([keep_min, keep_max], dim=1)

    def constancy_gap(self, m, lo, hi):
        _, (_, high_min), (_, high_max) = self._parts(m, lo, hi)
        return torch.cat([branchless.clamp(high_min, min=0), branchless.clamp(high_max, min=0)],
                         dim=1)

    def interval(self, m, inp):
        return m(inp.lo), m(inp.hi)

    def backward(self, m, lam, inp, slope):
        half = inp.lo.shape[1] // 2
        lam_min, lam_max = lam[:, :, :half], lam[:, :, half:]
        diff, low, high = self._parts(m, inp.lo, inp.hi)
        # lam_min (L + relu(min - L)) >= c_min (min - L) + k + lam_min L
        c_min, const = relu_backward(lam_min, *low, slope)
        # lam_max (U - relu(U - max)) >= lam_max U + c_max (U - max) + k
        c_max, k = relu_backward(-lam_max, *high, slope)
        const = const + k + per_row_dot(lam_min - c_min, m.lower.unsqueeze(0).unsqueeze(1)) + \
            per_row_dot(lam_max + c_max, m.upper.unsqueeze(0).unsqueeze(1))
        # c_min min - c_max max = c_min a - c_max b - (c_min + c_max) r
        c_r, k = relu_backward(-(c_min + c_max), *diff, slope)
        return torch.cat([c_min + c_r, -c_max - c_r], dim=2), const + k

    def backward_error(self, m, inp):
        """Three relaxations (of a - b, min - L and U - max, each within 2 H + |L| + |U|),
        the dots with L and U and the sums of the coefficients: 6 ReLUs' worth."""
        bounds = torch.cat([m.lower.abs() + m.upper.abs()] * 2, dim=0)
        return _relaxation_error(inp, 2 * _pairs_max(inp.magnitude) + bounds, 6)

    def drift(self, m, error, inp):
        return _pairs_max(error)


class IdentityRule(BoundRule):
    nonexpansive = True
    exact_interval = True

    def interval(self, m, inp):
        return inp.lo, inp.hi

    def backward(self, m, lam, inp, slope):
        return lam, lam.new_zeros(lam.shape[:2])

    def backward_error(self, m, inp):
        return 0.0

    def drift(self, m, error, inp):
        return error


BOUND_RULES: dict[type[nn.Module], BoundRule] = {}


def register_bound_rule(cls: type[nn.Module], rule: BoundRule) -> None:
    """Bound layers of exactly type ``cls`` (never subclasses) with ``rule``."""
    BOUND_RULES[cls] = rule


def rule_for(m: nn.Module) -> BoundRule:
    rule = BOUND_RULES.get(type(m))
    if rule is None:
        raise UnsupportedLayerError(
            f"no bound rule for layer {type(m).__name__}; supported: "
            f"{sorted(c.__name__ for c in BOUND_RULES)} (certnet.bounds.register_bound_rule)")
    return rule


def check_supported(layers: nn.Sequential) -> None:
    """UnsupportedLayerError naming the first layer without a bound rule or with settings its
    rule does not cover."""
    for i, m in enumerate(layers):
        rule_for(m)
        if type(m) in (nn.Conv2d, LipschitzConv2d, ResidualConv2d) and (
                m.padding_mode != "zeros" or m.dilation != (1, 1) or m.groups != 1
                or isinstance(m.padding, str)):
            raise UnsupportedLayerError(f"layer {i} ({type(m).__name__}): bounds support "
                                        "convolutions with integer zero padding, dilation 1 "
                                        "and groups 1")
        if type(m) is nn.AvgPool2d:
            AvgPoolRule._check(m)
        if type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) and not m.track_running_stats:
            raise UnsupportedLayerError(f"layer {i} ({type(m).__name__}) has no running "
                                        "statistics: it normalises by the batch, so no "
                                        "certificate of a single input can rely on it")


for _cls in (nn.Linear, LipschitzLinear):
    register_bound_rule(_cls, LinearRule())
for _cls in (nn.Conv2d, LipschitzConv2d):
    register_bound_rule(_cls, ConvRule())
register_bound_rule(ResidualConv2d, ResidualConvRule())
for _cls in (nn.BatchNorm1d, nn.BatchNorm2d):
    register_bound_rule(_cls, BatchNormRule())
register_bound_rule(Normalize, NormalizeRule())
register_bound_rule(nn.AvgPool2d, AvgPoolRule())
register_bound_rule(nn.Flatten, FlattenRule())
register_bound_rule(nn.ReLU, ReLURule())
register_bound_rule(MinMax, MinMaxRule())
register_bound_rule(ClippedReLU, ClippedReLURule())
register_bound_rule(ClippedMinMax, ClippedMinMaxRule())
register_bound_rule(nn.Identity, IdentityRule())
