"""GloRo nets (Leino, Wang, Fredrikson, ICML 2021, "Globally-Robust Neural Networks").

The network f = head o body gets an extra logit (Eq. 5 of the paper)

    y_bot = max_{i != j} y_i + eps * K_ij,   j = argmax y,   K_ij = ||w_j - w_i||_2 * Lip(body),

so ``argmax [y, y_bot] == j`` proves that no x' with ||x' - x||_2 <= eps changes the prediction.
Training uses power-iteration estimates of Lip(body); certification is the shared ``lipschitz``
certifier (:mod:`certnet.certifiers.lipschitz`: sound float64 bounds only, rounding bounded,
ties never certified), and any other certifier that applies (e.g. CROWN in l_inf).

``lipschitz="local"`` trains with local bounds instead (Huang et al. NeurIPS 2021): per point,
K_ij on the eps-ball from the activations that interval bounds prove constant there, plus a
sparsity penalty on the activations' distance from constancy; such models are certified by
``local-lipschitz`` (:mod:`certnet.certifiers.local_lipschitz`) by default.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from certnet.bounds.local import ball_box_shift, local_training_constants
from certnet.bounds.pairwise import (
    GAP_SLACK,
    SoundConstants,
    masked_pairwise,
    pairwise_lipschitz,
)
from certnet.errors import ConfigError
from certnet.methods.base import CertifiedModel, register_method
from certnet.nn.layer_types import layer_type
from certnet.nn.lipschitz import (
    LipschitzLinear,
    check_gloro_layer,
    layer_estimate,
    product,
)
from certnet.schema import Iterations, NonNegative
from certnet.threat import ThreatModel

__all__ = ["GAP_SLACK", "GloroNet", "SoundConstants", "bottom_logit", "pairwise_lipschitz",
           "shifted_logits"]

LOSSES = ("ce", "trades", "emma")
BOUNDS = ("global", "local")
#: Power iterations (from the stored iterates) behind the estimate in ``lipschitz_report``.
REPORT_ITERATIONS = 20


def pairwise_rows(lipschitz: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """K_{ref, i} per point (B, C) from shared (C, C) or per-point (B, C, C) constants."""
    if lipschitz.dim() == 2:
        return lipschitz[ref]
    return lipschitz[torch.arange(len(ref), device=ref.device), ref]


def shifted_logits(logits: torch.Tensor, lipschitz: torch.Tensor, eps: torch.Tensor | float,
                   ref: torch.Tensor) -> torch.Tensor:
    """y_i + eps_i * K_{ref,i} for i != ref and -inf at ref (eps may be per point and class;
    K shared (C, C) or per point (B, C, C))."""
    shifted = logits + eps * pairwise_rows(lipschitz, ref)
    return shifted.scatter(1, ref.unsqueeze(1), float("-inf"))


def bottom_logit(logits: torch.Tensor, lipschitz: torch.Tensor, eps: float,
                 ref: torch.Tensor | None = None) -> torch.Tensor:
    """y_bot (paper Eq. 5). Only the reference index is excluded, so a tie for the top makes
    y_bot >= y_j and the point is not certified (unlike gloro issue #9)."""
    ref = logits.argmax(1) if ref is None else ref
    return shifted_logits(logits, lipschitz, eps, ref).max(1).values


@register_method
class GloroNet(CertifiedModel):
    """A GloRo net over any ``nn.Sequential`` of Lipschitz layers ending in a LipschitzLinear."""

    method = "gloro"
    norm = "l2"
    default_certifier = "lipschitz"

    def __init__(self, layers: nn.Sequential, input_shape: tuple[int, ...], num_classes: int,
                 power_iterations: Iterations = 10, loss: Literal[LOSSES] = "ce",
                 lipschitz: Literal[BOUNDS] = "global", sparsity: NonNegative = 0.0,
                 local_iterations: Iterations = 2) -> None:
        super().__init__(input_shape, num_classes)
        if lipschitz not in BOUNDS:
            raise ConfigError(f"unknown GloRo lipschitz {lipschitz!r}; choose from {BOUNDS}")
        if lipschitz == "global" and sparsity:
            raise ConfigError("sparsity is a local-Lipschitz penalty: use lipschitz=local")
        if lipschitz == "local" and not any(
                (t := layer_type(m)) is not None and t.rule is not None and
                t.rule.finds_constant_outputs() for m in layers):
            raise ConfigError("lipschitz=local needs activations whose outputs can be constant "
                              "on a ball (relu, clipped-relu, clipped-minmax): with these layers "
                              "the local bounds equal the global ones at several times the cost; "
                              "e.g. --arch-arg activation=clipped-relu")
        if type(layers[-1]) is not LipschitzLinear or layers[-1].out_features != num_classes:
            raise ConfigError(f"a GloRo net must end in a linear layer with {num_classes} outputs")
        if loss not in LOSSES:
            raise ConfigError(f"unknown GloRo loss {loss!r}; choose from {LOSSES}")
        for layer in layers[:-1]:
            check_gloro_layer(layer)
        self.check_logits(layers)
        self.layers = layers
        self.power_iterations = power_iterations
        self.loss_name = loss
        self.lipschitz = lipschitz
        self.sparsity = float(sparsity)
        self.local_iterations = local_iterations
        if lipschitz == "local":
            self.default_certifier = "local-lipschitz"

    @property
    def head(self) -> LipschitzLinear:
        return self.layers[-1]

    @property
    def body(self) -> nn.Sequential:
        return self.layers[:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def method_config(self) -> dict[str, Any]:
        return {"power_iterations": self.power_iterations, "loss": self.loss_name,
                "lipschitz": self.lipschitz, "sparsity": self.sparsity,
                "local_iterations": self.local_iterations}

    # -- Lipschitz constants -------------------------------------------------------------------
    def body_estimate(self, iterations: int) -> torch.Tensor:
        return product([layer_estimate(m, iterations) for m in self.body])

    def body_bound(self) -> torch.Tensor:
        """Sound float64 bound of Lip(body)."""
        return self.sound_constants().body

    @torch.no_grad()
    def converge(self) -> None:
        """Run every layer's power iteration to convergence (before evaluation)."""
        for m in self.body:
            if hasattr(m, "converge"):
                m.converge()

    def training_lipschitz(self) -> torch.Tensor:
        """Pairwise K from power iteration (``power_iterations`` steps, persistent iterates)."""
        return pairwise_lipschitz(self.head.weight, self.body_estimate(self.power_iterations))

    def local_training_lipschitz(self, x: torch.Tensor, eps: float
                                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Logits, per-point pairwise K (B, C, C) on the eps-ball from masked power iteration
        (warm-started from each layer's global iterate, itself advanced ``power_iterations``
        steps) and the sparsity penalty. Estimates: training only. The rows of the predicted
        class are lowered to the box-constrained head's shift / eps where that is smaller
        (the local certificate's head, :func:`ball_box_shift`), so bottom_logit trains on it."""
        estimates = [layer_estimate(m, self.power_iterations) for m in self.layers]
        logits, bounds, ins, penalty, inputs = local_training_constants(
            self.layers, x, ThreatModel("l2", float(eps)), estimates, self.local_iterations)
        head = self.head.weight
        body = product(bounds[:-1])
        body = body.expand(len(x)) if isinstance(body, torch.Tensor) else \
            torch.full((len(x),), float(body), dtype=logits.dtype, device=logits.device)
        pairwise = masked_pairwise(head, ins[-1]) * body.view(-1, 1, 1)
        if float(eps) > 0:
            ref = logits.argmax(1)
            clean = inputs.clean.flatten(1)
            shift = ball_box_shift(head.unsqueeze(0) - head[ref].unsqueeze(1), float(eps) * body,
                                   inputs.lo.flatten(1) - clean, inputs.hi.flatten(1) - clean)
            rows = torch.arange(len(x), device=x.device)
            pairwise = pairwise.index_put((rows, ref), torch.minimum(pairwise[rows, ref],
                                                                     shift / float(eps)))
        return logits, pairwise, penalty

    def sound_constants(self) -> SoundConstants:
        """Sound float64 bounds, computed on a float64 copy of the layers and recomputed
        whenever any weight or attribute has changed since (checked on every call)."""
        return self.float64_copy("lipschitz", SoundConstants.of).derived

    def sound_lipschitz(self) -> torch.Tensor:
        """Pairwise K in float64 from guaranteed upper bounds only."""
        return self.sound_constants().pairwise

    # -- training ------------------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, eps: float, trades_lambda: float = 1.0
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GloRo losses on [y, y_bot]: ``ce`` (paper §4), ``trades`` (CE(clean) + lambda *
        KL(softmax([y, 0]) || softmax([y, y_bot])), paper §5), ``emma`` (Hu et al. 2023:
        each non-label logit shifted by its own eps_i = eps * clip(gap_i / (eps K_yi), .01, 1),
        gap detached, then CE)."""
        penalty = None
        if self.lipschitz == "local":
            logits, lipschitz, penalty = self.local_training_lipschitz(x, eps)
        else:
            logits, lipschitz = self(x), self.training_lipschitz()
        bot = bottom_logit(logits, lipschitz, eps)
        augmented = torch.cat([logits, bot.unsqueeze(1)], dim=1)
        if self.loss_name == "ce":
            loss = F.cross_entropy(augmented, y)
        elif self.loss_name == "trades":
            # KL(p || q) with p = softmax(y) (bot gets probability 0), q = softmax([y, y_bot]);
            # written with log-probabilities so an underflowing p_i gives 0, not 0/0 = NaN.
            log_p = F.log_softmax(logits, dim=1)
            log_q = F.log_softmax(augmented, dim=1)[:, :-1]
            robust = (log_p.exp() * (log_p - log_q)).sum(1).mean()
            loss = F.cross_entropy(logits, y) + trades_lambda * robust
        else:
            k_y = pairwise_rows(lipschitz, y)
            gap = (logits.gather(1, y.unsqueeze(1)) - logits).detach()
            scale = (gap / (eps * k_y).clamp_min(1e-12)).clamp(0.01, 1.0)
            emma = shifted_logits(logits, lipschitz, eps * scale, y)
            emma = emma.scatter(1, y.unsqueeze(1), logits.gather(1, y.unsqueeze(1)))
            loss = F.cross_entropy(emma, y)
        if penalty is not None and self.sparsity:
            loss = loss + self.sparsity * penalty
        with torch.no_grad():
            pred = augmented.argmax(1)
            stats = {"clean": logits.argmax(1) == y, "robust": pred == y}
        return loss, stats

    def lipschitz_summary(self, report: dict[str, float]) -> str:
        return (f"Lipschitz constant (all layers but the last): power-iteration estimate "
                f"{report['body_estimate']:.5g}, sound bound {report['body_bound']:.5g} "
                f"(bound/estimate {report['bound_over_estimate']:.4f})")

    def lipschitz_report(self) -> dict[str, float]:
        """Power-iteration estimate (``REPORT_ITERATIONS`` steps from the stored iterates)
        against the sound bound of Lip(body) and of the largest pairwise K."""
        with torch.no_grad():
            estimate = float(self.body_estimate(REPORT_ITERATIONS))
        sound = self.sound_constants()
        bound = float(sound.body)
        k_est = pairwise_lipschitz(self.head.weight.detach().double(),
                                   torch.tensor(estimate, dtype=torch.float64))
        return {
            "body_estimate": estimate,
            "body_bound": bound,
            "bound_over_estimate": bound / estimate if estimate > 0 else float("inf"),
            "max_pairwise_estimate": float(k_est.max()),
            "max_pairwise_bound": float(sound.pairwise.max()),
        }
