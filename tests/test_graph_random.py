"""Random DAGs with every operator certnet bounds (issue 27): hypothesis draws small graphs
(convolutions, ReLU, LeakyReLU, Tanh, Sigmoid, GELU, MinMax, average and max pooling,
eval-mode BatchNorm, Normalize, residual adds and channel concatenations on images; then a
flatten, dense layers, LeakyReLU, SiLU, erf, adds and concatenations on vectors; a dense head)
and checks that

1. the chain the bounds engine walks (``Graph.chain()``) computes the graph bit for bit;
2. every method's bound (IBP, CROWN-IBP, CROWN, alpha-CROWN; rigorous or not) is below
   spec . z at sampled points of the l_inf box, its corners (<= 8 input dims), and a PGD
   point, and (5) the same for an l2 ball;
3. at eps = 0 every rigorous bound is below spec . z(x) and within 1e-8 (1 + |v|) of it;
4. for graphs without smooth activations and with <= 6 input dims, the exact MILP oracle's
   minimum margin is above every rigorous margin bound;
6. CROWN-IBP, CROWN and alpha-CROWN are never looser than IBP (each takes the larger of its
   backward bound and IBP's on its own, tighter, intervals; 1e-12 relative for rounding).
   tests/test_graph_bounds.py checks that CROWN's relaxation gains through the joins.
"""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

from certnet.bounds.margins import margin_spec, spec_bounds
from certnet.errors import UnsupportedLayerError
from certnet.falsify import falsify
from certnet.graph import INPUT, Graph, Node
from certnet.graph.lower import Step
from certnet.graph.ops import Add, Concat
from certnet.nn.activations import MinMax
from certnet.nn.linf_dist import LinfDist
from certnet.nn.lipschitz import Normalize
from certnet.nn.smooth import Erf
from certnet.threat import ThreatModel
from certnet.verify.oracle import exact_min_margin

METHODS = ("ibp", "crown-ibp", "crown", "alpha-crown")
MAX_NODES = 8
SAMPLES = 200

#: the operator combinations certnet refused (UnsupportedLayerError), with the message
REFUSED: list[str] = []
#: how the examples went (chains vs lowered graphs, oracle checks, operators seen)
SEEN: dict[str, int] = {}


pytestmark = pytest.mark.usefixtures("single_thread")


def _count(key: str) -> None:
    SEEN[key] = SEEN.get(key, 0) + 1


# -- the strategy ------------------------------------------------------------------------------
#: the operators drawn (repeats: affine layers and ReLUs more often, for unstable neurons)
IMAGE_OPS = ("conv", "relu", "conv", "relu", "pool", "bn", "norm", "add", "concat", "tanh",
             "minmax", "maxpool", "leaky", "sigmoid", "gelu")
VECTOR_OPS = ("linear", "relu", "linear", "relu", "add", "concat", "tanh", "minmax", "leaky",
              "silu", "erf")
#: the smooth activations (no exact MILP encoding: the oracle check skips their graphs)
SMOOTH = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU, "erf": Erf}


