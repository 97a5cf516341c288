"""GloRo nets (Leino, Wang, Fredrikson, ICML 2021, "Globally-Robust Neural Networks").

The network f = head o body gets an extra logit (Eq. 5 of the paper)

    y_bot = max_{i != j} y_i + eps * K_ij,   j = argmax y,   K_ij = ||w_j - w_i||_2 * Lip(body),

so ``argmax [y, y_bot] == j`` proves that no x' with ||x' - x||_2 <= eps changes the prediction.
Training uses power-iteration estimates of Lip(body); :meth:`certify_lipschitz` uses only the
sound float64 bounds of :mod:`certnet.nn.spectral`, a float64 forward pass whose rounding is
bounded (:mod:`certnet.nn.rounding`), and treats ties as not certified.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from certnet.errors import ConfigError
from certnet.methods.base import Certificate, CertifiedModel, register_method
from certnet.nn.integrity import Float64Twin, check_plain
from certnet.nn.lipschitz import (
    LipschitzLinear,
    check_bounded,
    convert_sequential,
    layer_bound,
    layer_estimate,
    product,
    trace_shapes,
)
from certnet.nn.rounding import float64_forward
from certnet.nn.spectral import BOUND_SLACK

LossName = Literal["ce", "trades", "emma"]
LOSSES = ("ce", "trades", "emma")
#: Relative slack on logit gaps at certification time, on top of the rigorous bound on the
#: float64 forward pass's rounding: covers the final subtractions, and float32 evaluation of
#: ordinary networks, with a wide margin.
GAP_SLACK = 1e-5
#: Power iterations (from the stored iterates) behind the estimate in ``lipschitz_report``.
REPORT_ITERATIONS = 20


def pairwise_lipschitz(head_weight: torch.Tensor, body_lipschitz: torch.Tensor) -> torch.Tensor:
    """K_ij = ||w_i - w_j||_2 * Lip(body): the Lipschitz constant of y_i - y_j (paper Eq. 4).
    The norms are taken of rows rescaled by the largest weight, so they do not underflow."""
    scale = head_weight.detach().abs().max().clamp_min(torch.finfo(head_weight.dtype).tiny)
    diff = (head_weight.unsqueeze(0) - head_weight.unsqueeze(1)) / scale
    return diff.norm(dim=-1) * scale * body_lipschitz


@dataclass
class SoundConstants:
    """Sound float64 Lipschitz bounds of a GloRo net: per layer, of the body, pairwise K."""

    layers: list[torch.Tensor]
    body: torch.Tensor
    pairwise: torch.Tensor

    @classmethod
    @torch.no_grad()
    def of(cls, layers: nn.Sequential) -> SoundConstants:
        bounds = [layer_bound(m) for m in layers]
        body = product(bounds[:-1])
        pairwise = pairwise_lipschitz(layers[-1].weight.double(), body) * (1 + BOUND_SLACK)
        return cls(bounds, body, pairwise)


def _round_down_float32(value: torch.Tensor) -> torch.Tensor:
    """float64 -> float32 rounding toward zero (values >= 0), so a radius never grows."""
    down = value.float()
    return torch.where(down.double() > value, torch.nextafter(down, torch.zeros_like(down)),
                       down)


def shifted_logits(logits: torch.Tensor, lipschitz: torch.Tensor, eps: torch.Tensor | float,
                   ref: torch.Tensor) -> torch.Tensor:
    """y_i + eps_i * K_{ref,i} for i != ref and -inf at ref (eps may be per point and class)."""
    shifted = logits + eps * lipschitz[ref]
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
    certifiers = {"lipschitz": "certify_lipschitz"}

    def __init__(self, layers: nn.Sequential, input_shape: tuple[int, ...], num_classes: int,
                 power_iterations: int = 10, loss: LossName = "ce") -> None:
        super().__init__(input_shape, num_classes)
        if type(layers[-1]) is not LipschitzLinear or layers[-1].out_features != num_classes:
            raise ConfigError(f"a GloRo net must end in a linear layer with {num_classes} outputs")
        if loss not in LOSSES:
            raise ConfigError(f"unknown GloRo loss {loss!r}; choose from {LOSSES}")
        for layer in layers[:-1]:
            check_bounded(layer)
        if trace_shapes(layers, input_shape) != (num_classes,):
            raise ConfigError(f"a GloRo net must map inputs {tuple(input_shape)} to "
                              f"{num_classes} logits (flatten before the linear layers)")
        self.layers = layers
        self._twin: Float64Twin | None = None
        self.power_iterations = power_iterations
        self.loss_name = loss

    @classmethod
    def from_sequential(cls, model: nn.Sequential, input_shape: tuple[int, ...],
                        **kwargs: Any) -> GloroNet:
        """A GloRo net from any plain ``nn.Sequential`` of supported layers (weights copied);
        the number of classes is the last linear layer's output size."""
        layers = convert_sequential(model, input_shape)
        return cls(layers, input_shape, layers[-1].out_features, **kwargs)

    @property
    def head(self) -> LipschitzLinear:
        return self.layers[-1]

    @property
    def body(self) -> nn.Sequential:
        return self.layers[:-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def method_config(self) -> dict[str, Any]:
        return {"power_iterations": self.power_iterations, "loss": self.loss_name}

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

    def sound_constants(self) -> SoundConstants:
        """Sound float64 bounds, computed on a float64 copy of the layers and recomputed
        whenever any weight or attribute has changed since (checked on every call)."""
        check_plain(self)
        if self._twin is None or not self._twin.matches(self.layers):
            self._twin = Float64Twin(self.layers, SoundConstants.of)
        return self._twin.derived

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
        logits = self(x)
        lipschitz = self.training_lipschitz()
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
            k_y = lipschitz[y]
            gap = (logits.gather(1, y.unsqueeze(1)) - logits).detach()
            scale = (gap / (eps * k_y).clamp_min(1e-12)).clamp(0.01, 1.0)
            emma = shifted_logits(logits, lipschitz, eps * scale, y)
            emma = emma.scatter(1, y.unsqueeze(1), logits.gather(1, y.unsqueeze(1)))
            loss = F.cross_entropy(emma, y)
        with torch.no_grad():
            pred = augmented.argmax(1)
            stats = {"clean": logits.argmax(1) == y, "robust": pred == y}
        return loss, stats

    # -- certification -------------------------------------------------------------------------
    @torch.no_grad()
    def certify_lipschitz(self, x: torch.Tensor, eps: float) -> Certificate:
        """Sound certificate of the exact-arithmetic network: a float64 forward pass whose
        rounding is bounded rigorously (:mod:`certnet.nn.rounding`), sound float64 K, and
        radius = min_i (lower bound on the gap y_j - y_i) / K_ji, rounded down. A pair whose
        K or gap is zero, NaN or infinite proves nothing (radius 0)."""
        sound = self.sound_constants()
        logits, error = float64_forward(self._twin.layers, x, sound.layers)
        pred = logits.argmax(1)
        top = logits.gather(1, pred.unsqueeze(1))
        # |error of y_j - y_i| <= |d_j| + |d_i| <= 2 ||d||_2 <= 2 E
        gap = top - logits - GAP_SLACK * (1 + top.abs() + logits.abs()) - 2 * error[:, None]
        k = sound.pairwise[pred]
        others = torch.ones_like(gap, dtype=torch.bool).scatter(1, pred.unsqueeze(1), False)
        valid = torch.isfinite(gap) & torch.isfinite(k) & (k > 0)
        pair_radius = torch.where(valid, gap / torch.where(valid, k, 1.0), 0.0).clamp_min(0)
        radius = torch.where(others, pair_radius, float("inf")).min(1).values
        radius = torch.nextafter(radius, torch.zeros_like(radius))  # the division rounds
        return Certificate(pred=pred, certified=radius > eps,
                           radius=_round_down_float32(radius))

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
