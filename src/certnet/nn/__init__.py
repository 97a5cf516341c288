"""Lipschitz-aware layers (deel-torchlip style drop-ins)."""

from certnet.nn.activations import MinMax
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    LipschitzModule,
    Normalize,
    ResidualConv2d,
    convert_sequential,
    layer_bound,
    layer_estimate,
)

__all__ = [
    "LipschitzConv2d",
    "LipschitzLinear",
    "LipschitzModule",
    "MinMax",
    "Normalize",
    "ResidualConv2d",
    "convert_sequential",
    "layer_bound",
    "layer_estimate",
]
