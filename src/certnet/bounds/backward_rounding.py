"""The rounding of a backward linear relaxation pass (docs/rounding.md): what each step's float
evaluation may lose, charged to the bound (CROWN's, and CROWN's patches mode)."""

from __future__ import annotations

import torch
from torch import nn

from certnet.bounds.rules import LayerInput
from certnet.errors import UnsupportedLayerError
from certnet.floats import eta, gamma


def rule_rho(rule, m: nn.Module, inp: LayerInput) -> torch.Tensor | float:
    """The rule's ``backward_error`` (an UnsupportedLayerError where it has none)."""
    rho = rule.backward_error(m, inp)
    if rho is None:
        raise UnsupportedLayerError(f"{type(m).__name__}: no bound on the rounding of its "
                                    "backward relaxation")
    return rho


def top_rho(rule, m: nn.Module, inp: LayerInput) -> torch.Tensor | float:
    """:func:`largest` of :func:`rule_rho`, per point, kept with ``inp`` (every backward pass
    through the layer on this interval charges it)."""
    return inp.memo((m, "top_rho"), lambda: largest(rule_rho(rule, m, inp)))


def top_sum_error(rule, m: nn.Module, inp: LayerInput) -> torch.Tensor | float | None:
    """:func:`largest` of the rule's ``sum_error`` per point (None: no fork), kept with
    ``inp``."""
    def compute():
        rho = rule.sum_error(m, inp)
        return None if rho is None else largest(rho)
    return inp.memo((m, "top_sum_error"), compute)


class Rounding:
    """What a backward pass's float evaluation may have lost, per point and specification row
    (docs/rounding.md): sum over the steps of sum_j |lam_j| rho_j <= ||lam||_1 max_j rho_j
    (the rules' ``backward_error``; the l1 norm is one read of lam, with no temporary, and
    the charges are ~1e-13 of the bounds, so the max costs nothing that matters), and the
    magnitudes of the constants, whose L additions and the final one with the concretized term
    round by at most gamma_{L+1} of their sum."""

    def __init__(self, like: torch.Tensor) -> None:
        self.dims = like.dim()
        self.error: torch.Tensor | float = 0.0
        self.constants: list[torch.Tensor] = []  # their magnitudes are summed when settling
        self.steps = 0
        self.terms = 1

    def charge(self, lam: torch.Tensor, top: torch.Tensor | float, inp: LayerInput) -> None:
        """Add ||lam||_1 top >= sum_j |lam_j| rho_j over the step's outputs (lam (B, S, *z);
        ``top``: the largest rho per point (B, 1), :func:`top_rho`; the l1 norm rounded up as
        :func:`l1_rows` does, in the same product), and :meth:`underflow` for its input
        ``inp``."""
        terms = lam.shape[2:].numel()
        if not isinstance(top, torch.Tensor) and not top:  # no read of lam for nothing
            self.charge_sum(0.0, terms, inp)
            return
        self._count(terms)
        start, factor = self.error + self.underflow(terms, inp), 1 + gamma(terms + 1, lam.dtype)
        norm = l1_rows(lam, False)
        self.error = torch.addcmul(start, norm, top, value=factor) \
            if isinstance(top, torch.Tensor) else start + norm * (factor * top)

    def charge_sum(self, error: torch.Tensor | float, terms: int, inp: LayerInput) -> None:
        """Add a step's charge computed by the caller (patches mode), on coefficients of
        ``terms`` entries per row."""
        self._count(terms)
        self.error = self.error + self.underflow(terms, inp) + error

    def _count(self, terms: int) -> None:
        self.steps += 1
        self.terms = max(self.terms, terms)

    def underflow(self, terms: int, inp: LayerInput) -> torch.Tensor:
        """What products may lose to underflow whatever lam: each new coefficient sums at most
        ``terms`` + 16 products (eta each), and so does the constant, against inputs of size
        at most the interval's magnitudes (sum_k H_k <= their number times the largest);
        kept with ``inp``."""
        dims = self.dims

        def compute() -> torch.Tensor:
            reach = inp.largest.view(-1, *([1] * (dims - 1))) * inp.lo.shape[1:].numel() + 1
            return (terms + 16) * eta(reach.dtype) * reach
        return inp.memo(("underflow", terms, dims), compute)

    def constant(self, c: torch.Tensor) -> None:
        self.constants.append(c)

    def settle(self, base: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """base + const minus everything the evaluation may have lost, itself rounded up:
        the charges (sums of at most ``terms`` products each, ``steps`` of them added) and
        the additions of the constants (their magnitudes summed in any order) and of the
        slack itself."""
        size = torch.stack(torch.broadcast_tensors(*self.constants)).abs().sum(0) \
            if self.constants else 0.0
        error = self.error * (1 + 2 * gamma(self.terms + self.steps + 2, base.dtype))
        slack = error + gamma(self.steps + 6, base.dtype) * (base.abs() + size + error)
        return base + const - slack


#: Coefficients up to which ``l1_rows`` sums |lam| (a temporary of lam's size; several times
#: faster than vector_norm's order-1 kernel on the CPU there); beyond, vector_norm (no temporary).
L1_TEMPORARY_ELEMENTS = 2 ** 22


def l1_rows(lam: torch.Tensor, rounded_up: bool = True) -> torch.Tensor:
    """||lam[b, s]||_1 (B, S), rounded up (n-term sums of non-negative terms, any order:
    gamma_n; ``rounded_up=False``: the float sum, for a caller that multiplies by
    1 + gamma_{n+1} itself)."""
    dims = tuple(range(2, lam.dim()))
    norm = lam.abs().sum(dims) if lam.numel() <= L1_TEMPORARY_ELEMENTS else \
        torch.linalg.vector_norm(lam, 1, dim=dims)
    return norm * (1 + gamma(lam.shape[2:].numel() + 1, lam.dtype)) if rounded_up else norm


def largest(rho: torch.Tensor | float) -> torch.Tensor | float:
    """max_j rho_j per point (B, 1) (rho (B, ...)), or the scalar."""
    if not isinstance(rho, torch.Tensor):
        return rho
    return rho.flatten(1).amax(1, keepdim=True) if rho.dim() > 1 else rho.amax().view(1, 1)
