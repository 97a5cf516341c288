"""Affine rules: dense, convolution (also the folded residual one), per-channel affine maps
(Normalize, BatchNorm, mean shift), average pooling, and the reshaping layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds.rules.base import BoundRule, LayerInput, channels_last
from certnet.bounds.rules.fixed_weights import once
from certnet.distributed import batch_mean, batch_variance, distributed_run
from certnet.errors import UnsupportedLayerError
from certnet.floats import eta, gamma, unit_roundoff


class AffineRule(BoundRule):
    """z = A h + b. Subclasses give A h (``linear``), |A| r (``linear_abs``), A^T lam
    (``transpose``), the bias (``bias``, broadcastable to z) and the l2 norm of each row of A
    (``row_norms``: the exact range of z over an l2 ball of h)."""

    range_interval = True

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
        return rows * (1 + gamma(inp.lo.shape[1:].numel(), rows.dtype))

    def outputs(self, m: nn.Module, inp: LayerInput) -> int:
        """The number of outputs per point."""
        return self.linear(m, inp.lo[:1], inp)[0].numel()

    def size(self, m: nn.Module, inp: LayerInput) -> torch.Tensor:
        """M |A| 1 + |b| (B, *z), M each point's largest |h| on the interval: at least
        |A| |h| + |b| for every h in it, the magnitude that enters each output's dot product
        (kept with ``inp``: every rounding bound of the layer on it reads it)."""
        def compute() -> torch.Tensor:
            rows = self.abs_row_sums(m, inp)
            size = inp.largest.flatten().view(-1, *([1] * (rows.dim() - 1))) * rows
            bias = self.bias(m, inp)
            return size if bias is None else size + bias.abs()
        return inp.memo((m, "size"), compute)

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
        own = gamma(n + 4, dtype) * self.size(m, inp) + (2 * n + 4) * eta(dtype)
        if not error.any() and own.shape[1:].numel() == self.outputs(m, inp):
            return own  # exact inputs (the first layer's): |A| 0 = 0, so no product
        spread = self.linear_abs(m, error.expand_as(inp.lo), inp) * (1 + gamma(n + 2, dtype))
        return spread + own

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


def live_product(lam: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """lam @ weight over only the outputs some coefficient is non-zero on: behind a ReLU its
    dead neurons (most of them in a certified net) and, on the first step back from a layer's
    neurons, every neuron not asked for carry zero coefficients. The same sum less exact
    zeros, so any summation order's rounding bound still holds. Not where autograd records
    lam: a coefficient that is zero now may move (alpha-CROWN's slopes start at 0)."""
    if lam.requires_grad:
        return lam @ weight
    live = lam.reshape(-1, lam.shape[-1]).ne(0).any(0)
    kept = live.nonzero().squeeze(1)
    if len(kept) > live.numel() // 2:
        return lam @ weight
    return lam.index_select(-1, kept) @ weight.index_select(0, kept)


class WeightRule(AffineRule):
    """z = W h + b with a weight tensor W that ``apply`` uses (a matrix product, a convolution).
    The interval is IBP's centre/radius form computed as (W/2)(hi + lo) + b -/+ (|W|/2)(hi - lo):
    halving the weight is exact, so it rounds as the centre/radius form does (``interval_error``
    holds), with three elementwise passes over the activations fewer (a dense layer keeps
    :meth:`AffineRule.interval`: see :class:`LinearRule`)."""

    @staticmethod
    def weight(m: nn.Module) -> torch.Tensor:
        return m.weight

    def apply(self, m: nn.Module, h: torch.Tensor, weight: torch.Tensor,
              bias: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def linear(self, m, h, inp):
        return self.apply(m, h, self.weight(m), None)

    def abs_weight(self, m: nn.Module) -> torch.Tensor:
        return once(m, "abs_weight", lambda: self.weight(m).abs())

    def linear_abs(self, m, r, inp):
        return self.apply(m, r, self.abs_weight(m), None)

    def interval(self, m, inp):
        half = once(m, "half_weight", lambda: self.weight(m) * 0.5)
        half_abs = once(m, "half_abs_weight", lambda: self.abs_weight(m) * 0.5)
        z = self.apply(m, inp.hi + inp.lo, half, m.bias)
        r = self.apply(m, inp.hi - inp.lo, half_abs, None)
        return z - r, z + r


class LinearRule(WeightRule):
    def fan_in(self, m):
        return m.in_features

    def abs_row_sums(self, m, inp):
        return once(m, "abs_row_sums", lambda: self.abs_weight(m).sum(1, keepdim=True).T * (
            1 + gamma(m.in_features, m.weight.dtype)))

    def outputs(self, m, inp):
        return m.out_features

    #: AffineRule's centre/radius form: a dense layer, whose weights outweigh its activations,
    #: reads W and |W| (which its backward steps and drift read too), not W/2 and |W|/2
    interval = AffineRule.interval

    def row_norms(self, m, inp):
        return m.weight.norm(dim=1)

    def apply(self, m, h, weight, bias):
        return F.linear(h, weight, bias)

    def transpose(self, m, lam, inp):
        return live_product(lam, m.weight)

    def output_rows(self, m, rows, inp):
        if inp.lo.dim() != 2:  # a dense layer on (B, ..., in): a flat output is no row of W
            return None
        bias = m.bias[rows] if m.bias is not None else m.weight.new_zeros(len(rows))
        return m.weight[rows], bias


class ConvRule(WeightRule):
    """Zero-padded convolution, any stride; the transpose is ``conv_transpose2d`` with the
    output padding that restores the input size."""

    patches = "conv"
    #: ``weight`` is computed from the parameters (it rounds): its entries are no exact rows
    computed_kernel = False

    def check(self, m, where):
        if m.padding_mode != "zeros" or m.dilation != (1, 1) or m.groups != 1 or \
                isinstance(m.padding, str):
            raise UnsupportedLayerError(f"{where}: bounds support convolutions with integer "
                                        "zero padding, dilation 1 and groups 1")

    def fan_in(self, m):
        return m.weight[0].numel()

    def abs_row_sums(self, m, inp):
        """Each output channel's sum of |W| (the zero padding only drops terms): no conv."""
        def rows() -> torch.Tensor:
            weight = self.abs_weight(m)
            sums = weight.flatten(1).sum(1) * (1 + gamma(weight[0].numel(), weight.dtype))
            return sums.view(1, -1, 1, 1)
        return once(m, "abs_row_sums", rows)

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

    def output_rows(self, m, rows, inp):
        """Output (c, y, x)'s row of A: the kernel W[c] copied onto its window of the input
        (rows (y s - p) .., columns (x s - p) ..), the parts on the zero padding dropped (they
        multiply zeros); b[c]. Copies only, so exact, where the kernel is a stored parameter
        (not ``computed_kernel``)."""
        if self.computed_kernel or inp.lo.dim() != 4:
            return None
        weight = self.weight(m)
        (c_in, h, w), (k_h, k_w) = inp.lo.shape[1:], weight.shape[-2:]
        (s_h, s_w), (p_h, p_w) = m.stride, m.padding
        out_w = (w + 2 * p_w - k_w) // s_w + 1
        out_hw = ((h + 2 * p_h - k_h) // s_h + 1) * out_w
        channel, y, x = rows // out_hw, rows % out_hw // out_w, rows % out_w
        n = len(rows)
        canvas = weight.new_zeros(n, c_in, h + 2 * p_h, w + 2 * p_w)
        def at(k: int) -> torch.Tensor:
            return torch.arange(k, device=rows.device)
        canvas[at(n).view(-1, 1, 1, 1), at(c_in).view(1, -1, 1, 1),
               (y * s_h).view(-1, 1, 1, 1) + at(k_h).view(1, 1, -1, 1),
               (x * s_w).view(-1, 1, 1, 1) + at(k_w).view(1, 1, 1, -1)] = weight[channel]
        bias = m.bias[channel] if m.bias is not None else weight.new_zeros(n)
        return canvas[:, :, p_h:p_h + h, p_w:p_w + w], bias

    def transpose(self, m, lam, inp):
        weight = self.weight(m)
        flipped = self.flipped_padding(m, weight)
        if flipped is not None and lam.dtype == torch.float64:
            # float64 has no oneDNN kernel: the same products as one convolution, which the
            # CPU runs ~1.3x faster than a transposed one (any order: backward_error holds)
            kernel = once(m, "flipped_weight", lambda: weight.transpose(0, 1).flip(2, 3))
            back = F.conv2d(lam.reshape(-1, *lam.shape[2:]), kernel, None, 1, flipped)
            return back.view(*lam.shape[:2], *back.shape[1:])
        out_h, out_w = lam.shape[-2:]
        in_h, in_w = inp.lo.shape[-2:]
        pad = (out_h - 1) * m.stride[0] - 2 * m.padding[0] + weight.shape[-2]
        pad_w = (out_w - 1) * m.stride[1] - 2 * m.padding[1] + weight.shape[-1]
        flat = channels_last(lam.reshape(-1, *lam.shape[2:]))
        back = F.conv_transpose2d(flat, weight, None, m.stride, m.padding,
                                  output_padding=(in_h - pad, in_w - pad_w))
        return back.view(*lam.shape[:2], *back.shape[1:])

    @staticmethod
    def flipped_padding(m: nn.Module, weight: torch.Tensor) -> tuple[int, int] | None:
        """The padding k - 1 - p under which the convolution with the flipped, transposed
        kernel is this stride-1 convolution's transpose; None where there is none (strides,
        or padding wider than the kernel)."""
        pads = tuple(k - 1 - p for k, p in zip(weight.shape[-2:], m.padding, strict=True))
        return pads if tuple(m.stride) == (1, 1) and min(pads) >= 0 else None


class ResidualConvRule(ConvRule):
    """The folded residual conv x + alpha conv(x) (LiResNet) as the conv with kernel
    alpha W + I. That kernel is itself computed (two roundings per entry, at most 2u of
    |alpha W| + I, the layer's ``kernel_majorant``): the size takes the majorant, and n + 2
    terms in gamma pay for it."""

    @staticmethod
    def weight(m: nn.Module) -> torch.Tensor:
        return m.effective_weight()

    computed_kernel = True

    def fan_in(self, m):
        return m.weight[0].numel() + 2

    def abs_row_sums(self, m, inp):
        majorant = m.kernel_majorant().to(inp.lo.dtype)
        rows = majorant.flatten(1).sum(1) * (1 + gamma(majorant[0].numel() + 2, majorant.dtype))
        return rows.view(1, -1, 1, 1)


class ChannelAffineRule(AffineRule):
    """z = h * scale + shift per channel (Normalize; BatchNorm)."""

    keeps_boxes = True

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
        every computed value below is within a few u of S of its exact value (kept with
        ``inp``)."""
        def compute() -> torch.Tensor:
            scale, shift = self.magnitudes(m, inp)
            return inp.largest * self._view(scale, inp.lo) + self._view(shift, inp.lo)
        return inp.memo((m, "size"), compute)

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
    patches = "channel"

    def scale_shift(self, m, inp):
        scale = (1 / m.std).flatten()
        shift = (-m.mean / m.std).flatten()
        channels = inp.lo.shape[1]
        return scale.expand(channels), shift.expand(channels)


class BatchNormRule(ChannelAffineRule):
    """BatchNorm as the affine map it applies: running statistics in eval mode; in training
    mode the statistics of the clean batch (Shi et al. 2021, §3.3), so the bounds hold for the
    map the network computes on that batch."""

    patches = "channel"

    def uses_batch_statistics(self, m):
        return m.training or not m.track_running_stats

    def check(self, m, where):
        if not m.track_running_stats:
            raise UnsupportedLayerError(f"{where} has no running statistics: it normalises by "
                                        "the batch, so no certificate of a single input can "
                                        "rely on it")

    def scale_shift(self, m, inp):
        if self.uses_batch_statistics(m):
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
        mean = inp.clean.mean([0, *range(2, inp.clean.dim())]) \
            if self.uses_batch_statistics(m) else m.running_mean
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

    def check(self, m, where=""):
        if m.ceil_mode or not m.count_include_pad or m.divisor_override:
            raise UnsupportedLayerError("AvgPool2d bounds need ceil_mode=False, "
                                        "count_include_pad=True and no divisor_override")

    def linear(self, m, h, inp):
        self.check(m)
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
    """A reshape of each point (Flatten, :class:`certnet.nn.reshape.Reshape`): the interval is
    the reshape of its ends, the coefficients go back reshaped to the input's shape; exact."""

    nonexpansive = True
    exact_interval = True
    range_interval = True
    keeps_boxes = True

    def interval(self, m, inp):
        return m(inp.lo), m(inp.hi)

    def backward(self, m, lam, inp, slope):
        return lam.reshape(*lam.shape[:2], *inp.lo.shape[1:]), lam.new_zeros(lam.shape[:2])

    def backward_error(self, m, inp):
        return 0.0

    def drift(self, m, error, inp):
        return m(error.expand_as(inp.lo))


class IdentityRule(BoundRule):
    nonexpansive = True
    exact_interval = True
    range_interval = True
    keeps_boxes = True
    patches = "identity"

    def interval(self, m, inp):
        return inp.lo, inp.hi

    def backward(self, m, lam, inp, slope):
        return lam, lam.new_zeros(lam.shape[:2])

    def backward_error(self, m, inp):
        return 0.0

    def drift(self, m, error, inp):
        return error
