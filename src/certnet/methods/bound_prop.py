"""Bound-propagation training: IBP (Gowal et al. 2018, "On the Effectiveness of Interval Bound
Propagation for Training Verifiably Robust Models") and CROWN-IBP (Zhang et al. 2020, "Towards
Stable and Efficient Training of Verifiably Robust Neural Networks").

Loss (Zhang et al. 2020, Eq. 10): kappa * CE(z(x), y) + (1 - kappa) * CE(-lb, y), where lb_j is
a lower bound of the margin z_y - z_j over the l_inf ball (lb_y = 0) and, for CROWN-IBP,
lb = beta * lb_CROWN-IBP + (1 - beta) * lb_IBP. kappa and beta are loss schedules; the fast
start of Shi et al. 2021 is the ``ibp`` init with BatchNorm (``cnn7``) and a short eps ramp.
CROWN-IBP's ``loss_fusion`` (Xu et al. 2020) bounds the robust cross-entropy itself with one
backward pass instead of one per margin (:func:`certnet.bounds.margins.fused_training_loss`).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds import SLOPES, check_supported, fused_training_loss, training_bounds
from certnet.errors import ConfigError
from certnet.methods.base import CertifiedModel, register_method
from certnet.threat import ThreatModel


def robust_logits(lower: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Worst-case logits z_j - z_y <= -lb_j as a (B, K) tensor with 0 at the label."""
    k = lower.shape[1] + 1
    out = lower.new_zeros(len(y), k)
    others = torch.arange(k, device=y.device).expand(len(y), -1)
    mask = others != y.unsqueeze(1)
    return out.masked_scatter(mask, -lower)


@register_method
class IBPNet(CertifiedModel):
    """A network trained with interval bounds; certified by any certifier that applies
    (``ibp`` by default: for IBP-trained networks it is usually the tightest and cheapest)."""

    method = "ibp"
    norm = "linf"
    init = "ibp"
    default_certifier = "ibp"
    needs_eps_ramp = True
    loss_fusion = False

    def __init__(self, layers: nn.Sequential, input_shape: tuple[int, ...], num_classes: int,
                 slope: Literal[SLOPES] = "adaptive") -> None:
        super().__init__(input_shape, num_classes)
        check_supported(layers)
        if slope not in SLOPES:
            raise ConfigError(f"unknown ReLU lower slope {slope!r}; choose from {SLOPES}")
        self.check_logits(layers)
        self.layers = layers
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def method_config(self) -> dict[str, Any]:
        return {"slope": self.slope}

    def _bound_loss(self, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float,
                    beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        threat = ThreatModel(self.norm, eps)
        if self.loss_fusion:  # lower: IBP's margins, for the stats
            bound, lower, logits = fused_training_loss(self.layers, x, threat, y, beta,
                                                       self.slope)
            robust = bound.mean()
        else:
            lower, logits = training_bounds(self.layers, x, threat, y, beta, self.slope)
            robust = F.cross_entropy(robust_logits(lower, y), y)
        loss = robust if kappa == 0 else kappa * F.cross_entropy(logits, y) + \
            (1 - kappa) * robust
        with torch.no_grad():
            stats = {"clean": logits.argmax(1) == y, "robust": (lower > 0).all(1)}
        return loss, stats

    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """kappa * CE(clean) + (1 - kappa) * CE(-lb_IBP) (Gowal et al. 2018, Eq. 12)."""
        return self._bound_loss(x, y, eps, kappa, 0.0)


@register_method
class CrownIBPNet(IBPNet):
    """CROWN-IBP: the IBP loss with beta * CROWN-IBP's tighter bound mixed in."""

    method = "crown-ibp"

    def __init__(self, layers: nn.Sequential, input_shape: tuple[int, ...], num_classes: int,
                 slope: Literal[SLOPES] = "adaptive", loss_fusion: bool = False) -> None:
        super().__init__(layers, input_shape, num_classes, slope)
        self.loss_fusion = bool(loss_fusion)

    def method_config(self) -> dict[str, Any]:
        return {**super().method_config(), "loss_fusion": self.loss_fusion}

    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float, kappa: float = 0.0,
             beta: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """kappa * CE(clean) + (1 - kappa) * CE(-(beta lb_CROWN-IBP + (1 - beta) lb_IBP))
        (Zhang et al. 2020, Eq. 10); with ``loss_fusion`` the robust term is the fused upper
        bound on CE over the threat set, and the "robust" stat counts IBP's certificates."""
        return self._bound_loss(x, y, eps, kappa, beta)
