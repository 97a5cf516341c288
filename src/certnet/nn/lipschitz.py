"""Layers that know their l2 Lipschitz constant two ways.

* ``lipschitz_estimate(iterations)``: power iteration with a persistent iterate (Miyato et al.
  2018; GloRo, Leino et al. 2021 §4). Differentiable in the weights, cheap, and a *lower* bound
  of the true spectral norm: fine for training, never for certificates.
* ``lipschitz_bound()``: a guaranteed *upper* bound in float64, used by every certificate
  (shared/DESIGN.md §2). Dense layers: exact SVD (Gram iteration, Delattre et al. 2023, for
  huge matrices). Convolutions: the circular-FFT bound (Sedghi et al. 2019) on the polyphase
  (space-to-depth) form of the layer, which covers any stride and zero padding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from certnet.errors import InputError, UnsupportedLayerError
from certnet.nn.activations import MinMax

#: Relative slack added to every float64 bound to cover the rounding of the SVD / FFT itself.
BOUND_SLACK = 1e-9
#: Dense matrices with min(shape) above this use the Gram-iteration bound instead of an SVD.
EXACT_SVD_MAX_DIM = 4096

ONE_LIPSCHITZ = (nn.ReLU, MinMax, nn.Flatten, nn.Identity)


def _normalize(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm().clamp_min(torch.finfo(v.dtype).tiny)


def gram_spectral_bound(matrix: torch.Tensor, iterations: int = 8) -> torch.Tensor:
    """Upper bound on sigma_max(matrix) by Gram iteration (Delattre et al. 2023, Thm. 1).

    sigma_1(W) <= prod_t r_t^(2^-t) with r_0 = ||W||_F, H_{t+1} = H_t^T H_t / r_{t+1}, because
    sigma_1(H_t^T H_t) = sigma_1(H_t)^2 and sigma_1(H_T) <= ||H_T||_F = 1.
    """
    h = matrix.detach().to(torch.float64)
    if h.shape[0] < h.shape[1]:
        h = h.T
    log_bound = torch.zeros((), dtype=torch.float64, device=h.device)
    for t in range(iterations + 1):
        r = torch.linalg.matrix_norm(h, "fro")
        if r == 0:
            return torch.zeros((), dtype=torch.float64, device=h.device)
        log_bound = log_bound + r.log() / 2**t
        h = h / r
        if t < iterations:
            h = h.T @ h
    return log_bound.exp() * (1 + BOUND_SLACK)


def dense_spectral_bound(matrix: torch.Tensor) -> torch.Tensor:
    """Sound upper bound on the spectral norm of a dense matrix, in float64."""
    w = matrix.detach().to(torch.float64)
    if min(w.shape) > EXACT_SVD_MAX_DIM:
        return gram_spectral_bound(w)
    return torch.linalg.matrix_norm(w, ord=2) * (1 + BOUND_SLACK)


def conv_spectral_bound(
    weight: torch.Tensor, stride: int, padding: int, input_hw: tuple[int, int]
) -> torch.Tensor:
    """Sound upper bound on the l2 operator norm of ``F.conv2d(x, weight, stride, padding)`` on
    inputs of spatial size ``input_hw`` (zero padding).

    The zero-padded input is an isometric embedding of x; splitting it into its s*s polyphase
    components turns the stride-s correlation into a stride-1 correlation with c_in*s^2 channels
    and ceil(k/s) taps; every valid output of that is an output of the circular correlation on
    the polyphase grid, whose norm is max_f sigma_max(FFT(kernel)[f]) (Sedghi et al. 2019).
    """
    w = weight.detach().to(torch.float64)
    c_out, c_in, kh, kw = w.shape
    s = stride
    kh2, kw2 = -(-kh // s), -(-kw // s)
    w = F.pad(w, (0, kw2 * s - kw, 0, kh2 * s - kh))
    # w[o, c, p*s + a, q*s + b] -> w_poly[o, (c, a, b), p, q]
    w = w.reshape(c_out, c_in, kh2, s, kw2, s).permute(0, 1, 3, 5, 2, 4)
    w = w.reshape(c_out, c_in * s * s, kh2, kw2)
    n_h = -(-(input_hw[0] + 2 * padding) // s) + kh2
    n_w = -(-(input_hw[1] + 2 * padding) // s) + kw2
    spectrum = torch.fft.fft2(w, s=(n_h, n_w))  # (c_out, c_in s^2, n_h, n_w)
    spectrum = spectrum.permute(2, 3, 0, 1).reshape(n_h * n_w, c_out, c_in * s * s)
    return torch.linalg.matrix_norm(spectrum, ord=2).max() * (1 + BOUND_SLACK)


class LipschitzModule(nn.Module):
    """Interface of a layer with a power-iteration estimate and a sound bound."""

    def lipschitz_estimate(self, iterations: int = 1) -> torch.Tensor:
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
        with torch.no_grad():
            v = self.power_iterate.clone()
            for _ in range(iterations):
                v = _normalize(w.T @ (w @ v))
            self.power_iterate.copy_(v)
        return (w @ v).norm()

    def lipschitz_bound(self) -> torch.Tensor:
        return dense_spectral_bound(self.weight)


class LipschitzConv2d(nn.Conv2d, LipschitzModule):
    """nn.Conv2d (zero padding, any stride, no dilation/groups) whose Lipschitz constant is
    computed on its true input shape, recorded by :meth:`set_input_shape`."""

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
        self.register_buffer("input_shape", torch.zeros(3, dtype=torch.long))
        self.register_buffer("power_iterate", torch.zeros(0))

    def set_input_shape(self, shape: tuple[int, int, int]) -> None:
        """Record the (C, H, W) input shape and allocate the power-iteration iterate."""
        if shape[0] != self.in_channels:
            raise InputError(f"conv expects {self.in_channels} input channels, got {shape[0]}")
        self.input_shape = torch.tensor(shape, dtype=torch.long, device=self.weight.device)
        self.power_iterate = _normalize(
            torch.randn(1, *shape, dtype=self.weight.dtype, device=self.weight.device))

    def effective_weight(self) -> torch.Tensor:
        return self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.effective_weight(), self.bias, self.stride, self.padding)

    def _check_shape(self) -> tuple[int, int, int]:
        shape = tuple(int(d) for d in self.input_shape)
        if shape[0] == 0:
            raise UnsupportedLayerError(
                "conv layer has no recorded input shape; build it through certnet.archs or "
                "convert_sequential(model, input_shape)")
        return shape

    def lipschitz_estimate(self, iterations: int = 1) -> torch.Tensor:
        self._check_shape()
        w = self.effective_weight()
        with torch.no_grad():
            v = self.power_iterate.clone()
            for _ in range(iterations):
                out = F.conv2d(v, w, None, self.stride, self.padding)
                v = _normalize(torch.nn.grad.conv2d_input(
                    v.shape, w, out, self.stride, self.padding))
            self.power_iterate.copy_(v)
        return F.conv2d(v, w, None, self.stride, self.padding).norm()

    def lipschitz_bound(self) -> torch.Tensor:
        shape = self._check_shape()
        return conv_spectral_bound(
            self.effective_weight(), self.stride[0], self.padding[0], shape[1:])


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


class Normalize(nn.Module):
    """Per-channel (x - mean) / std inside the model, so epsilon stays in pixel space.
    Its l2 Lipschitz constant, max_c 1/|std_c|, enters the network bound."""

    def __init__(self, mean: list[float], std: list[float]) -> None:
        super().__init__()
        if min(abs(s) for s in std) == 0:
            raise InputError("Normalize: std must be non-zero")
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def lipschitz_estimate(self, iterations: int = 1) -> torch.Tensor:
        return 1 / self.std.abs().min()

    def lipschitz_bound(self) -> torch.Tensor:
        return (1 / self.std.detach().to(torch.float64).abs().min()) * (1 + BOUND_SLACK)


def layer_estimate(module: nn.Module, iterations: int) -> torch.Tensor | float:
    """Power-iteration estimate of one layer's l2 Lipschitz constant (1.0 for 1-Lipschitz ops)."""
    if isinstance(module, (LipschitzModule, Normalize)):
        return module.lipschitz_estimate(iterations)
    if type(module) in ONE_LIPSCHITZ:  # exact type: a subclass may change forward
        return 1.0
    raise UnsupportedLayerError(f"no known Lipschitz bound for layer {type(module).__name__}")


