"""Checks shared by tests/test_maxpool.py and tests/test_leaky_relu.py: bounds of every method
(rigorous or not) below sampled and PGD outputs, exact at eps = 0, below the MILP oracle's
minimum margin; an exact rational forward pass of networks with LeakyReLU and MaxPool2d; the
rule-level rounding checks of tests/test_rule_rounding.py for a given layer."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from fractions import Fraction

import numpy as np
import torch
from exact import exact_layer, rationals
from torch import nn

from certnet.bounds.ibp import layer_interval
from certnet.bounds.margins import margin_spec, spec_bounds
from certnet.bounds.rules import SLOPES, LayerInput, rule_for
from certnet.falsify import falsify
from certnet.threat import ThreatModel
from certnet.verify.oracle import exact_min_margin

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
F64 = torch.float64


# -- exact arithmetic ------------------------------------------------------------------------
def exact_leaky(m: nn.LeakyReLU) -> Callable[[np.ndarray], np.ndarray]:
    a = Fraction(float(m.negative_slope))
    return lambda v: np.array([t if t > 0 else a * t for t in v.reshape(-1)],
                              dtype=object).reshape(v.shape)


def _pair(v: int | tuple[int, ...]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def exact_maxpool(m: nn.MaxPool2d) -> Callable[[np.ndarray], np.ndarray]:
    """The max over each window's inputs inside the map (torch's -inf padding), ceil_mode off."""
    (kh, kw), (sh, sw) = _pair(m.kernel_size), _pair(m.stride or m.kernel_size)
    (ph, pw), (dh, dw) = _pair(m.padding), _pair(m.dilation)

    def apply(v: np.ndarray) -> np.ndarray:
        c, h, w = v.shape
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        out = np.empty((c, oh, ow), dtype=object)
        for ch, i, j in itertools.product(range(c), range(oh), range(ow)):
            rows = [i * sh - ph + a * dh for a in range(kh)]
            cols = [j * sw - pw + b * dw for b in range(kw)]
            out[ch, i, j] = max(v[ch, r, s] for r in rows for s in cols
                                if 0 <= r < h and 0 <= s < w)
        return out
    return apply


def exact_of(m: nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    if type(m) is nn.LeakyReLU:
        return exact_leaky(m)
    if type(m) is nn.MaxPool2d:
        return exact_maxpool(m)
    return exact_layer(m)


def exact_forward(layers: nn.Sequential, x: torch.Tensor) -> list[Fraction]:
    """The logits of ``layers`` at one float64 point (no batch axis), in exact arithmetic."""
    v = rationals(x.double())
    for m in layers:
        v = exact_of(m)(v)
    return list(v.reshape(-1))


# -- whole networks --------------------------------------------------------------------------
def _below(bound: torch.Tensor, spec: torch.Tensor, outputs: torch.Tensor, exact: bool,
           what: str) -> None:
    """bound (S,) <= spec (S, K) . z for every z (N, K), decided in rationals where close."""
    values = outputs @ spec.T
    slack = 1e-9 * (1 + values.abs())
    for n, s in (bound[None] > values - slack).nonzero().tolist():
        dot = sum((Fraction(float(a)) * Fraction(float(b)) for a, b in
                   zip(spec[s], outputs[n], strict=True)), Fraction(0))
        limit = dot if exact else dot + Fraction(1e-9) * (1 + abs(dot))
        assert Fraction(float(bound[s])) <= limit, (what, n, s, float(bound[s]), float(dot))


def points(layers: nn.Module, x: torch.Tensor, eps: float, spec: torch.Tensor,
           samples: int = 300, seed: int = 0) -> torch.Tensor:
    """Uniform points of the box around one point ``x`` (1, ...) clipped to [0, 1], its
    centre, and one PGD minimiser (certnet.falsify) per specification row."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    found = [lo + (hi - lo) * torch.rand(samples, *x.shape[1:], generator=g, dtype=F64), x]
    for s in range(spec.shape[1]):
        row = spec[0, s]
        point, _ = falsify(layers, lo, hi, lambda z, row=row: z @ row, steps=20, restarts=4,
                           seed=s)
        found.append(point)
    return torch.cat(found)


