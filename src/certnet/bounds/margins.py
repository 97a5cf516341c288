"""Margin bounds of a classifier over an input set: the specification C of margins
z_ref - z_j (Zhang et al. 2020, Eq. 3) bounded by IBP, CROWN-IBP, full CROWN or alpha-CROWN
(full CROWN's intermediate bounds, the last pass's ReLU slopes optimised)."""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from certnet.bounds.alpha_crown import optimized_bound
from certnet.bounds.crown import affine_tail, backward_bound, crown_walk
from certnet.bounds.ibp import interval_walk
from certnet.bounds.rules import LayerInput, Slope
from certnet.threat import ThreatModel

BoundMethod = Literal["ibp", "crown-ibp", "crown", "alpha-crown"]
BOUND_METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")


def margin_spec(ref: torch.Tensor, num_classes: int) -> torch.Tensor:
    """C of shape (B, K - 1, K): row j is e_ref - e_j for the K - 1 classes j != ref."""
    eye = torch.eye(num_classes, dtype=torch.get_default_dtype(), device=ref.device)
    others = torch.arange(num_classes, device=ref.device).expand(len(ref), -1)
    others = others[others != ref.unsqueeze(1)].view(len(ref), num_classes - 1)
    return eye[ref].unsqueeze(1) - eye[others]


def margin_bounds(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                  ref: torch.Tensor, method: BoundMethod = "ibp", slope: Slope = "adaptive"
                  ) -> torch.Tensor:
    """Lower bounds (B, K - 1) on z_ref - z_j over the threat model around ``x``, j != ref."""
    return margin_walk(layers, x, threat, ref, method, slope)[0]


def margin_walk(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                ref: torch.Tensor | None, method: BoundMethod = "ibp",
                slope: Slope = "adaptive"
                ) -> tuple[torch.Tensor, list[LayerInput], torch.Tensor | None]:
    """:func:`margin_bounds` with the walk it used: ``(lower, seen, logits)``; ``ref=None``
    takes the argmax of the clean logits. Given ``ref``, IBP and CROWN-IBP skip the clean
    pass where their bounds do not use it (``logits`` is then None)."""
    seen, logits = crown_walk(layers, x, threat, slope) if method in ("crown", "alpha-crown") \
        else interval_walk(layers, x, threat, with_clean=ref is None)
    ref = logits.argmax(1) if ref is None else ref
    spec = margin_spec(ref, seen[-1].lo.shape[1]).to(seen[-1].lo.dtype)
    if method == "alpha-crown":
        return optimized_bound(layers, seen, spec, x, threat, slope), seen, logits
    stop = affine_tail(layers) if method == "ibp" else 0
    return backward_bound(layers, seen, spec, x, threat, slope, stop=stop), seen, logits


def training_bounds(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                    y: torch.Tensor, beta: float, slope: Slope = "adaptive"
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """CROWN-IBP's training bound (Zhang et al. 2020, Eq. 9): beta * lb_CROWN-IBP +
    (1 - beta) * lb_IBP from one interval walk (CROWN skipped when beta == 0), and the
    clean logits of that walk."""
    seen, logits = interval_walk(layers, x, threat)
    spec = margin_spec(y, logits.shape[1]).to(logits.dtype)
    lower = 0.0
    if beta < 1:
        lower = (1 - beta) * backward_bound(layers, seen, spec, x, threat, slope,
                                            stop=affine_tail(layers))
    if beta > 0:
        lower = lower + beta * backward_bound(layers, seen, spec, x, threat, slope)
    return lower, logits
