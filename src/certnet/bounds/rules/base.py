"""The bound-rule interface (auto_LiRPA's ``operators/``: one bound class per operation with a
uniform interface) and what a layer sees, :class:`LayerInput`.

A rule knows two things about its layer h -> z:

* ``interval(m, inp)``: an interval containing z for every h in [inp.lo, inp.hi] (IBP, Gowal et
  al. 2018, Eq. 6: centre/radius form for affine maps, endpoints for monotone activations);
* ``backward(m, lam, inp, slope)``: given coefficients ``lam`` (B, S, *z.shape) of a linear lower
  bound lam . z, coefficients on h and a constant (B, S) with lam . z >= lam_h . h + const
  for every h in the interval (CROWN, Zhang et al. 2018, Thm 3.2; CROWN-IBP, Zhang et al. 2020).

Affine layers use their *effective* weight (e.g. the folded residual conv). Convolutions go
backward as transposed convolutions on the coefficient tensors, never as dense matrices.
A rule is the ``rule`` of its layer type's registration (:mod:`certnet.nn.layer_types`); what
the engine may do with it, it asks the rule (capabilities), never the rule's type.

Rigorous in floating point (certificates; docs/rounding.md): every rule also bounds its own
rounding, from the magnitudes that enter its operations (:mod:`certnet.floats`):

* ``interval_error``: how far the computed interval may fall inside the exact one, and the
  float forward pass of any input in it outside it: widened by it (and one ulp), the interval
  holds the layer's exact AND float outputs;
* ``backward_error``: rho (per output neuron) such that one ``backward`` step with any
  coefficients lam is off by at most sum_j |lam_j| rho_j, over the input interval;
* ``drift``: a bound on |float forward - exact forward| of the outputs, given that of the inputs.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

Slope = Literal["adaptive", "zero", "one", "same"]
SLOPES = ("adaptive", "zero", "one", "same")


@dataclass
class LayerInput:
    """What a layer sees: an interval [lo, hi] of its inputs and the unperturbed input."""

    lo: torch.Tensor
    hi: torch.Tensor
    clean: torch.Tensor | None
    _memo: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def memo(self, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, a quantity of this interval (and of the layer named in ``key``,
        whose weights must not change while the interval lives: one walk), computed once:
        the rounding charges of a rigorous walk read each layer's several times. Not kept
        where autograd records it (a training step's graph is used once)."""
        if key not in self._memo:
            value = compute()
            parts = value if isinstance(value, tuple) else (value,)
            if any(isinstance(v, torch.Tensor) and v.requires_grad for v in parts):
                return value
            self._memo[key] = value
        return self._memo[key]

    def rows(self, points: slice) -> LayerInput:
        """The interval (and clean input, where there is one) of the points ``points``."""
        return LayerInput(self.lo[points], self.hi[points],
                          None if self.clean is None else self.clean[points])

    @property
    def magnitude(self) -> torch.Tensor:
        """max(|lo|, |hi|): the largest |h| of each input over the interval (exact)."""
        return torch.maximum(self.lo.abs(), self.hi.abs())

    @functools.cached_property
    def largest(self) -> torch.Tensor:
        """Each point's largest |h| over the interval, shaped (B, 1, ...) to broadcast (read
        by every rounding charge on this input: computed once; ``lo`` and ``hi`` are never
        changed in place, a tightened interval is a new LayerInput)."""
        if self.lo.dim() == 1:  # one scalar per point (vector_norm would reduce dim=())
            return torch.maximum(self.lo.abs(), self.hi.abs())
        dims = tuple(range(1, self.lo.dim()))  # max |h| = max(|lo|, |hi|): both exact
        return torch.maximum(torch.linalg.vector_norm(self.lo, torch.inf, dims, keepdim=True),
                             torch.linalg.vector_norm(self.hi, torch.inf, dims, keepdim=True))


def channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-d float32 / half coefficient tensor in channels-last memory order (same values):
    oneDNN's transposed convolutions run about twice as fast on it, and the elementwise rules
    keep the order, so a backward pass converts once. float64 (no oneDNN kernel) is left as is."""
    if t.dim() == 4 and t.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return t.contiguous(memory_format=torch.channels_last)
    return t


class BoundRule:
    """Interface of a layer's bound rules. Activation rules (``activation = True``) relax
    using their input interval and say which neurons are ``unstable`` on it (where tighter
    intermediate bounds would help). A rule without a linear relaxation (``relaxable =
    False``: interval only) ends every backward pass at its output's interval.
    ``l2_lipschitz`` is a cheap l2 Lipschitz bound of the layer where one is known (else None):
    a ball of radius r around its clean input maps into one of radius r * L around its clean
    output; it is 1 for ``nonexpansive`` layers. ``patches`` names the form of its backward
    step in CROWN's patches mode (:mod:`certnet.bounds.crown_patches`: "conv", "relu",
    "channel", "identity"), None where it has none."""

    activation: bool = False
    relaxable: bool = True
    nonexpansive: bool = False
    #: ``interval`` is the exact range of the outputs over the input box, rounding aside
    #: (affine maps: the centre/radius form)
    range_interval: bool = False
    #: the image of a box is a box (each output a copy, or an affine function, of one input):
    #: intervals taken through the layer lose nothing
    keeps_boxes: bool = False
    #: ``interval`` is computed without rounding in any dtype (comparisons, clamps, reshapes).
    exact_interval: bool = False
    patches: str | None = None

    def l2_lipschitz(self, m: nn.Module, inp: LayerInput) -> torch.Tensor | float | None:
        return 1.0 if self.nonexpansive else None

    def needs_bounds(self, m: nn.Module) -> bool:
        """Whether its backward relaxation depends on its input interval (``activation``)."""
        return self.activation

    def is_relaxable(self, m: nn.Module) -> bool:
        """Whether it has a linear relaxation (``relaxable``)."""
        return self.relaxable

    def has_range_interval(self, m: nn.Module) -> bool:
        """Whether its interval is the exact range over a box (``range_interval``)."""
        return self.range_interval

    def maps_boxes_to_boxes(self, m: nn.Module) -> bool:
        """Whether the image of a box is a box (``keeps_boxes``)."""
        return self.keeps_boxes

    def sum_error(self, m: nn.Module, inp: LayerInput) -> torch.Tensor | float | None:
        """rho on the layer's input (broadcastable to (B, *h)) bounding what ``backward``
        loses by summing coefficients that reach one input from several outputs of the
        step (a fork): at most sum_i |lam_h_i| rho_i, charged after the step. None: no such
        sum (every input coefficient is computed once)."""
        return None

    def uses_batch_statistics(self, m: nn.Module) -> bool:
        """Whether the rules read ``LayerInput.clean``: the statistics of the clean batch
        (BatchNorm, mean shift in training), so no bound of one input holds alone."""
        return False

    def check(self, m: nn.Module, where: str) -> None:
        """UnsupportedLayerError (naming the layer as ``where``) if the rule does not cover
        the module's settings."""

    def slopes(self, m: nn.Module, inp: LayerInput, slope: Slope) -> torch.Tensor | None:
        """The lower slopes (B, *h) of the relaxation that alpha-CROWN may optimise (Xu et al.
        2021, §3.1: every value in [0, 1] is sound; ``backward`` takes them per specification
        row (B, S, *h) as ``slope``), CROWN's choice ``slope`` as the start; None where it has
        none."""
        return None

    def unstable(self, m: nn.Module, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(lo, dtype=torch.bool)

    def interval_error(self, m: nn.Module, inp: LayerInput) -> torch.Tensor | float | None:
        """A bound, per output, on how far ``interval(m, inp)`` computed in the dtype of
        ``inp`` may fall inside the exact interval of its input box, and the layer's float
        forward pass of any input in the box outside it, plus the rounding of the widening
        itself (u of the interval's magnitude): widening by it makes a walk rigorous. 0 for
        rules computed exactly (and exact forward passes); None if unknown."""
        return 0.0 if self.exact_interval else None

    def backward_error(self, m: nn.Module, inp: LayerInput) -> torch.Tensor | float | None:
        """rho, broadcastable to (B, *z): one ``backward`` step computed in the dtype of
        ``inp``, for any coefficients lam, satisfies lam . z >= lam_h . h + const - sum_j
        |lam_j| rho_j for every h in the interval (its slopes, products and constant round).
        None if unknown."""
        return None

    def drift(self, m: nn.Module, error: torch.Tensor, inp: LayerInput
              ) -> torch.Tensor | None:
        """Per output, a bound on |float forward - exact forward| of the layer at any input
        in the interval whose float value is off by at most ``error`` (per input). None if
        unknown."""
        return None

    def jacobian_masks(self, m: nn.Module, lo: torch.Tensor, hi: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Keep masks (of the input, of the output) such that the layer's Jacobian anywhere
        in the box [lo, hi] is diag(keep_out) A diag(keep_in) with ||A||_2 <= 1: outputs that
        are constant on the box, and inputs that only feed them, drop out of the local
        Lipschitz bound (Huang et al. 2021, §3). None where no such form is known."""
        return None

    @classmethod
    def finds_constant_outputs(cls) -> bool:
        """Whether its ``jacobian_masks`` exist (the rule defines them): local Lipschitz
        bounds gain only from layers whose outputs can be constant on a box."""
        return cls.jacobian_masks is not BoundRule.jacobian_masks

    def constancy_gap(self, m: nn.Module, lo: torch.Tensor, hi: torch.Tensor
                      ) -> torch.Tensor | None:
        """A differentiable distance of each output from being constant on the box [lo, hi]
        (0 where it is): the sparsity penalty of local-Lipschitz training. None if unknown."""
        return None

    def output_rows(self, m: nn.Module, rows: torch.Tensor, inp: LayerInput
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(A[rows], b[rows]) for the flat outputs ``rows`` of a layer z = A h + b whose A and b
        are entries of its parameters, exactly (a gather: CROWN's first step back from a
        layer's neurons); None where they are not (the step is then taken as a product)."""
        return None

    def interval(self, m: nn.Module, inp: LayerInput) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def backward(self, m: nn.Module, lam: torch.Tensor, inp: LayerInput, slope: Slope
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError
