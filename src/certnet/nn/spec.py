"""Architectures as plain JSON layer lists, so a checkpoint describes its network without code.

Each entry is ``{"type": ..., **hyperparameters}``; :func:`build_layers` turns a list into an
``nn.Sequential`` of Lipschitz layers, :func:`describe_layers` does the reverse. A layer type
registered with a spec ``name`` (:func:`certnet.nn.layer_types.register_layer_type`) gives the
schema of the hyperparameters a spec sets: nothing else reaches the constructor.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from certnet.errors import ConfigError, UnsupportedLayerError
from certnet.nn import activations, linf_dist, lipschitz, reshape  # noqa: F401  (registrations)
from certnet.nn.layer_types import LAYER_TYPES, layer_type
from certnet.nn.lipschitz import trace_shapes
from certnet.schema import validate

LayerSpec = dict[str, Any]


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
        validate(LAYER_TYPES[kind].fields, _fields(spec),
                 f"bad layer spec: layer {index} ({kind})")


def _fields(spec: LayerSpec) -> dict[str, Any]:
    return {k: v for k, v in spec.items() if k != "type"}


def _make(spec: LayerSpec, index: int) -> nn.Module:
    cls = LAYER_TYPES[spec["type"]].cls
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
    specs: list[LayerSpec] = []
    for m in layers:
        known = layer_type(m)
        if known is None or known.name is None:
            raise UnsupportedLayerError(f"cannot describe layer {type(m).__name__}")
        specs.append({"type": known.name, **known.describe(m)})
    return specs
