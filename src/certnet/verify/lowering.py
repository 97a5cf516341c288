"""A network as float64 operations on the flattened input: affine (Flatten, (Lipschitz)Linear,
(Lipschitz, residual) Conv2d as its dense matrix), ReLU and MinMax. Clipped forms are rewritten
exactly with ReLUs: clamp(min(z, t), 0) = relu(t - relu(t - z)), max(m, l) = l + relu(m - l),
min(M, u) = u - relu(u - M)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from certnet.errors import UnsupportedLayerError
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, ResidualConv2d
from certnet.nn.reshape import Reshape

Op = tuple  # ("affine", W, b) | ("relu",) | ("minmax",)


#: exact module class -> its lowering: (layer, input shape) -> (ops, output shape)
Lowering = Callable[[nn.Module, tuple[int, ...]], tuple[list[Op], tuple[int, ...]]]
LOWERINGS: dict[type[nn.Module], Lowering] = {}


def lowering(*classes: type[nn.Module]) -> Callable[[Lowering], Lowering]:
    """Decorator: the exact lowering of modules of exactly these classes (a new layer type
    registers its own, beside the rest of its description)."""
    def register(fn: Lowering) -> Lowering:
        LOWERINGS.update(dict.fromkeys(classes, fn))
        return fn
    return register


def network_ops(layers: nn.Module, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """Flatten ``layers`` (acting on one point of ``shape``) into affine / relu / minmax
    operations on the flattened vector; returns them and the output shape."""
    ops: list[Op] = []
    for layer in layers if isinstance(layers, nn.Sequential) else [layers]:
        lower = LOWERINGS.get(type(layer))
        if lower is None:
            raise UnsupportedLayerError(
                f"verify: no exact encoding for layer {type(layer).__name__} (supported: "
                f"{', '.join(sorted(c.__name__ for c in LOWERINGS))})")
        sub, shape = lower(layer, shape)
        ops += sub
    return ops, shape


lowering(nn.Sequential)(network_ops)
lowering(nn.Identity)(lambda layer, shape: ([], shape))


@lowering(nn.Flatten)
def _flatten(layer: nn.Flatten, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    if layer.start_dim != 1 or layer.end_dim != -1:
        raise UnsupportedLayerError("verify: only Flatten(start_dim=1, end_dim=-1)")
    return [], (int(np.prod(shape)),)


@lowering(Reshape)
def _reshape(layer: Reshape, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    if int(np.prod(shape)) != int(np.prod(layer.shape)):
        raise UnsupportedLayerError(f"verify: Reshape to {layer.shape} applied to {shape}")
    return [], layer.shape


@lowering(nn.Linear, LipschitzLinear)
def _linear(layer: nn.Linear, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    if len(shape) != 1 or shape[0] != layer.in_features:
        raise UnsupportedLayerError(
            f"verify: Linear({layer.in_features}, ...) applied to shape {shape}; flatten first")
    w = layer.weight.detach().to(torch.float64).cpu().numpy()
    b = np.zeros(w.shape[0]) if layer.bias is None else _flat(layer.bias)
    return [("affine", w, b)], (layer.out_features,)


lowering(nn.ReLU)(lambda layer, shape: ([("relu",)], shape))


@lowering(MinMax)
def _minmax(layer: MinMax, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    # channels c and c + C/2 (dim 0 of one point) are i and i + N/2 once flattened.
    if shape[0] % 2:
        raise UnsupportedLayerError(f"verify: MinMax on {shape[0]} (odd) channels")
    return [("minmax",)], shape


lowering(ClippedReLU)(lambda layer, shape: (_clipped_relu_ops(_flat(layer.threshold)), shape))
lowering(ClippedMinMax)(lambda layer, shape: (
    [("minmax",), *_clamp_halves_ops(_flat(layer.lower), _flat(layer.upper))], shape))


@lowering(nn.Conv2d, LipschitzConv2d, ResidualConv2d)
def _conv_affine(layer: nn.Conv2d, shape: tuple[int, ...]) -> tuple[list[Op], tuple[int, ...]]:
    """A convolution on one point of ``shape`` (C, H, W) as the dense affine operation on the
    flattened vector, and its output shape: column k is the kernel (``effective_weight`` for
    certnet's layers) applied to the k-th basis image, exact in float64 (one product per entry,
    the rest zeros)."""
    if len(shape) != 3 or shape[0] != layer.in_channels:
        raise UnsupportedLayerError(
            f"verify: Conv2d({layer.in_channels}, ...) applied to shape {shape}")
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros" or \
            isinstance(layer.padding, str):
        raise UnsupportedLayerError("verify: only zero-padded convolutions without groups, "
                                    "dilation or string padding")
    weight = (layer.effective_weight() if isinstance(layer, LipschitzConv2d) else
              layer.weight).detach().to(torch.float64).cpu()
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        columns = F.conv2d(basis, weight, None, layer.stride, layer.padding)
    bias = np.zeros(columns[0].numel()) if layer.bias is None else \
        np.repeat(_flat(layer.bias), columns[0, 0].numel())
    return [("affine", columns.reshape(n, -1).T.numpy(), bias)], tuple(columns.shape[1:])


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().reshape(-1)


def _clipped_relu_ops(t: np.ndarray) -> list[Op]:
    """clamp(min(z, t), 0) = relu(t - relu(t - z)), for any threshold t."""
    flip = -np.eye(t.size)
    return [("affine", flip, t), ("relu",), ("affine", flip, t), ("relu",)]


def _clamp_halves_ops(lower: np.ndarray, upper: np.ndarray) -> list[Op]:
    """[m; M] -> [max(m, lower); min(M, upper)] = [lower + relu(m - lower); upper -
    relu(upper - M)]."""
    sign = np.diag(np.concatenate([np.ones(lower.size), -np.ones(upper.size)]))
    return [("affine", sign, np.concatenate([-lower, upper])), ("relu",),
            ("affine", sign, np.concatenate([lower, upper]))]
