"""Certificates checked in exact rational arithmetic on tiny networks with adversarial
magnitudes: huge values that cancel inside a layer or in the next one, subnormal and
near-overflow weights, near-ties, large normalisation scales, random log-uniform magnitudes.

For every certifier in the registry and both norms, every claim a certificate makes is checked
(README, Guarantees: the network computed exactly, with its stored weights, in eval mode):

* **exact**: at float64 points of the threat set (the eps-ball where certified, the open ball
  of the reported radius where it is positive; both intersected with the pixel box, membership
  decided exactly) -- the centre, the vertices / axis and diagonal points, the worst point of
  every margin's gradient (the exact counterexample of the traps, whose margins are affine or
  constant on the set), random points and projected-gradient points -- the exact margin
  logit[pred] - logit[j] is > 0 for every j != pred;
* **float64**: certnet's own float64 eval-mode forward pass predicts ``pred`` at those points,
  without a tie;
* **radius**: no reported radius is rounded up: <= eps for "eps or nothing" certificates, and
  for radius certificates <= the radius their proof covers with the exact margins (lipschitz:
  min_j gap_j / K_pred,j with the model's sound pairwise constants; linf-lipschitz:
  margin / (2 L) with the exact product L of the layers' l_inf bounds).

Each construction is a trap (false certificates from float64 rounding) or a control (margins
far above any rounding, which a rigorous certifier must still certify: the harness is not
vacuous), and states which rounding it targets.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import zlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pytest
import torch
from exact import LP_ACCURACY, Ball, ExactNet, linf_lipschitz_constant, lp_norm, unique_points
from torch import nn

from certnet.bounds.ibp import _ball
from certnet.bounds.margins import spec_bounds
from certnet.bounds.rules import LayerInput
from certnet.bounds.rules.affine import LinearRule
from certnet.bounds.rules.linf_dist import dist_error
from certnet.certifiers import certify
from certnet.certifiers.base import CERTIFIERS
from certnet.methods.base import CertifiedModel
from certnet.methods.bound_prop import IBPNet
from certnet.methods.gloro import GloroNet
from certnet.methods.linf_dist import LinfDistNet
from certnet.nn.activations import MinMax
from certnet.nn.linf_dist import LinfDist, MeanShift, Negate
from certnet.nn.linf_dist_kernels import linf_dist, linf_dist_backend, linf_dist_reference
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, Normalize
from certnet.threat import BoxThreat

NORMS = ("linf", "l2")
#: Every registered certifier (``best`` included), in a fixed order.
NAMES = tuple(sorted(CERTIFIERS))
F64 = torch.float64
#: Huge magnitude of the cancellation constructions: float64 spacing 256 above it, 128 below.
BIG = 2.0**60


# -- building blocks -------------------------------------------------------------------------------
def linear(weight, bias, kind: type[nn.Linear] = LipschitzLinear) -> nn.Linear:
    """A float64 linear layer holding exactly the given weights and biases."""
    w, b = torch.tensor(weight, dtype=F64), torch.tensor(bias, dtype=F64)
    layer = kind(w.shape[1], w.shape[0], dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


def conv(weight, bias, stride: int = 1, padding: int = 0) -> LipschitzConv2d:
    """A float64 convolution holding exactly the given kernel (out, in, k, k) and biases."""
    w, b = torch.tensor(weight, dtype=F64), torch.tensor(bias, dtype=F64)
    layer = LipschitzConv2d(w.shape[1], w.shape[0], w.shape[2], stride=stride,
                            padding=padding, dtype=F64)
    with torch.no_grad():
        layer.weight.copy_(w)
        layer.bias.copy_(b)
    return layer


def gloro(*layers: nn.Module, shape: tuple[int, ...] = (2,)) -> GloroNet:
    """An eval-mode GloRo net of ``layers`` over inputs of ``shape`` (every certifier applies
    to it)."""
    seq = nn.Sequential(*layers)
    return GloroNet(seq, shape, layers[-1].out_features).eval()


def points(rows) -> torch.Tensor:
    """Centres as a float64 tensor."""
    return torch.tensor(rows, dtype=F64)


@dataclass
class Case:
    """A model, the centres to certify and the radii to certify them at."""

    variant: str
    model: CertifiedModel
    centres: torch.Tensor
    eps: tuple[float, ...]


@dataclass
class Construction:
    name: str
    build: Callable[[], list[Case]]
    #: Certifiers that must certify some point here (controls with margins far above any
    #: rounding; without it the checks above could pass by certifying nothing).
    expect: tuple[str, ...] = ()


CONSTRUCTIONS: dict[str, Construction] = {}


def construction(*expect: str):
    """Register a construction (its docstring says what it targets)."""
    def register(build: Callable[[], list[Case]]) -> Callable[[], list[Case]]:
        CONSTRUCTIONS[build.__name__] = Construction(build.__name__, build, expect)
        return build
    return register


BOUND = ("ibp", "crown-ibp", "crown", "alpha-crown", "best")


# -- constructions ---------------------------------------------------------------------------------
def _last_layer(offset: float) -> GloroNet:
    """h = relu(0 x + 1, x1 + 60, x2); z0 = B h0 - h1 - B, z1 = 2^16 h2 + offset."""
    return gloro(nn.Flatten(), linear([[0, 0], [1, 0], [0, 1]], [1, 60, 0]), nn.ReLU(),
                 linear([[BIG, -1, 0], [0, 0, 2.0**16]], [-BIG, offset]))


@construction(*BOUND)
def last_layer_cancellation() -> list[Case]:
    """Cancellation inside the last layer: z0 = B h0 - (x1 + 60) - B with h0 = relu(0 x + 1)
    = 1 on the whole set and B = 2^60, so float64 loses the O(1) term (exact z0 = -(x1 + 60),
    computed 0). Targets IBP's concretisation of the centre product lam . c (B + small
    terms), CROWN's bias term lam . b (B - 60 + ..., then - B) and the forward pass itself.
    Traps: centres where the exact worst margin is -2..-55 (x2 just below the boundary);
    control: an offset of 2^36, margins ~2^36, 2^28 times the spacing of B."""
    s = 2.0**16
    traps = [Case(f"trap eps={eps}", _last_layer(-2.0**15),
                  points([[x1, 0.5 - eps - t / s] for x1 in (0.05, 0.35, 0.6)
                          for t in (2, 8, 17, 26, 35, 44, 55)]), (eps,))
             for eps in (1 / 16, 0.2)]
    control = Case("control", _last_layer(-2.0**36),
                   torch.rand(12, 2, dtype=F64, generator=torch.Generator().manual_seed(1)),
                   (0.1, 0.3))
    return [*traps, control]


def _hidden(offset: float) -> GloroNet:
    """g0 = relu(B h0 - 60 h1 - B + 128), g1 = relu(128 - 60 h2), h = relu(1, x1, x2)."""
    return gloro(nn.Flatten(), linear([[0, 0], [1, 0], [0, 1]], [1, 0, 0]), nn.ReLU(),
                 linear([[BIG, -60, 0], [0, 0, -60]], [-BIG + 128, 128]), nn.ReLU(),
                 linear([[1, 0], [0, 1]], [0, offset]))


@construction(*BOUND)
def hidden_layer_cancellation() -> list[Case]:
    """Cancellation inside a hidden layer: g0 = relu(B h0 - 60 x1 - B + 128) = 128 - 60 x1
    exactly, 128 in float64 (the term is below half the spacing of B = 2^60). Targets IBP's
    centre product W c + b of an intermediate interval, which the next layer's bounds then
    trust. Trap: logits (g0, g1) with exact margin 60 (x2 - x1) < 0 where x1 > x2, computed
    60 x2 > 0; control: class 1 lowered by 2^40."""
    g = torch.Generator().manual_seed(2)
    trap = torch.stack([0.55 + 0.4 * torch.rand(12, generator=g, dtype=F64),
                        0.3 + 0.2 * torch.rand(12, generator=g, dtype=F64)], 1)
    return [Case("trap", _hidden(0.0), trap, (0.1, 0.25)),
            Case("control", _hidden(-2.0**40), torch.rand(12, 2, dtype=F64, generator=g),
                 (0.1, 0.3))]


def _conv_net(offset: float) -> GloroNet:
    """On 1 x 2 x 2 inputs: h = relu(conv1x1: channel 0 = 1, channel 1 = x); a 2 x 2 conv of
    stride 2 with g0 = B h0[0, 0] - 15 (x00 + x01) - B + 128, g1 = 128 - 15 (x10 + x11);
    logits (g0, g1 + offset)."""
    k0 = [[[BIG, 0], [0, 0]], [[-15, -15], [0, 0]]]
    k1 = [[[0, 0], [0, 0]], [[0, 0], [-15, -15]]]
    return gloro(conv([[[[0]]], [[[1]]]], [1, 0]), nn.ReLU(),
                 conv([k0, k1], [-BIG + 128, 128], stride=2), nn.ReLU(), nn.Flatten(),
                 linear([[1, 0], [0, 1]], [0, offset]), shape=(1, 2, 2))


@construction(*BOUND)
def conv_cancellation() -> list[Case]:
    """Cancellation inside a strided convolution: a constant channel (relu(0 x + 1)) times
    B = 2^60 and the bias -B + 128 cancel, so float64 drops -15 (x00 + x01) from g0. Targets
    the conv interval's centre product and the forward pass. Trap: exact margin
    15 (x10 + x11 - x00 - x01) < 0, computed 15 (x10 + x11) > 0; control: class 1 lowered by
    2^40."""
    g = torch.Generator().manual_seed(3)
    top = 0.6 + 0.3 * torch.rand(10, 2, generator=g, dtype=F64)
    bottom = 0.3 + 0.2 * torch.rand(10, 2, generator=g, dtype=F64)
    trap = torch.cat([top, bottom], 1).view(-1, 1, 2, 2)
    return [Case("trap", _conv_net(0.0), trap, (0.1, 0.2)),
            Case("control", _conv_net(-2.0**40),
                 torch.rand(10, 1, 2, 2, generator=g, dtype=F64), (0.1, 0.3))]


@construction("lipschitz", "local-lipschitz", *BOUND)
def conv_bias_cancels_in_next_layer() -> list[Case]:
    """Huge conv biases that cancel in the next layer: conv(k 2, padding 1) with weights
    ~2^30 and biases 1e16, MinMax (shift-invariant), then a stride-2 conv whose bias
    -2e16 cancels them: every hidden value carries 1e16 (spacing 2), so each is off by up to
    1 in float64. Margins ~2^30 dwarf that: certificates must hold and still be given."""
    g = torch.Generator().manual_seed(4)
    k1 = (2.0**30 * torch.randint(-3, 4, (2, 1, 2, 2), generator=g)).tolist()
    k2 = torch.tensor([[[[1, 0], [0, 0]], [[0, 0], [0, 1]]],
                       [[[0, 1], [0, 0]], [[0, 0], [1, 0]]]], dtype=F64).tolist()
    head = torch.randint(-2, 3, (3, 2), generator=g).tolist()
    model = gloro(conv(k1, [1e16, 1e16], padding=1), MinMax(),
                  conv(k2, [-2e16, -2e16], stride=2), nn.Flatten(),
                  linear(head, [0, 0, 0]), shape=(1, 2, 2))
    return [Case("random", model, torch.rand(16, 1, 2, 2, generator=g, dtype=F64),
                 (0.01, 0.1))]


def _linf_dist(big: float, offset: float) -> LinfDistNet:
    """h = (max x - 1/2, 1/2 - min x) (a distance layer and a mean shift); u0 = ||h - (-B,
    -B)||_inf - B = max h, u1 = ||h||_inf + offset; logits -u."""
    hidden, last = LinfDist(2, 2).double(), LinfDist(2, 2, bias=True).double()
    shift = MeanShift(2).double()
    with torch.no_grad():
        hidden.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
        shift.running_mean.fill_(0.5)
        last.weight.copy_(torch.tensor([[-big, -big], [0.0, 0.0]], dtype=F64))
        last.bias.copy_(torch.tensor([-big, offset], dtype=F64))
    layers = nn.Sequential(nn.Flatten(), hidden, shift, last, Negate())
    return LinfDistNet(layers, (2,), 2).double().eval()


@construction("linf-lipschitz", *BOUND)
def linf_dist_cancellation() -> list[Case]:
    """An l_inf-dist net whose last neuron has huge weights beside small inputs: u0 =
    max_i |h_i + B| - B (B = 2^56) loses h entirely in float64 (computed 0, exact max h).
    Targets the l_inf margin certificate (margin / 2, the net being 1-Lipschitz) and interval
    bounds of distance layers. Trap: offset -0.3 makes the exact margin -0.3 wherever the
    largest |h_i| is positive, while float64 reports max |h| - 0.3 > 0; control: offset
    2^20."""
    g = torch.Generator().manual_seed(5)
    low = torch.stack([0.02 + 0.13 * torch.rand(8, generator=g, dtype=F64),
                       0.3 + 0.4 * torch.rand(8, generator=g, dtype=F64)], 1)
    trap = torch.cat([low, 1 - low])
    return [Case("trap", _linf_dist(2.0**56, -0.3), trap, (0.02, 0.05)),
            Case("control", _linf_dist(2.0**56, 2.0**20),
                 torch.rand(12, 2, generator=g, dtype=F64), (0.1, 0.3))]


def _batchnorm(offset: float) -> IBPNet:
    """h = x + 2^52 (rounds x to an integer), BatchNorm with mean 2^52 and variance 2^-60
    (scale 2^30, eps 0), ReLU; margin 2^30 (x0 - x1) + offset."""
    norm = nn.BatchNorm1d(2, eps=0.0).double()
    with torch.no_grad():
        norm.running_mean.fill_(2.0**52)
        norm.running_var.fill_(2.0**-60)
    layers = nn.Sequential(nn.Flatten(), linear([[1, 0], [0, 1]], [2.0**52] * 2, nn.Linear),
                           norm, nn.ReLU(), linear([[1, -1], [0, 0]], [offset, 0], nn.Linear))
    return IBPNet(layers, (2,), 2).eval()


@construction(*BOUND)
def batchnorm_large_scale() -> list[Case]:
    """A huge offset that a BatchNorm of large scale removes: h = x + 2^52 is rounded to an
    integer, and BatchNorm ((h - 2^52) 2^30, eps = 0, variance an exact square) amplifies the
    lost fraction to ~2^29, above a rounding slack relative to the largest value (2^52).
    Targets interval bounds through BatchNorm and the forward pass. Trap: offset 2^28 with
    x0, x1 rounding to the same integer and x1 - x0 > 1/4; control: offset 2^45."""
    g = torch.Generator().manual_seed(6)
    low = torch.stack([0.04 + 0.04 * torch.rand(6, generator=g, dtype=F64),
                       0.38 + 0.06 * torch.rand(6, generator=g, dtype=F64)], 1)
    trap = torch.cat([low, low + 0.52])
    return [Case("trap", _batchnorm(2.0**28), trap, (0.03,)),
            Case("control", _batchnorm(2.0**45), torch.rand(12, 2, generator=g, dtype=F64),
                 (0.1, 0.3))]


def _normalize(offset: float) -> GloroNet:
    """Normalize with mean -2^52 (x + 2^52, rounded to an integer), then a linear layer of
    gain 2^30 whose bias -2^82 cancels the shift; margin 2^30 (x0 - x1) + offset."""
    return gloro(Normalize([-2.0**52], [1.0]).double(), nn.Flatten(),
                 linear([[2.0**30, 0], [0, 2.0**30]], [-2.0**82] * 2), nn.ReLU(),
                 linear([[1, -1], [0, 0]], [offset, 0]), shape=(1, 1, 2))


@construction("lipschitz", "linf-lipschitz", *BOUND)
def normalize_shift_cancellation() -> list[Case]:
    """Normalize with a huge mean (-2^52) whose shift the next layer cancels after a gain of
    2^30: the input's fraction, lost in x + 2^52, comes back as ~2^29 in the logits. Targets
    Normalize's interval and rounding rules and the forward pass. Trap: offset 2^28 with the
    two pixels in the same integer cell and 1/4 apart; control: offset 2^45."""
    g = torch.Generator().manual_seed(7)
    low = torch.stack([0.04 + 0.04 * torch.rand(6, generator=g, dtype=F64),
                       0.38 + 0.06 * torch.rand(6, generator=g, dtype=F64)], 1)
    trap = torch.cat([low, low + 0.52]).view(-1, 1, 1, 2)
    return [Case("trap", _normalize(2.0**28), trap, (0.03,)),
            Case("control", _normalize(2.0**45),
                 torch.rand(12, 1, 1, 2, generator=g, dtype=F64), (0.1, 0.3))]


@construction()
def near_ties() -> list[Case]:
    """Logits that tie exactly (class 2 = class 0) or nearly (class 1 = class 0 + 2^-24 v . h),
    with and without a common offset of 2^20 that float64 must carry: ties are never
    certified, and the tiny radii of near-ties must hold."""
    g = torch.Generator().manual_seed(8)
    w1, b1 = torch.randn(4, 2, generator=g, dtype=F64), torch.randn(4, generator=g, dtype=F64)
    row = torch.randn(4, generator=g, dtype=F64)
    near = row + 2.0**-24 * torch.sign(torch.randn(4, generator=g, dtype=F64))
    cases = []
    for offset in (0.0, 2.0**20):
        model = gloro(nn.Flatten(), linear(w1.tolist(), b1.tolist()), nn.ReLU(),
                      linear(torch.stack([row, near, row]).tolist(), [offset] * 3))
        cases.append(Case(f"offset {offset}", model, torch.rand(12, 2, generator=g, dtype=F64),
                          (2.0**-30, 1e-9)))
    return cases


def _subnormal(offset: float) -> GloroNet:
    """h = relu(3 * 2^-1070 x), subnormal (spacing 2^-1074: 3x kept to 1/16), then gains of
    2^1020 and 2^50: logits (3 x0, 3 x1 - offset) off by up to 1/32 in float64."""
    tiny = 3 * 2.0**-1070
    return gloro(nn.Flatten(), linear([[tiny, 0], [0, tiny]], [0, 0]), nn.ReLU(),
                 linear([[2.0**1020, 0], [0, 2.0**1020]], [0, 0]), nn.ReLU(),
                 linear([[2.0**50, 0], [0, 2.0**50]], [0, -offset]))


@construction("lipschitz", "local-lipschitz", "linf-lipschitz", "ibp", "best")
def subnormal_weights() -> list[Case]:
    """Subnormal weights (3 * 2^-1070): products underflow to the subnormal grid, an
    absolute error that relative error bounds (gamma_n |W| |x|) do not cover, amplified by
    2^1070 in the next layers. Trap: offset 1/100 with x0, x1 in the same 1/48 cell and
    0.35/48 apart (exact margin -0.012, computed +0.01); control: offset 64."""
    k = torch.arange(4, 44, 4, dtype=F64)
    trap = torch.stack([(k + 0.1) / 48, (k + 0.45) / 48], 1)
    g = torch.Generator().manual_seed(9)
    control = torch.rand(12, 2, generator=g, dtype=F64).sort(1, descending=True).values
    return [Case("trap", _subnormal(0.01), trap, (2.0**-11,)),
            Case("control", _subnormal(64.0), control, (0.01, 0.1))]


@construction("lipschitz")
def near_overflow() -> list[Case]:
    """Hidden values near the top of float64: weights 2^s and biases 2^(s + 10) (s = 500,
    and s = 1000, where squares and norms of such values overflow but sums must not), the next
    layer scaled by 2^-s and cancelling the biases, logits O(1)."""
    g = torch.Generator().manual_seed(10)
    a = torch.tensor([[1.0, 0.5], [0.25, 1.0]], dtype=F64)
    cases = []
    for s in (500, 1000):
        model = gloro(nn.Flatten(), linear((2.0**s * a).tolist(), [2.0 ** (s + 10)] * 2),
                      nn.ReLU(), linear([[2.0**-s, -(2.0**-s)], [-(2.0**-s), 2.0**-s]],
                                        [0, 0.1]))
        cases.append(Case(f"2^{s}", model, torch.rand(12, 2, generator=g, dtype=F64),
                          (0.01, 0.1)))
    return cases


def _lp_dist(p: float, unit: float, hidden, last, bias) -> LinfDistNet:
    """h = (||x - w_o||_p)_o (weights ``hidden``), a mean shift of 0, u_j = ||h - v_j||_p + b_j
    (weights ``last``, biases ``bias``), logits -u; every weight in multiples of ``unit``."""
    first, second = LinfDist(2, 2, p).double(), LinfDist(2, 2, p, bias=True).double()
    with torch.no_grad():
        first.weight.copy_(unit * torch.tensor(hidden, dtype=F64))
        second.weight.copy_(unit * torch.tensor(last, dtype=F64))
        second.bias.copy_(unit * torch.tensor(bias, dtype=F64))
    layers = nn.Sequential(nn.Flatten(), first, MeanShift(2).double(), second, Negate())
    return LinfDistNet(layers, (2,), 2).double().eval()


@construction("ibp", "best")
def lp_dist_extreme_gaps() -> list[Case]:
    """l_p-dist nets at finite p (8: numba, 3 and 2^31: torch) whose differences are subnormal
    (unit 2^-1060: 1/m overflows, the forward gave inf) or near the top of float64 (unit
    2^1016, distances up to 2^1023), and one whose last differences overflow (|h - v| > max:
    that neuron is inf, nothing may be certified). Class 0 wins near x = 0 and class 1 near
    x = (64, 64) units, by some 70 units; between them the balls cross the boundary."""
    g = torch.Generator().manual_seed(12)
    tiny, big = 2.0**-1060, 2.0**1016
    cases = []
    for p in (8.0, 3.0, 2.0**31):
        model = _lp_dist(p, tiny, [[0, 0], [64, 64]], [[0, 100], [100, 0]], [0, 0])
        cases.append(Case(f"p={p} subnormal", model,
                          tiny * torch.randint(0, 65, (12, 2), generator=g).to(F64),
                          (tiny, 4 * tiny)))
        model = _lp_dist(p, big, [[-40, -40], [-41, -41]], [[-30, -30], [-40, -40]], [0, 4])
        cases.append(Case(f"p={p} near overflow", model,
                          torch.rand(6, 2, generator=g, dtype=F64), (0.1,)))
    overflow = _lp_dist(8.0, big, [[-40, -40], [-41, -41]], [[-30, -30], [-230, -230]],
                        [0, 0])
    cases.append(Case("trap: overflow", overflow, torch.rand(6, 2, generator=g, dtype=F64), (0.1,)))
    return cases


def _magnitudes(g: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    """Half O(1) normal values, half of magnitude 2^U(-40, 60) with a random sign."""
    normal = torch.randn(shape, generator=g, dtype=F64)
    sign = torch.sign(torch.randn(shape, generator=g, dtype=F64))
    huge = sign * 2.0 ** (-40 + 100 * torch.rand(shape, generator=g, dtype=F64))
    return torch.where(torch.rand(shape, generator=g) < 0.5, normal, huge)


@construction()
def random_magnitudes() -> list[Case]:
    """Random tiny nets (2-4 inputs, one or two hidden layers of ReLU or MinMax, 2-3 classes)
    with weights and biases mixing O(1) values and magnitudes log-uniform over 2^-40..2^60,
    of both signs."""
    cases = []
    for seed in range(6):
        g = torch.Generator().manual_seed(100 + seed)
        d = 2 + seed % 3
        widths = [2, 4] if seed % 2 else [4]
        act = MinMax if seed % 4 == 1 else nn.ReLU
        layers: list[nn.Module] = [nn.Flatten()]
        prev = d
        for width in [*widths, 2 + seed % 2]:
            layers.append(linear(_magnitudes(g, (width, prev)).tolist(),
                                 _magnitudes(g, (width,)).tolist()))
            layers.append(act())
            prev = width
        model = gloro(*layers[:-1], shape=(d,))
        cases.append(Case(f"seed {seed}", model, torch.rand(5, d, generator=g, dtype=F64),
                          (0.05, 0.3)))
    return cases


# -- the harness -----------------------------------------------------------------------------------
def show(p: np.ndarray) -> str:
    """A point with every coordinate's float64 repr (exact, so a failure can be replayed)."""
    return "[" + ", ".join(repr(float(v)) for v in p) + "]"


