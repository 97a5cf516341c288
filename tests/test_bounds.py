"""The bounds engine (certnet.bounds) against the functions it bounds, in float64.

* per rule: the interval contains (and for these single layers attains) the layer's range on
  the input box, checked at random points, box vertices and, per output neuron, the vertex that
  minimises / maximises it; ``backward`` is a valid linear lower bound for every slope;
* conv / avg-pool transposes equal autograd's vector-Jacobian product (hypothesis over shapes);
* whole networks: every margin lower bound (IBP, CROWN-IBP, CROWN x slopes) lies below the
  margins at random and PGD points of the threat set (l_inf and l2); CROWN's intervals lie in
  IBP's and contain the activations; batching and chunking change nothing; eps = 0 is exact;
  BatchNorm in training mode is bounded as the affine map of the clean batch's statistics;
* unsupported layers are refused with a clear message.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import certnet.bounds.crown as crown_module
from certnet.archs import build_arch
from certnet.attacks import PGD
from certnet.bounds import (
    BOUND_METHODS,
    SLOPES,
    LayerInput,
    check_supported,
    crown_walk,
    interval_walk,
    margin_bounds,
    margin_spec,
    margin_walk,
    rule_for,
    training_bounds,
)
from certnet.errors import UnsupportedLayerError
from certnet.methods.bound_prop import IBPNet
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, Normalize, ResidualConv2d
from certnet.threat import ThreatModel

F64 = torch.float64
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)
BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# -- single layers ----------------------------------------------------------------------------
def randomize(m: nn.Module, seed: int) -> nn.Module:
    """float64 copy of ``m`` with random parameters (and BatchNorm running statistics)."""
    m = m.double()
    g = gen(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
        if isinstance(m, BATCHNORMS) and m.track_running_stats:
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g, dtype=F64))
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g, dtype=F64) + 0.1)
    return m


def bn(cls, features: int, train: bool, **kwargs) -> nn.Module:
    m = cls(features, **kwargs)
    return m.train(train)


#: id -> (layer factory, input shape of one point). Every exact type with a bound rule.
LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), (5,)),
    "linear-nobias": (lambda: nn.Linear(5, 3, bias=False), (5,)),
    "linear-3d-input": (lambda: nn.Linear(4, 3), (2, 4)),
    "lipschitz-linear": (lambda: LipschitzLinear(5, 4), (5,)),
    "conv-k3-s1-p0": (lambda: nn.Conv2d(2, 3, 3), (2, 6, 6)),
    "conv-k3-s2-p1-odd": (lambda: nn.Conv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)),
    "conv-k4-s2-p1-even": (lambda: nn.Conv2d(1, 2, 4, stride=2, padding=1), (1, 8, 8)),
    "conv-k2-s3-p2": (lambda: nn.Conv2d(2, 2, 2, stride=3, padding=2), (2, 7, 6)),
    "conv-k1": (lambda: nn.Conv2d(3, 2, 1), (3, 4, 5)),
    "conv-k5-s3-p2-nobias": (lambda: nn.Conv2d(1, 2, 5, stride=3, padding=2, bias=False),
                             (1, 9, 8)),
    "conv-rect": (lambda: nn.Conv2d(2, 2, (3, 2), stride=(2, 1), padding=(1, 0)), (2, 7, 6)),
    "lipschitz-conv": (lambda: LipschitzConv2d(2, 3, 3, stride=2, padding=1), (2, 7, 7)),
    "residual-conv": (lambda: ResidualConv2d(3, 3, alpha=0.7), (3, 5, 5)),
    "bn1d-eval": (lambda: bn(nn.BatchNorm1d, 4, False), (4,)),
    "bn1d-train": (lambda: bn(nn.BatchNorm1d, 4, True), (4,)),
    "bn1d-3d-train": (lambda: bn(nn.BatchNorm1d, 3, True), (3, 5)),
    "bn1d-noaffine-eval": (lambda: bn(nn.BatchNorm1d, 4, False, affine=False), (4,)),
    "bn2d-eval": (lambda: bn(nn.BatchNorm2d, 3, False), (3, 4, 4)),
    "bn2d-train": (lambda: bn(nn.BatchNorm2d, 3, True), (3, 4, 4)),
    "bn2d-no-running-stats": (lambda: bn(nn.BatchNorm2d, 2, False, track_running_stats=False),
                              (2, 3, 3)),
    "normalize": (lambda: Normalize([0.5, 0.4, 0.3], [0.2, -0.5, 2.0]), (3, 4, 4)),
    "normalize-shared": (lambda: Normalize([0.5], [0.25]), (3, 4, 4)),
    "avgpool-k2": (lambda: nn.AvgPool2d(2), (2, 6, 6)),
    "avgpool-k3-s2-p1": (lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 7, 7)),
    "avgpool-k3-s1-p1": (lambda: nn.AvgPool2d(3, stride=1, padding=1), (1, 5, 6)),
    "avgpool-rect": (lambda: nn.AvgPool2d((2, 3), stride=(1, 2), padding=(1, 1)), (2, 5, 6)),
    "flatten": (lambda: nn.Flatten(), (2, 3, 3)),
    "flatten-from-2": (lambda: nn.Flatten(2), (2, 3, 3)),
    "relu-2d": (lambda: nn.ReLU(), (6,)),
    "relu-4d": (lambda: nn.ReLU(), (2, 3, 3)),
    "minmax-2d": (lambda: MinMax(), (6,)),
    "minmax-4d": (lambda: MinMax(), (4, 3, 3)),
    "identity": (lambda: nn.Identity(), (2, 3)),
    "clipped-relu-2d": (lambda: ClippedReLU([6]), (6,)),
    "clipped-relu-4d": (lambda: ClippedReLU([2, 3, 3]), (2, 3, 3)),
    "clipped-minmax-2d": (lambda: ClippedMinMax([6]), (6,)),
    "clipped-minmax-4d": (lambda: ClippedMinMax([4, 3, 3]), (4, 3, 3)),
}
AFFINE = {k for k in LAYERS if not k.startswith(("relu", "minmax", "clipped"))}


def reference(m: nn.Module, inp: LayerInput):
    """The map the rule claims to bound: the layer itself, except BatchNorm on batch statistics
    (training mode, or no running statistics), which is the affine map with the statistics of
    the clean batch (Shi et al. 2021)."""
    if isinstance(m, BATCHNORMS) and (m.training or not m.track_running_stats):
        dims = [0, *range(2, inp.clean.dim())]
        mean, var = inp.clean.mean(dims), inp.clean.var(dims, unbiased=False)
        return lambda h: F.batch_norm(h, mean, var, m.weight, m.bias, False, 0.0, m.eps)
    return m


def random_box(shape: tuple[int, ...], batch: int, seed: int) -> LayerInput:
    """Boxes with some zero widths and some endpoints exactly 0 (ReLU's kink)."""
    g = gen(seed)
    lo = torch.randn(batch, *shape, generator=g, dtype=F64)
    width = torch.rand(batch, *shape, generator=g, dtype=F64) * 1.5
    width = width * (torch.rand(batch, *shape, generator=g) > 0.15)
    hi = lo + width
    kink = torch.rand(batch, *shape, generator=g)
    lo, hi = torch.where(kink < 0.1, 0.0, lo), torch.where(kink < 0.1, width, hi)
    lo, hi = torch.where(kink > 0.9, -width, lo), torch.where(kink > 0.9, 0.0, hi)
    clean = lo + torch.rand(batch, *shape, generator=g, dtype=F64) * (hi - lo)
    return LayerInput(lo, hi, clean)


def box_points(f, inp: LayerInput, seed: int, random: int = 48) -> torch.Tensor:
    """(N, B, *shape) points of the boxes: uniform ones, lo, hi, random vertices and, for each
    output neuron k of f, the vertices minimising and maximising the linearisation of f_k at
    the box centre (exact extremes of an affine f_k)."""
    g = gen(seed)
    lo, hi = inp.lo, inp.hi
    u = torch.rand(random, *lo.shape, generator=g, dtype=F64)
    pts = [lo + u * (hi - lo), lo[None], hi[None]]
    signs = torch.rand(8, *lo.shape, generator=g) < 0.5
    pts.append(torch.where(signs, lo, hi))
    center = ((lo + hi) / 2)[:1]
    jac = torch.autograd.functional.jacobian(lambda v: f(v.view(center.shape)).flatten(),
                                             center.flatten())
    jac = jac.view(-1, 1, *lo.shape[1:])  # (n_out, 1, *shape)
    pts += [torch.where(jac > 0, lo, hi), torch.where(jac > 0, hi, lo)]
    return torch.cat(pts)


def apply(f, points: torch.Tensor) -> torch.Tensor:
    """f on (N, B, *shape) points -> (N, B, *out_shape)."""
    n, b = points.shape[:2]
    out = f(points.reshape(n * b, *points.shape[2:]))
    return out.reshape(n, b, *out.shape[1:])


def layer_case(name: str, seed: int) -> tuple[nn.Module, LayerInput]:
    factory, shape = LAYERS[name]
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = randomize(factory(), seed)
    return m, random_box(shape, 3, seed + 1)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_rule_interval_contains_and_attains_the_layer_range(name, seed):
    """lo <= f(h) <= hi at every sampled h of the box, and both ends are attained (each output
    is monotone or affine on the box, so IBP is exact for one layer): sound and tight."""
    m, inp = layer_case(name, seed)
    with torch.no_grad():
        lo, hi = rule_for(m).interval(m, inp)
    f = reference(m, inp)
    z = apply(f, box_points(f, inp, seed)).detach()
    assert lo.shape == hi.shape == z.shape[1:]
    scale = 1e-9 * (1 + z.abs().amax())
    assert (lo <= hi).all()
    assert (z >= lo - scale).all(), float((lo - z).max())
    assert (z <= hi + scale).all(), float((z - hi).max())
    assert torch.allclose(z.amin(0), lo, rtol=0, atol=float(scale))
    assert torch.allclose(z.amax(0), hi, rtol=0, atol=float(scale))


@pytest.mark.parametrize("slope", SLOPES)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_rule_backward_is_a_linear_lower_bound(name, slope):
    """lam . f(h) >= lam_h . h + const for random lam (some entries 0) and every sampled h of
    the box; an equality for affine layers."""
    for seed in (3, 4):
        m, inp = layer_case(name, seed)
        f = reference(m, inp)
        with torch.no_grad():
            out_shape = rule_for(m).interval(m, inp)[0].shape[1:]
            g = gen(seed + 7)
            lam = torch.randn(3, 4, *out_shape, generator=g, dtype=F64)
            lam = lam * (torch.rand(lam.shape, generator=g) > 0.2)
            lam_h, const = rule_for(m).backward(m, lam, inp, slope)
        assert lam_h.shape == (3, 4, *inp.lo.shape[1:]) and const.shape == (3, 4)
        h = box_points(f, inp, seed)
        with torch.no_grad():
            z = apply(f, h)
            lhs = torch.einsum("bs...,nb...->nbs", lam, z)
            rhs = torch.einsum("bs...,nb...->nbs", lam_h, h) + const
            size = torch.einsum("bs...,nb...->nbs", lam.abs(), z.abs()) + \
                torch.einsum("bs...,nb...->nbs", lam_h.abs(), h.abs()) + const.abs()
        tol = 1e-9 * (1 + size)
        assert (lhs >= rhs - tol).all(), float((rhs - lhs - tol).max())
        if name in AFFINE:
            assert ((lhs - rhs).abs() <= tol).all(), float((lhs - rhs).abs().max())


def test_relu_relaxation_slopes_at_the_kinks():
    """Stable, unstable and degenerate neurons: the lower line for each slope choice and the
    exact relaxation of stable ones (intervals touching 0 included)."""
    lo = torch.tensor([[-2.0, -1.0, -3.0, 0.0, -1.0, 1.0, -1.0, 0.0]], dtype=F64)
    hi = torch.tensor([[-1.0, 3.0, 1.0, 2.0, 0.0, 2.0, 1.0, 0.0]], dtype=F64)
    inp = LayerInput(lo, hi, lo)
    rule = rule_for(nn.ReLU())
    expected_lower = {"adaptive": [0, 1, 0, 1, 0, 1, 0, 1], "zero": [0, 0, 0, 1, 0, 1, 0, 1],
                      "one": [0, 1, 1, 1, 0, 1, 1, 1],
                      "same": [0, 0.75, 0.25, 1, 0, 1, 0.5, 1]}
    upper = torch.tensor([0, 0.75, 0.25, 1, 0, 1, 0.5, 1], dtype=F64)
    upper_const = torch.tensor([0, 0.75, 0.75, 0, 0, 0, 0.5, 0], dtype=F64)
    for slope, lower in expected_lower.items():
        lam = torch.eye(8, dtype=F64).unsqueeze(0)
        coef, const = rule.backward(nn.ReLU(), torch.cat([lam, -lam], 1), inp, slope)
        assert coef[0, :8].diagonal().tolist() == lower
        assert torch.equal(const[0, :8], torch.zeros(8, dtype=F64))
        assert torch.equal(-coef[0, 8:].diagonal(), upper)
        assert torch.equal(-const[0, 8:], upper_const)


# -- transposes against autograd --------------------------------------------------------------
@st.composite
def conv_shapes(draw, pool: bool = False):
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    sh, sw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    cap = (kh // 2, kw // 2) if pool else (2, 2)  # avg_pool2d: padding <= kernel / 2
    ph, pw = draw(st.integers(0, cap[0])), draw(st.integers(0, cap[1]))
    h = draw(st.integers(max(1, kh - 2 * ph), 9))
    w = draw(st.integers(max(1, kw - 2 * pw), 9))
    return (kh, kw), (sh, sw), (ph, pw), (h, w)


@SETTINGS
@given(shape=conv_shapes(), cin=st.integers(1, 3), cout=st.integers(1, 3),
       batch=st.integers(1, 2), specs=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_conv_transpose_is_the_vector_jacobian_product(shape, cin, cout, batch, specs, seed):
    kernel, stride, padding, (h, w) = shape
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        m = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding)
    _check_transpose(m.double(), (cin, h, w), batch, specs, seed)
    _check_transpose(m.float(), (cin, h, w), batch, specs, seed)  # the channels-last path


@SETTINGS
@given(shape=conv_shapes(pool=True), channels=st.integers(1, 3), batch=st.integers(1, 2),
       specs=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_avgpool_transpose_is_the_vector_jacobian_product(shape, channels, batch, specs, seed):
    kernel, stride, padding, (h, w) = shape
    m = nn.AvgPool2d(kernel, stride=stride, padding=padding)
    _check_transpose(m, (channels, h, w), batch, specs, seed)
    _check_transpose(m, (channels, h, w), batch, specs, seed, torch.float32)


def _check_transpose(m: nn.Module, shape: tuple[int, ...], batch: int, specs: int,
                     seed: int, dtype: torch.dtype | None = None) -> None:
    """rule.transpose(lam) == d(lam . m(h))/dh, and the interval of a point is m(point)."""
    g = gen(seed)
    dtype = dtype or next(m.parameters(), torch.empty(0, dtype=F64)).dtype
    atol = 1e-12 if dtype == F64 else 1e-5
    point = torch.rand(batch, *shape, generator=g, dtype=F64).to(dtype)
    hs = point.repeat_interleave(specs, 0).requires_grad_(True)
    out = m(hs)
    lam = torch.randn(batch, specs, *out.shape[1:], generator=g, dtype=F64).to(dtype)
    (vjp,) = torch.autograd.grad(out, hs, lam.reshape(out.shape))
    rule = rule_for(m)
    inp = LayerInput(point, point, point)
    with torch.no_grad():
        back = rule.transpose(m, lam, inp)
        lo, hi = rule.interval(m, inp)
        exact = m(point)
    assert back.shape == (batch, specs, *shape) and back.dtype == dtype
    assert torch.allclose(back.reshape(vjp.shape), vjp, rtol=0, atol=atol)
    assert torch.allclose(lo, exact, rtol=0, atol=atol)
    assert torch.allclose(hi, exact, rtol=0, atol=atol)


@pytest.mark.parametrize("shape", [(3, 4, 6), (2, 3, 4, 3, 3)], ids=["flat", "image"])
def test_fused_relu_relaxation_has_the_plain_formulas_value_and_gradient(shape):
    """relaxed_backward (a custom autograd Function) = lam+ * lower + lam- * upper and
    sum(lam- * upper_bias), with the gradient autograd takes through that formula, for lam with
    exact zeros and slopes broadcast over the spec dim (and in channels-last order, float32)."""
    from certnet.bounds.rules.relaxation import _like, relaxed_backward

    g = gen(len(shape))
    for dtype in (F64, torch.float32):
        lam = torch.randn(shape, generator=g, dtype=F64)
        lam = (lam * (torch.rand(shape, generator=g) > 0.3)).to(dtype)
        slopes = [torch.rand(shape[0], 1, *shape[2:], generator=g, dtype=F64).to(dtype)
                  for _ in range(3)]
        if len(shape) == 5 and dtype == torch.float32:  # the layout conv transposes produce
            lam = lam.flatten(0, 1).contiguous(memory_format=torch.channels_last).view(shape)
            slopes = [_like(t, lam) for t in slopes]
        up_coef = torch.randn(shape, generator=g, dtype=F64).to(dtype)
        up_const = torch.randn(shape[:2], generator=g, dtype=F64).to(dtype)
        results = []
        for fused in (True, False):
            args = [t.detach().clone().requires_grad_(True) for t in (lam, *slopes)]
            a, lower, upper, bias = args
            if fused:
                coef, const = relaxed_backward(a, lower, upper, bias)
            else:
                neg = a.clamp(max=0)
                coef = a.clamp(min=0) * lower + neg * upper
                const = (neg * bias).flatten(2).sum(-1)
            total = (coef * up_coef).sum() + (const * up_const).sum()
            results.append((coef, const, *torch.autograd.grad(total, args)))
        tol = 1e-12 if dtype == F64 else 1e-5
        for fused, plain in zip(*results, strict=True):
            assert fused.shape == plain.shape
            assert torch.allclose(fused, plain, rtol=tol, atol=tol)


# -- whole networks ---------------------------------------------------------------------------
def activation(act: str, width: int) -> nn.Module:
    """The clipped ones with thresholds that the balls of the tests cross."""
    return {"relu": nn.ReLU, "minmax": MinMax,
            "clipped-relu": lambda: ClippedReLU([width], 0.6),
            "clipped-minmax": lambda: ClippedMinMax([width], -0.5, 0.5)}[act]()


def mlp(seed: int, d: int, widths: list[int], act: str, classes: int) -> nn.Sequential:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        modules: list[nn.Module] = [nn.Flatten()]
        prev = d
        for width in widths:
            modules += [nn.Linear(prev, width), activation(act, width)]
            prev = width
        modules.append(nn.Linear(prev, classes))
        layers = nn.Sequential(*modules).double()
        with torch.no_grad():  # larger weights: unstable neurons inside the balls
            for m in layers:
                if isinstance(m, nn.Linear):
                    m.weight.mul_(2.0)
    return layers


def mixed_convnet(seed: int, train: bool = False) -> nn.Sequential:
    """Every layer type at once: Normalize, conv (stride 2, padding 1), BatchNorm2d, ReLU,
    residual conv, MinMax, avg-pool with padding, Lipschitz conv, Flatten, Linear, BatchNorm1d,
    Identity. Input (1, 7, 7)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        layers = nn.Sequential(
            Normalize([0.45], [0.3]), nn.Conv2d(1, 4, 3, stride=2, padding=1),
            nn.BatchNorm2d(4), nn.ReLU(), ResidualConv2d(4, 3, alpha=0.5), MinMax(),
            nn.AvgPool2d(3, stride=1, padding=1), LipschitzConv2d(4, 4, 2, stride=1),
            nn.ReLU(), nn.Flatten(), nn.Linear(36, 10), nn.BatchNorm1d(10), nn.ReLU(),
            nn.Identity(), LipschitzLinear(10, 3)).double()
        with torch.no_grad():
            for m in layers:
                if isinstance(m, BATCHNORMS):
                    m.running_mean.normal_(0, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.2)
    return layers.train(train)


def arch(name: str, shape: tuple[int, ...], seed: int, init: str) -> nn.Sequential:
    with torch.random.fork_rng():
        return build_arch(name, shape, 3, seed=seed, init=init).double().eval()


#: id -> (network factory, input shape, l_inf eps, l2 eps)
NETS = {
    "mlp-relu": (lambda: mlp(0, 4, [8, 8, 8], "relu", 3), (4,), 0.08, 0.12),
    "mlp-minmax": (lambda: mlp(1, 3, [6, 6], "minmax", 4), (3,), 0.08, 0.12),
    "mlp-clipped-relu": (lambda: mlp(2, 4, [8, 8], "clipped-relu", 3), (4,), 0.08, 0.12),
    "mlp-clipped-minmax": (lambda: mlp(3, 3, [6, 6], "clipped-minmax", 4), (3,), 0.08, 0.12),
    "mixed-conv": (lambda: mixed_convnet(2).eval(), (1, 7, 7), 0.02, 0.1),
    "dm-small": (lambda: arch("dm-small", (1, 10, 10), 3, "ibp"), (1, 10, 10), 0.02, 0.1),
    "2c2f": (lambda: arch("2c2f", (1, 8, 8), 4, "orthogonal"), (1, 8, 8), 0.03, 0.2),
}


def inputs(shape: tuple[int, ...], batch: int, seed: int) -> torch.Tensor:
    x = torch.rand(batch, *shape, generator=gen(seed), dtype=F64)
    x[0].clamp_(0.1, 0.9)
    x[-1] = (x[-1] > 0.5).to(F64)  # a corner of the pixel box: the clipping matters
    return x


def threat_points(x: torch.Tensor, threat: ThreatModel, n: int, seed: int) -> torch.Tensor:
    """(n, B, ...) points of the threat set: uniform and on its boundary (l2: sphere, l_inf:
    box vertices), clipped to the pixel box (which keeps them in the ball around x)."""
    g = gen(seed)
    shape = (n, *x.shape)
    if threat.norm == "linf":
        u = torch.rand(shape, generator=g, dtype=F64) * 2 - 1
        u[n // 2:] = u[n // 2:].sign()
        delta = u * threat.eps
    else:
        d = torch.randn(shape, generator=g, dtype=F64)
        d = d / d.flatten(2).norm(dim=2).view(n, -1, *[1] * (x.dim() - 1))
        r = torch.rand(n, x.shape[0], generator=g, dtype=F64) ** (1 / x[0].numel())
        r[n // 2:] = 1.0
        delta = d * r.view(n, -1, *[1] * (x.dim() - 1)) * threat.eps
    return (x + delta).clamp(threat.lower, threat.upper)


def true_margins(layers: nn.Sequential, points: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """(N, B, K - 1) margins z_ref - z_j at (N, B, ...) points, in margin_spec's order."""
    with torch.no_grad():
        z = apply(layers, points)
    spec = margin_spec(ref, z.shape[-1]).to(F64)
    return torch.einsum("bjk,nbk->nbj", spec, z)


def pgd_points(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
               ref: torch.Tensor) -> torch.Tensor:
    attack = PGD(layers, threat.eps, threat.norm, steps=20, restarts=2, seed=1)
    return attack(x, ref)[None]


@pytest.fixture(scope="module", params=sorted(NETS))
def net(request):
    factory, shape, eps_inf, eps_2 = NETS[request.param]
    layers = factory()
    x = inputs(shape, 4, 11)
    with torch.no_grad():
        ref = layers(x).argmax(1)
    ref[1] = (ref[1] + 1) % 3  # a wrong reference too: its margins are negative
    return request.param, layers, x, ref, {"linf": eps_inf, "l2": eps_2}


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_margin_bounds_lie_below_margins_at_random_and_pgd_points(net, norm):
    name, layers, x, ref, eps = net
    threat = ThreatModel(norm, eps[norm])
    points = torch.cat([threat_points(x, threat, 300, 5), pgd_points(layers, x, threat, ref)])
    margins = true_margins(layers, points, ref)
    lowest = margins.amin(0)
    tol = 1e-9 * (1 + margins.abs().amax())
    with torch.no_grad():
        for method in BOUND_METHODS:
            for slope in SLOPES:
                bound = margin_bounds(layers, x, threat, ref, method, slope)
                assert bound.shape == lowest.shape
                assert torch.isfinite(bound).all()
                assert (bound <= lowest + tol).all(), (method, slope, bound - lowest)
                # batch-size invariance
                for i in range(len(x)):
                    alone = margin_bounds(layers, x[i:i + 1], threat, ref[i:i + 1],
                                          method, slope)
                    assert torch.allclose(alone, bound[i:i + 1], rtol=0, atol=1e-10)
    # not vacuous: at the true prediction some bound is within reach of the sampled margin
    crown = margin_bounds(layers, x, threat, ref, "crown")
    assert (crown[0] > lowest[0] - 10 * (lowest[0].abs() + 1)).all()


@st.composite
def random_nets(draw):
    """(layers, input shape, description): conv blocks (random kernel / stride / padding,
    optional eval-mode BatchNorm and avg-pool, ReLU or MinMax), Flatten, dense blocks, head."""
    seed = draw(st.integers(0, 2**16))
    channels, size = draw(st.integers(1, 2)), draw(st.integers(4, 7))
    shape = (channels, size, size)
    desc = [f"seed={seed} input={shape}"]
    modules: list[nn.Module] = []
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for _ in range(draw(st.integers(0, 2))):
            k, stride, pad = draw(st.integers(1, 3)), draw(st.integers(1, 2)), \
                draw(st.integers(0, 1))
            if size + 2 * pad < k:
                continue
            out = draw(st.sampled_from([2, 4]))
            modules.append(nn.Conv2d(channels, out, k, stride=stride, padding=pad))
            desc.append(f"conv{out} k{k} s{stride} p{pad}")
            channels, size = out, (size + 2 * pad - k) // stride + 1
            if draw(st.booleans()):
                modules.append(nn.BatchNorm2d(channels))
            modules.append(nn.ReLU() if draw(st.booleans()) else MinMax())
            if size >= 2 and draw(st.booleans()):
                pad = draw(st.integers(0, 1))
                modules.append(nn.AvgPool2d(2, stride=1, padding=pad))
                size = size + 2 * pad - 1
        modules.append(nn.Flatten())
        features = channels * size * size
        for _ in range(draw(st.integers(0, 2))):
            width = draw(st.sampled_from([4, 6, 8]))
            modules.append(nn.Linear(features, width))
            if draw(st.booleans()):
                modules.append(nn.BatchNorm1d(width))
            modules.append(nn.ReLU() if draw(st.booleans()) else MinMax())
            features = width
        modules.append(nn.Linear(features, draw(st.integers(2, 3))))
        layers = nn.Sequential(*modules).double().eval()
        with torch.no_grad():
            for m in layers:
                if isinstance(m, BATCHNORMS):
                    m.running_mean.normal_(0, 0.3)
                    m.running_var.uniform_(0.3, 2.0)
                    m.weight.uniform_(-1.5, 1.5)
                    m.bias.normal_(0, 0.3)
                elif isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.weight.mul_(2.0)
    desc.append(" ".join(type(m).__name__ for m in layers))
    return layers, shape, "; ".join(desc)


def max_violation(layers: nn.Sequential, x: torch.Tensor, threat: ThreatModel,
                  ref: torch.Tensor, points: torch.Tensor, methods=BOUND_METHODS,
                  slopes=SLOPES) -> float:
    """Largest amount by which a margin lower bound exceeds a margin at the given points
    (relative to the logits' scale; <= 1e-9 for sound bounds)."""
    margins = true_margins(layers, points, ref)
    lowest = margins.amin(0)
    scale = 1 + float(margins.abs().amax())
    worst = -math.inf
    with torch.no_grad():
        for method in methods:
            for slope in slopes:
                bound = margin_bounds(layers, x, threat, ref, method, slope)
                worst = max(worst, float((bound - lowest).max()) / scale)
    return worst


@pytest.mark.parametrize("examples", [
    100, pytest.param(2000, marks=pytest.mark.slow, id="2000-slow")])
def test_margin_bounds_of_random_networks(examples):
    """Random conv / dense stacks (hypothesis): every method and slope lies below the margins at
    sampled points of the threat set, and is exact at eps = 0."""

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None)
    @given(case=random_nets(), norm=st.sampled_from(["linf", "l2"]),
           eps=st.sampled_from([0.01, 0.05, 0.2]), seed=st.integers(0, 2**16))
    def check(case, norm, eps, seed):
        layers, shape, desc = case
        x = inputs(shape, 3, seed)
        with torch.no_grad():
            ref = layers(x).argmax(1)
        threat = ThreatModel(norm, eps if norm == "linf" else 3 * eps)
        points = threat_points(x, threat, 200, seed)
        assert max_violation(layers, x, threat, ref, points) <= 1e-9, desc
        exact = true_margins(layers, x[None], ref)[0]
        with torch.no_grad():
            for method in BOUND_METHODS:
                bound = margin_bounds(layers, x, ThreatModel(norm, 0.0), ref, method, "same")
                assert torch.allclose(bound, exact, rtol=0, atol=1e-9), (method, desc)

    check()


@pytest.mark.parametrize("method", BOUND_METHODS)
def test_the_sampling_check_catches_a_broken_relu_rule(method, monkeypatch):
    """Teeth: a ReLU rule whose upper line is 10% too low (and whose interval lost 30% at each
    end) must be caught by the same sampled-points check on the ReLU MLP."""
    import certnet.bounds.rules as rules
    import certnet.bounds.rules.relaxation as relaxation

    layers, x = NETS["mlp-relu"][0](), inputs((4,), 4, 11)
    ref = layers(x).argmax(1).detach()
    threat = ThreatModel("linf", NETS["mlp-relu"][2])
    points = threat_points(x, threat, 300, 5)
    assert max_violation(layers, x, threat, ref, points, [method]) <= 1e-9
    relax = relaxation.relu_relaxation

    def low_upper(lo, hi, slope):
        lower, upper, upper_bias = relax(lo, hi, slope)
        return lower, upper * 0.9, upper_bias * 0.9

    def low_interval(self, m, inp):
        lo, hi = inp.lo.clamp(min=0), inp.hi.clamp(min=0)
        return lo + 0.3 * (hi - lo), hi - 0.3 * (hi - lo)

    monkeypatch.setattr(relaxation, "relu_relaxation", low_upper)
    monkeypatch.setattr(rules.activations.ReLURule, "interval", low_interval)
    assert max_violation(layers, x, threat, ref, points, [method]) > 1e-6


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_crown_intervals_lie_inside_ibp_and_contain_the_activations(net, norm):
    name, layers, x, ref, eps = net
    threat = ThreatModel(norm, eps[norm])
    with torch.no_grad():
        ibp, clean = interval_walk(layers, x, threat)
        for slope in SLOPES:
            crown, clean_crown = crown_walk(layers, x, threat, slope)
            assert torch.equal(clean, clean_crown)
            assert len(crown) == len(ibp) == len(layers) + 1
            for a, b in zip(crown, ibp, strict=True):
                assert (a.lo >= b.lo).all() and (a.hi <= b.hi).all() and (a.lo <= a.hi).all()
        points = threat_points(x, threat, 200, 6)
        h = points.reshape(-1, *x.shape[1:])
        crown, _ = crown_walk(layers, x, threat)
        for i in range(len(layers) + 1):
            act = h.view(points.shape[0], len(x), *h.shape[1:])
            tol = 1e-9 * (1 + act.abs().amax())
            assert (act >= crown[i].lo - tol).all(), i
            assert (act <= crown[i].hi + tol).all(), i
            if i < len(layers):
                h = layers[i](h)
        # CROWN tightens something on these nets (else the test has no teeth)
        assert any((a.hi - a.lo).sum() < (b.hi - b.lo).sum() - 1e-9
                   for a, b in zip(crown, ibp, strict=True))


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_zero_eps_bounds_are_the_exact_margins(net, norm):
    name, layers, x, ref, _ = net
    threat = ThreatModel(norm, 0.0)
    exact = true_margins(layers, x[None], ref)[0]
    with torch.no_grad():
        for method in BOUND_METHODS:
            for slope in SLOPES:
                bound = margin_bounds(layers, x, threat, ref, method, slope)
                assert torch.allclose(bound, exact, rtol=0, atol=1e-9), (method, slope)


def test_chunked_crown_gives_the_same_bounds(net, monkeypatch):
    """_neuron_bounds splits points and neurons into chunks past CHUNK_ELEMENTS (on full
    maps) and PATCH_CHUNK_ELEMENTS (on patches): forcing one point and one neuron per chunk
    must not change anything (eval mode)."""
    name, layers, x, ref, eps = net
    threat = ThreatModel("linf", eps["linf"])
    with torch.no_grad():
        whole = margin_bounds(layers, x, threat, ref, "crown")
        monkeypatch.setattr(crown_module, "CHUNK_ELEMENTS", 1)
        monkeypatch.setattr(crown_module, "PATCH_CHUNK_ELEMENTS", 1)
        chunked = margin_bounds(layers, x, threat, ref, "crown")
    assert torch.allclose(whole, chunked, rtol=0, atol=1e-10)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_alpha_crown_is_never_below_crown_and_gains_where_relus_are_unstable(net, norm):
    """alpha-CROWN keeps CROWN's bound among its iterates, so it is never below it; on the
    ReLU nets its optimised slopes raise some bound. (Soundness: the oracle, PGD and random
    point tests take every method in BOUND_METHODS.)"""
    name, layers, x, ref, eps = net
    threat = ThreatModel(norm, 2 * eps[norm])  # wide enough that many ReLUs are unstable
    with torch.no_grad():
        crown = margin_bounds(layers, x, threat, ref, "crown")
        alpha = margin_bounds(layers, x, threat, ref, "alpha-crown")
    assert bool((alpha >= crown).all())
    if any(type(m) is nn.ReLU for m in layers):
        assert bool((alpha > crown + 1e-9).any()), (name, alpha - crown)
    assert all(p.grad is None for p in layers.parameters())  # slopes only


def test_training_bounds_mix_ibp_and_crown_ibp(net):
    name, layers, x, ref, eps = net
    threat = ThreatModel("linf", eps["linf"])
    with torch.no_grad():
        ibp = margin_bounds(layers, x, threat, ref, "ibp")
        crown_ibp = margin_bounds(layers, x, threat, ref, "crown-ibp")
        # training mixes CROWN-IBP's own backward bound (Zhang et al. 2020, Eq. 9); a
        # certificate takes the larger of it and IBP's
        raw, _ = training_bounds(layers, x, threat, ref, 1.0)
        assert torch.allclose(crown_ibp, torch.maximum(raw, ibp), rtol=0, atol=1e-12)
        for beta in (0.0, 0.3, 1.0):
            lower, logits = training_bounds(layers, x, threat, ref, beta)
            assert torch.allclose(lower, beta * raw + (1 - beta) * ibp, rtol=0, atol=1e-10)
            assert torch.allclose(logits, layers(x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", ["mixed-conv", "dm-small", "2c2f"])
def test_float32_training_bounds_and_gradients_match_float64(name):
    """The training path runs in float32 (channels-last transposes, fused relaxations): its
    bounds and their gradients in the weights agree with the float64 computation."""
    layers64 = NETS[name][0]()
    x = inputs(NETS[name][1], 3, 14)
    ref = layers64(x).argmax(1).detach()
    threat = ThreatModel("linf", NETS[name][2])
    out = {}
    for dtype in (F64, torch.float32):
        layers = copy.deepcopy(layers64).to(dtype)
        lower, _ = training_bounds(layers, x.to(dtype), threat, ref, 0.5)
        grads = torch.autograd.grad(lower.sum(), list(layers.parameters()))
        out[dtype] = (lower.detach().double(), [gr.double() for gr in grads])
    (lo64, g64), (lo32, g32) = out[F64], out[torch.float32]
    assert torch.allclose(lo32, lo64, rtol=1e-4, atol=1e-4 * float(lo64.abs().max()))
    for a, b in zip(g32, g64, strict=True):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-3 * (1 + float(b.abs().max())))


def frozen_statistics(layers: nn.Sequential, x: torch.Tensor) -> nn.Sequential:
    """Eval-mode copy whose BatchNorm running statistics are the clean batch's: the function
    a training-mode bound is about."""
    frozen = copy.deepcopy(layers).eval()
    h = x
    with torch.no_grad():
        for m in frozen:
            if isinstance(m, BATCHNORMS):
                dims = [0, *range(2, h.dim())]
                m.running_mean.copy_(h.mean(dims))
                m.running_var.copy_(h.var(dims, unbiased=False))
            h = m(h)
    return frozen


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_training_mode_batchnorm_bounds_hold_for_the_clean_batch_statistics(norm):
    layers = mixed_convnet(3, train=True)
    x = inputs((1, 7, 7), 6, 12)
    threat = ThreatModel(norm, {"linf": 0.02, "l2": 0.1}[norm])
    frozen = frozen_statistics(layers, x)
    ref = frozen(x).argmax(1)
    lowest = true_margins(frozen, threat_points(x, threat, 300, 8), ref).amin(0)
    with torch.no_grad():
        for method in ("ibp", "crown-ibp"):  # full CROWN refuses train-mode BatchNorm
            bound = margin_bounds(copy.deepcopy(layers), x, threat, ref, method)
            assert (bound <= lowest + 1e-9).all(), method
        for beta in (0.0, 1.0):
            lower, logits = training_bounds(copy.deepcopy(layers), x, threat, ref, beta)
            assert (lower <= lowest + 1e-9).all(), beta
            assert torch.allclose(logits, frozen(x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("train", [False, True])
def test_margin_bounds_given_the_labels_skip_only_an_unused_clean_pass(train):
    """Given ``ref``, IBP and CROWN-IBP skip the clean pass in l_inf unless a rule reads it
    (train-mode BatchNorm); the bounds are those of the walk that makes it."""
    layers = mixed_convnet(3, train=train)
    x = inputs((1, 7, 7), 6, 12)
    threat = ThreatModel("linf", 0.02)
    seen, logits = interval_walk(copy.deepcopy(layers), x, threat, with_clean=False)
    assert (logits is None) == (not train)
    with torch.no_grad():
        ref = copy.deepcopy(layers)(x).argmax(1)
        for method in ("ibp", "crown-ibp"):
            lower, _, walk_logits = margin_walk(copy.deepcopy(layers), x, threat, None, method)
            assert torch.equal(walk_logits.argmax(1), ref)
            given = margin_bounds(copy.deepcopy(layers), x, threat, ref, method)
            assert torch.equal(given, lower), method


def test_training_mode_batchnorm_crown_bounds_survive_point_chunking(monkeypatch):
    torch.manual_seed(0)
    layers = nn.Sequential(nn.Linear(3, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 6),
                           nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double().train()
    x = torch.rand(8, 3, generator=gen(0), dtype=F64)
    threat = ThreatModel("linf", 0.1)
    frozen = frozen_statistics(layers, x)
    ref = torch.zeros(8, dtype=torch.long)
    lowest = true_margins(frozen, threat_points(x, threat, 2000, 9), ref).amin(0)
    monkeypatch.setattr(crown_module, "CHUNK_ELEMENTS", 2 * 6 * 6 * 2)  # 2 points per chunk
    with pytest.raises(UnsupportedLayerError, match="eval mode"):  # chunks would change the
        margin_bounds(copy.deepcopy(layers), x, threat, ref, "crown")  # batch statistics
    with torch.no_grad():  # the other methods never chunk points: still sound in train mode
        bound = margin_bounds(copy.deepcopy(layers), x, threat, ref, "crown-ibp")
    assert (bound <= lowest + 1e-9).all(), float((bound - lowest).max())


def test_full_crown_bounds_do_not_depend_on_the_batch():
    with torch.random.fork_rng():
        torch.manual_seed(5)
        layers = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(),
                               nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2)).double()
        x = torch.rand(4, 2, dtype=F64)
    ref = torch.zeros(4, dtype=torch.long)
    threat = ThreatModel("linf", 0.2)
    with torch.no_grad():
        batch = margin_bounds(layers, x, threat, ref, "crown")
        alone = torch.cat([margin_bounds(layers, x[i:i + 1], threat, ref[i:i + 1], "crown")
                           for i in range(len(x))])
    assert torch.allclose(batch, alone, rtol=0, atol=1e-10), (batch - alone).abs().max()


# -- unsupported layers -----------------------------------------------------------------------
class MyReLU(nn.ReLU):
    pass


class MyLinear(nn.Linear):
    pass


UNSUPPORTED = {
    "Softsign": (nn.Softsign(), "no bound rule for layer Softsign"),
    "Hardswish": (nn.Hardswish(), "no bound rule for layer Hardswish"),
    "ReLU-subclass": (MyReLU(), "no bound rule for layer MyReLU"),
    "Linear-subclass": (MyLinear(4, 4), "no bound rule for layer MyLinear"),
    "nested-Sequential": (nn.Sequential(nn.ReLU()), "no bound rule for layer Sequential"),
    "dilated-conv": (nn.Conv2d(1, 1, 3, dilation=2, padding=2), "dilation 1"),
    "grouped-conv": (nn.Conv2d(2, 2, 3, groups=2, padding=1), "groups 1"),
    "circular-conv": (nn.Conv2d(1, 1, 3, padding=1, padding_mode="circular"), "zero padding"),
    "same-padding-conv": (nn.Conv2d(1, 1, 3, padding="same"), "integer zero padding"),
}


@pytest.mark.parametrize("name", sorted(UNSUPPORTED))
def test_unsupported_layers_are_refused_with_a_clear_message(name):
    layer, message = UNSUPPORTED[name]
    layers = nn.Sequential(nn.Identity(), layer)
    with pytest.raises(UnsupportedLayerError, match=message):
        check_supported(layers)
    if "conv" not in name:
        with pytest.raises(UnsupportedLayerError, match=message):
            rule_for(layer)
        with pytest.raises(UnsupportedLayerError, match="supported: .*Linear"):
            margin_bounds(nn.Sequential(nn.Linear(4, 4), layer, nn.Flatten(), nn.Linear(4, 2)),
                          torch.rand(2, 4), ThreatModel("linf", 0.1), torch.zeros(2).long())
    if name != "Linear-subclass":  # (it would need a different input)
        shape = (2, 4, 4) if name == "grouped-conv" else (1, 4, 4)
        model_layers = nn.Sequential(layer, nn.Flatten(), nn.Linear(16, 2))
        with pytest.raises(UnsupportedLayerError, match=message):
            IBPNet(model_layers, shape, 2)


def test_margin_bounds_refuse_a_circular_padding_conv():
    with torch.random.fork_rng():
        torch.manual_seed(0)
        layers = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular"),
                               nn.ReLU(), nn.Flatten(), nn.Linear(50, 2)).double()
    x = torch.rand(3, 1, 5, 5, generator=gen(0), dtype=F64)
    ref = torch.zeros(3, dtype=torch.long)
    exact = true_margins(layers, x[None], ref)[0]
    try:
        bound = margin_bounds(layers, x, ThreatModel("linf", 0.0), ref, "ibp")
    except UnsupportedLayerError:
        return
    assert torch.allclose(bound, exact, rtol=0, atol=1e-9), (bound - exact).abs().max()


def test_layer_input_shapes_follow_the_network():
    """seen[i] has layer i's input shape (the batch first), the last entry the logits'."""
    layers = mixed_convnet(4).eval()
    x = inputs((1, 7, 7), 2, 13)
    seen, logits = interval_walk(layers, x, ThreatModel("l2", 0.1))
    h = x
    for i, m in enumerate(layers):
        assert seen[i].lo.shape == seen[i].hi.shape == h.shape
        assert torch.equal(seen[i].clean, h)
        h = m(h)
    assert torch.equal(seen[-1].clean, logits) and logits.shape == (2, 3)
    assert torch.equal(logits, layers(x))


def test_margin_spec_rows_are_e_ref_minus_e_j():
    spec = margin_spec(torch.tensor([1, 0, 2]), 3)
    assert spec.tolist() == [[[-1, 1, 0], [0, 1, -1]], [[1, -1, 0], [1, 0, -1]],
                             [[-1, 0, 1], [0, -1, 1]]]


# -- l2 balls in the interval walk -------------------------------------------------------------
def test_l2_interval_walk_is_exact_at_the_first_affine_layer_and_contains_the_ball():
    """The first affine layer's l2 interval is z +- eps ||row||_2 (the ball's exact range,
    here through Normalize's 1/std), strictly inside the box-IBP interval; given a sound radius
    for a deeper layer (eps times the product of the spectral norms before it), the intervals
    still contain every sampled point of the ball."""
    layers = mixed_convnet(3).eval()
    x = inputs((1, 7, 7), 4, 5)
    threat = ThreatModel("l2", 0.2)
    seen, _ = interval_walk(layers, x, threat)
    box_only, _ = interval_walk(layers, x, threat, radii={0: None})
    with torch.no_grad():
        z = layers[:2](x)
        conv = layers[1]
        norms = F.conv2d(torch.ones(1, 1, 7, 7, dtype=F64), conv.weight.square(), None,
                         conv.stride, conv.padding).sqrt()
        reach = 0.2 / 0.3 * norms
        torch.testing.assert_close(seen[2].hi[:1], torch.minimum(z + reach, box_only[2].hi)[:1])
        assert (seen[2].lo >= z - reach - 1e-12).all() and (seen[2].hi <= z + reach + 1e-12).all()
    width, box_width = seen[2].hi - seen[2].lo, box_only[2].hi - box_only[2].lo
    assert (width <= box_width + 1e-12).all() and (width < box_width - 1e-6).any()

    net = mlp(7, 6, [8, 8], "relu", 3)
    x = inputs((6,), 4, 8)
    with torch.no_grad():  # layer 5 (the last Linear) sees ReLU(W2 ReLU(W1 x + b1) + b2)
        norms = [torch.linalg.matrix_norm(m.weight, ord=2) for m in net[1:4:2]]
    radius = 0.3 * float(norms[0] * norms[1]) * (1 + 1e-9)
    deep, _ = interval_walk(net, x, ThreatModel("l2", 0.3), radii={5: radius})
    plain, _ = interval_walk(net, x, ThreatModel("l2", 0.3), radii={0: None})
    assert (deep[6].hi - deep[6].lo < plain[6].hi - plain[6].lo - 1e-9).any()
    for p in threat_points(x, ThreatModel("l2", 0.3), 256, 6):
        h = p
        for i, m in enumerate(net):
            assert (h >= deep[i].lo - 1e-9).all() and (h <= deep[i].hi + 1e-9).all(), i
            h = m(h)
