"""Exact robustness oracles (certnet.verify) and soundness of GloRo certificates against them.

* the oracles on cases computable by hand, and against brute-force grids in 2-D;
* the l_inf MILP against the independent region enumeration in 2-4 D;
* property (hypothesis): on random tiny ReLU / MinMax nets, a GloRo certificate never
  contradicts the exact l2 oracle, at random radii and at the certified radius itself.
"""

from __future__ import annotations

import copy
import math
from collections import Counter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from nets import random_cnn, random_mlp
from torch import nn

from certnet.errors import InputError, UnsupportedLayerError
from certnet.methods.gloro import GloroNet
from certnet.nn.activations import MinMax
from certnet.nn.lipschitz import ResidualConv2d, convert_sequential
from certnet.verify import exact_min_margin, find_counterexample, min_margin

SETTINGS = settings(max_examples=200, deadline=None, derandomize=True, database=None)


pytestmark = pytest.mark.usefixtures("single_thread")


# -- helpers -----------------------------------------------------------------------------------
def tiny_net(seed: int, d: int, widths: list[int], act: str, classes: int,
             gain: float = 1.0) -> GloroNet:
    """Random MLP (Flatten, [Linear, act] * len(widths), Linear), hidden weights times ``gain``
    so the kinks fall inside small balls, converted and wrapped in a GloRo net."""
    layers = convert_sequential(random_mlp(seed, d, widths, act, classes, gain), (d,))
    return GloroNet(layers, (d,), classes).eval()


@st.composite
def nets(draw, dims=(2, 4), min_depth=1):
    """(GloRo net, description "seed/d/widths/act/classes/gain")."""
    d = draw(st.integers(*dims))
    depth = draw(st.sampled_from([k for k in (1, 2, 2, 0) if k >= min_depth]))
    widths = [draw(st.sampled_from([2, 4, 6, 8])) for _ in range(depth)]
    act = draw(st.sampled_from(["relu", "minmax"]))
    classes = draw(st.integers(2, 4))
    gain = draw(st.sampled_from([1.0, 2.0, 4.0]))
    seed = draw(st.integers(0, 2**16))
    model = tiny_net(seed, d, widths, act, classes, gain)
    return model, f"{seed}/{d}/{widths}/{act}/{classes}/{gain}"


def margins(model: nn.Module, points: torch.Tensor, label: int) -> torch.Tensor:
    """min_{j != label} f_label - f_j at each point, float64."""
    with torch.no_grad():
        logits = copy.deepcopy(model).double()(points.double())
    gap = logits[:, label : label + 1] - logits
    gap[:, label] = float("inf")
    return gap.min(1).values


def margin_lipschitz(model: GloroNet, label: int) -> float:
    """Sound l2 Lipschitz constant of min_j f_label - f_j (max_j K_label,j)."""
    return float(model.sound_lipschitz()[label].max())


# -- hand-computable cases ---------------------------------------------------------------------
def linear_model(weight: list[list[float]], bias: list[float]) -> nn.Sequential:
    layer = nn.Linear(len(weight[0]), len(weight))
    with torch.no_grad():
        layer.weight.copy_(torch.tensor(weight))
        layer.bias.copy_(torch.tensor(bias))
    return convert_sequential(nn.Sequential(nn.Flatten(), layer), (len(weight[0]),))


def test_linear_model_exact_values():
    """f linear: min margin = gap - eps * ||w_l - w_j||_dual when the ball stays in [0, 1]."""
    layers = linear_model([[1.0, -2.0, 0.5], [0.0, 1.0, 1.0], [-1.0, 0.0, 0.0]],
                          [0.3, 0.0, -0.1])
    x = torch.tensor([0.5, 0.4, 0.6])
    w, b = layers[-1].weight.detach().double(), layers[-1].bias.detach().double()
    logits = w @ x.double() + b
    for eps in (0.0, 0.01, 0.1, 0.2):
        for norm, dual in (("linf", 1), ("l2", 2)):
            expected = min(float(logits[0] - logits[j] - eps * (w[0] - w[j]).norm(p=dual))
                           for j in (1, 2))
            for method in ((None, "enumerate") if norm == "linf" else (None,)):
                value = exact_min_margin(layers, x, 0, eps, norm, method=method)
                assert value == pytest.approx(expected, abs=1e-9)