def check_contains(layers: nn.Module, x: torch.Tensor, eps: float, seed: int = 0,
                   methods: tuple[str, ...] = METHODS) -> dict[tuple[str, bool], torch.Tensor]:
    """Every method's bound, rigorous or not, of random specifications lies below the
    sampled and PGD values (exactly, for rigorous ones); returns the bounds."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        classes = layers(x).shape[1]
    spec = torch.randn(len(x), 3, classes, generator=g, dtype=F64)
    found = {}
    for b in range(len(x)):
        z = layers(points(layers, x[b:b + 1], eps, spec[b:b + 1], seed=seed + b)).detach()
        for method in methods:
            for rigorous in (False, True):
                bound = spec_bounds(layers, x[b:b + 1], ThreatModel("linf", eps),
                                    spec[b:b + 1], method, rigorous=rigorous).detach()
                assert torch.isfinite(bound).all(), (method, rigorous)
                _below(bound[0], spec[b], z, rigorous, f"{method} rigorous={rigorous}")
                found[method, rigorous] = bound
    return found


def check_exact_at_zero(layers: nn.Module, x: torch.Tensor, tolerance: float = 1e-9) -> None:
    """At eps = 0 every rigorous bound lies below spec . z(x) and within ``tolerance``."""
    with torch.no_grad():
        z = layers(x)
    spec = torch.randn(len(x), 3, z.shape[1], generator=torch.Generator().manual_seed(5),
                       dtype=F64)
    value = torch.einsum("bk,bsk->bs", z, spec)
    for method in METHODS:
        bound = spec_bounds(layers, x, ThreatModel("linf", 0.0), spec, method,
                            rigorous=True).detach()
        assert (bound <= value).all(), method
        assert ((value - bound) <= tolerance * (1 + value.abs())).all(), (method, value - bound)


def check_oracle(layers: nn.Module, x: torch.Tensor, eps: float) -> float:
    """The MILP's minimum margin (an attained one) is at least every rigorous margin lower
    bound; returns it."""
    with torch.no_grad():
        label = int(layers(x).argmax())
        classes = layers(x).shape[1]
    oracle = exact_min_margin(layers, x[0], label, eps, "linf")
    spec = margin_spec(torch.tensor([label]), classes).to(F64)
    for method in METHODS:
        bound = spec_bounds(layers, x, ThreatModel("linf", eps), spec, method, rigorous=True)
        lowest = float(bound.detach().min())
        assert lowest <= oracle, (method, lowest, oracle)
    return oracle


# -- one layer, exactly (as tests/test_rule_rounding.py) ------------------------------------
def box_points(lo: torch.Tensor, hi: torch.Tensor, seed: int, corners: int = 64
               ) -> list[torch.Tensor]:
    """Up to ``corners`` vertices of the box and 16 random points inside it, float64."""
    g = torch.Generator().manual_seed(seed)
    flat_lo, flat_hi = lo.flatten(), hi.flatten()
    n = flat_lo.numel()
    chosen = itertools.islice(itertools.product((0, 1), repeat=n), corners)
    found = [torch.where(torch.tensor(c, dtype=torch.bool), flat_hi, flat_lo) for c in chosen]
    for _ in range(16):
        found.append((flat_lo + torch.rand(n, generator=g, dtype=F64) * (flat_hi - flat_lo))
                     .clamp(flat_lo, flat_hi))
    return [p.view(lo.shape) for p in found]


def check_rule_rounding(m: nn.Module, lo: torch.Tensor, hi: torch.Tensor, seed: int = 0,
                        lam_scale: int = 30) -> None:
    """In exact rationals over the box [lo, hi] (1, ...): the rigorous interval holds the
    exact and the float outputs; a backward step with its charge is a valid lower bound for
    every slope choice (and random alpha-CROWN slopes where the rule has slopes); the drift
    bounds the float forward pass, from exact inputs and from inputs off by a given error."""
    inp = LayerInput(lo, hi, (lo + hi) / 2)
    rule, exact = rule_for(m), exact_of(m)
    rule.check(m, "the layer")
    found = box_points(lo, hi, seed)
    with torch.no_grad():
        out_lo, out_hi = layer_interval(m, inp, rigorous=True)
        floats = [m(h) for h in found]
    low, high = rationals(out_lo[0]).reshape(-1), rationals(out_hi[0]).reshape(-1)
    exacts = [exact(rationals(h[0])).reshape(-1) for h in found]
    for value in [*exacts, *(rationals(f[0]).reshape(-1) for f in floats)]:
        assert all(a <= v <= b for a, v, b in zip(low, value, high, strict=True))
    # the drift from exact inputs
    drift = rule.drift(m, torch.zeros_like(lo), inp).expand_as(out_lo)
    bound = rationals(drift[0]).reshape(-1)
    for f, e in zip(floats, exacts, strict=True):
        assert all(abs(c - v) <= d for c, v, d in zip(rationals(f[0]).reshape(-1), e, bound,
                                                        strict=True))
    # from float inputs off by up to err: h' = h +- err (rounded inward), h in the box
    err = (hi - lo).abs() / 3 + 2.0**-60
    drift = rule.drift(m, err, inp).expand_as(out_lo)
    bound = rationals(drift[0]).reshape(-1)
    g = torch.Generator().manual_seed(seed + 3)
    for h, e in zip(found, exacts, strict=True):
        step = err * (torch.rand(h.shape, generator=g, dtype=F64) * 2 - 1)
        moved = h + step
        moved = torch.where((moved - h).abs() > err, h, moved)
        with torch.no_grad():
            value = rationals(m(moved)[0]).reshape(-1)
        assert all(abs(c - v) <= d for c, v, d in zip(value, e, bound, strict=True))
    # the backward step with its charge
    out_shape = out_lo.shape[1:]
    rows = 4
    powers = torch.randint(-lam_scale, lam_scale, (1, rows, *out_shape), generator=g)
    lam = torch.randn(1, rows, *out_shape, generator=g, dtype=F64) * torch.exp2(powers.double())
    check_backward(m, lam, inp, found, exacts)


def check_backward(m: nn.Module, lam: torch.Tensor, inp: LayerInput, found: list[torch.Tensor],
                   exacts: list[np.ndarray], charged: bool = True) -> bool:
    """lam . z >= lam_h . h + const - charge at every point (``charged=False``: no charge;
    returns whether it held everywhere instead of asserting)."""
    rule = rule_for(m)
    rows = lam.shape[1]
    rho = torch.as_tensor(rule.backward_error(m, inp), dtype=F64)
    rho = rho.expand(1, *lam.shape[2:])
    charge = (lam.abs() * rho.unsqueeze(1)).flatten(2).sum(2) if charged else \
        torch.zeros(1, rows, dtype=F64)
    g = torch.Generator().manual_seed(11)
    choices = [*SLOPES]
    if rule.slopes(m, inp, "adaptive") is not None:
        choices.append(torch.rand(1, rows, *inp.lo.shape[1:], generator=g, dtype=F64))
    held = True
    for slope in choices:
        with torch.no_grad():
            lam_h, const = rule.backward(m, lam, inp, slope)
        for h, z in zip(found, exacts, strict=True):
            hh, z = rationals(h[0]).reshape(-1), np.asarray(z).reshape(-1)
            for r in range(rows):
                left = sum(a * b for a, b in zip(rationals(lam[0, r]).reshape(-1), z,
                                                 strict=True))
                right = sum(a * b for a, b in zip(rationals(lam_h[0, r]).reshape(-1), hh,
                                                  strict=True)) + Fraction(float(const[0, r]))
                ok = left >= right - Fraction(float(charge[0, r]))
                if charged:
                    assert ok, (slope if isinstance(slope, str) else "alpha", r)
                held = held and ok
    return held
