"""l_inf-dist nets (Zhang et al. 2021, "Towards Certifying L-infinity Robustness using Neural
Networks with L-inf-dist Neurons"; v2: Zhang et al. 2022, "Boosting the Certified Robustness of
L-infinity Distance Nets").

The network is a stack of l_p-dist layers (:mod:`certnet.nn.linf_dist`) with mean shifts, ending
in -u (the pure net) or in a small ordinary head (v2's hybrid). The model keeps p itself: held at
``p_start``, grown geometrically to ``p_end`` between progress ``p_begin`` and ``p_finish``, then
inf (the reference's schedule; with ``p_pow2`` rounded to the nearest power of two, which the
CPU kernel computes exactly by squaring).

Training bound: the l_p-dist body is treated as 1-Lipschitz in l_inf (exact at p = inf, the
papers' surrogate before), so its output h moves by at most eps * L (L: the Normalize layer's
1/std); interval bounds through the head from that box give margin lower bounds lb_j of
z_y - z_j (for the pure net, o_y - o_j - 2 eps L). Loss (v2, §4; ``loss="mixture"``):
mean_b max_j clamp(-lb_j / theta, 0, 1) + lam * CE(s * z, y), theta = 2 eps L, s a learnable
output scale: zero once a point is certified at the training eps, saturated once its clean
margin is gone; ``loss="hinge"`` (v1) leaves the hinge unclipped.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from certnet.bounds import margin_bounds
from certnet.bounds.linf_lipschitz import linf_lipschitz
from certnet.errors import ConfigError
from certnet.methods.base import CertifiedModel, register_method
from certnet.nn.linf_dist import (
    LinfDist,
    LinfDistConv2d,
    MeanShift,
    check_p,
    dist_layers,
    p_to_json,
)
from certnet.schedules import Ramp
from certnet.schema import Fraction, NonNegative
from certnet.threat import ThreatModel

LOSSES = ("mixture", "hinge")
#: an end of the p ramp: a finite p (p is inf once the ramp is done)
PRamp = Annotated[float, Field(ge=1)]


def body_end(layers: nn.Sequential) -> int:
    """Index just past the last l_p-dist layer and the mean shift that follows it."""
    last = max((i for i, m in enumerate(layers) if type(m) in (LinfDist, LinfDistConv2d)),
               default=-1)
    if last < 0:
        raise ConfigError("an l_inf-dist net needs at least one LinfDist layer")
    return last + 2 if last + 1 < len(layers) and type(layers[last + 1]) is MeanShift \
        else last + 1


@register_method
class LinfDistNet(CertifiedModel):
    """An l_inf-dist net (pure or hybrid); certified by ``best`` (the l_inf Lipschitz margin,
    then interval bounds)."""

    method = "linf-dist"
    norm = "linf"
    init = "linf-dist"
    default_certifier = "best"
    skips_parameters = True  # the output scale, without the CE term (lam = 0)

    def __init__(self, layers: nn.Sequential, input_shape: tuple[int, ...], num_classes: int,
                 loss: Literal[LOSSES] = "mixture", p_start: PRamp = 8.0, p_end: PRamp = 1000.0,
                 p_begin: Fraction = 0.0, p_finish: Fraction = 0.9, p_pow2: bool = True,
                 scale_lr: NonNegative = 0.2) -> None:
        super().__init__(input_shape, num_classes)
        if loss not in LOSSES:
            raise ConfigError(f"unknown l_inf-dist loss {loss!r}; choose from {LOSSES}")
        self.check_logits(layers)
        self.layers = layers
        self.split = body_end(layers)
        try:
            self.body_lipschitz()
        except ValueError as err:
            raise ConfigError(f"the l_inf-dist body: {err}") from err
        check_p(p_start), check_p(p_end)
        self.p_ramp = Ramp(float(p_start), float(p_end), p_begin, p_finish, "exp")
        self.loss_name, self.p_pow2, self.scale_lr = loss, bool(p_pow2), float(scale_lr)
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def method_config(self) -> dict[str, Any]:
        r = self.p_ramp
        return {"loss": self.loss_name, "p_start": r.start, "p_end": r.end, "p_begin": r.begin,
                "p_finish": r.finish, "p_pow2": self.p_pow2, "scale_lr": self.scale_lr}

    def param_groups(self) -> list[dict[str, Any]]:
        """The output scale learns at ``scale_lr`` times the learning rate (v2: 0.006 vs
        0.03)."""
        rest = [p for name, p in self.named_parameters() if name != "scale"]
        return [{"params": rest}, {"params": [self.scale], "lr_scale": self.scale_lr}]

    def p_at(self, progress: float) -> float:
        """p of every l_p-dist layer at training ``progress``: inf once the ramp is done."""
        if progress >= self.p_ramp.finish:
            return math.inf
        p = self.p_ramp(progress)
        return 2.0 ** round(math.log2(p)) if self.p_pow2 else p

    def on_progress(self, progress: float) -> dict[str, Any]:
        p = self.p_at(progress)
        for m in dist_layers(self.layers):
            m.p = p
        return {"p": p_to_json(p)}

    def body_lipschitz(self) -> float:
        """The body's l_inf Lipschitz constant from its current layers, every l_p-dist layer
        counted as at p = inf (L in the module docstring)."""
        return linf_lipschitz(self.layers[:self.split], dist_at_inf=True)

    def training_margins(self, x: torch.Tensor, y: torch.Tensor, eps: float
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower bounds (B, K - 1) of z_y - z_j with the body treated as 1-Lipschitz (see the
        module docstring), and the clean logits."""
        return self._margins(x, y, float(eps) * self.body_lipschitz())

    def _margins(self, x: torch.Tensor, y: torch.Tensor, reach: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`training_margins` with the body's output moving by at most ``reach``."""
        h = self.layers[:self.split](x)
        head = self.layers[self.split:]
        lower = margin_bounds(head, h, ThreatModel("linf", reach, -math.inf, math.inf), y,
                              "ibp")
        return lower, head(h)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float, lam: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Clipped (``mixture``, v2) or plain (``hinge``, v1) hinge on the margin bounds plus
        ``lam`` * CE(scale * logits)."""
        reach = float(eps) * self.body_lipschitz()
        lower, logits = self._margins(x, y, reach)
        theta = max(2 * reach, 1e-12)
        hinge = -lower / theta
        hinge = hinge.clamp(0, 1) if self.loss_name == "mixture" else hinge.clamp_min(0)
        loss = hinge.amax(1).mean() if hinge.shape[1] else hinge.new_zeros(())
        if lam:
            loss = loss + lam * F.cross_entropy(self.scale * logits, y)
        with torch.no_grad():
            stats = {"clean": logits.argmax(1) == y, "robust": (lower > 0).all(1)}
        return loss, stats
