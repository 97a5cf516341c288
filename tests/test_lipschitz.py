"""Lipschitz layers: power iteration vs exact spectral norms, soundness and tightness of the
certified upper bounds, 1-Lipschitz activations, conversion, whole-network bounds against
empirical (random and optimised) difference quotients, and the layer-spec round trip."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import certnet.nn.spectral as spectral
from certnet.archs import ARCHS, arch_specs, build_arch
from certnet.errors import InputError, UnsupportedLayerError
from certnet.nn.activations import MinMax
from certnet.nn.lipschitz import (
    LipschitzConv2d,
    LipschitzLinear,
    Normalize,
    ResidualConv2d,
    convert_sequential,
    layer_bound,
    layer_estimate,
    product,
)
from certnet.nn.spec import build_layers, describe_layers
from certnet.nn.spectral import conv_spectral_bound, dense_spectral_bound, gram_spectral_bound

HYPOTHESIS = settings(max_examples=200, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])


# -- helpers -----------------------------------------------------------------------------------
def exact_norm(matrix: torch.Tensor) -> float:
    """Largest singular value of the float64 matrix, by a full SVD."""
    m = matrix.detach().double()
    if m.numel() == 0:
        return 0.0
    return float(torch.linalg.svdvals(m)[0])


def conv_matrix(weight: torch.Tensor, stride: int, padding: int,
                shape: tuple[int, int, int]) -> torch.Tensor:
    """The explicit (out_dim, in_dim) matrix of x -> conv2d(x, weight), built in float64 by
    applying the convolution to every vector of the identity basis."""
    c, h, w = shape
    eye = torch.eye(c * h * w, dtype=torch.float64).view(-1, c, h, w)
    out = F.conv2d(eye, weight.detach().double(), None, stride, padding)
    return out.flatten(1).T


def conv_layer(c_in: int, c_out: int, k: int, s: int, p: int, n: int,
               weight: torch.Tensor | None = None) -> LipschitzConv2d:
    layer = LipschitzConv2d(c_in, c_out, k, stride=s, padding=p)
    if weight is not None:
        with torch.no_grad():
            layer.weight.copy_(weight)
    layer.set_input_shape((c_in, n, n))
    return layer


def make_matrix(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    """float64 test matrices: gaussian, near zero, rank one plus tiny noise, a huge dynamic
    range of singular values, exactly zero, or with a repeated top singular value."""
    g = torch.Generator().manual_seed(seed)
    r = min(rows, cols)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if kind == "gauss":
        return randn(rows, cols)
    if kind == "tiny":
        return 1e-8 * randn(rows, cols)
    if kind == "rank1":
        return torch.outer(randn(rows), randn(cols)) + 1e-7 * randn(rows, cols)
    if kind == "zero":
        return torch.zeros(rows, cols, dtype=torch.float64)
    u, _ = torch.linalg.qr(randn(rows, r))
    v, _ = torch.linalg.qr(randn(cols, r))
    if kind == "range":
        sigma = torch.logspace(0, -12, r, dtype=torch.float64) * 10.0 ** (seed % 7 - 3)
    elif kind == "flat":  # r equal top singular values: the worst case for Gram iteration
        sigma = torch.ones(r, dtype=torch.float64)
    else:
        raise AssertionError(kind)
    return u @ torch.diag(sigma) @ v.T


KINDS = ["gauss", "tiny", "rank1", "range", "zero", "flat"]


# -- power iteration ---------------------------------------------------------------------------
@pytest.mark.parametrize("rows,cols", [(1, 1), (1, 7), (7, 1), (10, 30), (30, 10), (64, 64),
                                       (100, 784)])
def test_linear_power_iteration_converges_to_spectral_norm(rows, cols):
    torch.manual_seed(rows * 1000 + cols)
    layer = LipschitzLinear(cols, rows)
    exact = float(torch.linalg.matrix_norm(layer.weight.detach().double(), ord=2))
    estimate = float(layer.converge())
    assert estimate == pytest.approx(exact, rel=1e-4)
    assert estimate <= exact * (1 + 1e-5)  # power iteration is a lower bound (up to rounding)
    assert float(layer.lipschitz_bound()) >= exact


CONV_CASES = [
    # (c_in, c_out, kernel, stride, padding, input size)
    (1, 1, 3, 1, 1, 5),
    (1, 4, 2, 1, 0, 6),
    (2, 3, 3, 1, 1, 8),
    (3, 2, 3, 1, 2, 7),
    (2, 2, 4, 2, 1, 8),
    (3, 4, 4, 2, 1, 9),
    (2, 3, 5, 2, 2, 7),
    (2, 2, 2, 2, 0, 6),
    (2, 2, 3, 2, 0, 7),
    (3, 2, 2, 3, 0, 7),
    (2, 2, 5, 3, 2, 7),
    (2, 3, 3, 3, 1, 8),
    (1, 3, 4, 3, 2, 9),
    (4, 2, 5, 1, 0, 6),
]


@pytest.mark.parametrize("c_in,c_out,k,s,p,n", CONV_CASES)
def test_conv_power_iteration_and_bound_vs_explicit_matrix(c_in, c_out, k, s, p, n):
    torch.manual_seed(hash((c_in, c_out, k, s, p, n)) % 2**31)
    layer = conv_layer(c_in, c_out, k, s, p, n)
    matrix = conv_matrix(layer.weight, s, p, (c_in, n, n))
    x = torch.randn(2, c_in, n, n, dtype=torch.float64)
    # the explicit matrix really is the layer (bias aside)
    assert torch.allclose((x.flatten(1) @ matrix.T),
                          F.conv2d(x, layer.weight.double(), None, s, p).flatten(1))
    exact = exact_norm(matrix)
    estimate = float(layer.converge())
    bound = float(layer.lipschitz_bound())
    assert estimate == pytest.approx(exact, rel=1e-4)
    assert estimate <= exact * (1 + 1e-5)
    assert bound >= exact
    # The circular-FFT bound is tight once the map is large next to the kernel; on a map
    # barely larger than the kernel (few output positions) it can be ~1.5-2.5x loose.
    assert bound <= (1.5 if n >= 2 * k else 3.0) * exact


def test_conv_bound_on_gloro_arch_shapes_is_close_to_power_iteration():
    """Real 2C2F / 4C3F conv shapes on 28x28 (too big for an explicit SVD in a fast test):
    the sound bound sits above the converged estimate, and not far above
    (docs/architecture.md §3)."""
    torch.manual_seed(0)
    for layers in (build_arch("2c2f", (1, 28, 28), 10),):
        for m in layers:
            if isinstance(m, LipschitzConv2d):
                with torch.no_grad():
                    m.weight.normal_()
                estimate = float(m.converge(tol=1e-6, max_iterations=2000))
                bound = float(m.lipschitz_bound())
                assert estimate <= bound <= 1.05 * estimate


# -- soundness of the bounds -------------------------------------------------------------------
@HYPOTHESIS
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), kind=st.sampled_from(KINDS),
       seed=st.integers(0, 2**31 - 1), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_dense_bounds_are_sound(rows, cols, kind, seed, dtype):
    weight = make_matrix(kind, rows, cols, seed).to(dtype)
    layer = LipschitzLinear(cols, rows).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    exact = exact_norm(layer.weight)  # of the weights the layer really holds
    bound = float(layer.lipschitz_bound())
    assert bound >= exact
    assert bound <= 1.5 * exact + 1e-300
    gram = float(gram_spectral_bound(layer.weight))
    assert gram >= exact
    # 8 Gram steps: at most ||A||_F / sigma_1 <= sqrt(r) to the power 1/256 above
    assert gram <= exact * min(rows, cols) ** (1 / 512) * (1 + 1e-6) + 1e-300
    # the estimate never exceeds the bound
    assert float(layer.converge(max_iterations=200)) <= bound * (1 + 1e-5) + 1e-30


@HYPOTHESIS
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), kind=st.sampled_from(KINDS),
       seed=st.integers(0, 2**31 - 1))
def test_dense_bound_through_gram_path_is_sound(rows, cols, kind, seed):
    weight = make_matrix(kind, rows, cols, seed)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(spectral, "EXACT_SVD_MAX_DIM", 0)
        bound = float(dense_spectral_bound(weight))
    exact = exact_norm(weight)
    assert bound >= exact
    assert bound <= exact * min(rows, cols) ** (1 / 512) * (1 + 1e-6) + 1e-300
    assert bound == pytest.approx(float(gram_spectral_bound(weight)), rel=1e-12)


def test_gram_path_is_taken_above_the_threshold(monkeypatch):
    weight = make_matrix("flat", 20, 20, 0)
    monkeypatch.setattr(spectral, "EXACT_SVD_MAX_DIM", 0)
    gram = float(dense_spectral_bound(weight))
    monkeypatch.setattr(spectral, "EXACT_SVD_MAX_DIM", 4096)
    svd = float(dense_spectral_bound(weight))
    # an orthogonal matrix: SVD gives 1, 8 Gram steps give ||I||_F**(1/2**8) = 20**(1/512)
    assert svd == pytest.approx(1.0, rel=1e-8)
    assert gram == pytest.approx(20 ** (1 / 512), rel=1e-6) and gram > svd


@st.composite
def conv_shapes(draw):
    k = draw(st.integers(1, 5))
    s = draw(st.integers(1, 3))
    p = draw(st.integers(0, 2))
    h = draw(st.integers(max(1, k - 2 * p), 9))
    w = draw(st.integers(max(1, k - 2 * p), 9))
    return draw(st.integers(1, 3)), draw(st.integers(1, 4)), k, s, p, h, w


@HYPOTHESIS
@given(shape=conv_shapes(), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**31 - 1),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_conv_bound_is_sound(shape, kind, seed, dtype):
    c_in, c_out, k, s, p, h, w = shape
    n = min(h, w)
    weight = make_matrix(kind, c_out, c_in * k * k, seed).view(c_out, c_in, k, k)
    layer = LipschitzConv2d(c_in, c_out, k, stride=s, padding=p)
    layer.set_input_shape((c_in, h, w))
    layer = layer.to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
    exact = exact_norm(conv_matrix(layer.weight, s, p, (c_in, h, w)))
    bound = float(layer.lipschitz_bound())
    assert bound >= exact
    # never above the triangle inequality over the k*k taps
    taps = torch.linalg.matrix_norm(layer.weight.detach().double().permute(2, 3, 0, 1), ord=2)
    assert bound <= float(taps.sum()) * (1 + 1e-6) + 1e-300
    if n >= 2 * k and p <= k // 2 and s <= k and exact > 0:  # layer shapes used in practice
        assert bound <= 1.5 * exact


@HYPOTHESIS
@given(kh=st.integers(1, 5), kw=st.integers(1, 5), s=st.integers(1, 3), p=st.integers(0, 2),
       h=st.integers(5, 9), w=st.integers(5, 9), seed=st.integers(0, 2**31 - 1))
def test_conv_spectral_bound_rectangular_kernels_and_maps(kh, kw, s, p, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 2, kh, kw, generator=g, dtype=torch.float64)
    exact = exact_norm(conv_matrix(weight, s, p, (2, h, w)))
    assert float(conv_spectral_bound(weight, s, p, (h, w))) >= exact


def test_conv_bound_tightness_grid():
    """Bound / exact over a grid of realistic small layers (n >= 2k, p <= k // 2, s <= k)."""
    torch.manual_seed(0)
    worst = 1.0
    for c_in, c_out, k, s in itertools.product([1, 2], [3], [2, 3, 4, 5], [1, 2, 3]):
        if s > k:
            continue
        for p in range(k // 2 + 1):
            n = 2 * k + (k + s + p) % 2  # odd and even sizes
            w = torch.randn(c_out, c_in, k, k, dtype=torch.float64)
            exact = exact_norm(conv_matrix(w, s, p, (c_in, n, n)))
            bound = float(conv_spectral_bound(w, s, p, (n, n)))
            assert bound >= exact
            worst = max(worst, bound / exact)
    assert worst < 1.5


# -- residual conv -----------------------------------------------------------------------------
@pytest.mark.parametrize("channels,k,alpha,n", [(2, 3, 1.0, 6), (3, 3, 0.3, 5), (2, 5, -0.7, 7),
                                                (1, 1, 2.0, 4)])
def test_residual_conv_forward_and_bound(channels, k, alpha, n):
    torch.manual_seed(channels + k)
    layer = ResidualConv2d(channels, k, alpha=alpha)
    with torch.no_grad():
        layer.bias.normal_()
    layer.set_input_shape((channels, n, n))
    x = torch.randn(3, channels, n, n)
    conv = F.conv2d(x, layer.weight, None, 1, k // 2)
    expected = x + alpha * conv + layer.bias.view(1, -1, 1, 1)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    # the folded operator x -> x + alpha * conv(x), explicitly
    matrix = conv_matrix(layer.weight.double() * alpha, 1, k // 2, (channels, n, n))
    matrix = matrix + torch.eye(channels * n * n, dtype=torch.float64)
    exact = exact_norm(matrix)
    bound = float(layer.lipschitz_bound())
    assert exact <= bound <= 1.5 * exact
    assert float(layer.converge()) == pytest.approx(exact, rel=1e-4)


def test_residual_conv_rejects_even_kernels():
    with pytest.raises(UnsupportedLayerError):
        ResidualConv2d(2, 4)


# -- other layers ------------------------------------------------------------------------------
def test_normalize_bound_and_forward():
    layer = Normalize([0.1, 0.2, 0.3], [0.5, -0.25, 2.0])
    x = torch.rand(4, 3, 5, 5)
    expected = (x - torch.tensor([0.1, 0.2, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.5, -0.25, 2.0]).view(1, 3, 1, 1)
    assert torch.allclose(layer(x), expected)
    bound = layer_bound(layer)
    assert bound.dtype == torch.float64
    assert float(bound) >= 4.0 and float(bound) == pytest.approx(4.0, rel=1e-6)
    assert float(layer_estimate(layer, 1)) == pytest.approx(4.0)
    # the operator norm is attained on the channel with the smallest |std|
    d = torch.zeros(1, 3, 5, 5)
    d[0, 1, 2, 2] = 1.0
    assert float((layer(x[:1] + d) - layer(x[:1])).norm()) == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(InputError):
        Normalize([0.0], [0.0])


@pytest.mark.parametrize("shape", [(64, 6), (16, 4, 3, 3), (8, 2, 5, 1)])
def test_minmax_is_one_lipschitz_and_gradient_norm_preserving(shape):
    torch.manual_seed(len(shape))
    act = MinMax()
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(*shape, dtype=torch.float64)
    # per example (the Lipschitz property is per point in the batch)
    diff_out = (act(x) - act(y)).flatten(1).norm(dim=1)
    diff_in = (x - y).flatten(1).norm(dim=1)
    assert (diff_out <= diff_in * (1 + 1e-12)).all()
    # a permutation of each pair: output is a rearrangement of the input values
    assert torch.equal(act(x).flatten(1).sort(1).values, x.flatten(1).sort(1).values)
    x.requires_grad_(True)
    g = torch.randn(*shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad(act(x), x, g)
    assert torch.allclose(grad.flatten(1).norm(dim=1), g.flatten(1).norm(dim=1))
    assert float(layer_bound(act)) == 1.0
    with pytest.raises(InputError):
        act(torch.randn(2, 3))


def test_conv_without_input_shape_raises():
    layer = LipschitzConv2d(1, 2, 3)
    with pytest.raises(UnsupportedLayerError):
        layer.lipschitz_bound()
    with pytest.raises(UnsupportedLayerError):
        layer.lipschitz_estimate(1)
    with pytest.raises(UnsupportedLayerError):
        layer_bound(layer)


def test_conv_input_shape_channel_mismatch_raises():
    with pytest.raises(InputError):
        LipschitzConv2d(2, 2, 3).set_input_shape((3, 5, 5))


@pytest.mark.parametrize("kwargs", [dict(dilation=2), dict(groups=2),
                                    dict(padding_mode="circular", padding=1),
                                    dict(padding="same")])
def test_unsupported_conv_options_raise(kwargs):
    with pytest.raises(UnsupportedLayerError):
        LipschitzConv2d(2, 2, 3, **kwargs)


@pytest.mark.parametrize("module", [nn.Tanh(), nn.BatchNorm2d(3, track_running_stats=False),
                                    nn.Linear(3, 2),
                                    nn.Conv2d(1, 1, 3), nn.MaxPool2d(2), nn.Sigmoid(),
                                    nn.Sequential(nn.ReLU()), nn.LeakyReLU()])
def test_layer_bound_refuses_unknown_layers(module):
    with pytest.raises(UnsupportedLayerError):
        layer_bound(module)
    with pytest.raises(UnsupportedLayerError):
        layer_estimate(module, 1)


def test_one_lipschitz_layers_bound_is_one():
    for m in (nn.ReLU(), MinMax(), nn.Flatten(), nn.Identity()):
        b = layer_bound(m)
        assert b.dtype == torch.float64 and float(b) == 1.0


def test_product():
    assert float(product([])) == 1.0
    assert float(product([2.0, 3.0])) == 6.0
    t = product([2.0, torch.tensor(3.0, dtype=torch.float64), torch.tensor(0.5,
                 dtype=torch.float64)])
    assert t.dtype == torch.float64 and float(t) == 3.0


# -- convert_sequential ------------------------------------------------------------------------
def test_convert_sequential_copies_weights_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 6, 2, bias=False), MinMax(),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 8), nn.Identity(), nn.Linear(8, 3, bias=False))
    converted = convert_sequential(model, (2, 7, 7))
    assert len(converted) == len(model)
    for old, new in zip(model, converted, strict=True):
        if isinstance(old, (nn.Conv2d, nn.Linear)):
            assert isinstance(new, (LipschitzConv2d, LipschitzLinear))
            assert torch.equal(new.weight, old.weight)
            assert (new.bias is None) == (old.bias is None)
            if old.bias is not None:
                assert torch.equal(new.bias, old.bias)
        if isinstance(old, nn.Conv2d):
            assert (new.stride, new.padding, new.kernel_size) == (
                old.stride, old.padding, old.kernel_size)
    x = torch.randn(5, 2, 7, 7)
    assert torch.equal(converted(x), model(x))
    assert [tuple(int(d) for d in m.input_shape) for m in converted
            if isinstance(m, LipschitzConv2d)] == [(2, 7, 7), (4, 4, 4)]
    for m in converted:
        layer_bound(m)  # every layer now has a bound


@pytest.mark.parametrize("bad", [
    nn.Tanh(), nn.BatchNorm2d(2), nn.MaxPool2d(2), nn.Sequential(nn.ReLU()),
    nn.Conv2d(2, 2, 3, dilation=2), nn.Conv2d(2, 2, 3, groups=2),
    nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Conv2d(2, 2, 3, padding="same"),
    nn.Conv2d(2, 2, (3, 2)), nn.Dropout(),
])
def test_convert_sequential_refuses_unsupported_layers(bad):
    model = nn.Sequential(nn.Conv2d(2, 2, 1), bad, nn.Flatten())
    with pytest.raises(UnsupportedLayerError):
        convert_sequential(model, (2, 8, 8))


@pytest.mark.parametrize("kwargs", [dict(stride=(1, 2)), dict(padding=(0, 1))])
def test_convert_sequential_refuses_or_preserves_non_square_stride_padding(kwargs):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, **kwargs), nn.Flatten())
    x = torch.randn(2, 1, 6, 6)
    try:
        converted = convert_sequential(model, (1, 6, 6))
    except UnsupportedLayerError:
        return
    assert converted(x).shape == model(x).shape and torch.equal(converted(x), model(x))


def _float64_linear() -> LipschitzLinear:
    return LipschitzLinear(3, 4, dtype=torch.float64)


def _float64_conv() -> LipschitzConv2d:
    layer = LipschitzConv2d(1, 2, 3, padding=1, dtype=torch.float64)
    layer.set_input_shape((1, 5, 5))
    return layer


@pytest.mark.parametrize("make", [_float64_linear, _float64_conv])
def test_float64_layers_support_power_iteration(make):
    layer = make()
    assert float(layer.lipschitz_estimate(5)) > 0


def test_convert_sequential_keeps_float64_weights_exactly():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():
        model[1].weight.add_(1e-12)  # not representable in float32
    converted = convert_sequential(model, (4,))
    assert torch.equal(converted[1].weight, model[1].weight)


# -- whole network -----------------------------------------------------------------------------
def _network_bound(layers: nn.Sequential) -> float:
    return float(product([layer_bound(m) for m in layers]))


def _max_empirical_ratio(f, shape: tuple[int, ...], n_random: int, n_starts: int, steps: int,
                         seed: int) -> float:
    """Largest ||f(x) - f(x')|| / ||x - x'|| from random pairs, then Adam on x' (starting at x
    plus small noise) maximising the ratio, then power iteration on the local Jacobian."""
    g = torch.Generator().manual_seed(seed)
    best = 0.0
    with torch.no_grad():
        x = torch.rand(n_random, *shape, generator=g, dtype=torch.float64)
        for scale in (1.0, 1e-2, 1e-4):
            x2 = x + scale * torch.randn(x.shape, generator=g, dtype=torch.float64)
            ratio = (f(x) - f(x2)).flatten(1).norm(dim=1) / (x - x2).flatten(1).norm(dim=1)
            best = max(best, ratio.max().item())
    x = torch.rand(n_starts, *shape, generator=g, dtype=torch.float64)
    delta = (1e-2 * torch.randn(x.shape, generator=g, dtype=torch.float64)).requires_grad_()
    opt = torch.optim.Adam([delta], lr=1e-3)
    fx = f(x).detach()
    for _ in range(steps):
        ratio = (f(x + delta) - fx).flatten(1).norm(dim=1) / delta.flatten(1).norm(dim=1)
        best = max(best, ratio.max().item())
        opt.zero_grad()
        (-ratio.sum()).backward()
        opt.step()
    # local Jacobian at the optimised points: sigma_max(J) by power iteration, then a pair
    x = (x + delta).detach()
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    for _ in range(50):
        v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))
        _, jv = torch.func.jvp(f, (x,), (v,))
        _, vjp = torch.func.vjp(f, x)
        (v,) = vjp(jv)
    v = v / v.flatten(1).norm(dim=1).view(-1, *[1] * len(shape))
    with torch.no_grad():
        for t in (1e-3, 1e-5):
            ratio = (f(x + t * v) - f(x)).flatten(1).norm(dim=1) / t
            best = max(best, ratio.max().item())
    return best


