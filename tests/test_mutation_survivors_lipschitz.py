"""Tests written against the mutants of the ``lipschitz_bounds`` slice (``bounds/pairwise.py``,
``bounds/local.py``, ``bounds/linf_lipschitz.py``, ``bounds/rules/linf_dist.py``) that survived
``scripts/mutation.sh`` (tests/mutation/survivors.md).

The certificates are checked against attacks and exact points; the pairwise constant
K_ij = ||w_i - w_j||_2 Lip(body) itself is checked here against its exact value, so that its
rounding slack can neither vanish nor grow unnoticed."""

from __future__ import annotations

import math
from fractions import Fraction

import torch
from torch import nn

from certnet.bounds.pairwise import SoundConstants, masked_pairwise, pairwise_lipschitz
from certnet.nn.lipschitz import LipschitzLinear
from certnet.nn.spectral import BOUND_SLACK


def _exact_squared_distance(w: torch.Tensor, i: int, j: int) -> Fraction:
    """||w_i - w_j||_2 squared, in exact rationals."""
    return sum((Fraction(a) - Fraction(b)) ** 2 for a, b in zip(w[i].tolist(), w[j].tolist(),
                                                                strict=True))


def test_sound_pairwise_constants_are_above_the_exact_ones_and_within_their_slack():
    """K_ij >= ||w_i - w_j||_2 * body exactly (the float norm and products round), and at
    most (1 + 4 * BOUND_SLACK) above it: the slack is the documented one, no larger."""
    torch.manual_seed(3)
    net = nn.Sequential(LipschitzLinear(5, 7), nn.ReLU(), LipschitzLinear(7, 4)).double()
    sound = SoundConstants.of(net)
    w = net[-1].weight.double()
    body = Fraction(float(sound.body))
    for i in range(4):
        for j in range(4):
            squared = _exact_squared_distance(w, i, j) * body ** 2
            k = Fraction(float(sound.pairwise[i, j]))
            assert k ** 2 >= squared
            if i != j:
                assert k ** 2 <= squared * Fraction(1 + 4 * BOUND_SLACK) ** 2


def test_pairwise_and_masked_constants_are_row_distances_at_any_scale():
    """||w_i - w_j||_2 (times the body's constant), whatever the weights' magnitude (they are
    rescaled by the largest weight, so neither the squares underflow nor the scale is lost),
    with every input kept or only some."""
    g = torch.Generator().manual_seed(4)
    for scale in (1.0, 2.0 ** -600, 2.0 ** 500):
        w = torch.randn(3, 6, generator=g, dtype=torch.float64) * scale
        want = torch.cdist(w / scale, w / scale) * scale
        assert torch.allclose(pairwise_lipschitz(w, 2.0), 2 * want, rtol=1e-12, atol=0)
        assert torch.allclose(masked_pairwise(w, None), want, rtol=1e-12, atol=0)
        keep = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 0, 1]], dtype=torch.float64)
        masked = masked_pairwise(w, keep)
        floor = 2 * math.sqrt(torch.finfo(torch.float64).tiny) * float(w.abs().max())  # diag
        assert torch.allclose(masked[0], want, rtol=1e-12, atol=floor)
        part = w[:, keep[1].bool()] / scale
        assert torch.allclose(masked[1], torch.cdist(part, part) * scale, rtol=1e-12,
                              atol=floor)


def test_the_sound_body_is_the_product_of_every_layer_but_the_head():
    torch.manual_seed(5)
    net = nn.Sequential(LipschitzLinear(4, 6), nn.ReLU(), LipschitzLinear(6, 6),
                        LipschitzLinear(6, 3)).double()  # the last body layer is no ReLU
    sound = SoundConstants.of(net)
    assert len(sound.layers) == len(net)
    product = math.prod(float(b) for b in sound.layers[:-1])
    assert math.isclose(float(sound.body), product, rel_tol=1e-12)
    assert float(sound.layers[-2]) != 1.0


def test_logit_gaps_subtract_the_documented_allowance():
    """gap_j = y_pred - y_j - GAP_SLACK (1 + |y_pred| + |y_j|) - 2 E: the rounding bound E of
    each logit counted twice (|d_j| + |d_pred| <= 2 E), no more."""
    from certnet.bounds.pairwise import GAP_SLACK, logit_gaps

    logits = torch.tensor([[1.0, 3.0, -2.0], [0.5, 0.25, 4.0]], dtype=torch.float64)
    error = torch.tensor([1e-6, 2e-6], dtype=torch.float64)
    pred, gaps = logit_gaps(logits, error)
    assert pred.tolist() == [1, 2]
    top = logits.gather(1, pred.unsqueeze(1))
    want = top - logits - GAP_SLACK * (1 + top.abs() + logits.abs()) - 2 * error[:, None]
    assert torch.equal(gaps, want)


def test_a_pair_whose_gap_or_constant_is_unusable_certifies_nothing():
    """pairwise_radius: min_j gap_j / K_j over j != pred, rounded down; a gap or K that is not
    finite, or K <= 0, gives radius 0 for that point (never inf, never 1), and a K below 1 is
    as usable as any other."""
    from certnet.bounds.pairwise import pairwise_radius

    inf, nan = float("inf"), float("nan")
    pred = torch.zeros(6, dtype=torch.long)
    gap = torch.tensor([[0.0, 1.0, 2.0], [0.0, inf, 2.0], [0.0, 1.0, 2.0], [0.0, 1.0, 2.0],
                        [0.0, nan, 2.0], [0.0, 1.0, 2.0]], dtype=torch.float64)
    k = torch.tensor([[1.0, 0.5, 4.0], [1.0, 1.0, 4.0], [1.0, 0.0, 4.0], [1.0, inf, 4.0],
                      [1.0, 1.0, 4.0], [1.0, nan, 4.0]], dtype=torch.float64)
    radius = pairwise_radius(gap, k, pred)
    assert radius[0] == torch.nextafter(torch.tensor(0.5, dtype=torch.float64),
                                        torch.tensor(0.0, dtype=torch.float64))
    assert radius[1:].eq(0).all(), radius


def test_local_bounds_walk_rigorously_without_a_float32_box():
    """Without a float32 copy (weights float32 cannot hold) the local walk is the rigorous
    float64 one: its head interval holds the exact values behind biases of 2^52 that cancel
    (a plain walk rounds them away)."""
    from certnet.bounds.local import local_layer_bounds
    from certnet.threat import ThreatModel

    up, down, head = (LipschitzLinear(2, 2).double() for _ in range(3))
    with torch.no_grad():
        for layer in (up, down, head):
            layer.weight.copy_(torch.eye(2, dtype=torch.float64))
        up.bias.fill_(2.0 ** 52)
        down.bias.fill_(-(2.0 ** 52))
        head.bias.zero_()
    net = nn.Sequential(up, nn.ReLU(), down, nn.ReLU(), head)
    x = torch.tensor([[0.3, 0.6]], dtype=torch.float64)
    threat = ThreatModel("linf", 0.125)
    with torch.no_grad():
        _, _, last = local_layer_bounds(net, x, threat, SoundConstants.of(net).layers, {},
                                        box_layers=None)
    lo, hi = (Fraction(v) for v in last.lo[0].tolist()), (Fraction(v) for v in last.hi[0].tolist())
    for low, high, centre in zip(lo, hi, x[0].tolist(), strict=True):
        for end in (Fraction(centre) - Fraction(0.125), Fraction(centre) + Fraction(0.125)):
            exact = max(end, Fraction(0))  # relu(relu(h + 2^52) - 2^52), h + 2^52 > 0
            assert low <= exact <= high