@dataclass
class Outcome:
    """What checking one construction found: soundness problems (exact, float64), radius
    problems, certified points checked per certifier (all; outside the traps), points
    evaluated exactly."""

    problems: list[str] = field(default_factory=list)
    radius_problems: list[str] = field(default_factory=list)
    certified: Counter[str] = field(default_factory=Counter)
    controls: Counter[str] = field(default_factory=Counter)
    points: int = 0


class TorchLinfDist(nn.Module):
    """An l_p-dist layer in plain torch ops: the attacks' differentiable stand-in (certnet's
    kernels are for batches far larger than these)."""

    def __init__(self, layer: LinfDist) -> None:
        super().__init__()
        self.weight, self.bias, self.p = layer.weight, layer.bias, layer.p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = (x.unsqueeze(1) - self.weight).abs().amax(2) if math.isinf(self.p) else \
            linf_dist_reference(x, self.weight, self.p)
        return u if self.bias is None else u + self.bias


class Checker:
    """Exact and float64 verdicts on the threat sets of one model, cached per set and pred.
    The float64 verdict is certnet's own float64 eval-mode forward pass (``layers64``); the
    attacks search on an equivalent copy (``search``)."""

    def __init__(self, model: CertifiedModel) -> None:
        self.model = model
        self.shape = tuple(model.input_shape)
        self.net = ExactNet(model.layers)
        self.layers64 = copy.deepcopy(model.layers).double().eval()
        self.search = nn.Sequential(*(TorchLinfDist(m) if type(m) is LinfDist else m
                                      for m in self.layers64))
        self.logits: dict[bytes, list[Fraction]] = {}
        self.verdicts: dict[tuple, tuple[str | None, str | None]] = {}

    def exact(self, p: np.ndarray) -> list[Fraction]:
        key = p.tobytes()
        if key not in self.logits:
            self.logits[key] = self.net(p.reshape(self.shape))
        return self.logits[key]

    def _margins(self, x: torch.Tensor, pred: torch.Tensor, layers: nn.Module | None = None
                 ) -> torch.Tensor:
        """float64 z_pred - z_j (B, C), +inf at j = pred, by ``layers`` (the search copy)."""
        z = (self.search if layers is None else layers)(x.view(-1, *self.shape))
        gaps = z.gather(1, pred.unsqueeze(1)) - z
        return gaps.scatter(1, pred.unsqueeze(1), math.inf)

    def directions(self, centres: torch.Tensor, pred: torch.Tensor) -> list[list[np.ndarray]]:
        """Per centre, the float64 gradients of z_pred - z_j for every j != pred."""
        x = centres.clone().requires_grad_(True)
        gaps = self._margins(x, pred)
        out: list[list[np.ndarray]] = [[] for _ in range(len(x))]
        for j in range(gaps.shape[1]):
            mask = pred != j
            (g,) = torch.autograd.grad(gaps[:, j].where(mask, 0.0).sum(), x, retain_graph=True)
            for i in mask.nonzero().flatten().tolist():
                if torch.isfinite(g[i]).all():
                    out[i].append(g[i].numpy())
        return out

    def attack(self, starts: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor,
               pred: torch.Tensor, norm: str, steps: int = 8) -> tuple[torch.Tensor, ...]:
        """Projected sign-gradient (l_inf) or normalised-gradient (l2) descent on the float64
        worst margin from ``starts``, every iterate projected onto its ball and the pixel box
        (approximately: the points are fitted exactly later). Returns the last iterates and
        the best ones."""
        adv, r = starts.clone(), radii.unsqueeze(1)
        best, best_margin = adv.clone(), torch.full((len(adv),), math.inf, dtype=F64)
        for t in range(steps):
            a = adv.clone().requires_grad_(True)
            margin = self._margins(a, pred).amin(1)
            (g,) = torch.autograd.grad(margin.sum(), a)
            better = margin.detach() < best_margin
            best[better], best_margin[better] = adv[better], margin.detach()[better]
            g = torch.where(torch.isfinite(g), g, 0.0)
            g = g.sign() if norm == "linf" else g / g.norm(dim=1, keepdim=True).clamp_min(1e-300)
            delta = adv - r / 4 * 0.7**t * g - centres
            if norm == "linf":
                delta = torch.maximum(torch.minimum(delta, r), -r)
            else:
                delta = delta * (r / delta.norm(dim=1, keepdim=True).clamp_min(1e-300)).clamp(
                    max=1.0)
            adv = (centres + delta).clamp(0, 1)
        return adv, best

    def verdicts_of(self, balls: list[Ball], preds: list[int]
                    ) -> list[tuple[str | None, str | None]]:
        """Per (ball, pred): the worst exact contradiction and the first float64 one over the
        points tried (None where there is none)."""
        keys = [(b.centre.tobytes(), b.radius, b.norm, b.closed, p) for b, p in zip(
            balls, preds, strict=True)]
        todo = [i for i, k in enumerate(keys) if k not in self.verdicts]
        todo = [i for n, i in enumerate(todo) if keys[i] not in [keys[t] for t in todo[:n]]]
        if todo:
            self._compute([balls[i] for i in todo], [preds[i] for i in todo],
                          [keys[i] for i in todo])
        return [self.verdicts[k] for k in keys]

    def _compute(self, balls: list[Ball], preds: list[int], keys: list[tuple]) -> None:
        rngs = [np.random.default_rng(zlib.crc32(repr(k).encode())) for k in keys]
        centres = torch.tensor(np.stack([b.centre for b in balls]), dtype=F64)
        pred = torch.tensor(preds)
        radii = torch.tensor([float(b.radius) for b in balls], dtype=F64)
        raw = [b.candidates(rng, dirs) for b, rng, dirs in
               zip(balls, rngs, self.directions(centres, pred), strict=True)]
        for runs in self.attack(centres, centres, radii, pred, balls[0].norm) + self.attack(
                torch.tensor(np.stack([cands[-1] for cands in raw])).clamp(0, 1), centres,
                radii, pred, balls[0].norm):
            for cands, q in zip(raw, runs.numpy(), strict=True):
                cands.append(q)
        fitted = [unique_points([q for q in map(ball.fit, cands) if q is not None])
                  for ball, cands in zip(balls, raw, strict=True)]
        flat = [q for pts in fitted for q in pts]
        owner = torch.tensor([p for p, pts in zip(preds, fitted, strict=True) for _ in pts])
        threads = torch.get_num_threads()
        with torch.no_grad():
            gaps = self._margins(torch.tensor(np.stack(flat), dtype=F64), owner, self.layers64)
        keep_threads(threads)
        wrong = (~(gaps.amin(1) > 0)).tolist()
        start = 0
        for p, key, pts in zip(preds, keys, fitted, strict=True):
            worst = None
            for q in pts:
                z = self.exact(q)
                for j, zj in enumerate(z):
                    if j != p and z[p] - zj <= 0 and (worst is None or z[p] - zj < worst[0]):
                        worst = (z[p] - zj, j, q)
            exact = None if worst is None else \
                f"exact margin {float(worst[0]):.6g} vs class {worst[1]} at x'={show(worst[2])}"
            bad = [k for k in range(start, start + len(pts)) if wrong[k]]
            floats = None if not bad else \
                f"float64 margins {gaps[bad[0]].tolist()} at x'={show(flat[bad[0]])}"
            start += len(pts)
            self.verdicts[key] = (exact, floats)