def _double(layers: nn.Sequential) -> nn.Sequential:
    return copy.deepcopy(layers).double()


def test_2c2f_network_bound_beats_empirical_ratios():
    layers = build_arch("2c2f", (1, 28, 28), 10, seed=0)
    bound = _network_bound(layers)
    f = _double(layers)
    empirical = _max_empirical_ratio(f, (1, 28, 28), n_random=64, n_starts=8, steps=60, seed=0)
    assert empirical <= bound
    assert empirical > 0.2 * bound  # the optimiser found something non-trivial


def test_random_conv_net_bound_beats_empirical_ratios():
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(2, 6, 3, stride=2, padding=1), MinMax(),
        nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 4, 2, stride=3), MinMax(),
        nn.Flatten(), nn.Linear(4 * 2 * 2, 12), MinMax(), nn.Linear(12, 3))
    layers = convert_sequential(model, (2, 9, 9))
    bound = _network_bound(layers)
    empirical = _max_empirical_ratio(_double(layers), (2, 9, 9), n_random=256, n_starts=16,
                                     steps=150, seed=1)
    assert empirical <= bound
    assert empirical > 0.05 * bound


def test_linear_network_bound_beats_exact_norm_of_composition():
    """Without activations the network is one linear map: its exact norm is computable."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Conv2d(3, 4, 3, padding=1),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5, bias=False))
    for m in model:
        if isinstance(m, nn.Conv2d):
            m.bias = None
    layers = convert_sequential(model, (2, 7, 7))
    f = _double(layers)
    eye = torch.eye(2 * 7 * 7, dtype=torch.float64).view(-1, 2, 7, 7)
    exact = exact_norm(f(eye).T)
    bound = _network_bound(layers)
    assert exact <= bound
    # the product of per-layer norms may be loose for the composition, but not absurdly
    assert bound <= 10 * exact


# -- spec round trip ---------------------------------------------------------------------------
SPEC_DEFAULTS = {"conv": {"stride": 1, "padding": 0, "bias": True},
                 "linear": {"bias": True},
                 "residual_conv": {"kernel_size": 3, "alpha": 1.0, "bias": True}}

#: the conv/dense archs, whose activation is minmax or relu (l_inf-dist archs: test_linf_dist)
ARCH_CASES = [(name, shape, act) for name in sorted(ARCHS) if not name.startswith("linf-dist")
              for shape in ((1, 28, 28), (3, 32, 32)) for act in ("minmax", "relu")]


def _canonical(specs: list[dict]) -> list[dict]:
    return [{**SPEC_DEFAULTS.get(s["type"], {}), **s} for s in specs]


@pytest.mark.parametrize("name,shape,activation", ARCH_CASES)
def test_spec_round_trip_for_every_arch(name, shape, activation):
    specs = arch_specs(name, shape, 10, activation=activation)
    layers = build_layers(specs, shape)
    described = describe_layers(layers)
    assert described == _canonical(specs)
    # fixed point: what a checkpoint stores rebuilds the same architecture
    rebuilt = build_layers(described, shape)
    assert describe_layers(rebuilt) == described
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {
        k: v.shape for k, v in layers.state_dict().items()}
    assert layers(torch.zeros(2, *shape)).shape == (2, 10)


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_spec_round_trip_is_literal_identity(name):
    small = {"width": 32, "hidden": 16} if name == "linf-dist-hybrid" else \
        {"width": 32} if name.startswith("linf-dist") else {}
    specs = arch_specs(name, (1, 28, 28), 10, **small)
    assert describe_layers(build_layers(specs, (1, 28, 28))) == specs


def test_spec_round_trip_other_layers():
    specs = [{"type": "normalize", "mean": [0.5, 0.25], "std": [0.5, 2.0]},
             {"type": "residual_conv", "channels": 2, "kernel_size": 3, "alpha": 0.5,
              "bias": False},
             {"type": "identity"}, {"type": "relu"},
             {"type": "conv", "in_channels": 2, "out_channels": 4, "kernel_size": 3,
              "stride": 3, "padding": 2, "bias": False},
             {"type": "minmax"}, {"type": "flatten"},
             {"type": "linear", "in_features": 4 * 3 * 3, "out_features": 3, "bias": True}]
    layers = build_layers(specs, (2, 6, 6))
    assert describe_layers(layers) == specs
    assert layers(torch.rand(2, 2, 6, 6)).shape == (2, 3)
    with pytest.raises(UnsupportedLayerError):
        describe_layers(nn.Sequential(nn.Sigmoid()))


def test_subclass_of_a_one_lipschitz_layer_is_not_trusted():
    class ScaledReLU(nn.ReLU):
        def forward(self, x):
            return 5 * super().forward(x)

    with pytest.raises(UnsupportedLayerError):
        layer_bound(ScaledReLU())
    with pytest.raises(UnsupportedLayerError):
        convert_sequential(nn.Sequential(nn.Flatten(), ScaledReLU(), nn.Linear(4, 2)), (4,))


def test_spec_errors_and_registered_layer_types(monkeypatch):
    from certnet.errors import ConfigError
    from certnet.nn import spec

    with pytest.raises(ConfigError, match="unknown layer"):
        build_layers([{"type": "lstm"}], (4,))
    with pytest.raises(ConfigError, match="bad layer spec"):
        build_layers([{"type": "linear", "in_features": 4}], (4,))
    with pytest.raises(ConfigError, match="bad layer spec"):
        build_layers([{"type": "flatten", "start_dim": "x", "bogus": 1}], (4,))
    with pytest.raises(ConfigError):
        build_layers([], (4,))

    class Halve(nn.Module):  # a method's own layer plugs in with one call
        def forward(self, x):
            return x / 2

    from certnet.nn import layer_types

    monkeypatch.setattr(layer_types, "BY_CLASS", dict(layer_types.BY_CLASS))
    monkeypatch.setattr(spec.LAYER_TYPES, "_entries", dict(spec.LAYER_TYPES._entries))
    layer_types.register_layer_type(layer_types.LayerType(Halve, "halve"))
    layers = build_layers([{"type": "halve"}, {"type": "linear", "in_features": 4,
                                                "out_features": 2, "bias": True}], (4,))
    assert describe_layers(layers)[0] == {"type": "halve"}


def test_batchnorm_bound_covers_its_eval_function_and_gloro_refuses_it():
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(3)
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.1, 3)
    with torch.no_grad():
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    bn.eval()
    x, z = torch.randn(64, 3, 4, 4, dtype=torch.float64), torch.randn(64, 3, 4, 4,
                                                                      dtype=torch.float64)
    ratio = (bn.double()(x) - bn(z)).flatten(1).norm(dim=1) / (x - z).flatten(1).norm(dim=1)
    assert float(ratio.max()) <= float(layer_bound(bn))
    scale = bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
    assert float(layer_bound(bn)) == pytest.approx(float(scale.max()), rel=1e-12)
    with pytest.raises(UnsupportedLayerError, match="GloRo"):
        convert_sequential(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.Flatten()),
                           (3, 4, 4))
