"""Layers that know their l2 Lipschitz constant two ways.

* ``lipschitz_estimate(iterations)``: power iteration with a persistent iterate (Miyato et al.
  2018; GloRo, Leino et al. 2021 §4). Differentiable in the weights, cheap, and a *lower* bound
  of the true spectral norm: fine for training, never for certificates.
* ``lipschitz_bound()``: a guaranteed *upper* bound in float64 (:mod:`certnet.nn.spectral`),
  used by every certificate (docs/architecture.md §3).

Only layers of exactly these types are trusted (a subclass may change ``forward``); a
convolution's bound is computed for the input shape traced through the architecture, and
every layer refuses inputs of another shape, so a bound always holds for what the layer sees.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Annotated, Any

import torch
import torch.nn.functional as F
from annotated_types import Len
from pydantic import Field
from torch import nn

from certnet.errors import ConfigError, InputError, UnsupportedLayerError
from certnet.floats import eta, gamma
from certnet.nn.conv_algorithms import without_onednn
from certnet.nn.layer_types import LayerType, layer_type, register_layer_type, unit_bound
from certnet.nn.masked_spectral import conv_masked_bound, dense_masked_bound
from certnet.nn.rounding import RoundingBound, affine_rounding
from certnet.nn.spectral import (
    FLOAT64_UNIT_ROUNDOFF,
    conv_spectral_bound,
    dense_spectral_bound,
    magnitude_bound,
)
from certnet.schema import Count, Fraction, Positive

#: Buffers that only feed the power-iteration estimate, never a forward pass or a bound.
ESTIMATE_ONLY_BUFFERS = frozenset({"power_iterate"})


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


@torch.no_grad()
def _power_iterate(step: Callable[[torch.Tensor], torch.Tensor], v: torch.Tensor,
                   iterations: int) -> torch.Tensor:
    """``iterations`` steps v <- step(v) / ||step(v)|| from the unit vector ``v``."""
    v = v.clone()  # the estimate's graph must not hold the persistent buffer
    for _ in range(iterations):
        v = _normalize(step(v))
    return v


#: multiply-adds of one image's convolution under which power iteration runs without oneDNN
SMALL_CONVOLUTION = 1 << 20


class LipschitzModule(nn.Module):
    """Interface of a layer with a power-iteration estimate and a sound bound."""

    def lipschitz_estimate(self, iterations: int = 1) -> torch.Tensor:
        """||W v|| after ``iterations`` power-iteration steps on the persistent iterate v."""
        raise NotImplementedError

    def lipschitz_bound(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def converge(self, tol: float = 1e-7, max_iterations: int = 5000) -> torch.Tensor:
        """Run power iteration until the estimate changes by less than ``tol`` (relative)."""
        previous = self.lipschitz_estimate(10)
        for _ in range(max_iterations // 10):
            current = self.lipschitz_estimate(10)
            if (current - previous).abs() <= tol * current.abs():
                return current
            previous = current
        return previous


class LipschitzLinear(nn.Linear, LipschitzModule):
    """nn.Linear with spectral-norm estimate (persistent right singular vector) and bound."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs) -> None:
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.register_buffer("power_iterate", _normalize(
            torch.randn(in_features, dtype=self.weight.dtype, device=self.weight.device)))

    def lipschitz_estimate(self, iterations: int = 1) -> torch.Tensor:
        w = self.weight
        v = _power_iterate(lambda v: w.T @ (w @ v), self.power_iterate, iterations)
        self.power_iterate.copy_(v)
        return (w @ v).norm()

    def lipschitz_bound(self) -> torch.Tensor:
        return dense_spectral_bound(self.weight)


