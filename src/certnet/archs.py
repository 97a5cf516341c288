"""Registry of named architectures (timm style): ``build_layers(ARCHS[name](...))``.

GloRo architectures (Leino et al. 2021, App. B; klasleino/gloro ``tools/training``): "same"
zero padding, an activation after every conv and hidden dense layer, orthogonal init.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from certnet.errors import ConfigError
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear
from certnet.nn.spec import LayerSpec, build_layers

ArchFn = Callable[..., list[LayerSpec]]
ARCHS: dict[str, ArchFn] = {}


def register_arch(name: str) -> Callable[[ArchFn], ArchFn]:
    def decorator(fn: ArchFn) -> ArchFn:
        ARCHS[name] = fn
        return fn
    return decorator


def conv_mlp(input_shape: tuple[int, ...], num_classes: int, convs: list[tuple[int, int, int]],
             dense: list[int], activation: str = "minmax") -> list[LayerSpec]:
    """Conv stack (filters, kernel, stride) with "same" padding, then dense layers, then the
    logit layer; ``activation`` after every layer but the last."""
    if activation not in ("minmax", "relu"):
        raise ConfigError(f"unknown activation {activation!r}; choose minmax or relu")
    channels, height, width = input_shape
    specs: list[LayerSpec] = []
    for filters, kernel, stride in convs:
        # TF "same": output = ceil(n / stride); symmetric padding (k - 1) // 2 gives it for
        # the kernels and even sizes used here, and we check it.
        padding = (kernel - 1) // 2 if stride == 1 else (kernel - stride + 1) // 2
        specs += [{"type": "conv", "in_channels": channels, "out_channels": filters,
                   "kernel_size": kernel, "stride": stride, "padding": padding,
                   "bias": True},
                  {"type": activation}]
        height = (height + 2 * padding - kernel) // stride + 1
        width = (width + 2 * padding - kernel) // stride + 1
        channels = filters
    specs.append({"type": "flatten"})
    features = channels * height * width
    for units in dense:
        specs += [{"type": "linear", "in_features": features, "out_features": units,
                   "bias": True},
                  {"type": activation}]
        features = units
    specs.append({"type": "linear", "in_features": features, "out_features": num_classes,
                  "bias": True})
    return specs


@register_arch("2c2f")
def arch_2c2f(input_shape, num_classes, activation="minmax"):
    return conv_mlp(input_shape, num_classes, [(16, 4, 2), (32, 4, 2)], [100], activation)


@register_arch("4c3f")
def arch_4c3f(input_shape, num_classes, activation="minmax"):
    return conv_mlp(input_shape, num_classes,
                    [(32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 4, 2)], [512, 512], activation)


@register_arch("6c2f")
def arch_6c2f(input_shape, num_classes, activation="minmax"):
    return conv_mlp(input_shape, num_classes,
                    [(32, 3, 1), (32, 3, 1), (32, 4, 2), (64, 3, 1), (64, 3, 1), (64, 4, 2)],
                    [512], activation)


@register_arch("8c2f")
def arch_8c2f(input_shape, num_classes, activation="minmax"):
    return conv_mlp(input_shape, num_classes,
                    [(64, 3, 1), (64, 3, 1), (64, 4, 2), (128, 3, 1), (128, 3, 1), (128, 4, 2),
                     (256, 3, 1), (256, 4, 2)], [256], activation)


def arch_specs(name: str, input_shape: tuple[int, ...], num_classes: int,
               **kwargs) -> list[LayerSpec]:
    if name not in ARCHS:
        raise ConfigError(f"unknown architecture {name!r}; choose from {sorted(ARCHS)}")
    return ARCHS[name](tuple(input_shape), num_classes, **kwargs)


def orthogonal_init(layers: nn.Sequential) -> None:
    """Orthogonal weights (conv kernels as (out, in*k*k) matrices), zero biases."""
    for m in layers:
        if isinstance(m, (LipschitzConv2d, LipschitzLinear)):
            nn.init.orthogonal_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_arch(name: str, input_shape: tuple[int, ...], num_classes: int,
               seed: int | None = None, **kwargs) -> nn.Sequential:
    """Freshly initialised layers of a named architecture."""
    if seed is not None:
        torch.manual_seed(seed)
    layers = build_layers(arch_specs(name, input_shape, num_classes, **kwargs), input_shape)
    orthogonal_init(layers)
    return layers
