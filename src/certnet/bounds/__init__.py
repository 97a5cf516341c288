"""The bounds engine: per-layer rules (:mod:`.rules`), interval bound propagation
(:mod:`.ibp`), backward linear relaxation (:mod:`.crown`) and margin bounds
(:mod:`.margins`) over a :class:`certnet.threat.ThreatModel`."""

from certnet.bounds.crown import backward_bound, crown_walk
from certnet.bounds.ibp import interval_walk
from certnet.bounds.margins import (
    BOUND_METHODS,
    fused_training_loss,
    margin_bounds,
    margin_spec,
    margin_walk,
    training_bounds,
)
from certnet.bounds.rules import (
    SLOPES,
    BoundRule,
    LayerInput,
    check_supported,
    register_bound_rule,
    rule_for,
)

__all__ = ["BOUND_METHODS", "SLOPES", "BoundRule", "LayerInput",
           "backward_bound", "check_supported", "crown_walk", "fused_training_loss",
           "interval_walk", "margin_bounds",
           "margin_spec", "margin_walk", "register_bound_rule", "rule_for", "training_bounds"]
