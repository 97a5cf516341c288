"""The bound rules (one per exact layer type, held by its registration
:class:`certnet.nn.layer_types.LayerType`): interface (:mod:`.base`), affine rules (:mod:`.affine`),
ReLU relaxation maths (:mod:`.relaxation`), activations (:mod:`.activations`), smooth
activations (:mod:`.smooth`), LeakyReLU and max pooling (:mod:`.piecewise`), l_p-dist and
companions (:mod:`.linf_dist`), constant padding (:mod:`.pad`) and elementwise arithmetic with
constants (:mod:`.scale`)."""

from __future__ import annotations

from torch import nn

from certnet.bounds.rules import activations, affine, linf_dist, piecewise, smooth
from certnet.bounds.rules.affine import AffineRule
from certnet.bounds.rules.base import SLOPES, BoundRule, LayerInput, Slope
from certnet.bounds.rules.graph_step import StepRule
from certnet.bounds.rules.pad import PadRule
from certnet.bounds.rules.scale import ScaleRule
from certnet.errors import UnsupportedLayerError
from certnet.graph.lower import Step
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.layer_types import BY_CLASS, LayerType, layer_type, register_layer_type
from certnet.nn.linf_dist import LinfDist, LinfDistConv2d, MeanShift, Negate
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, Normalize, ResidualConv2d
from certnet.nn.pad import TORCH_PADS, Pad
from certnet.nn.reshape import Reshape
from certnet.nn.scale import Scale
from certnet.nn.smooth import Erf

__all__ = ["SLOPES", "AffineRule", "BoundRule", "LayerInput", "Slope", "check_supported",
           "register_bound_rule", "rule_for"]


def register_bound_rule(cls: type[nn.Module], rule: BoundRule) -> None:
    """Bound layers of exactly type ``cls`` (never subclasses) with ``rule``: the ``rule`` of
    its registration (a bare one if it has none)."""
    (layer_type(cls) or register_layer_type(LayerType(cls))).rule = rule


def rule_for(m: nn.Module) -> BoundRule:
    known = layer_type(m)
    if known is None or known.rule is None:
        raise UnsupportedLayerError(
            f"no bound rule for layer {type(m).__name__}; supported: "
            f"{sorted(c.__name__ for c, t in BY_CLASS.items() if t.rule is not None)} "
            "(certnet.bounds.register_bound_rule)")
    return known.rule


def check_supported(layers: nn.Sequential) -> None:
    """UnsupportedLayerError naming the first layer without a bound rule or with settings its
    rule does not cover (the rule's ``check``)."""
    for i, m in enumerate(layers):
        rule_for(m).check(m, f"layer {i} ({type(m).__name__})")


#: (exact layer classes, their rule's class): one rule instance per class
_RULES = (((nn.Linear, LipschitzLinear), affine.LinearRule),
          ((nn.Conv2d, LipschitzConv2d), affine.ConvRule),
          ((ResidualConv2d,), affine.ResidualConvRule),
          ((nn.BatchNorm1d, nn.BatchNorm2d), affine.BatchNormRule),
          ((Normalize,), affine.NormalizeRule), ((nn.AvgPool2d,), affine.AvgPoolRule),
          ((nn.Flatten, Reshape), affine.FlattenRule), ((nn.ReLU,), activations.ReLURule),
          ((MinMax,), activations.MinMaxRule), ((ClippedReLU,), activations.ClippedReLURule),
          ((ClippedMinMax,), activations.ClippedMinMaxRule),
          ((nn.Identity,), affine.IdentityRule), ((LinfDist,), linf_dist.LinfDistRule),
          ((LinfDistConv2d,), linf_dist.LinfDistConvRule),
          ((MeanShift,), linf_dist.MeanShiftRule), ((Negate,), linf_dist.NegateRule),
          ((nn.Tanh,), smooth.TanhRule), ((nn.Sigmoid,), smooth.SigmoidRule),
          ((Erf,), smooth.ErfRule), ((nn.GELU,), smooth.GELURule),
          ((nn.SiLU,), smooth.SiLURule),
          ((nn.LeakyReLU,), piecewise.LeakyReLURule), ((nn.MaxPool2d,), piecewise.MaxPoolRule),
          ((Pad, *TORCH_PADS), PadRule), ((Scale,), ScaleRule),
          ((Step,), StepRule))
for _classes, _rule in _RULES:
    for _cls in _classes:
        register_bound_rule(_cls, _rule())
