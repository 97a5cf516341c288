"""Bounds on graphs (residual adds, concatenations) through their lowered chain
(certnet.graph.lower): the chain computes the graph exactly, every bound contains sampled
and attacked outputs, radius 0 is exact, and the rigorous bounds hold in exact rational
arithmetic at adversarial magnitudes (huge cancelling biases in a branch)."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
import torch
from exact import ExactNet
from torch import nn

from certnet.bounds.margins import spec_bounds
from certnet.graph import INPUT, Graph, Node
from certnet.graph.lower import lower
from certnet.graph.ops import Add, Concat
from certnet.threat import ThreatModel

METHODS = ("ibp", "crown", "alpha-crown")


def random_graph(seed: int, d: int = 4, classes: int = 3, scale: float = 1.0) -> Graph:
    """A random DAG on flat vectors: dense layers, ReLUs, residual adds of equal widths and
    concatenations of earlier values, then a dense head."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    nodes: list[Node] = []
    widths = {INPUT: d}

    def add(op: nn.Module, inputs: tuple[int, ...], width: int) -> None:
        nodes.append(Node(op.double(), inputs, f"n{len(nodes)} ({type(op).__name__})"))
        widths[len(nodes) - 1] = width

    for _ in range(rng.randint(3, 6)):
        last = len(nodes) - 1 if nodes else INPUT
        pick = rng.random()
        same = [j for j in widths if widths[j] == widths[last] and j != last]
        if pick < 0.3 and same:
            add(Add(), (last, rng.choice(same)), widths[last])
        elif pick < 0.45:
            other = rng.choice(list(widths))
            add(Concat(1), (last, other), widths[last] + widths[other])
        else:
            width = rng.choice([widths[last], 5, 6])
            linear = nn.Linear(widths[last], width)
            with torch.no_grad():
                linear.weight.mul_(scale)
            add(linear, (last,), width)
            add(nn.ReLU(), (len(nodes) - 1,), width)
    add(nn.Linear(widths[len(nodes) - 1], classes), (len(nodes) - 1,), classes)
    return Graph(nodes, (d,)).double().eval()


@pytest.mark.parametrize("seed", range(8))
def test_the_chain_computes_the_graph_and_bounds_contain_outputs(seed):
    graph = random_graph(seed)
    chain = lower(graph)
    generator = torch.Generator().manual_seed(seed)
    x = torch.rand(3, 4, dtype=torch.float64, generator=generator)
    with torch.no_grad():
        assert torch.equal(chain(x), graph(x))
    spec = torch.randn(3, 4, 3, dtype=torch.float64, generator=generator)
    noise = torch.rand(500, 3, 4, dtype=torch.float64, generator=generator) * 0.1 - 0.05
    with torch.no_grad():
        outputs = graph((x + noise).clamp(0, 1).flatten(0, 1)).view(500, 3, 3)
    values = torch.einsum("nbk,bsk->nbs", outputs, spec).amin(0)
    threat = ThreatModel("linf", 0.05)
    for method in METHODS:
        for rigorous in (False, True):
            lower_bound = spec_bounds(chain, x, threat, spec, method, rigorous=rigorous)
            assert (lower_bound <= values).all(), (method, rigorous)
    at_zero = spec_bounds(chain, x, ThreatModel("linf", 0.0), spec, "crown", rigorous=True)
    with torch.no_grad():
        exact = torch.einsum("bk,bsk->bs", graph(x), spec)
    assert (at_zero <= exact).all()
    assert torch.allclose(at_zero, exact, rtol=0, atol=1e-9)


def test_crown_is_tighter_than_intervals_on_residual_graphs():
    wins = 0
    for seed in range(8):
        chain = lower(random_graph(seed))
        x = torch.rand(4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
        spec = torch.eye(3, dtype=torch.float64).expand(4, 3, 3)
        threat = ThreatModel("linf", 0.05)
        ibp = spec_bounds(chain, x, threat, spec, "ibp", rigorous=True)
        crown = spec_bounds(chain, x, threat, spec, "crown", rigorous=True)
        wins += int((crown > ibp + 1e-9).any())
    assert wins >= 4  # CROWN's relaxation is used through the joins, not bypassed


def _cancelling_graph() -> Graph:
    """x -> Linear(+1e16 bias) -> ReLU -> Linear(-1e16 bias) , + x -> ReLU -> head: the branch
    computes ~x in float64 only up to rounding of size 1 (u * 1e16), which the rigorous bounds
    must charge."""
    up, down, head = nn.Linear(3, 3), nn.Linear(3, 3), nn.Linear(3, 2)
    with torch.no_grad():
        up.weight.copy_(torch.eye(3))
        up.bias.fill_(1e16)
        down.weight.copy_(torch.eye(3) * 0.5)
        down.bias.fill_(-5e15)
        head.weight.copy_(torch.tensor([[1.0, -1.0, 0.5], [-0.5, 1.0, 1.0]]))
        head.bias.zero_()
    nodes = [Node(up, (INPUT,), "up"), Node(nn.ReLU(), (0,), "relu"),
             Node(down, (1,), "down"), Node(Add(), (2, INPUT), "res"),
             Node(nn.ReLU(), (3,), "relu2"), Node(head, (4,), "head")]
    return Graph(nodes, (3,)).double().eval()


@pytest.mark.parametrize("method", METHODS)
def test_rigorous_bounds_hold_in_exact_arithmetic_at_adversarial_magnitudes(method):
    graph = _cancelling_graph()
    chain = lower(graph)
    exact = ExactNet(chain)
    x = torch.tensor([[0.25, 0.5, 0.75]], dtype=torch.float64)
    eps = 0.125
    spec = torch.tensor([[[1.0, -1.0], [-1.0, 1.0]]], dtype=torch.float64)
    lower_bound = spec_bounds(chain, x, ThreatModel("linf", eps), spec, method, rigorous=True)
    rng = np.random.default_rng(0)
    corners = [np.array(c) for c in np.array(np.meshgrid(*[[0, 1]] * 3)).T.reshape(-1, 3)]
    points = [x[0].numpy() + eps * (2 * c - 1) for c in corners] + \
        [x[0].numpy() + eps * rng.uniform(-1, 1, 3) for _ in range(20)]
    for p in points:
        z = exact(p)
        for row in range(2):
            value = sum(Fraction(float(spec[0, row, k])) * z[k] for k in range(2))
            assert Fraction(float(lower_bound[0, row])) <= value


def test_a_value_summed_three_ways_is_refused():
    """x read twice by one add and kept for later: its coefficients would be summed with two
    roundings, the first relative to a partial sum; certnet refuses rather than guess."""
    from certnet.bounds.rules import check_supported
    from certnet.errors import UnsupportedLayerError

    head = nn.Linear(2, 2).double()
    nodes = [Node(Add(), (INPUT, INPUT), "double"), Node(Add(), (0, INPUT), "plus"),
             Node(head, (1,), "head")]
    chain = lower(Graph(nodes, (2,)))
    with pytest.raises(UnsupportedLayerError, match="three-way sum"):
        check_supported(chain)