def proved_radius(prover: str, model: CertifiedModel, checker: Checker, centre: np.ndarray,
                  pred: int, norm: str) -> Fraction | None:
    """The square of the radius the proof of the radius certifier ``prover`` covers with the
    exact margins at the centre (0 if none), or None where that proof is not known here.
    linf-lipschitz: margin / (2 L); lipschitz: min_j gap_j / K_pred,j with the model's sound
    pairwise constants, divided by sqrt(d) in l_inf (squares keep it rational)."""
    z = checker.exact(centre)
    gaps = [(j, z[pred] - zj) for j, zj in enumerate(z) if j != pred]
    if prover == "linf-lipschitz":
        lip = linf_lipschitz_constant(model.layers)
        if lip is None or lip == 0:
            return None
        margin = min(gap for _, gap in gaps)
        return (margin / (2 * lip)) ** 2 if margin > 0 else Fraction(0)
    if prover == "lipschitz" and hasattr(model, "sound_lipschitz"):
        k = [Fraction(v) for v in model.sound_lipschitz()[pred].tolist()]
        scale = len(centre) if norm == "linf" else 1
        squares = [gap * gap / (k[j] ** 2 * scale) if gap > 0 else Fraction(0)
                   for j, gap in gaps if gap <= 0 or k[j] > 0]
        return min(squares) if squares else None
    return None


