"""Interval bound propagation (Gowal et al. 2018, "On the Effectiveness of Interval Bound
Propagation for Training Verifiably Robust Models", Eqs. 5-6)."""

from __future__ import annotations

import torch
from torch import nn

from certnet.bounds.rules import LayerInput, check_supported, rule_for
from certnet.threat import ThreatModel


def interval_walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel
                  ) -> tuple[list[LayerInput], torch.Tensor]:
    """Propagate the threat model's box around ``x`` and ``x`` itself through every layer.

    Returns what each layer sees (``LayerInput`` i is layer i's input interval and clean
    input; the list has one more entry, the output) and the clean output. The clean pass
    calls the layers themselves (so BatchNorm updates its running statistics in training)."""
    check_supported(layers)
    lo, hi = threat.box(x)
    clean = x
    seen: list[LayerInput] = []
    for m in layers:
        inp = LayerInput(lo, hi, clean)
        seen.append(inp)
        lo, hi = rule_for(m).interval(m, inp)
        clean = m(clean)
    seen.append(LayerInput(lo, hi, clean))
    return seen, clean