class LipschitzConv2d(nn.Conv2d, LipschitzModule):
    """nn.Conv2d (zero padding, any stride, no dilation/groups) whose Lipschitz constant is
    computed on its true input shape ``input_shape`` (C, H, W). The shape is traced through
    the architecture (:func:`trace_shapes`), never read from a checkpoint, and the layer
    refuses inputs of any other shape."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, **kwargs) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         bias=bias, **kwargs)
        if self.padding_mode != "zeros" or self.dilation != (1, 1) or self.groups != 1:
            raise UnsupportedLayerError(
                "LipschitzConv2d supports zero padding, dilation 1 and groups 1 only")
        if isinstance(self.padding, str) or len(set(self.stride)) != 1 or \
                len(set(self.padding)) != 1:
            raise UnsupportedLayerError(
                "LipschitzConv2d needs an integer padding and a square stride")
        self.input_shape: tuple[int, int, int] | None = None
        self.register_buffer("power_iterate", torch.zeros(0))

    def set_input_shape(self, shape: tuple[int, int, int]) -> None:
        """Record the (C, H, W) input shape and allocate the power-iteration iterate."""
        shape = tuple(int(d) for d in shape)
        if len(shape) != 3 or shape[0] != self.in_channels:
            raise InputError(f"conv expects input (C={self.in_channels}, H, W), got {shape}")
        if shape == self.input_shape:
            return
        self.input_shape = shape
        self.power_iterate = _normalize(
            torch.randn(1, *shape, dtype=self.weight.dtype, device=self.weight.device))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        # certnet 0.1.0 stored the input shape as a buffer: accept it only if it agrees with
        # the traced shape (a checkpoint must not choose the map size its bound is computed on).
        stored = state_dict.pop(prefix + "input_shape", None)
        if stored is not None and tuple(int(d) for d in stored) != self.input_shape:
            raise InputError(f"{prefix}input_shape {tuple(stored.tolist())} in the weights "
                             f"disagrees with the architecture's {self.input_shape}")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise InputError(f"conv layer traced for inputs {self.input_shape}, got "
                             f"{tuple(x.shape[1:])}")
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding)

    def _check_shape(self) -> tuple[int, int, int]:
        if self.input_shape is None:
            raise UnsupportedLayerError(
                "conv layer has no recorded input shape; build it through certnet.archs or "
                "convert_sequential(model, input_shape)")
        return self.input_shape

    def _small(self) -> bool:
        """Whether one image's convolution has under ``SMALL_CONVOLUTION`` multiply-adds:
        there oneDNN's fixed cost dominates (2C2F's layers: 3x slower with it; 4C3F's, at
        over 1M, as fast or faster), measured with benchmarks/gloro_step.py."""
        _, h, w = self._check_shape()
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        positions = ((h + 2 * p - k) // s + 1) * ((w + 2 * p - k) // s + 1)
        return self.weight.numel() * positions < SMALL_CONVOLUTION

    def lipschitz_estimate(self, iterations: int = 1) -> torch.Tensor:
        _, h, width = self._check_shape()
        w = self.effective_weight()
        k, s, p = self.kernel_size[0], self.stride[0], self.padding[0]
        # the transposed convolution back onto the input grid: rows or columns the strided
        # forward never reads come back as output padding (zeros)
        extra = ((h + 2 * p - k) % s, (width + 2 * p - k) % s)

        def step(v: torch.Tensor) -> torch.Tensor:  # W^T W v
            out = F.conv2d(v, w, None, s, p)
            return F.conv_transpose2d(out, w, None, s, p, extra)

        with without_onednn() if self._small() else contextlib.nullcontext():
            v = _power_iterate(step, self.power_iterate, iterations)
            self.power_iterate.copy_(v)
            return F.conv2d(v, w, None, self.stride, self.padding).norm()

    def lipschitz_bound(self) -> torch.Tensor:
        shape = self._check_shape()
        return conv_spectral_bound(self.weight, self.stride[0], self.padding[0], shape[1:])


class ResidualConv2d(LipschitzConv2d):
    """LiResNet-style residual block folded into one convolution (Hu et al. 2023):
    x + alpha * conv(x) is the convolution with kernel alpha * W + I, so its Lipschitz
    constant is computed (and bounded) exactly like any other convolution."""

    def __init__(self, channels: int, kernel_size: int = 3, alpha: float = 1.0,
                 bias: bool = True) -> None:
        if kernel_size % 2 == 0:
            raise UnsupportedLayerError("ResidualConv2d needs an odd kernel size")
        super().__init__(channels, channels, kernel_size, stride=1, padding=kernel_size // 2,
                         bias=bias)
        self.alpha = alpha
        identity = torch.zeros_like(self.weight)
        identity[range(channels), range(channels), kernel_size // 2, kernel_size // 2] = 1.0
        self.register_buffer("identity_kernel", identity, persistent=False)

    def effective_weight(self) -> torch.Tensor:
        return self.alpha * self.weight + self.identity_kernel

    def kernel_majorant(self) -> torch.Tensor:
        """|alpha| |W| + I in float64: dominates the exact kernel and its float64 rounding."""
        return abs(self.alpha) * self.weight.detach().double().abs() + \
            self.identity_kernel.double()

    def lipschitz_bound(self) -> torch.Tensor:
        """Bound of the exact kernel alpha * W + I: the FFT bound of its float64 rounding plus
        the norm of the rounding error, at most 2u (|alpha| |W| + I) per entry."""
        shape = self._check_shape()
        kernel = self.alpha * self.weight.detach().double() + self.identity_kernel.double()
        rounding = 2.0001 * FLOAT64_UNIT_ROUNDOFF * magnitude_bound(self.kernel_majorant())
        return conv_spectral_bound(kernel, 1, self.padding[0], shape[1:]) + rounding


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so epsilon stays in pixel space.
    Its l2 Lipschitz constant, max_c 1/|std_c|, enters the network bound; mean and std have
    one entry per input channel (or a single shared entry), checked on every input."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        mean_t, std_t = torch.tensor(mean).flatten(), torch.tensor(std).flatten()
        if mean_t.numel() != std_t.numel() or mean_t.numel() == 0:
            raise InputError(f"Normalize: mean and std need the same non-zero length, got "
                             f"{mean_t.numel()} and {std_t.numel()}")
        values = torch.tensor([mean, std], device="cpu").flatten().tolist()  # also on "meta"
        if not all(map(math.isfinite, values)) or 0 in values[len(values) // 2:]:
            raise InputError("Normalize: mean and std must be finite and std non-zero")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1))
        self.register_buffer("std", std_t.view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        channels = self.std.shape[1]
        if x.dim() != 4 or channels not in (1, x.shape[1]):
            raise InputError(f"Normalize with {channels} channels applied to input of shape "
                             f"{tuple(x.shape)} (it needs (B, {channels}, H, W))")
        return (x - self.mean) / self.std

    def lipschitz_estimate(self, iterations: int = 1) -> torch.Tensor:
        return 1 / self.std.abs().min()

    def lipschitz_bound(self) -> torch.Tensor:
        bound = 1 / self.std.detach().to(torch.float64).abs().min()
        return bound * (1 + 4 * FLOAT64_UNIT_ROUNDOFF)


def batchnorm_affine(m: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (scale, shift) in float64 of an eval-mode BatchNorm: y = x * scale + shift.
    A BatchNorm without running statistics depends on the batch and has no such form."""
    if not m.track_running_stats or m.running_var is None:
        raise UnsupportedLayerError("BatchNorm without running statistics normalises by the "
                                    "batch: it is not one function of each input")
    var, mean = m.running_var.detach().double(), m.running_mean.detach().double()
    scale = 1 / torch.sqrt(var + m.eps)
    if m.weight is not None:
        scale = scale * m.weight.detach().double()
    shift = -mean * scale
    if m.bias is not None:
        shift = shift + m.bias.detach().double()
    return scale, shift