def radius_problem(name: str, prover: str, case: Case, checker: Checker, centre: np.ndarray,
                   pred: int, certified: bool, radius: Fraction, eps: float, norm: str
                   ) -> str | None:
    """Why a reported radius > 0 exceeds what was proved (None if it does not, or that is not
    known here): eps for an "eps or nothing" certificate, the proof's radius for a radius
    certificate. ``best``'s radius may be any applicable certifier's: the largest of them."""
    if name == "best":
        provers = [c for c in NAMES if c != "best" and CERTIFIERS[c].gives_radius and
                   CERTIFIERS[c].applies(case.model, norm) is None]
    elif CERTIFIERS[name].gives_radius:
        provers = [name]
    else:
        provers = []
    proofs = {c: proved_radius(c, case.model, checker, centre, pred, norm) for c in provers}
    if any(v is None for v in proofs.values()):
        return None
    allowed = [Fraction(eps) ** 2] if certified and (name == "best" or not provers) else []
    if radius * radius <= max([*allowed, *proofs.values()], default=Fraction(0)):
        return None
    limits = ([f"eps = {eps!r}"] if allowed else []) + \
        [f"what {c}'s proof covers, {math.sqrt(v):.6g}" for c, v in proofs.items()]
    return f"radius {float(radius)!r} > " + (" and ".join(limits) or "0, nothing certified") + \
        f" (by {prover or '?'})"


