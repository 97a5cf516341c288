"""Bound rules of a lowered graph node (:class:`certnet.graph.lower.Step`) and of the operators
that join branches (a residual :class:`Add`, a :class:`Concat`): auto_LiRPA's graph idea (one
coefficient per input, coefficients from several consumers summed) on certnet's chain
engine. A step's rule slices the state into its slots, lets the operator's own rule bound
the slots it reads, passes the kept slots through unchanged (exactly), and charges the one
new rounding: the sum of coefficients where a slot is both kept and read (a fork), or read
twice.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from certnet.bounds.rules.base import BoundRule, LayerInput, Slope
from certnet.errors import UnsupportedLayerError
from certnet.floats import gamma
from certnet.graph.lower import Step
from certnet.graph.ops import Add, Concat


class JoinRule:
    """Rules of an operator of several inputs ``inps`` (the interface of :class:`BoundRule`
    with a list of inputs; ``backward`` returns one coefficient tensor per input)."""

    def interval(self, m: nn.Module, inps: list[LayerInput]
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def interval_error(self, m: nn.Module, inps: list[LayerInput]) -> torch.Tensor | float:
        raise NotImplementedError

    def backward(self, m: nn.Module, lam: torch.Tensor, inps: list[LayerInput]
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
        raise NotImplementedError

    def drift(self, m: nn.Module, errors: list[torch.Tensor], inps: list[LayerInput]
              ) -> torch.Tensor:
        raise NotImplementedError


class AddRule(JoinRule):
    """z = a + b. Intervals add end to end; backward, lam . z = lam . a + lam . b exactly (no
    constant, no rounding). One rounding per output: the computed ends are within u |z| of the
    exact ones, and the float sum of any a, b in the boxes within u |a + b| of the exact."""

    def interval(self, m, inps):
        a, b = inps
        return a.lo + b.lo, a.hi + b.hi

    def interval_error(self, m, inps):
        a, b = inps
        # the two ends, the float sum and the widening: 4 roundings of |z| <= |a| + |b|
        return gamma(4, a.lo.dtype) * (a.magnitude + b.magnitude)

    def backward(self, m, lam, inps):
        return [lam, lam], lam.new_zeros(lam.shape[:2])

    def drift(self, m, errors, inps):
        a, b = inps
        # |fl(a' + b') - (a + b)| <= e_a + e_b + u |a' + b'|, |a' + b'| within the boxes
        return (errors[0] + errors[1]) * (1 + gamma(4, a.lo.dtype)) + \
            gamma(4, a.lo.dtype) * (a.magnitude + b.magnitude)


class ConcatRule(JoinRule):
    """z = cat(inputs) along ``m.dim``: everything exact, coefficients split."""

    def interval(self, m, inps):
        return torch.cat([i.lo for i in inps], m.dim), torch.cat([i.hi for i in inps], m.dim)

    def interval_error(self, m, inps):
        return 0.0

    def backward(self, m, lam, inps):
        sizes = [i.lo.shape[m.dim] for i in inps]
        return list(lam.split(sizes, dim=m.dim + 1)), lam.new_zeros(lam.shape[:2])

    def drift(self, m, errors, inps):
        return torch.cat([e.expand_as(i.lo) for e, i in zip(errors, inps, strict=True)], m.dim)


#: operators of several inputs -> their rules
JOINS: dict[type[nn.Module], JoinRule] = {Add: AddRule(), Concat: ConcatRule()}


class StepRule(BoundRule):
    """The rule of a :class:`Step`: its operator's rule (a registered layer's, or a
    :data:`JOINS` rule) on the slots it reads; the kept slots pass through."""

    def _rule(self, m: Step) -> BoundRule | JoinRule:
        from certnet.bounds.rules import rule_for  # the registry, filled after this module

        return JOINS.get(type(m.op)) or rule_for(m.op)

    def _slots(self, m: Step, t: torch.Tensor | None) -> list[torch.Tensor | None]:
        return [None] * len(m.shapes) if t is None else m.slots(t)

    def _inputs(self, m: Step, inp: LayerInput) -> list[LayerInput]:
        lo, hi, clean = (self._slots(m, t) for t in (inp.lo, inp.hi, inp.clean))
        return [LayerInput(lo[i], hi[i], clean[i]) for i in m.inputs]

    def _state(self, m: Step, kept: list[torch.Tensor], result: torch.Tensor) -> torch.Tensor:
        """The step's output from its kept slots and the operator's result (like forward)."""
        if m.last:
            return result
        return torch.cat([k.flatten(1) for k in kept] + [result.flatten(1)], 1)

    def _kept(self, m: Step, t: torch.Tensor) -> list[torch.Tensor]:
        slots = m.slots(t)
        return [slots[k] for k in m.keep]

    def _on_result(self, m: Step, inp: LayerInput, value: torch.Tensor | float
                   ) -> torch.Tensor:
        """A per-output quantity of the operator's result, as a state: 0 on the kept slots."""
        shape = (len(inp.lo), *m.out_shape)
        result = torch.as_tensor(value, dtype=inp.lo.dtype, device=inp.lo.device).expand(shape)
        return self._state(m, [torch.zeros_like(k) for k in self._kept(m, inp.lo)], result)

    def _single(self, m: Step) -> BoundRule | None:
        rule = self._rule(m)
        return rule if isinstance(rule, BoundRule) else None

    # -- capabilities --------------------------------------------------------------------------
    def needs_bounds(self, m: Step) -> bool:
        single = self._single(m)
        return single is not None and single.needs_bounds(m.op)

    def is_relaxable(self, m: Step) -> bool:
        single = self._single(m)
        return single is None or single.is_relaxable(m.op)

    def has_range_interval(self, m: Step) -> bool:
        single = self._single(m)
        return single is not None and single.has_range_interval(m.op)

    def maps_boxes_to_boxes(self, m: Step) -> bool:
        single = self._single(m)
        return single is not None and single.maps_boxes_to_boxes(m.op)

    def uses_batch_statistics(self, m: Step) -> bool:
        single = self._single(m)
        return single is not None and single.uses_batch_statistics(m.op)

    def check(self, m: Step, where: str) -> None:
        counts = Counter(m.keep) + Counter(m.inputs)
        if max(counts.values()) > 2:  # see sum_error: one rounding per sum is bounded
            raise UnsupportedLayerError(
                f"{where}: a value read twice by {type(m.op).__name__} and also used later; "
                "the rounding of a three-way sum of its coefficients is not bounded here")
        single = self._single(m)
        if single is not None:
            single.check(m.op, f"{where}, operator {type(m.op).__name__}")

    def unstable(self, m: Step, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        single = self._single(m)
        mask = torch.zeros_like(lo, dtype=torch.bool).flatten(1)
        if single is not None:
            (i,) = m.inputs
            self._slots(m, mask)[i].copy_(single.unstable(m.op, m.slots(lo)[i], m.slots(hi)[i]))
        return mask.view_as(lo)

    def slopes(self, m: Step, inp: LayerInput, slope: Slope) -> torch.Tensor | None:
        single = self._single(m)
        start = None if single is None else single.slopes(m.op, self._inputs(m, inp)[0], slope)
        if start is None:
            return None
        state = torch.zeros_like(inp.lo).flatten(1)
        self._slots(m, state)[m.inputs[0]].copy_(start.expand_as(m.slots(inp.lo)[m.inputs[0]]))
        return state.view_as(inp.lo)

    def output_rows(self, m: Step, rows: torch.Tensor, inp: LayerInput
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The operator's rows, where every row asked for is one of its result's (not a kept
        slot's), placed on the slot it reads within the input state (zero elsewhere)."""
        single = self._single(m)
        start = 0 if m.last else sum(m.sizes[k] for k in m.keep)
        if single is None or len(rows) == 0 or int(rows.min()) < start:
            return None
        (i,) = m.inputs
        selected = single.output_rows(m.op, rows - start, self._inputs(m, inp)[0])
        if selected is None:
            return None
        a, b = selected
        state = a.new_zeros(len(rows), sum(m.sizes))
        first = sum(m.sizes[:i])
        state[:, first:first + m.sizes[i]] = a.reshape(len(rows), -1)
        return state.view(len(rows), *inp.lo.shape[1:]), b

    # -- bounds --------------------------------------------------------------------------------
    def interval(self, m, inp):
        ins = self._inputs(m, inp)
        rule = self._rule(m)
        lo, hi = rule.interval(m.op, ins if isinstance(rule, JoinRule) else ins[0])
        return (self._state(m, self._kept(m, inp.lo), lo),
                self._state(m, self._kept(m, inp.hi), hi))

    def interval_error(self, m, inp):
        ins = self._inputs(m, inp)
        rule = self._rule(m)
        error = rule.interval_error(m.op, ins if isinstance(rule, JoinRule) else ins[0])
        if error is None or (not isinstance(error, torch.Tensor) and not error):
            return error
        return self._on_result(m, inp, error)

    def backward_error(self, m, inp):
        rule = self._rule(m)
        if isinstance(rule, JoinRule):
            return 0.0  # joins move coefficients exactly
        rho = rule.backward_error(m.op, self._inputs(m, inp)[0])
        if rho is None or (not isinstance(rho, torch.Tensor) and not rho) or m.last:
            return rho
        return self._on_result(m, inp, rho)

    def sum_error(self, m: Step, inp: LayerInput) -> torch.Tensor | None:
        """rho on the step's input: where a slot receives coefficients from two places (kept
        and read, or read twice), their one float addition is off by u of the computed sum:
        at most sum_i |lam_i| gamma_2 |h_i| over the input (charged after the step). Three
        places would round twice, the first time relative to a partial sum the result need
        not bound: :meth:`check` refuses them."""
        counts = Counter(m.keep) + Counter(m.inputs)
        if max(counts.values()) < 2:
            return None
        return gamma(2, inp.lo.dtype) * inp.magnitude

    def backward(self, m, lam, inp, slope):
        batch, rows = lam.shape[:2]
        flat = lam.flatten(2)
        sizes = [m.sizes[k] for k in m.keep]
        rule = self._rule(m)
        ins = self._inputs(m, inp)
        if m.last:
            kept, out = [], lam
        else:
            *kept, out = flat.split([*sizes, flat.shape[2] - sum(sizes)], dim=2)
            out = out.reshape(batch, rows, *m.out_shape)
        if isinstance(rule, JoinRule):
            lams, const = rule.backward(m.op, out, ins)
        else:
            if isinstance(slope, torch.Tensor):  # alpha-CROWN: per row, on the whole state
                parts = slope.flatten(2).split(m.sizes, dim=2)
                slope = parts[m.inputs[0]].reshape(batch, rows, *m.shapes[m.inputs[0]])
            lam_in, const = rule.backward(m.op, out, ins[0], slope)
            lams = [lam_in]
        # each slot's coefficients: kept, read, both (one addition: ``sum_error``) or none
        pieces: list[torch.Tensor | None] = [None] * len(m.sizes)
        for k, piece in zip(m.keep, kept, strict=True):
            pieces[k] = piece
        for i, piece in zip(m.inputs, lams, strict=True):
            piece = piece.reshape(batch, rows, -1)
            pieces[i] = piece if pieces[i] is None else pieces[i] + piece
        total = torch.cat([lam.new_zeros(batch, rows, size) if piece is None else piece
                           for piece, size in zip(pieces, m.sizes, strict=True)], dim=2)
        return total.view(batch, rows, *inp.lo.shape[1:]), const

    def drift(self, m, error, inp):
        errors = m.slots(error.expand_as(inp.lo))
        rule = self._rule(m)
        ins = self._inputs(m, inp)
        if isinstance(rule, JoinRule):
            moved = rule.drift(m.op, [errors[i] for i in m.inputs], ins)
        else:
            moved = rule.drift(m.op, errors[m.inputs[0]], ins[0])
        if moved is None:
            return None
        return self._state(m, [errors[k] for k in m.keep],
                           moved.expand(len(inp.lo), *m.out_shape))