def check_batchnorm(m: nn.Module, name: str = "") -> None:
    """Refuse (:class:`UnsupportedLayerError`) an eval-mode BatchNorm whose affine map has no
    sound float64 form: ``eps`` must be a finite number >= 0; running_mean, weight and bias
    finite; running_var >= 0 and, computed in float64, running_var + eps a normal float64
    (>= 2.2e-308, the smallest) and finite. Below that, var + eps is subnormal or 0: it has
    lost relative precision (the rounding bounds assume none) and rsqrt(var + eps) loses
    more or is infinite; the resulting scale and shift must be finite too (a huge weight
    times rsqrt overflows). A BatchNorm without running statistics is left to the rules."""
    if m.running_var is None or m.running_mean is None:
        return
    where = f"layer {name or '?'} ({type(m).__name__})"
    eps = m.eps
    if type(eps) not in (int, float) or not math.isfinite(eps) or eps < 0:
        raise UnsupportedLayerError(f"{where}: eps must be a finite number >= 0, got {eps!r}")
    var = m.running_var.detach().double()
    tensors = {"running_mean": m.running_mean, "weight": m.weight, "bias": m.bias}
    for key, t in tensors.items():
        if t is not None and not bool(torch.isfinite(t.detach()).all()):
            raise UnsupportedLayerError(f"{where}: {key} is not finite")
    if bool((var < 0).any()) or bool(torch.isnan(var).any()):
        raise UnsupportedLayerError(f"{where}: running_var has negative or NaN entries")
    total = var + eps
    tiny = torch.finfo(torch.float64).tiny
    if not bool(torch.isfinite(total).all()) or bool((total < tiny).any()):
        raise UnsupportedLayerError(
            f"{where}: running_var + eps must be finite and at least {tiny:.3g} (the smallest "
            f"normal float64), got {float(total.min()):.3g} to {float(total.max()):.3g}")
    scale, shift = batchnorm_affine(m)
    if not bool(torch.isfinite(scale).all() and torch.isfinite(shift).all()):
        raise UnsupportedLayerError(f"{where}: its affine map overflows float64 (weight / "
                                    "sqrt(running_var + eps) or the shift is infinite)")