def layer_bound(module: nn.Module) -> torch.Tensor:
    """Sound float64 upper bound on one layer's l2 Lipschitz constant."""
    if isinstance(module, (LipschitzModule, Normalize)):
        return module.lipschitz_bound()
    if type(module) in ONE_LIPSCHITZ:  # exact type: a subclass may change forward
        return torch.ones((), dtype=torch.float64)
    raise UnsupportedLayerError(f"no known Lipschitz bound for layer {type(module).__name__}")


def record_input_shapes(model: nn.Sequential, input_shape: tuple[int, ...]) -> None:
    """Trace a dummy input through ``model`` so every conv knows its true input shape."""
    param = next(model.parameters(), None)
    x = torch.zeros(1, *input_shape) if param is None else \
        torch.zeros(1, *input_shape, dtype=param.dtype, device=param.device)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, LipschitzConv2d):
                layer.set_input_shape(tuple(x.shape[1:]))
            x = layer(x)


def convert_sequential(model: nn.Sequential, input_shape: tuple[int, ...]) -> nn.Sequential:
    """Turn a plain ``nn.Sequential`` of Linear / Conv2d / ReLU / MinMax / Flatten layers into
    one whose layers know their Lipschitz constants (weights are copied). Unsupported layers
    raise :class:`UnsupportedLayerError`."""
    layers: list[nn.Module] = []
    for layer in model:
        if isinstance(layer, (LipschitzModule, Normalize)) or type(layer) in ONE_LIPSCHITZ:
            new = layer
        elif type(layer) is nn.Linear:
            new = LipschitzLinear(layer.in_features, layer.out_features, layer.bias is not None,
                                  dtype=layer.weight.dtype, device=layer.weight.device)
        elif type(layer) is nn.Conv2d:
            if isinstance(layer.padding, str):
                raise UnsupportedLayerError("convert_sequential: use integer conv padding")
            if layer.kernel_size[0] != layer.kernel_size[1]:
                raise UnsupportedLayerError("convert_sequential: square kernels only")
            new = LipschitzConv2d(
                layer.in_channels, layer.out_channels, layer.kernel_size[0],
                stride=layer.stride, padding=layer.padding, bias=layer.bias is not None,
                dilation=layer.dilation, groups=layer.groups, padding_mode=layer.padding_mode,
                dtype=layer.weight.dtype, device=layer.weight.device)
        else:
            raise UnsupportedLayerError(
                f"no known Lipschitz bound for layer {type(layer).__name__}")
        if new is not layer:
            new.load_state_dict(layer.state_dict(), strict=False)
        layers.append(new)
    converted = nn.Sequential(*layers)
    record_input_shapes(converted, input_shape)
    return converted


def product(values: list[torch.Tensor | float]) -> torch.Tensor:
    """Product of per-layer constants (composition bound: Lip(f o g) <= Lip(f) Lip(g))."""
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    result = math.prod(v for v in values if not isinstance(v, torch.Tensor))
    for t in tensors:
        result = result * t
    return torch.as_tensor(result) if not tensors else result