def check_certificate(where: str, case: Case, checker: Checker, name: str, norm: str,
                      eps: float, cert, outcome: Outcome) -> None:
    """Every claim of ``cert`` on the case's centres (see the module docstring)."""
    contradicted, float_wrong, too_large = [], [], []
    claims, balls, preds = [], [], []
    for i, centre in enumerate(case.centres.view(len(case.centres), -1).numpy()):
        pred, certified = int(cert.pred[i]), bool(cert.certified[i])
        r32 = float(cert.radius[i])
        claim = f"certifies class {pred} at x={show(centre)} (radius {r32!r})" if certified \
            else f"claims radius {r32!r} for class {pred} at x={show(centre)}"
        if not (math.isfinite(r32) and r32 >= 0):
            too_large.append(f"{claim}: not a finite radius >= 0")
            continue
        radius = Fraction(r32)
        if not certified and radius == 0:
            continue
        outcome.certified[name] += certified
        if not case.variant.startswith("trap"):
            outcome.controls[name] += certified
        if radius > 0:
            prover = (cert.by[i] if cert.by else "") or ("" if name == "best" else name)
            why = radius_problem(name, prover, case, checker, centre, pred, certified, radius,
                                 eps, norm)
            if why:
                too_large.append(f"{claim}: {why}")
        closed = certified and radius <= Fraction(eps)
        balls.append(Ball(centre, Fraction(eps) if closed else radius, norm, closed))
        claims.append(claim)
        preds.append(pred)
    for claim, (exact, floats) in zip(claims, checker.verdicts_of(balls, preds), strict=True):
        if exact:
            contradicted.append(f"{claim}: {exact}")
        if floats:
            float_wrong.append(f"{claim}: {floats}")
    n = len(case.centres)
    for label, found, sink in (("contradicted in exact arithmetic", contradicted,
                                outcome.problems),
                               ("contradicted by the float64 forward pass", float_wrong,
                                outcome.problems),
                               ("with a radius rounded up", too_large, outcome.radius_problems)):
        if found:
            sink.append(f"{where} {name} {norm} eps={eps!r}: {len(found)} of {n} points "
                        f"{label}; e.g. {name} {found[0]}")


