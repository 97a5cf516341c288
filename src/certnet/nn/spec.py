"""Architectures as plain JSON layer lists, so a checkpoint describes its network without code.

Each entry is ``{"type": ..., **hyperparameters}``; :func:`build_layers` turns a list into an
``nn.Sequential`` of Lipschitz layers, :func:`describe_layers` does the reverse. A method that
brings its own layer (e.g. an l_inf-dist neuron) calls :func:`register_layer` once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from certnet.errors import ConfigError, UnsupportedLayerError
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate, p_to_json
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    ResidualConv2d,
    trace_shapes,
)

LayerSpec = dict[str, Any]
#: spec type -> (module class, hyperparameters of a module)
LAYER_TYPES: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {}


def register_layer(name: str, cls: type[nn.Module],
                   describe: Callable[[Any], dict[str, Any]] = lambda m: {}) -> None:
    """Make ``cls`` storable in checkpoints as ``{"type": name, **describe(module)}``; it is
    rebuilt as ``cls(**hyperparameters)``."""
    LAYER_TYPES[name] = (cls, describe)


register_layer("conv", LipschitzConv2d, lambda m: {
    "in_channels": m.in_channels, "out_channels": m.out_channels,
    "kernel_size": m.kernel_size[0], "stride": m.stride[0], "padding": m.padding[0],
    "bias": m.bias is not None})
register_layer("residual_conv", ResidualConv2d, lambda m: {
    "channels": m.in_channels, "kernel_size": m.kernel_size[0], "alpha": m.alpha,
    "bias": m.bias is not None})
register_layer("linear", LipschitzLinear, lambda m: {
    "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None})
register_layer("normalize", Normalize, lambda m: {
    "mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()})
register_layer("batchnorm2d", nn.BatchNorm2d, lambda m: {"num_features": m.num_features})
register_layer("batchnorm1d", nn.BatchNorm1d, lambda m: {"num_features": m.num_features})
register_layer("avgpool", nn.AvgPool2d, lambda m: {
    "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding})
register_layer("linf_dist", LinfDist, lambda m: {
    "in_features": m.in_features, "out_features": m.out_features, "p": p_to_json(m.p),
    "bias": m.bias is not None})
register_layer("linf_dist_conv", LinfDistConv2d, lambda m: {
    "in_channels": m.in_channels, "out_channels": m.out_channels,
    "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
    "p": p_to_json(m.p), "bias": m.bias is not None})
register_layer("mean_shift", MeanShift, lambda m: {
    "num_features": m.num_features, "momentum": m.momentum})
register_layer("negate", Negate)
register_layer("tanh", nn.Tanh)
register_layer("relu", nn.ReLU)
register_layer("minmax", MinMax)
register_layer("clipped_relu", ClippedReLU, lambda m: {"shape": list(m.shape)})
register_layer("clipped_minmax", ClippedMinMax, lambda m: {"shape": list(m.shape)})
register_layer("flatten", nn.Flatten)
register_layer("identity", nn.Identity)


def _make(spec: LayerSpec) -> nn.Module:
    if not isinstance(spec, dict) or spec.get("type") not in LAYER_TYPES:
        raise ConfigError(f"unknown layer spec {spec!r}; known types: {sorted(LAYER_TYPES)}")
    cls, _ = LAYER_TYPES[spec["type"]]
    try:
        return cls(**{k: v for k, v in spec.items() if k != "type"})
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"bad layer spec {spec!r}: {err}") from err


def build_layers(specs: list[LayerSpec], input_shape: tuple[int, ...]) -> nn.Sequential:
    """Build the layers and record every conv's true input shape."""
    if not isinstance(specs, list) or not specs:
        raise ConfigError("a layer spec must be a non-empty list")
    layers = nn.Sequential(*[_make(s) for s in specs])
    trace_shapes(layers, input_shape)
    return layers


def describe_layers(layers: nn.Sequential) -> list[LayerSpec]:
    """The JSON spec of a Sequential of registered layers (inverse of :func:`build_layers`).
    Matching is by exact class, so a subclass is never stored as its parent."""
    by_class = {cls: (name, describe) for name, (cls, describe) in LAYER_TYPES.items()}
    specs: list[LayerSpec] = []
    for m in layers:
        if type(m) not in by_class:
            raise UnsupportedLayerError(f"cannot describe layer {type(m).__name__}")
        name, describe = by_class[type(m)]
        specs.append({"type": name, **describe(m)})
    return specs
