"""Architectures as plain JSON layer lists, so a checkpoint describes its network without code.

Each entry is ``{"type": ..., **hyperparameters}``; :func:`build_layers` turns a list into an
``nn.Sequential`` of Lipschitz layers, :func:`describe_layers` does the reverse.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from certnet.errors import ConfigError, UnsupportedLayerError
from certnet.nn.activations import MinMax
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    ResidualConv2d,
    record_input_shapes,
)

LayerSpec = dict[str, Any]


def _make(spec: LayerSpec) -> nn.Module:
    kind = spec.get("type")
    args = {k: v for k, v in spec.items() if k != "type"}
    try:
        if kind == "conv":
            return LipschitzConv2d(args["in_channels"], args["out_channels"], args["kernel_size"],
                                   stride=args.get("stride", 1), padding=args.get("padding", 0),
                                   bias=args.get("bias", True))
        if kind == "residual_conv":
            return ResidualConv2d(args["channels"], args.get("kernel_size", 3),
                                  alpha=args.get("alpha", 1.0), bias=args.get("bias", True))
        if kind == "linear":
            return LipschitzLinear(args["in_features"], args["out_features"],
                                   bias=args.get("bias", True))
        if kind == "normalize":
            return Normalize(args["mean"], args["std"])
    except (KeyError, TypeError) as err:
        raise ConfigError(f"bad layer spec {spec!r}: {err}") from err
    simple = {"relu": nn.ReLU, "minmax": MinMax, "flatten": nn.Flatten, "identity": nn.Identity}
    if kind in simple:
        return simple[kind]()
    raise ConfigError(f"unknown layer type {kind!r} in spec {spec!r}")


def build_layers(specs: list[LayerSpec], input_shape: tuple[int, ...]) -> nn.Sequential:
    """Build the layers and record every conv's true input shape."""
    layers = nn.Sequential(*[_make(s) for s in specs])
    record_input_shapes(layers, input_shape)
    return layers


def describe_layers(layers: nn.Sequential) -> list[LayerSpec]:
    """The JSON spec of a Sequential of supported layers (inverse of :func:`build_layers`)."""
    specs: list[LayerSpec] = []
    for m in layers:
        if isinstance(m, ResidualConv2d):
            specs.append({"type": "residual_conv", "channels": m.in_channels,
                          "kernel_size": m.kernel_size[0], "alpha": m.alpha,
                          "bias": m.bias is not None})
        elif isinstance(m, LipschitzConv2d):
            specs.append({"type": "conv", "in_channels": m.in_channels,
                          "out_channels": m.out_channels, "kernel_size": m.kernel_size[0],
                          "stride": m.stride[0], "padding": m.padding[0],
                          "bias": m.bias is not None})
        elif isinstance(m, LipschitzLinear):
            specs.append({"type": "linear", "in_features": m.in_features,
                          "out_features": m.out_features, "bias": m.bias is not None})
        elif isinstance(m, Normalize):
            specs.append({"type": "normalize", "mean": m.mean.flatten().tolist(),
                          "std": m.std.flatten().tolist()})
        elif type(m) in (nn.ReLU, MinMax, nn.Flatten, nn.Identity):
            specs.append({"type": {nn.ReLU: "relu", MinMax: "minmax", nn.Flatten: "flatten",
                                   nn.Identity: "identity"}[type(m)]})
        else:
            raise UnsupportedLayerError(f"cannot describe layer {type(m).__name__}")
    return specs