def _batchnorm_bound(m: nn.Module) -> torch.Tensor:
    # a diagonal map: its norm is the largest |scale|, computed with a few roundings
    return batchnorm_affine(m)[0].abs().max() * (1 + 8 * FLOAT64_UNIT_ROUNDOFF)


def check_bounded(module: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` unless the layer's exact type has a known bound."""
    known = layer_type(module)
    if known is None or not (known.exact or known.l2_bound is not None):
        raise UnsupportedLayerError(
            f"no known Lipschitz bound for layer {type(module).__name__}")


def check_gloro_layer(module: nn.Module) -> None:
    """A layer GloRo can train: a known bound that holds in training too (BatchNorm's bound
    holds only for its running statistics, not for the batch statistics it trains with)."""
    check_bounded(module)
    if layer_type(module).batch_statistics:
        raise UnsupportedLayerError(f"GloRo cannot train through {type(module).__name__}: its "
                                    "training-mode function is not the one its bound covers")


def layer_estimate(module: nn.Module, iterations: int) -> torch.Tensor | float:
    """Power-iteration estimate of one layer's l2 Lipschitz constant (1.0 for 1-Lipschitz ops),
    always in the weights' own precision (outside any autocast of mixed-precision training)."""
    check_bounded(module)
    estimate = layer_type(module).l2_estimate
    if estimate is None:
        return 1.0
    device = next(module.buffers(), torch.zeros(())).device.type
    with torch.autocast(device, enabled=False):
        return estimate(module, iterations)


def layer_bound(module: nn.Module) -> torch.Tensor:
    """Sound float64 upper bound on one layer's l2 Lipschitz constant."""
    check_bounded(module)
    bound = layer_type(module).l2_bound
    return torch.ones((), dtype=torch.float64) if bound is None else bound(module)


def trace_shapes(model: nn.Sequential, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Run a dummy input through ``model``: every conv records its true input shape and every
    layer must accept what the previous one produces (else :class:`ConfigError`). Returns
    the shape of one output. Runs in eval mode, so BatchNorm statistics stay untouched."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape) if param is None else \
        torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i, layer in enumerate(model):
                try:
                    if isinstance(layer, LipschitzConv2d):
                        layer.set_input_shape(tuple(x.shape[1:]))
                    x = layer(x)
                except (InputError, RuntimeError, ValueError) as err:
                    raise ConfigError(f"layer {i} ({type(layer).__name__}) cannot take inputs "
                                      f"of shape {tuple(x.shape[1:])}: {err}") from err
    finally:
        model.train(was_training)
    return tuple(x.shape[1:])


def _same_function(original: nn.Module, converted: nn.Module,
                   input_shape: tuple[int, ...]) -> bool:
    """Do both networks give the same outputs on a few random inputs in [0, 1]?"""
    param = next(converted.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(4, *input_shape, generator=generator, dtype=dtype).to(device)
    with torch.no_grad():
        a, b = original(x), converted(x)
    scale = a.abs().max().clamp_min(1e-30)
    return a.shape == b.shape and bool(((a - b).abs() <= 1e-6 * scale).all())


def convert_sequential(model: nn.Sequential, input_shape: tuple[int, ...]) -> nn.Sequential:
    """Turn a plain ``nn.Sequential`` of Linear / Conv2d / ReLU / MinMax / Flatten layers (and
    eval-mode dropout, the identity) into one whose layers know their Lipschitz constants: each
    layer whose type has a ``convert`` (:class:`certnet.nn.layer_types.LayerType`) is replaced
    by it, the others are kept if they have a bound. Unsupported layers, hooks (e.g. the
    hook-based ``weight_norm`` / ``spectral_norm``) and parametrizations raise
    :class:`UnsupportedLayerError`; the result must compute the same outputs as ``model``."""
    from certnet.nn.integrity import check_plain

    if not isinstance(model, nn.Sequential):
        raise UnsupportedLayerError(
            f"expected an nn.Sequential, got {type(model).__name__}: certnet certifies "
            "sequential networks (put the layers, flattening included, in an nn.Sequential)")
    check_plain(model)
    layers: list[nn.Module] = []
    for layer in model:
        known = layer_type(layer)
        if hasattr(layer, "parametrizations"):
            raise UnsupportedLayerError(
                f"{type(layer).__name__} is parametrized: remove its parametrizations "
                "(torch.nn.utils.parametrize.remove_parametrizations) first")
        if known is not None and known.convert is not None:
            layers += [new for new in [known.convert(layer)] if new is not None]
        else:
            check_gloro_layer(layer)
            layers.append(layer)
    converted = nn.Sequential(*layers)
    trace_shapes(converted, input_shape)
    if not _same_function(model, converted, input_shape):
        raise UnsupportedLayerError("convert_sequential: the converted network computes a "
                                    "different function than the given one")
    return converted


def _copy_weights(plain: nn.Linear | nn.Conv2d, new: nn.Module) -> nn.Module:
    params = dict(plain.named_parameters())
    if set(params) != {"weight", "bias"} - ({"bias"} if plain.bias is None else set()):
        raise UnsupportedLayerError(
            f"{type(plain).__name__} has parameters {sorted(params)}; expected weight "
            "(and bias)")
    new.load_state_dict({k: v.detach() for k, v in params.items()}, strict=False)
    return new


def _from_linear(m: nn.Linear) -> LipschitzLinear:
    return _copy_weights(m, LipschitzLinear(m.in_features, m.out_features, m.bias is not None,
                                            dtype=m.weight.dtype, device=m.weight.device))


def _from_conv(m: nn.Conv2d) -> LipschitzConv2d:
    if isinstance(m.padding, str):
        raise UnsupportedLayerError("convert_sequential: use integer conv padding")
    if m.kernel_size[0] != m.kernel_size[1]:
        raise UnsupportedLayerError("convert_sequential: square kernels only")
    return _copy_weights(m, LipschitzConv2d(
        m.in_channels, m.out_channels, m.kernel_size[0], stride=m.stride, padding=m.padding,
        bias=m.bias is not None, dilation=m.dilation, groups=m.groups,
        padding_mode=m.padding_mode, dtype=m.weight.dtype, device=m.weight.device))


def _drop_in_eval(m: nn.Module) -> None:
    if m.training:
        raise UnsupportedLayerError(f"{type(m).__name__} in training mode is random: call "
                                    "model.eval() first")
    return None  # the identity in eval mode


def _check_square(m: LipschitzConv2d, name: str) -> None:
    # the global bounds read one entry of stride and padding
    if not all(isinstance(p, tuple) and len(p) == 2 and p[0] == p[1]
               for p in (m.stride, m.padding)):
        raise UnsupportedLayerError(
            f"layer {name} ({type(m).__name__}) needs a square stride and padding, got "
            f"stride {m.stride!r} and padding {m.padding!r}")


def product(values: list[torch.Tensor | float]) -> torch.Tensor:
    """Product of per-layer constants (composition bound: Lip(f o g) <= Lip(f) Lip(g))."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    result = math.prod(v for v in values if not isinstance(v, torch.Tensor))
    for t in tensors:
        result = result * t
    return torch.as_tensor(result) if not tensors else result


def _batchnorm_bound(m: nn.Module) -> torch.Tensor:
    # a diagonal map: its norm is the largest |scale|, computed with a few roundings
    return batchnorm_affine(m)[0].abs().max() * (1 + 8 * FLOAT64_UNIT_ROUNDOFF)


def _batchnorm_rounding(m: nn.Module) -> RoundingBound:
    # y = x * a + c with a, c computed in a few float64 steps from the running statistics:
    # each entry is off by at most 8u (|x a| + |m a| + |beta|) (generous for any order)
    scale, _ = batchnorm_affine(m)
    mean_part = (m.running_mean.double() * scale).abs()
    beta = m.bias.detach().double().abs() if m.bias is not None else 0.0
    u8 = 8 * FLOAT64_UNIT_ROUNDOFF
    return RoundingBound(input=u8 * scale.abs().max(),
                         per_position=u8 * float((mean_part + beta).norm()), per_entry=8 * eta())


def _normalize_rounding(m: Normalize) -> RoundingBound:
    # fl(fl(x - m) / s) = (x - m) / s * (1 + d) + e, |d| <= 2u + u^2, |e| <= eta
    return RoundingBound(output=3 * FLOAT64_UNIT_ROUNDOFF, per_entry=2 * eta())


def _rows_linf_bound(m: nn.Linear) -> float:
    """The l_inf operator norm of a dense map: its largest absolute row sum, rounded up."""
    rows = m.weight.detach().double().abs().sum(1).max()
    return float(rows) * (1 + gamma(m.weight.shape[1] + 1))


def _bound(m: LipschitzModule) -> torch.Tensor:
    return m.lipschitz_bound()


def _estimate(m: LipschitzModule, iterations: int) -> torch.Tensor:
    return m.lipschitz_estimate(iterations)


def _conv_describe(m: LipschitzConv2d) -> dict[str, int | bool]:
    return {"in_channels": m.in_channels, "out_channels": m.out_channels,
            "kernel_size": m.kernel_size[0], "stride": m.stride[0], "padding": m.padding[0],
            "bias": m.bias is not None}


#: a window, stride (>= 1) or padding (>= 0): one int or a pair
PAIR = Positive | Annotated[list[Positive], Len(2, 2)]
PAD = Count | Annotated[list[Count], Len(2, 2)]
#: a non-empty list of finite numbers; of positive ones
NUMBERS = Annotated[list[float], Len(1)]
SCALES = Annotated[list[Annotated[float, Field(gt=0)]], Len(1)]
register_layer_type(LayerType(
    LipschitzLinear, "linear", lambda m: {
        "in_features": m.in_features, "out_features": m.out_features,
        "bias": m.bias is not None},
    {"in_features": Positive, "out_features": Positive, "bias": bool},
    l2_bound=_bound, l2_estimate=_estimate, linf_bound=_rows_linf_bound,
    rounding=lambda m: affine_rounding(magnitude_bound(m.weight), m.in_features + 1, m.bias),
    masked_bound=lambda m, rows, cols, tails: dense_masked_bound(m.weight, rows, cols, tails),
    dense=True))
register_layer_type(LayerType(
    LipschitzConv2d, "conv", _conv_describe,
    {"in_channels": Positive, "out_channels": Positive, "kernel_size": Positive,
     "stride": Positive, "padding": Count, "bias": bool},
    l2_bound=_bound, l2_estimate=_estimate,
    rounding=lambda m: affine_rounding(magnitude_bound(m.weight), m.weight[0].numel() + 1,
                                       m.bias),
    masked_bound=lambda m, rows, cols, tails: conv_masked_bound(m.weight, m.stride, m.padding,
                                                                rows, cols),
    check=_check_square))
# the kernel alpha W + I is itself rounded (2u per entry): 2 more terms in gamma, and the
# masked bounds take its entrywise majorant
register_layer_type(LayerType(
    ResidualConv2d, "residual_conv", lambda m: {
        "channels": m.in_channels, "kernel_size": m.kernel_size[0], "alpha": m.alpha,
        "bias": m.bias is not None},
    {"channels": Positive, "kernel_size": Positive, "alpha": float, "bias": bool},
    l2_bound=_bound, l2_estimate=_estimate,
    rounding=lambda m: affine_rounding(magnitude_bound(m.kernel_majorant()),
                                       m.weight[0].numel() + 3, m.bias),
    masked_bound=lambda m, rows, cols, tails: conv_masked_bound(
        m.kernel_majorant(), m.stride, m.padding, rows, cols), check=_check_square))
register_layer_type(LayerType(
    Normalize, "normalize", lambda m: {
        "mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()},
    {"mean": NUMBERS, "std": SCALES}, l2_bound=_bound, l2_estimate=_estimate,
    linf_bound=lambda m: float((1 / m.std.detach().double().abs()).max()) * (1 + gamma(2)),
    rounding=_normalize_rounding))
for _name, _cls in (("batchnorm1d", nn.BatchNorm1d), ("batchnorm2d", nn.BatchNorm2d)):
    register_layer_type(LayerType(
        _cls, _name, lambda m: {"num_features": m.num_features}, {"num_features": Positive},
        l2_bound=_batchnorm_bound,
        l2_estimate=lambda m, k: _batchnorm_bound(m).to(m.running_var.dtype),
        rounding=_batchnorm_rounding, batch_statistics=True, check=check_batchnorm))
register_layer_type(LayerType(nn.AvgPool2d, "avgpool", lambda m: {
    "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding},
    {"kernel_size": PAIR, "stride": PAIR, "padding": PAD}))


def _maxpool_describe(m: nn.MaxPool2d) -> dict[str, Any]:
    """Its spec fields; ceil_mode and return_indices (another function) are never stored."""
    if m.ceil_mode or m.return_indices:
        raise UnsupportedLayerError("cannot describe MaxPool2d with ceil_mode or "
                                    "return_indices")
    return {"kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
            "dilation": m.dilation}


# max pooling and LeakyReLU (0 <= a <= 1): each output moves at most as far as one input (l_inf)
register_layer_type(LayerType(
    nn.MaxPool2d, "maxpool", _maxpool_describe,
    {"kernel_size": PAIR, "stride": PAIR, "padding": PAD, "dilation": PAIR},
    linf_bound=unit_bound))
register_layer_type(LayerType(
    nn.LeakyReLU, "leaky_relu", lambda m: {"negative_slope": m.negative_slope},
    {"negative_slope": Fraction},
    linf_bound=lambda m: 1.0 if 0 <= m.negative_slope <= 1 else None))
register_layer_type(LayerType(nn.Linear, linf_bound=_rows_linf_bound, convert=_from_linear))
register_layer_type(LayerType(nn.Conv2d, convert=_from_conv))
for _cls in (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout):
    register_layer_type(LayerType(_cls, convert=_drop_in_eval))
register_layer_type(LayerType(nn.Tanh, "tanh", linf_bound=unit_bound))
register_layer_type(LayerType(nn.ReLU, "relu", exact=True))
register_layer_type(LayerType(nn.Flatten, "flatten", exact=True, reshape_only=True))
register_layer_type(LayerType(nn.Identity, "identity", exact=True, reshape_only=True))