def test_domain_box_is_respected():
    """Near a corner the [0, 1] box cuts the ball: the oracle only searches inside it."""
    layers = linear_model([[1.0, 1.0], [0.0, 0.0]], [0.0, 0.05])
    x = torch.tensor([0.02, 0.01])  # margin x1 + x2 - 0.05 = -0.02 at x, -0.05 at the corner
    bias = float(layers[-1].bias[1].detach().double())
    at_x = float(x.double().sum()) - bias
    for norm in ("l2", "linf"):
        result = min_margin(layers, x, 0, 0.5, norm)
        assert result.margin == pytest.approx(-bias, abs=1e-12)
        assert result.point.tolist() == [0.0, 0.0]
        unclipped = exact_min_margin(layers, x, 0, 0.5, norm, domain=None)
        expected = at_x - 0.5 * (2 if norm == "linf" else math.sqrt(2))
        assert unclipped == pytest.approx(expected, abs=1e-9)


def test_minmax_and_relu_by_hand():
    """MinMax then a swapping head: f = [max(x1, x2), min(x1, x2)], margin |x1 - x2| (dyadic
    numbers, exact in float32)."""
    head = nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    layers = convert_sequential(nn.Sequential(MinMax(), head), (2,))
    x = torch.tensor([0.25, 0.625])
    for norm, expected in (("linf", 0.25), ("l2", 0.375 - 0.0625 * math.sqrt(2))):
        assert exact_min_margin(layers, x, 0, 0.0625, norm) == pytest.approx(expected, abs=1e-12)
    # a tie is not robust: the ball reaches the diagonal x1 == x2
    assert exact_min_margin(layers, x, 0, 0.1875, "linf") == pytest.approx(0.0, abs=1e-12)
    assert exact_min_margin(layers, x, 0, 0.3, "linf") == pytest.approx(0.0, abs=1e-12)
    assert find_counterexample(layers, x, 0, 0.3, "l2") is not None
    assert find_counterexample(layers, x, 0, 0.25, "l2") is None
    relu_net = convert_sequential(nn.Sequential(nn.ReLU(), head), (2,))  # f = [x2, x1]
    assert exact_min_margin(relu_net, x, 0, 0.0625, "linf") == pytest.approx(0.25, abs=1e-12)
    assert exact_min_margin(relu_net, x, 0, 0.5, "linf") == pytest.approx(-0.625, abs=1e-12)
    for method in ("milp", "enumerate"):  # relu(x2) >= 0 caps the drop (linear: -1.625)
        assert exact_min_margin(relu_net, x, 0, 1.0, "linf", domain=None, method=method) == \
            pytest.approx(-1.25, abs=1e-12)


def test_find_counterexample_reproduces():
    model, _ = tiny_net(3, 2, [8, 8], "relu", 3, gain=4.0), None
    x = torch.tensor([0.4, 0.7])
    label = int(model(x[None]).argmax())
    for norm in ("l2", "linf"):
        assert find_counterexample(model.layers, x, label, 0.0, norm) is None
        point = find_counterexample(model.layers, x, label, 1.0, norm)
        assert point is not None  # eps = 1 covers the whole box: some other class wins there
        assert float(margins(model.layers, point[None], label)[0]) <= 0
        dist = (point - x).abs().max() if norm == "linf" else (point - x).norm()
        assert dist <= 1.0 + 1e-9 and point.min() >= 0 and point.max() <= 1


def _as_dense(layers: nn.Sequential, shape: tuple[int, ...]) -> nn.Sequential:
    """The same function with every convolution replaced by Flatten + a float64 Linear whose
    weight is its Jacobian (torch.autograd: an independent route to the matrix)."""
    out: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.Conv2d):
            conv = copy.deepcopy(layer).double()
            zero = torch.zeros(math.prod(shape), dtype=torch.float64)
            jac = torch.autograd.functional.jacobian(
                lambda v, conv=conv, shape=shape: conv(v.view(1, *shape)).flatten(), zero)
            linear = nn.Linear(*reversed(jac.shape)).double()
            with torch.no_grad():
                bias = conv(zero.view(1, *shape))
                linear.weight.copy_(jac)
                linear.bias.copy_(bias.flatten())
            shape = tuple(bias.shape[1:])
            out += [nn.Flatten(), linear]
        else:
            out.append(layer)
    return nn.Sequential(*out)