@st.composite
def graphs(draw: st.DrawFn) -> Graph:
    """A DAG of <= 8 nodes: image operators on (C <= 3, H, W <= 6) (or, sometimes, a vector
    input), a flatten, vector operators, a dense head to 2-4 outputs. The structure comes from
    hypothesis (so it shrinks), the weights from a drawn seed."""
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    scale = draw(st.sampled_from([1.0, 3.0]), label="scale")

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    def uniform(lo: float, hi: float, *shape: int) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(*shape, generator=gen, dtype=torch.float64)

    nodes: list[Node] = []
    shapes: dict[int, tuple[int, ...]] = {}

    def add(op: nn.Module, inputs: tuple[int, ...], shape: tuple[int, ...]) -> int:
        nodes.append(Node(op.double().eval(), inputs, f"n{len(nodes)} ({type(op).__name__})"))
        shapes[len(nodes) - 1] = shape
        return len(nodes) - 1

    def pick(candidates: list[int], label: str) -> int:
        """Mostly the newest value (a chain), sometimes an earlier one (a branch)."""
        return draw(st.sampled_from(sorted(candidates, reverse=True)), label=label)

    image = draw(st.integers(0, 3), label="image input") > 0
    if image:
        input_shape = (draw(st.integers(1, 3), label="C"), draw(st.integers(2, 6), label="H"),
                       draw(st.integers(2, 6), label="W"))
    else:
        input_shape = (draw(st.integers(1, 6), label="d"),)
    shapes[INPUT] = input_shape
    budget = MAX_NODES - 1 - image  # the head, the flatten
    n_image = draw(st.integers(1, budget), label="image ops") if image else 0
    n_vector = draw(st.integers(0, budget - n_image), label="vector ops")

    def grow(ops: tuple[str, ...], count: int, rank: int) -> None:
        for _ in range(count):
            values = [j for j, s in shapes.items() if len(s) == rank]
            kind = draw(st.sampled_from(ops), label="op")
            a = pick(values, "input")
            shape = shapes[a]
            if kind == "conv":
                c, h, w = shape
                out = draw(st.integers(1, 3), label="out channels")
                stride = draw(st.integers(1, 2), label="stride")
                pad = draw(st.integers(0, 1), label="padding")
                k = draw(st.integers(1, min(3, h + 2 * pad, w + 2 * pad)), label="kernel")
                oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
                conv = nn.Conv2d(c, out, k, stride=stride, padding=pad).double()
                with torch.no_grad():
                    conv.weight.copy_(randn(out, c, k, k) * scale / math.sqrt(c * k * k))
                    conv.bias.copy_(randn(out) * 0.5)
                add(conv, (a,), (out, oh, ow))
            elif kind == "linear":
                out = draw(st.integers(1, 6), label="width")
                linear = nn.Linear(shape[0], out).double()
                with torch.no_grad():
                    linear.weight.copy_(randn(out, shape[0]) * scale / math.sqrt(shape[0]))
                    linear.bias.copy_(randn(out) * 0.5)
                add(linear, (a,), (out,))
            elif kind == "relu":
                add(nn.ReLU(), (a,), shape)
            elif kind in SMOOTH:
                add(SMOOTH[kind](), (a,), shape)
            elif kind == "leaky":
                slope = draw(st.sampled_from([0.0, 0.01, 0.3, 1.0]), label="slope")
                add(nn.LeakyReLU(slope), (a,), shape)
            elif kind == "maxpool":  # overlapping, padded windows too
                k = draw(st.integers(2, 3), label="pool kernel")
                stride = draw(st.integers(1, k), label="pool stride")
                pad = draw(st.integers(0, k // 2), label="pool padding")
                if min(shape[1:]) + 2 * pad < k:
                    continue
                add(nn.MaxPool2d(k, stride, pad), (a,),
                    (shape[0], *((d + 2 * pad - k) // stride + 1 for d in shape[1:])))
            elif kind == "minmax":
                if shape[0] % 2:
                    continue
                add(MinMax(), (a,), shape)
            elif kind == "pool":
                if shape[1] < 2 or shape[2] < 2:
                    continue
                add(nn.AvgPool2d(2), (a,), (shape[0], shape[1] // 2, shape[2] // 2))
            elif kind == "bn":
                bn = nn.BatchNorm2d(shape[0]).double()
                with torch.no_grad():
                    bn.running_mean.copy_(uniform(-1, 1, shape[0]))
                    bn.running_var.copy_(uniform(0.1, 2, shape[0]))
                    bn.weight.copy_(uniform(-2, 2, shape[0]))
                    bn.bias.copy_(uniform(-1, 1, shape[0]))
                add(bn, (a,), shape)
            elif kind == "norm":
                channels = draw(st.sampled_from([1, shape[0]]), label="norm channels")
                add(Normalize(uniform(0, 1, channels).tolist(),
                              uniform(0.2, 1, channels).tolist()), (a,), shape)
            elif kind == "add":
                b = pick([j for j in values if shapes[j] == shape], "other")
                add(Add(), (a, b), shape)
            else:  # concat along channels / features
                others = [j for j in values if shapes[j][1:] == shape[1:]
                          and shapes[j][0] + shape[0] <= 6]
                if not others:
                    continue
                b = pick(others, "other")
                add(Concat(1), (a, b), (shape[0] + shapes[b][0], *shape[1:]))

    if image:
        grow(IMAGE_OPS, n_image, 3)
        last = len(nodes) - 1 if nodes else INPUT
        add(nn.Flatten(), (last,), (math.prod(shapes[last]),))
    grow(VECTOR_OPS, n_vector, 1)
    last = len(nodes) - 1 if nodes else INPUT
    classes = draw(st.integers(2, 4), label="classes")
    head = nn.Linear(shapes[last][0], classes).double()
    with torch.no_grad():
        head.weight.copy_(randn(classes, shapes[last][0]) * scale / math.sqrt(shapes[last][0]))
        head.bias.copy_(randn(classes) * 0.5)
    add(head, (last,), (classes,))
    return Graph(nodes, input_shape).double().eval()


@st.composite
def problems(draw: st.DrawFn) -> tuple[Graph, torch.Tensor, torch.Tensor, float]:
    """A graph, a point x in [0, 1] (batch of one), a random spec (1, 3, K), a small eps."""
    graph = draw(graphs())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="x seed"))
    x = torch.rand(1, *graph.input_shape, generator=gen, dtype=torch.float64)
    classes = graph.nodes[-1].op.out_features
    spec = torch.randn(1, 3, classes, generator=gen, dtype=torch.float64)
    eps = draw(st.sampled_from([0.01, 0.05, 0.15]), label="eps")
    return graph, x, spec, eps


# -- exact comparisons -------------------------------------------------------------------------
def _exact_dot(spec_row: torch.Tensor, z: torch.Tensor) -> Fraction:
    return sum((Fraction(float(s)) * Fraction(float(v)) for s, v in zip(spec_row, z,
                                                                        strict=True)),
               Fraction(0))


def assert_below(bound: torch.Tensor, spec: torch.Tensor, outputs: torch.Tensor,
                 tolerance: float, what: str) -> None:
    """bound (S,) <= spec (S, K) . z for every output z (N, K): exactly (rationals) where
    ``tolerance`` is 0, else up to tolerance * (1 + |v|) (float bounds: rounding is not
    charged)."""
    values = outputs @ spec.T  # (N, S)
    slack = tolerance * (1 + values.abs()) + 1e-12 * (1 + values.abs())
    suspects = (bound[None] > values - slack).nonzero().tolist()
    for n, s in suspects:
        exact = _exact_dot(spec[s], outputs[n])
        limit = exact + Fraction(tolerance) * (1 + abs(exact))
        assert Fraction(float(bound[s])) <= limit, (
            f"{what}: bound {float(bound[s])!r} above spec.z = {float(exact)!r} "
            f"(row {s}, point {n})")


def box_points(x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """200 uniform points of the l_inf box (clipped to [0, 1]), its corners if <= 8 dims."""
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    points = lo + (hi - lo) * torch.rand(SAMPLES, *x.shape[1:], generator=gen,
                                         dtype=torch.float64)
    d = x[0].numel()
    if d <= 8:
        bits = (torch.arange(2**d)[:, None] >> torch.arange(d)) & 1
        corners = lo.flatten(1) + (hi - lo).flatten(1) * bits.double()
        points = torch.cat([points, corners.view(-1, *x.shape[1:]), x])
    return points


def ball_points(x: torch.Tensor, eps: float, gen: torch.Generator) -> torch.Tensor:
    """200 points of the l2 ball (radius eps * u^(1/d), some on the sphere), clipped to
    [0, 1] (which keeps them in the ball: x is in the box)."""
    d = x[0].numel()
    direction = torch.randn(SAMPLES, d, generator=gen, dtype=torch.float64)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(1e-300)
    radius = eps * torch.rand(SAMPLES, 1, generator=gen, dtype=torch.float64) ** (1 / d)
    radius[: SAMPLES // 4] = eps * (1 - 1e-12)
    points = (x.flatten(1) + radius * direction).clamp(0, 1).view(-1, *x.shape[1:])
    inside = (points - x).flatten(1).norm(dim=1) <= eps
    return points[inside]


def attacked(chain: nn.Module, lo: torch.Tensor, hi: torch.Tensor, spec: torch.Tensor
             ) -> torch.Tensor:
    """One PGD minimiser of each spec row over the box [lo, hi]: (S, *input)."""
    found = []
    for s in range(spec.shape[1]):
        row = spec[0, s]
        point, _ = falsify(chain, lo, hi, lambda z, row=row: z @ row, steps=30, restarts=4,
                           seed=s)
        found.append(point)
    return torch.cat(found)


def outputs_of(chain: nn.Module, points: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return chain(points)


def bounds(chain: nn.Module, x: torch.Tensor, threat: ThreatModel, spec: torch.Tensor,
           method: str, rigorous: bool) -> torch.Tensor:
    value = spec_bounds(chain, x, threat, spec, method, rigorous=rigorous)
    assert torch.isfinite(value).all(), (method, rigorous, value)
    return value.detach()[0]


def _describe(graph: Graph) -> str:
    return " ".join(f"{type(n.op).__name__}{list(n.inputs)}" for n in graph.nodes)


# -- the properties ----------------------------------------------------------------------------
@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(problems())
def test_random_graphs(problem):
    graph, x, spec, eps = problem
    chain = graph.chain()
    _count("lowered" if isinstance(chain[0], Step) else "chain")
    for node in graph.nodes:
        _count(type(node.op).__name__)
    gen = torch.Generator().manual_seed(len(graph.nodes))

    # (1) the chain computes the graph: bit for bit on one point; on a batch up to 1e-12
    # relative (a Step applies its operator to a strided view of the state, and a dense
    # layer over a batch of strided rows may sum in another order than over contiguous ones)
    batch = torch.cat([x, torch.rand(3, *x.shape[1:], generator=gen, dtype=torch.float64)])
    with torch.no_grad():
        assert torch.equal(chain(x), graph(x)), _describe(graph)
        ours, theirs = chain(batch), graph(batch)
    if not torch.equal(ours, theirs):
        _count("batch rounding differs")
        assert ((ours - theirs).abs() <= 1e-12 * (1 + theirs.abs())).all(), _describe(graph)

    try:
        results, at_zero = {}, {}
        for method in METHODS:
            for norm in ("linf", "l2"):
                for rigorous in (True, False):
                    results[norm, method, rigorous] = bounds(
                        chain, x, ThreatModel(norm, eps), spec, method, rigorous)
            at_zero[method] = bounds(chain, x, ThreatModel("linf", 0.0), spec, method, True)
    except UnsupportedLayerError as error:
        REFUSED.append(f"{_describe(graph)}: {error}")
        assume(False)
        return

    # (2) l_inf: sampled points, corners, the centre, PGD points
    lo, hi = (x - eps).clamp(0, 1), (x + eps).clamp(0, 1)
    points = torch.cat([box_points(x, eps, gen), attacked(chain, lo, hi, spec)])
    z = outputs_of(chain, points)
    # (5) l2: sampled points of the ball, PGD in the box inscribed in it
    side = eps / math.sqrt(x[0].numel())
    l2_points = torch.cat([ball_points(x, eps, gen),
                           attacked(chain, (x - side).clamp(0, 1), (x + side).clamp(0, 1),
                                    spec)])
    z2 = outputs_of(chain, l2_points)
    for (norm, method, rigorous), bound in results.items():
        assert_below(bound, spec[0], z if norm == "linf" else z2, 0.0 if rigorous else 1e-9,
                     f"{norm} {method} rigorous={rigorous} eps={eps} on {_describe(graph)}")

    # (6) never looser than IBP
    for (norm, method, rigorous), bound in results.items():
        ibp = results[norm, "ibp", rigorous]
        assert (bound >= ibp - 1e-12 * (1 + ibp.abs())).all(), \
            (norm, method, rigorous, (bound - ibp).min(), _describe(graph))

    # (3) eps = 0: exact up to rounding
    clean = outputs_of(chain, x)
    for method, bound in at_zero.items():
        assert_below(bound, spec[0], clean, 0.0, f"eps=0 {method} on {_describe(graph)}")
        value = (clean @ spec[0].T)[0]
        gap = (value - bound).abs() / (1 + value.abs())
        assert (gap <= 1e-8).all(), (method, gap, _describe(graph))

    # (4) the exact oracle: min margin >= every rigorous margin lower bound
    if any(type(n.op) in SMOOTH.values() for n in graph.nodes) or x[0].numel() > 6:
        return
    with torch.no_grad():
        label = int(graph(x).argmax())
    classes = graph.nodes[-1].op.out_features
    margins = margin_spec(torch.tensor([label]), classes).double()
    try:
        oracle = exact_min_margin(chain, x[0], label, eps, "linf")
    except UnsupportedLayerError as error:
        REFUSED.append(f"oracle: {_describe(graph)}: {error}")
        return
    _count("oracle")
    for method in METHODS:
        lowest = float(bounds(chain, x, ThreatModel("linf", eps), margins, method, True).min())
        assert lowest <= oracle, (method, lowest, oracle, _describe(graph))


def test_alpha_crown_with_a_relu_below_an_interval_only_layer():
    """An l_p-dist layer is interval-only, so the backward pass concretizes at its output box
    and the slopes of a ReLU below it are never used: alpha-CROWN optimises only the slopes
    above (it once asked autograd for the unused ones and crashed, found by this file with
    Tanh, which was interval-only then)."""
    torch.manual_seed(0)
    chain = nn.Sequential(nn.ReLU(), LinfDist(1, 1), nn.Linear(1, 2)).double()
    x = torch.tensor([[0.5]], dtype=torch.float64)
    spec = torch.tensor([[[1.0, -1.0]]], dtype=torch.float64)
    bound = spec_bounds(chain, x, ThreatModel("linf", 0.01), spec, "alpha-crown",
                        rigorous=True)
    crown = spec_bounds(chain, x, ThreatModel("linf", 0.01), spec, "crown", rigorous=True)
    assert torch.equal(bound, crown)  # nothing to optimise: CROWN's bound