@functools.cache
def outcome(name: str) -> Outcome:
    """Every registered certifier that applies, in both norms, on every case of the
    construction ``name`` (the global RNG is left as it was)."""
    with torch.random.fork_rng():
        return _outcome(name)


def keep_threads(threads: int) -> None:
    """Give torch back its thread count: certnet's numba kernels (l_inf-dist layers) set the
    shared OpenMP thread count to numba's, which makes torch's small float64 convolutions
    here some 40 times slower on two busy cores."""
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


def _outcome(name: str) -> Outcome:
    result = Outcome()
    threads = torch.get_num_threads()
    for case in CONSTRUCTIONS[name].build():
        checker = Checker(case.model)
        x = case.centres.view(-1, *case.model.input_shape)
        for norm in NORMS:
            for cname in NAMES:
                if CERTIFIERS[cname].applies(case.model, norm) is not None:
                    continue
                for eps in case.eps:
                    cert = certify(case.model, x, eps, cname, norm)
                    keep_threads(threads)
                    check_certificate(f"{name}[{case.variant}]", case, checker, cname, norm,
                                      eps, cert, result)
        result.points += len(checker.logits)
    return result


# -- tests -----------------------------------------------------------------------------------------
def test_the_exact_forward_pass_agrees_with_float64_on_ordinary_values():
    """The exact rules of every layer type used here (strided, padded convolutions, MinMax,
    Normalize, eval-mode BatchNorm, l_inf-dist layers, mean shifts, negation) agree with the
    layers' own float64 outputs to rounding, on O(1) weights."""
    g = torch.Generator().manual_seed(11)
    norm = nn.BatchNorm1d(16, eps=0.0).double().eval()
    dist, last = LinfDist(16, 6).double(), LinfDist(6, 3, bias=True).double()
    shift = MeanShift(6).double().eval()
    with torch.no_grad():
        norm.running_mean.normal_(generator=g)
        norm.running_var.copy_(4.0 ** torch.randint(-3, 4, (16,), generator=g))
        norm.weight.normal_(generator=g)
        norm.bias.normal_(generator=g)
        for m in (dist, last):
            for p in m.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        shift.running_mean.normal_(generator=g)
    first = nn.Conv2d(1, 4, 3, stride=2, padding=1).double()
    second = LipschitzConv2d(4, 4, 2, stride=1, padding=1, dtype=F64)
    hidden = linear(torch.randn(16, 36, generator=g).tolist(), [0.5] * 16)
    head = linear(torch.randn(3, 16, generator=g).tolist(), [0.1, 0, -0.1])
    nets = [nn.Sequential(Normalize([0.5], [0.3]).double(), first, MinMax(), second,
                          nn.ReLU(), nn.Identity(), nn.Flatten(), hidden, norm, nn.ReLU(), head),
            nn.Sequential(nn.Flatten(), dist, shift, last, Negate())]
    threads = torch.get_num_threads()
    for layers in nets:
        layers.eval()
        exact = ExactNet(layers)
        for x in torch.rand(4, 1, 4, 4, generator=g, dtype=F64):
            with torch.no_grad():
                reference = layers(x.unsqueeze(0))[0].tolist()
            keep_threads(threads)
            got = [float(v) for v in exact(x.numpy())]
            assert got == pytest.approx(reference, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("unit", [2.0**-1060, 2.0**1016])
@pytest.mark.parametrize("p", [8.0, 3.0, 2.0**31])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_lp_dist_forward_is_within_its_stated_error(backend, p, unit):
    """The float64 l_p-dist forward (finite p) against the exact distance (``lp_norm``) on
    integers of [-40, 40] times ``unit``: subnormal differences (1/m overflows) and
    differences up to 2^1022.3 (distances up to 2^1023.2), every one within the rule's stated
    error (``dist_error`` on the one-point box), which is finite; a difference that overflows
    (x = 2^1023 against w = -2^1023) gives inf, as does its stated error."""
    g = torch.Generator().manual_seed(13)
    x = unit * torch.randint(-40, 41, (5, 6), generator=g).to(F64)
    w = unit * torch.randint(-40, 41, (4, 6), generator=g).to(F64)
    if backend == "numba" and linf_dist_backend(x, p) != "numba":
        pytest.skip(f"numba does not take p = {p}")
    layer = LinfDist(6, 4, p).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    u = linf_dist(x, w, p, backend)
    error = dist_error(x, x, layer)
    assert u.isfinite().all() and error.isfinite().all()
    for b, o in itertools.product(range(5), range(4)):
        exact = lp_norm([Fraction(s) - Fraction(t) for s, t in
                         zip(x[b].tolist(), w[o].tolist(), strict=True)], p)
        assert abs(Fraction(u[b, o].item()) - exact) <= \
            Fraction(error[b, o].item()) - 2 * LP_ACCURACY * exact, (b, o)
    x[0, 0], w[0, 0] = 2.0**1023, -(2.0**1023)
    layer.weight.data[0, 0] = w[0, 0]
    assert linf_dist(x, w, p, backend)[0, 0].item() == dist_error(x, x, layer)[0, 0] == math.inf


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_certificates_hold_in_exact_arithmetic(name):
    """Every certified point's threat set (and every reported radius's open ball): exact
    margins > 0 and the float64 forward pass agrees, at every point tried."""
    problems = outcome(name).problems
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_reported_radii_are_never_rounded_up(name):
    """eps-or-nothing radii <= eps exactly; radius certificates <= what their proof covers."""
    problems = outcome(name).radius_problems
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", list(CONSTRUCTIONS))
def test_the_checks_are_not_vacuous(name):
    """The controls (the cases that are not traps) are certified by the certifiers the
    construction names, and the checks evaluated points exactly."""
    result = outcome(name)
    missing = [c for c in CONSTRUCTIONS[name].expect if result.controls[c] == 0]
    assert not missing, f"{name}: no control certified by {missing}: {dict(result.controls)}"
    assert result.points >= 50, result.points


def test_every_certifier_is_checked_on_certified_points():
    """Summed over the constructions, every registered certifier had certified points
    checked (the registry, not a list here, says which certifiers there are)."""
    totals: Counter[str] = Counter()
    for name in CONSTRUCTIONS:
        totals.update(outcome(name).certified)
    print(f"\ncertified points checked: {dict(sorted(totals.items()))}")
    assert all(totals[c] >= 10 for c in NAMES), dict(totals)


def test_the_drift_is_subtracted_rounded_down_in_exact_arithmetic():
    """lower - |spec| . drift as margin_walk and spec_bounds return it is at most the exact
    difference, where plain float subtraction of a rounded-down sum would land above it."""
    from certnet.bounds.margins import _minus_drift, margin_spec

    lower = torch.tensor([[1.0, 3.0]], dtype=torch.float64)
    # drift_ref + drift_j = 1 + 2^-54 rounds down to 1: lower - (a + b) would give 0 > -2^-54
    drift = torch.tensor([[1.0, 2.0 ** -54, 2.0]], dtype=torch.float64)
    spec = margin_spec(torch.tensor([0]), 3).double()
    got = _minus_drift(lower, spec, drift)
    for k, j in enumerate((1, 2)):
        exact = Fraction(1.0 if k == 0 else 3.0) - Fraction(1.0) - Fraction(float(drift[0, j]))
        assert Fraction(float(got[0, k])) <= exact
    assert float(lower[0, 0] - (drift[0, 0] + drift[0, 1])) == 0.0  # the naive form's error


@pytest.mark.parametrize("method", ["ibp", "crown-ibp", "crown", "alpha-crown"])
def test_box_bounds_hold_at_a_point_of_cancelling_biases(method):
    """spec_bounds over the one-point box {x} of _last_layer's net (B = 2^60 cancels: float64
    computes z0 = 0 or -256 where the exact z0 = -(x1 + 60)): each rigorous bound on z0 and
    on -z0 is below the exact value at x, in exact arithmetic. The plain bounds are not (so
    the check can fail): a method whose rigorous pass ran plain would be caught here."""
    net = _last_layer(-2.0**15).layers
    spec = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]], dtype=F64)
    for x1 in (0.05, 0.35, 0.6):
        x = torch.tensor([x1, 0.5], dtype=F64)
        threat = BoxThreat.of(x, x)
        exact = -(Fraction(x1) + 60)
        rigorous = spec_bounds(net, x.unsqueeze(0), threat, spec, method, rigorous=True)[0]
        assert Fraction(float(rigorous[0])) <= exact and Fraction(float(rigorous[1])) <= -exact
        plain = spec_bounds(net, x.unsqueeze(0), threat, spec, method)[0]
        assert Fraction(float(plain[0])) > exact or Fraction(float(plain[1])) > -exact