@pytest.mark.parametrize("act", ["relu", "minmax"])
@pytest.mark.parametrize("channels", [[2], [2, 4]])
def test_convolutions_are_read_as_their_dense_matrices(act, channels):
    """A conv net (plain, certnet's LipschitzConv2d, a ResidualConv2d with kernel alpha W + I)
    has the exact minimum margin of the MLP made of its convolutions' Jacobians, in l2 and
    l_inf, MILP and enumeration, and an l_inf grid search never goes below it."""
    shape = (1, 2, 2)
    plain = random_cnn(3, shape, channels, act, 3, gain=3.0).double()
    residual = ResidualConv2d(2, 3, alpha=0.7).double()
    residual.set_input_shape((2, 3, 3))
    with torch.no_grad():
        residual.weight.normal_(generator=torch.Generator().manual_seed(0))
    nets_ = [plain, convert_sequential(plain, shape),
             nn.Sequential(*plain[:2], residual, *plain[2:]) if len(channels) == 1 else None]
    g = torch.Generator().manual_seed(1)
    for net in filter(None, nets_):
        dense = _as_dense(net, shape)
        for _ in range(3):
            x = torch.rand(shape, generator=g, dtype=torch.float64)
            label = int(net(x[None]).argmax())
            for norm, method in (("l2", "enumerate"), ("linf", "milp"), ("linf", "enumerate")):
                got = exact_min_margin(net, x, label, 0.2, norm, method=method)
                want = exact_min_margin(dense, x, label, 0.2, norm, method=method)
                assert got == pytest.approx(want, abs=1e-7), (type(net[0]), norm, method)
            grid = torch.stack(torch.meshgrid(*[torch.linspace(-0.2, 0.2, 5)] * 4,
                                              indexing="ij"), -1).reshape(-1, *shape)
            points = (x + grid.double()).clamp(0, 1)
            assert float(margins(net, points, label).min()) >= got - 1e-6  # the tolerances


