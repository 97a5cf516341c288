"""Architectures as plain JSON layer lists, so a checkpoint describes its network without code.

Each entry is ``{"type": ..., **hyperparameters}``; :func:`build_layers` turns a list into an
``nn.Sequential`` of Lipschitz layers, :func:`describe_layers` does the reverse. A method that
brings its own layer (e.g. an l_inf-dist neuron) calls :func:`register_layer` once, with the
schema of the hyperparameters a spec may set: nothing else reaches the constructor.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable
from typing import Any, Literal, Union, get_args, get_origin

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
#: A spec field's declared type: ``int``, ``bool``, ``float`` (finite; an int is accepted),
#: ``str``, ``Literal[...]``, ``list[T]`` / ``tuple[T, ...]`` / ``tuple[T, T]`` (JSON arrays of
#: T) or a union ``A | B``. A bool is never an int or a float.
Schema = dict[str, Any]
#: spec type -> (module class, hyperparameters of a module)
LAYER_TYPES: dict[str, tuple[type[nn.Module], Callable[[Any], dict[str, Any]]]] = {}
#: spec type -> the fields a spec may set and their types (none for a type without a schema)
LAYER_SCHEMAS: dict[str, Schema] = {}


def register_layer(name: str, cls: type[nn.Module],
                   describe: Callable[[Any], dict[str, Any]] = lambda m: {},
                   schema: Schema | None = None) -> None:
    """Make ``cls`` storable in checkpoints as ``{"type": name, **describe(module)}``; it is
    rebuilt as ``cls(**hyperparameters)`` once every field conforms to ``schema`` (field ->
    declared type, see ``Schema``; fields it does not name are refused)."""
    LAYER_TYPES[name] = (cls, describe)
    LAYER_SCHEMAS[name] = dict(schema or {})


#: an int or a pair of ints (a pooling window, stride or padding)
PAIR = int | tuple[int, int]
register_layer("conv", LipschitzConv2d, lambda m: {
    "in_channels": m.in_channels, "out_channels": m.out_channels,
    "kernel_size": m.kernel_size[0], "stride": m.stride[0], "padding": m.padding[0],
    "bias": m.bias is not None},
    {"in_channels": int, "out_channels": int, "kernel_size": int, "stride": int, "padding": int,
     "bias": bool})
register_layer("residual_conv", ResidualConv2d, lambda m: {
    "channels": m.in_channels, "kernel_size": m.kernel_size[0], "alpha": m.alpha,
    "bias": m.bias is not None},
    {"channels": int, "kernel_size": int, "alpha": float, "bias": bool})
register_layer("linear", LipschitzLinear, lambda m: {
    "in_features": m.in_features, "out_features": m.out_features, "bias": m.bias is not None},
    {"in_features": int, "out_features": int, "bias": bool})
register_layer("normalize", Normalize, lambda m: {
    "mean": m.mean.flatten().tolist(), "std": m.std.flatten().tolist()},
    {"mean": list[float], "std": list[float]})
register_layer("batchnorm2d", nn.BatchNorm2d, lambda m: {"num_features": m.num_features},
               {"num_features": int})
register_layer("batchnorm1d", nn.BatchNorm1d, lambda m: {"num_features": m.num_features},
               {"num_features": int})
register_layer("avgpool", nn.AvgPool2d, lambda m: {
    "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding},
    {"kernel_size": PAIR, "stride": PAIR, "padding": PAIR})
register_layer("linf_dist", LinfDist, lambda m: {
    "in_features": m.in_features, "out_features": m.out_features, "p": p_to_json(m.p),
    "bias": m.bias is not None},
    {"in_features": int, "out_features": int, "p": float | Literal["inf"], "bias": bool})
register_layer("linf_dist_conv", LinfDistConv2d, lambda m: {
    "in_channels": m.in_channels, "out_channels": m.out_channels,
    "kernel_size": m.kernel_size, "stride": m.stride, "padding": m.padding,
    "p": p_to_json(m.p), "bias": m.bias is not None},
    {"in_channels": int, "out_channels": int, "kernel_size": int, "stride": int,
     "padding": int, "p": float | Literal["inf"], "bias": bool})
register_layer("mean_shift", MeanShift, lambda m: {
    "num_features": m.num_features, "momentum": m.momentum},
    {"num_features": int, "momentum": float})
register_layer("negate", Negate)
register_layer("tanh", nn.Tanh)
register_layer("relu", nn.ReLU)
register_layer("minmax", MinMax)
register_layer("clipped_relu", ClippedReLU, lambda m: {"shape": list(m.shape)},
               {"shape": list[int]})
register_layer("clipped_minmax", ClippedMinMax, lambda m: {"shape": list(m.shape)},
               {"shape": list[int]})
register_layer("flatten", nn.Flatten)
register_layer("identity", nn.Identity)


def conforms(value: Any, kind: Any) -> bool:
    """Whether a (JSON) value has the declared type ``kind`` (see ``Schema``)."""
    origin, args = get_origin(kind), get_args(kind)
    if origin in (types.UnionType, Union):  # A | B; Union when B is a Literal
        return any(conforms(value, k) for k in args)
    if origin is Literal:
        return any(type(value) is type(a) and value == a for a in args)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(map(conforms, value, args))
        return all(conforms(v, args[0]) for v in value)
    if kind is float:
        return type(value) is int or (type(value) is float and math.isfinite(value))
    return type(value) is kind


def _type_name(kind: Any) -> str:
    if get_origin(kind) in (types.UnionType, Union):
        return " | ".join(_type_name(k) for k in get_args(kind))
    return kind.__name__ if isinstance(kind, type) else str(kind).replace("typing.", "")


def _make(spec: LayerSpec, index: int) -> nn.Module:
    kind = spec.get("type") if isinstance(spec, dict) else None
    if not isinstance(kind, str) or kind not in LAYER_TYPES:
        raise ConfigError(f"unknown layer spec {repr(spec)[:80]} at layer {index}; known "
                          f"types: {sorted(LAYER_TYPES)}")
    schema = LAYER_SCHEMAS.get(kind, {})
    where = f"bad layer spec: layer {index} ({kind})"
    fields = {k: v for k, v in spec.items() if k != "type"}
    for key, value in fields.items():
        if key not in schema:
            raise ConfigError(f"{where}: unknown field {key!r}; allowed: {sorted(schema)}")
        if not conforms(value, schema[key]):
            raise ConfigError(f"{where}: field {key!r} must be {_type_name(schema[key])}, got "
                              f"{repr(value)[:60]}")
    cls, _ = LAYER_TYPES[kind]
    try:
        return cls(**fields)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ConfigError(f"{where}: {(str(err) or type(err).__name__).splitlines()[0]}"
                          ) from err


def build_layers(specs: list[LayerSpec], input_shape: tuple[int, ...]) -> nn.Sequential:
    """Build the layers (each spec checked against its type's schema) and record every
    conv's true input shape."""
    if not isinstance(specs, list) or not specs:
        raise ConfigError("a layer spec must be a non-empty list")
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