def test_an_l2_ball_reach_is_above_the_exact_reach():
    """IBP's l2-ball refinement (ibp._ball, rigorous): radius * ||row||_2 of every row, in
    exact rationals, is at most the computed reach squared, at ordinary, tiny (squares
    underflow) and huge magnitudes, at a radius that float32 rounds down and at a subnormal
    one; the plain reach
    falls below it on some row (so the check can fail)."""
    generator = torch.Generator().manual_seed(5)
    below = 0
    # 0.7 rounds down in float32: a radius taken in the default dtype would be too small
    # a subnormal radius: the product rounds to a multiple of the smallest subnormal, whatever
    # the norms' relative slack
    for scale, radius in ((1.0, 0.37), (1.0, 0.7), (2.0**-540, 0.37), (2.0**-1000, 0.37),
                          (2.0**500, 0.37), (1.0, 3 * 2.0**-1074)):
        layer = nn.Linear(300, 24).double()
        with torch.no_grad():
            layer.weight.copy_(torch.randn(24, 300, generator=generator, dtype=F64) * scale)
        inp = LayerInput(*(torch.zeros(1, 300, dtype=F64),) * 3)
        rigorous = _ball(LinearRule(), layer, inp, radius, rigorous=True).flatten().tolist()
        plain = _ball(LinearRule(), layer, inp, radius, rigorous=False).flatten().tolist()
        for row, got, loose in zip(layer.weight.tolist(), rigorous, plain, strict=True):
            exact = Fraction(radius) ** 2 * sum(Fraction(w) ** 2 for w in row)
            assert Fraction(got) ** 2 >= exact, scale
            below += Fraction(loose) ** 2 < exact
    assert below


def test_a_float32_l2_ball_reach_is_above_the_exact_reach():
    """The same in float32 (a float32 network's rigorous walk): its norms round by float32's
    unit, and the radius itself rounds (0.7 down) when taken in the layer's dtype."""
    generator = torch.Generator().manual_seed(5)
    for radius in (0.37, 0.7):
        layer = nn.Linear(300, 24)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(24, 300, generator=generator))
        inp = LayerInput(*(torch.zeros(1, 300),) * 3)
        reach = _ball(LinearRule(), layer, inp, radius, rigorous=True)
        assert reach.dtype == torch.float32
        for row, got in zip(layer.weight.tolist(), reach.flatten().tolist(), strict=True):
            assert Fraction(got) ** 2 >= Fraction(radius) ** 2 * sum(Fraction(w) ** 2
                                                                     for w in row)