def test_errors():
    dilated = nn.Sequential(nn.Conv2d(1, 2, 2, dilation=2), nn.Flatten(), nn.Linear(2, 2))
    with pytest.raises(UnsupportedLayerError, match="dilation"):
        exact_min_margin(dilated, torch.rand(1, 3, 3), 0, 0.1, "linf")
    tanh = nn.Sequential(nn.Linear(2, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError):
        exact_min_margin(tanh, torch.rand(2), 0, 0.1, "l2")
    big = linear_model([[1.0] * 5, [0.0] * 5], [0.0, 0.0])
    with pytest.raises(InputError, match="at most 4"):
        exact_min_margin(big, torch.rand(5), 0, 0.1, "l2")
    assert exact_min_margin(big, torch.full((5,), 0.5), 0, 0.1, "l2", max_dim=5) == \
        pytest.approx(2.5 - 0.1 * math.sqrt(5), abs=1e-9)
    assert exact_min_margin(big, torch.full((5,), 0.5), 0, 0.1, "linf") == \
        pytest.approx(2.0, abs=1e-9)  # the MILP has no dimension limit
    with pytest.raises(InputError):
        exact_min_margin(big, torch.full((5,), 1.5), 0, 0.1, "linf")
    with pytest.raises(InputError):
        exact_min_margin(big, torch.full((5,), 0.5), 0, -0.1, "linf")


# -- the oracles against brute force -----------------------------------------------------------
GRID = 121


def box_grid(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
    """Grid on [x - eps, x + eps] ∩ [0, 1]^2 and the l2 distance within which it covers it."""
    lo, hi = (x.double() - eps).clamp(0, 1), (x.double() + eps).clamp(0, 1)
    axes = [torch.linspace(float(lo[i]), float(hi[i]), GRID, dtype=torch.float64)
            for i in range(2)]
    grid = torch.cartesian_prod(*axes)
    return grid, float((hi - lo).norm()) / (GRID - 1) / 2


def disk_grid(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, float]:
    """Polar grid on the disk, projected on [0, 1]^2 (non-expansive, stays in the disk), and
    the l2 distance within which it covers disk ∩ box."""
    radii = torch.linspace(0, eps, GRID, dtype=torch.float64)
    angles = torch.arange(4 * GRID, dtype=torch.float64) * (2 * math.pi / (4 * GRID))
    r, a = torch.meshgrid(radii, angles, indexing="ij")
    grid = x.double() + torch.stack([r * a.cos(), r * a.sin()], -1).reshape(-1, 2)
    return grid.clamp(0, 1), eps / (GRID - 1) / 2 + eps * math.pi / (4 * GRID)


@SETTINGS
@given(case=nets(dims=(2, 2)), x=st.lists(st.floats(0, 1), min_size=2, max_size=2),
       eps=st.sampled_from([0.02, 0.1, 0.3, 0.6]), norm=st.sampled_from(["linf", "l2"]),
       label_shift=st.integers(0, 3))
def test_oracles_match_grid_search_2d(case, x, eps, norm, label_shift):
    """Every grid point is feasible, so oracle <= grid min (up to solver tolerance); the grid
    covers the set within `cover`, so grid min - oracle <= Lip * cover."""
    model, _ = case
    x = torch.tensor(x)
    label = (int(model(x[None]).argmax()) + label_shift) % model.num_classes
    grid, cover = (box_grid if norm == "linf" else disk_grid)(x, eps)
    grid_min = float(margins(model.layers, grid, label).min())
    result = min_margin(model.layers, x, label, eps, norm)
    tol = 1e-6 * (1 + abs(grid_min))
    assert result.margin <= grid_min + tol
    assert result.bound <= grid_min + tol
    assert grid_min - result.margin <= margin_lipschitz(model, label) * cover + 1e-9
    assert result.margin == pytest.approx(result.bound, abs=tol)
    # the reported minimiser is feasible and attains the reported margin
    point = result.point.double()
    dist = (point - x).abs().max() if norm == "linf" else (point - x.double()).norm()
    assert dist <= eps * (1 + 1e-9) and point.min() >= 0 and point.max() <= 1
    assert float(margins(model.layers, point[None], label)[0]) == \
        pytest.approx(result.margin, rel=1e-12, abs=1e-15)


@SETTINGS
@given(case=nets(dims=(2, 4)), seed=st.integers(0, 2**16),
       eps=st.sampled_from([0.02, 0.1, 0.3]))
def test_linf_milp_matches_enumeration(case, seed, eps):
    """Two independent exact l_inf methods (MILP / region enumeration) agree in 2-4 D."""
    model, _ = case
    x = torch.rand(model.input_shape, generator=torch.Generator().manual_seed(seed))
    label = int(model(x[None]).argmax())
    milp_result = min_margin(model.layers, x, label, eps, "linf")
    enum_result = min_margin(model.layers, x, label, eps, "linf", method="enumerate")
    assert milp_result.margin == pytest.approx(enum_result.margin, abs=1e-6)
    # l2 ball of radius eps is inside the l_inf ball: its minimum cannot be lower
    l2_value = exact_min_margin(model.layers, x, label, eps, "l2")
    assert l2_value >= enum_result.margin - 1e-9


# -- soundness of GloRo certificates -----------------------------------------------------------
@pytest.mark.parametrize("examples", [
    500, pytest.param(5000, marks=pytest.mark.slow, id="5000-slow")])
def test_gloro_certificates_never_contradict_oracle(examples):
    """certified[i] => the exact l2 oracle finds no x' in the eps-ball (no box: the Lipschitz
    certificate claims the whole ball) where another class scores >= pred[i]; checked at
    random eps and just below the certified radius (the tightest case). Nets without a hidden
    layer are included: there GloRo is exact, so the radius check has no slack to hide in.
    Teeth: the same check on radii 10% too large (K 10% too small) must catch some."""
    stats: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    contradictions: list[str] = []

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None)
    @given(case=nets(dims=(2, 4), min_depth=0), seed=st.integers(0, 2**16),
           eps=st.sampled_from([0.01, 0.03, 0.1, 0.3, 0.6, 1.0]))
    def check(case, seed, eps):
        model, desc = case
        _, d, widths, act, classes, _ = desc.split("/")
        depth = widths.count(",") + 1 if widths != "[]" else 0
        kinds.update([f"d={d}", f"depth={depth}", f"classes={classes}"] + [act] * (depth > 0))
        x = torch.rand(4, *model.input_shape, generator=torch.Generator().manual_seed(seed))
        cert = model.certify(x, eps)
        radius = model.certify(x, 0.0).radius.double()
        for i in range(x.shape[0]):
            pred = int(cert.pred[i])
            value = exact_min_margin(model.layers, x[i], pred, eps, "l2", domain=None)
            stats["tried"] += 1
            stats["certified"] += bool(cert.certified[i])
            stats["not_robust"] += value <= 0
            stats["robust_not_certified"] += value > 0 and not bool(cert.certified[i])
            if cert.certified[i] and value <= 0:
                contradictions.append(f"net {desc}, x={x[i].tolist()}, eps={eps}, "
                                      f"pred={pred}, oracle margin {value}")
            r = float(radius[i])
            if r > 0:
                stats["radius_checks"] += 1
                at_radius = exact_min_margin(model.layers, x[i], pred, r * (1 - 1e-6), "l2",
                                             domain=None)
                if at_radius <= 0:
                    contradictions.append(f"net {desc}, x={x[i].tolist()}, pred={pred}, "
                                          f"certified radius {r}, oracle margin {at_radius}")
                caught = exact_min_margin(model.layers, x[i], pred, r / 0.9, "l2",
                                          domain=None) <= 0
                stats["caught_if_K_10pct_low"] += caught
                stats["caught_if_K_10pct_low_hidden"] += caught and depth > 0

    check()
    print(f"\nGloRo vs exact l2 oracle: {dict(stats)}\nnets: {dict(sorted(kinds.items()))}")
    assert not contradictions, "\n".join(contradictions)
    assert stats["certified"] >= 0.25 * stats["tried"], stats  # not vacuous
    assert stats["not_robust"] >= 0.1 * stats["tried"], stats
    assert stats["radius_checks"] >= 0.5 * stats["tried"], stats
    assert stats["caught_if_K_10pct_low"] >= 0.05 * stats["tried"], stats
