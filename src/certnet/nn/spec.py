"""Architectures as plain JSON layer lists, so a checkpoint describes its network without code.

Each entry is ``{"type": ..., **hyperparameters}``; :func:`build_layers` turns a list into an
``nn.Sequential`` of Lipschitz layers, :func:`describe_layers` does the reverse. A method that
brings its own layer (e.g. an l_inf-dist neuron) calls :func:`register_layer` once, with the
schema of the hyperparameters a spec sets: nothing else reaches the constructor.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from annotated_types import Len
from pydantic import BaseModel, Field
from torch import nn

from certnet.errors import ConfigError, UnsupportedLayerError
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate, P, p_to_json
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    ResidualConv2d,
    trace_shapes,
)
from certnet.schema import Count, Fraction, Positive, fields_schema, validate

LayerSpec = dict[str, Any]
#: spec type -> (module class, hyperparameters of a module)
LAYER_TYPES: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {}
#: spec type -> the schema of its fields (every field required: ``describe`` writes them all)
LAYER_SCHEMAS: dict[str, type[BaseModel]] = {}


def register_layer(name: str, cls: type[nn.Module],
                   describe: Callable[[Any], dict[str, Any]] = lambda m: {},
                   schema: dict[str, Any] | None = None) -> None:
    """Make ``cls`` storable in checkpoints as ``{"type": name, **describe(module)}``; it is
    rebuilt as ``cls(**fields)`` once the fields fit ``schema`` (field -> type, with
    :mod:`certnet.schema`'s constraints; no other field is accepted)."""
    LAYER_TYPES[name] = (cls, describe)
    LAYER_SCHEMAS[name] = fields_schema(f"{name} layer", schema or {})


#: a window, stride (>= 1) or padding (>= 0): one int or a pair
PAIR = Positive | Annotated[list[Positive], Len(2, 2)]
PAD = Count | Annotated[list[Count], Len(2, 2)]
#: a non-empty list of finite numbers; of positive ones
NUMBERS = Annotated[list[float], Len(1)]
SCALES = Annotated[list[Annotated[float, Field(gt=0)]], Len(1)]
register_layer("conv", LipschitzConv2d, lambda m: {
    "in_channels": m.in_channels, "out_channels": m.out_channels,
    "kernel_size": m.kernel_size[0], "stride": m.stride[0], "padding": m.padding[0],
    "bias": m.bias is not None},
    {"in_channels": Positive, "out_channels": Positive, "kernel_size": Positive,
     "stride": Positive, "padding": Count, "bias": bool})
register_layer("residual_conv", ResidualConv2d, lambda m: {
    "channels": m.in_channels, "kernel_size": m.kernel_size[0], "alpha": m.alpha,
    "bias": m.bias is not None},
    {"channels": Positive, "kernel_size": Positive, "alpha": float, "bias": bool})
register_layer("linear", LipschitzLinear, lambda m: {
    "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    {"in_features": Positive, "out_features": Positive, "bias": bool})
register_layer("normalize", Normalize, lambda m: {
    "mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()},
    {"mean": NUMBERS, "std": SCALES})
register_layer("batchnorm2d", nn.BatchNorm2d, lambda m: {"num_features": m.num_features},
               {"num_features": Positive})
register_layer("batchnorm1d", nn.BatchNorm1d, lambda m: {"num_features": m.num_features},
               {"num_features": Positive})
register_layer("avgpool", nn.AvgPool2d, lambda m: {
    "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding},
    {"kernel_size": PAIR, "stride": PAIR, "padding": PAD})
register_layer("linf_dist", LinfDist, lambda m: {
    "in_features": m.in_features, "out_features": m.out_features, "p": p_to_json(m.p),
    "bias": m.bias is not None},
    {"in_features": Positive, "out_features": Positive, "p": P, "bias": bool})
register_layer("linf_dist_conv", LinfDistConv2d, lambda m: {
    "in_channels": m.in_channels, "out_channels": m.out_channels,
    "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
    "p": p_to_json(m.p), "bias": m.bias is not None},
    {"in_channels": Positive, "out_channels": Positive, "kernel_size": Positive,
     "stride": Positive, "padding": Count, "p": P, "bias": bool})
register_layer("mean_shift", MeanShift, lambda m: {
    "num_features": m.num_features, "momentum": m.momentum},
    {"num_features": Positive, "momentum": Fraction})
register_layer("negate", Negate)
register_layer("tanh", nn.Tanh)
register_layer("relu", nn.ReLU)
register_layer("minmax", MinMax)
register_layer("clipped_relu", ClippedReLU, lambda m: {"shape": list(m.shape)},
               {"shape": Annotated[list[Positive], Len(1)]})
register_layer("clipped_minmax", ClippedMinMax, lambda m: {"shape": list(m.shape)},
               {"shape": Annotated[list[Positive], Len(1)]})
register_layer("flatten", nn.Flatten)
register_layer("identity", nn.Identity)


def check_specs(specs: Any) -> None:
    """ConfigError unless ``specs`` is a non-empty list of layer specs, each of a registered
    type and fitting its schema."""
    if not isinstance(specs, list) or not specs:
        raise ConfigError("a layer spec must be a non-empty list")
    for index, spec in enumerate(specs):
        kind = spec.get("type") if isinstance(spec, dict) else None
        if not isinstance(kind, str) or kind not in LAYER_TYPES:
            raise ConfigError(f"unknown layer spec {repr(spec)[:80]} at layer {index}; known "
                              f"types: {sorted(LAYER_TYPES)}")
        validate(LAYER_SCHEMAS[kind], _fields(spec), f"bad layer spec: layer {index} ({kind})")


def _fields(spec: LayerSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "type"}


def _make(spec: LayerSpec, index: int) -> nn.Module:
    cls, _ = LAYER_TYPES[spec["type"]]
    try:
        return cls(**_fields(spec))
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"bad layer spec: layer {index} ({spec['type']}): "
                          f"{(str(err) or type(err).__name__).splitlines()[0]}") from err


def build_layers(specs: list[LayerSpec], input_shape: tuple[int, ...]) -> nn.Sequential:
    """Build the layers (every spec first checked against its type's schema) and record
    every conv's true input shape."""
    check_specs(specs)
    layers = nn.Sequential(*[_make(s, i) for i, s in enumerate(specs)])
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
