"""Decide a VNN-LIB property of a network: **holds** (every input of every box keeps the
outputs out of the violation, proved by rigorous bound propagation), **violated** (a concrete
input whose float64 outputs satisfy the violation, checked in exact arithmetic) or
**unknown**. The VNN-COMP answers are ``unsat``, ``sat`` and ``unknown`` (``timeout`` when the
time ran out first).

A falsification search runs first (cheap, and it settles violated properties), then the bound
methods from the cheapest (IBP, CROWN, α-CROWN by default), each only on the boxes still
open. A box is proved when, for every violation disjunct, some row c . y <= d has a rigorous
lower bound on c . y above d (the property's d is rounded up, so the exact c . y > d too).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from certnet.bounds.margins import BOUND_METHODS, spec_bounds
from certnet.bounds.rules import check_supported
from certnet.bounds.rules.fixed_weights import fixed_weights
from certnet.errors import ConfigError, InputError
from certnet.falsify import falsify
from certnet.nn.integrity import Float64Twin, check_plain
from certnet.properties import Property
from certnet.threat import BoxThreat

Status = Literal["holds", "violated", "unknown", "timeout"]
#: the VNN-COMP result word of each status
VNNCOMP = {"holds": "unsat", "violated": "sat", "unknown": "unknown", "timeout": "timeout"}


@dataclass
class Verdict:
    """The answer, with the counterexample of a violated property (input, float64 outputs),
    which method proved each box (None: open), and the seconds spent per stage."""

    status: Status
    x: torch.Tensor | None = None
    y: torch.Tensor | None = None
    proved_by: list[str | None] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def result(self) -> str:
        """The VNN-COMP word: unsat, sat, unknown or timeout."""
        return VNNCOMP[self.status]

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "result": self.result, "proved_by": self.proved_by,
                "seconds": self.seconds, "total_seconds": sum(self.seconds.values()),
                "counterexample": None if self.x is None else {
                    "x": self.x.flatten().tolist(), "y": self.y.flatten().tolist()}}


def _violation(rows: list[tuple[torch.Tensor, torch.Tensor]]):
    """The falsification objective: min over disjuncts of max over rows of c . y - d (<= 0
    exactly where some disjunct holds, up to rounding; the exact check decides)."""
    def objective(y: torch.Tensor) -> torch.Tensor:
        return torch.stack([(y @ c.T.to(y) - d.to(y)).amax(1) for c, d in rows], 1).amin(1)
    return objective


def prepare(layers: nn.Sequential) -> Float64Twin:
    """The float64 eval-mode copy :func:`decide` works on, for a caller that decides several
    properties of one network (``twin=``); refuses hooked or patched layers."""
    check_plain(layers)
    return Float64Twin(layers, lambda net: None)


def decide(layers: nn.Sequential, input_shape: tuple[int, ...], prop: Property,
           methods: tuple[str, ...] = ("ibp", "crown", "alpha-crown"),
           timeout: float | None = None, attack: bool = True, seed: int = 0,
           twin: Float64Twin | None = None) -> Verdict:
    """Decide ``prop`` for the network ``layers`` (computed in float64, eval mode) on inputs
    of ``input_shape`` (the property's X_i in row-major order). ``timeout`` (seconds) is
    checked between stages: a stage that started finishes. ``twin`` (optional): the caller's
    :func:`prepare` of ``layers``, kept across properties (its copy and the weight quantities
    the bounds keep are reused while it matches ``layers``)."""
    unknown = [m for m in methods if m not in BOUND_METHODS]
    if unknown:
        raise ConfigError(f"unknown bound methods {unknown}; choose from {BOUND_METHODS}")
    if math.prod(input_shape) != prop.n_inputs:
        raise InputError(f"the property has {prop.n_inputs} inputs, the network "
                         f"{math.prod(input_shape)} (shape {tuple(input_shape)})")
    check_plain(layers)  # also when a twin is given: hooks added since are not in its copy
    if twin is None or not twin.matches(layers):
        twin = Float64Twin(layers, lambda net: None)
    net = twin.layers
    cases = [(*(t.view(1, *input_shape) for t in prop.box_tensors(i)), prop.violation_tensors(i))
             for i in range(len(prop.cases))]
    # the search stays in each box's float64 points (rounded inward), so what it finds is in
    inner = [case.box.inner_tensors() for case in prop.cases]
    check_supported(net)
    start = time.perf_counter()
    verdict = Verdict("unknown", proved_by=[None] * len(prop.cases))

    def out_of_time() -> bool:
        return timeout is not None and time.perf_counter() - start > timeout

    def timed(stage: str, begun: float) -> None:
        verdict.seconds[stage] = verdict.seconds.get(stage, 0.0) + time.perf_counter() - begun

    if attack:
        begun = time.perf_counter()
        for (_, _, disjuncts), box in zip(cases, inner, strict=True):
            if box is None:
                continue
            lo, hi = (t.view(1, *input_shape) for t in box)
            x, value = falsify(net, lo, hi, _violation(disjuncts), seed=seed)
            if value <= 0:
                with torch.no_grad():
                    y = net(x)
                if prop.check_counterexample(x.flatten(), y.flatten()):
                    timed("attack", begun)
                    verdict.status, verdict.x, verdict.y = "violated", x[0], y[0]
                    return verdict
        timed("attack", begun)
    with fixed_weights(twin.weight_memo):  # ``net`` is the twin's copy: its weights never change
        for method in methods:
            if out_of_time():
                verdict.status = "timeout"
                return verdict
            begun = time.perf_counter()
            for i, case in enumerate(cases):
                if verdict.proved_by[i] is None and _proved(net, *case, method):
                    verdict.proved_by[i] = method
            timed(method, begun)
            if all(verdict.proved_by):
                verdict.status = "holds"
                return verdict
    return verdict


def _proved(net: nn.Sequential, lo: torch.Tensor, hi: torch.Tensor,
            disjuncts: list[tuple[torch.Tensor, torch.Tensor]], method: str) -> bool:
    """Whether ``method`` proves that no input of the box [lo, hi] satisfies any of the
    violation ``disjuncts`` (C y <= d each)."""
    threat = BoxThreat.of(lo[0], hi[0])
    spec = torch.cat([c for c, _ in disjuncts]).unsqueeze(0)
    with torch.no_grad():
        lower = spec_bounds(net, threat.center(), threat, spec, method, rigorous=True)[0]
    k = 0
    for c, d in disjuncts:
        rows = slice(k, k + len(c))
        k += len(c)
        if not bool((lower[rows] > d.to(lower)).any()):
            return False
    return True
