"""Local Lipschitz bounds (Huang et al. 2021): sound masked norms, masks that agree with brute
force, a certificate never weaker than the global one, and local-Lipschitz GloRo training.

The oracle, PGD and ``best`` harnesses (test_certifiers_soundness.py, test_activations.py) run
``local-lipschitz`` with every other certifier that applies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from nets import random_mlp
from torch import nn

from certnet.bounds import interval_walk
from certnet.bounds.local import (
    ball_box_shift,
    keep_masks,
    local_layer_bounds,
    masked_bound,
    masked_estimate,
)
from certnet.bounds.rules import LayerInput
from certnet.certifiers import certify
from certnet.certifiers.local_lipschitz import LocalConstants, local_pairwise
from certnet.errors import ConfigError
from certnet.floats import round_down
from certnet.methods.gloro import GloroNet
from certnet.nn.activations import ClippedMinMax, ClippedReLU
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, convert_sequential
from certnet.nn.masked_spectral import (
    GramTail,
    conv_frobenius,
    conv_schur,
    dense_frobenius,
)
from certnet.threat import ThreatModel


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def close_top_spectrum(seed: int, out: int, inp: int) -> torch.Tensor:
    """A weight whose two largest singular values differ by 0.1%: power iteration from the
    second singular vector stays far below the norm for many steps."""
    g = gen(seed)
    u, _ = torch.linalg.qr(torch.randn(out, out, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(inp, inp, generator=g, dtype=torch.float64))
    k = min(out, inp)
    s = torch.linspace(1.0, 0.2, k, dtype=torch.float64)
    s[1] = 0.999
    return (u[:, :k] * s) @ v[:, :k].T


def exact_masked_norm(weight: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
                      ) -> torch.Tensor:
    """||diag(r) W diag(c)||_2 per point by dense SVD."""
    w = weight.double()
    return torch.stack([torch.linalg.matrix_norm(r.double()[:, None] * w * c.double()[None], 2)
                        for r, c in zip(rows, cols, strict=True)])


def conv_matrix(weight: torch.Tensor, stride: int, padding: int, shape: tuple[int, ...]
                ) -> torch.Tensor:
    """The dense (out, in) matrix of a convolution on inputs of ``shape``."""
    n = torch.Size(shape).numel()
    eye = torch.eye(n, dtype=torch.float64).view(n, *shape)
    return F.conv2d(eye, weight.double(), None, stride, padding).flatten(1).T


# -- masked norm bounds ------------------------------------------------------------------------
@pytest.mark.parametrize("rank", [1, 3, 8, 40])
def test_gram_tail_bounds_every_masked_norm_and_is_exact_at_full_rank(rank):
    w = close_top_spectrum(0, 12, 9)
    g = gen(1)
    cols = torch.rand(50, 9, generator=g) < 0.6
    rows = torch.ones(50, 12, dtype=torch.bool)
    exact = exact_masked_norm(w, rows, cols)
    bound = GramTail.of(w, rank).bound(cols)
    assert bool((bound >= exact).all())
    if rank >= 9:  # the split is the whole Gram: only rounding slack remains
        torch.testing.assert_close(bound, exact, rtol=1e-8, atol=1e-12)
    rows_bound = GramTail.of(w.T, rank).bound(rows[:, :12] & (torch.rand(50, 12, generator=g)
                                                               < 0.5))
    assert bool((rows_bound >= 0).all())


def test_gram_tail_of_a_zero_or_tiny_weight_is_sound():
    assert float(GramTail.of(torch.zeros(3, 4)).bound(torch.ones(2, 4)).max()) < 1e-100
    w = close_top_spectrum(2, 5, 5) * 1e-200
    bound = GramTail.of(w, 2).bound(torch.ones(1, 5))
    assert float(bound) >= float(torch.linalg.matrix_norm(w, 2))


def test_dense_and_conv_bounds_are_at_least_the_exact_masked_norms():
    g = gen(3)
    w = torch.randn(7, 10, generator=g)
    rows, cols = torch.rand(20, 7, generator=g) < 0.5, torch.rand(20, 10, generator=g) < 0.5
    assert bool((dense_frobenius(w, rows, cols) >= exact_masked_norm(w, rows, cols)).all())
    kernel = torch.randn(3, 2, 3, 3, generator=g)
    for stride, padding in [(1, 1), (2, 0), (2, 1)]:
        shape = (2, 6, 5)
        matrix = conv_matrix(kernel, stride, padding, shape)
        out_shape = F.conv2d(torch.zeros(1, *shape), kernel, None, stride, padding).shape[1:]
        r = torch.rand(6, *out_shape, generator=g) < 0.4
        c = torch.rand(6, *shape, generator=g) < 0.4
        exact = exact_masked_norm(matrix, r.flatten(1), c.flatten(1))
        assert bool((conv_frobenius(kernel, stride, padding, r, c) >= exact).all())
        assert bool((conv_schur(kernel, stride, padding, r, c) >= exact).all())


def test_a_power_iteration_estimate_would_fail_the_soundness_check():
    """The local bound of a layer, as the certifier computes it, is at least the exact norm of
    the masked weight even where power iteration from the stored iterate (the reference's
    certificate) stays below it: the check below has teeth."""
    w = close_top_spectrum(4, 6, 6)
    layer = LipschitzLinear(6, 6, bias=False).double()
    with torch.no_grad():
        layer.weight.copy_(w)
    # the stored iterate: the second right singular vector, as after a drift in training
    layer.power_iterate.copy_(torch.linalg.svd(w)[2][1])
    rows = torch.ones(4, 6, dtype=torch.bool)
    cols = torch.ones(4, 6, dtype=torch.bool)
    cols[1:, 5] = False
    exact = exact_masked_norm(w, rows, cols)
    inp = LayerInput(torch.zeros(4, 6, dtype=torch.float64), torch.zeros(4, 6, dtype=torch.float64),
                     torch.zeros(4, 6, dtype=torch.float64))
    estimate = masked_estimate(layer, inp, rows, cols, layer.power_iterate, 3)
    assert bool((estimate < exact * (1 - 1e-4)).any())  # what the check must catch
    constants = LocalConstants.of(nn.Sequential(layer, nn.ReLU(), LipschitzLinear(6, 2).double()))
    bound = masked_bound(layer, rows, cols, constants.tails[0])
    assert bool((bound >= exact).all())


# -- masks -------------------------------------------------------------------------------------
def activation_net(seed: int, act: str) -> nn.Sequential:
    """Flatten, Linear, act, Linear, act, Linear on 3 inputs (6 hidden), weights x 1.5."""
    g = gen(seed)
    d, h = 3, 6
    make = {"relu": nn.ReLU, "clipped-relu": lambda: ClippedReLU([h], 0.5),
            "clipped-minmax": lambda: ClippedMinMax([h], -0.3, 0.3)}[act]
    first, second, last = nn.Linear(d, h), nn.Linear(h, h), nn.Linear(h, 3)
    with torch.no_grad():
        for p in (*first.parameters(), *second.parameters(), *last.parameters()):
            p.copy_(torch.randn(p.shape, generator=g) * 1.5)
    net = nn.Sequential(nn.Flatten(), first, make(), second, make(), last)
    return convert_sequential(net, (d,)).double().eval()


def ball_samples(x: torch.Tensor, eps: float, norm: str, n: int, g: torch.Generator
                 ) -> torch.Tensor:
    """Points of the ball around one x (inside, on the sphere, at corners), clipped to [0, 1]."""
    d = x.numel()
    if norm == "linf":
        delta = torch.rand(n, d, generator=g, dtype=torch.float64) * 2 - 1
        delta[: n // 2] = delta[: n // 2].sign()
        delta = delta * eps
    else:
        delta = torch.randn(n, d, generator=g, dtype=torch.float64)
        radius = torch.rand(n, 1, generator=g, dtype=torch.float64) ** (1 / d)
        radius[: n // 2] = 1
        delta = delta / delta.norm(dim=1, keepdim=True) * radius * eps
    return (x.double() + delta).clamp(0, 1)


@pytest.mark.parametrize("act", ["relu", "clipped-relu", "clipped-minmax"])
@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_masks_agree_with_brute_force_activations(act, norm):
    """Every activation output a mask drops is constant on thousands of sampled points of the
    ball; every input dropped only feeds dropped outputs. Some outputs are dropped and some
    kept (the check is not vacuous)."""
    dropped = kept = 0
    for seed in range(6):
        layers = activation_net(seed, act)
        g = gen(100 + seed)
        x = torch.rand(4, 3, generator=g, dtype=torch.float64)
        eps = 0.15
        seen, _ = interval_walk(layers, x, ThreatModel(norm, eps))
        ins, outs = keep_masks(layers, seen)
        for i in range(len(x)):
            points = ball_samples(x[i], eps, norm, 4000, g)
            h = points
            for j, m in enumerate(layers):
                out = m(h)
                if type(m) in (nn.ReLU, ClippedReLU, ClippedMinMax):
                    keep_out = ins[j + 1][i] if j + 1 < len(layers) else None
                    keep_in = outs[j - 1][i]
                    assert keep_out is not None and keep_in is not None
                    spread = out.amax(0) - out.amin(0)
                    assert bool((spread[~keep_out] == 0).all()), (seed, i, j)
                    dropped += int((~keep_out).sum())
                    kept += int(keep_out.sum())
                    if type(m) is ClippedMinMax:  # a pair's inputs drop iff both outputs do
                        half = keep_out.numel() // 2
                        pair = keep_out[:half] | keep_out[half:]
                        assert torch.equal(keep_in, torch.cat([pair, pair]))
                    else:
                        assert torch.equal(keep_in, keep_out)
                h = out
    assert dropped > 20 and kept > 20, (dropped, kept)


# -- the box-constrained head ------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_ball_box_shift_is_the_maximum_over_ball_and_box(seed):
    """Equal (to rounding) to max a.d over ||d|| <= r, lo <= d <= hi found by bisection on the
    multiplier; never above the ball's r ||a|| nor the box's maximum; finite gradients."""
    g = gen(seed)
    a = torch.randn(40, 3, 7, generator=g, dtype=torch.float64)
    a[0, 0] = 0.0  # a zero margin gradient moves nothing
    r = torch.rand(40, generator=g, dtype=torch.float64) * 2
    lo = -torch.rand(40, 7, generator=g, dtype=torch.float64)
    hi = torch.rand(40, 7, generator=g, dtype=torch.float64)
    hi[1] = 0.0  # a coordinate that cannot move up
    shift = ball_box_shift(a, r, lo, hi)
    low, high = torch.zeros(40, 3, 1, dtype=torch.float64), torch.full((40, 3, 1), 1e8,
                                                                        dtype=torch.float64)
    for _ in range(200):  # ||clip(lam a, lo, hi)|| is nondecreasing in lam
        mid = (low + high) / 2
        d = torch.minimum(torch.maximum(mid * a, lo.unsqueeze(1)), hi.unsqueeze(1))
        over = d.norm(dim=-1, keepdim=True) > r.view(-1, 1, 1)
        high, low = torch.where(over, mid, high), torch.where(over, low, mid)
    d = torch.minimum(torch.maximum(low * a, lo.unsqueeze(1)), hi.unsqueeze(1))
    best = (a * d).sum(-1)  # a feasible point: the maximum to bisection accuracy
    assert torch.allclose(shift, best, rtol=0, atol=1e-9)
    assert bool((shift >= best - 1e-12).all())
    assert bool((shift <= r.view(-1, 1) * a.norm(dim=-1) + 1e-12).all())
    assert bool((shift <= torch.maximum(a * lo.unsqueeze(1), a * hi.unsqueeze(1)).sum(-1)
                 + 1e-12).all())
    assert shift[0, 0] == 0
    a.requires_grad_()
    ball_box_shift(a, r, lo, hi).sum().backward()
    assert bool(torch.isfinite(a.grad).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ball_box_shift_has_finite_gradients_at_the_edges(dtype):
    """Radius 0 (every neuron before the head constant) moves nothing; a box inside the ball
    gives the box's maximum; tiny radii and zero gradients stay finite (a NaN here once
    diverged a training run)."""
    a = torch.randn(5, 3, 4, generator=gen(0)).to(dtype)
    a[0] = 0
    r = torch.tensor([1.0, 0.0, 1e30, 1e-30, 0.5], dtype=dtype)
    lo = -torch.rand(5, 4, generator=gen(1)).to(dtype)
    hi = torch.rand(5, 4, generator=gen(2)).to(dtype)
    leaves = [t.requires_grad_() for t in (a, r, lo, hi)]
    shift = ball_box_shift(a, r, lo, hi)
    shift.sum().backward()
    assert all(bool(torch.isfinite(t.grad).all()) for t in leaves)
    assert bool((shift[1] == 0).all()) and bool((shift[0] == 0).all())
    box = torch.maximum(a * lo.unsqueeze(1), a * hi.unsqueeze(1)).sum(-1)
    torch.testing.assert_close(shift[2], box[2])


# -- the certificate ---------------------------------------------------------------------------
def tiny_gloro(seed: int, act: str = "relu", gain: float = 2.0) -> GloroNet:
    layers = convert_sequential(random_mlp(seed, 4, [8, 8], act, 3, gain), (4,))
    return GloroNet(layers, (4,), 3).eval()


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_local_constants_never_exceed_global_and_certify_a_superset(norm):
    more = 0
    for seed in range(8):
        model = tiny_gloro(seed)
        x = torch.rand(64, 4, generator=gen(seed))
        twin = model.float64_copy("local-lipschitz", LocalConstants.of)
        for eps in (0.02, 0.1, 0.3):
            threat = ThreatModel(norm, eps)
            k, _, _ = local_pairwise(twin.layers, x.double(), threat, twin.derived)
            assert bool((k <= twin.derived.sound.pairwise).all())
            glob = certify(model, x, eps, "lipschitz", norm)
            loc = certify(model, x, eps, "local-lipschitz", norm)
            assert torch.equal(glob.pred, loc.pred)
            assert bool((loc.certified | ~glob.certified).all())
            more += int(loc.certified.sum() - glob.certified.sum())
            # eps rounded down to float32: never more than proved
            proved = round_down(torch.tensor(eps, dtype=torch.float64))
            assert float(proved) <= eps
            assert bool((loc.radius[loc.certified] == proved).all())
            assert bool((loc.radius[~loc.certified] == 0).all())
    assert more > 50  # on these nets the masks matter


def test_the_second_pass_never_loosens_a_layer_bound():
    model = tiny_gloro(3)
    twin = model.float64_copy("local-lipschitz", LocalConstants.of)
    x = torch.rand(32, 4, generator=gen(5)).double()
    threat = ThreatModel("l2", 0.2)
    args = (twin.layers, x, threat, twin.derived.sound.layers, twin.derived.tails)
    one, *_ = local_layer_bounds(*args, passes=1)
    two, *_ = local_layer_bounds(*args, passes=2)
    for a, b in zip(one, two, strict=True):
        assert bool((b <= a).all())


def test_local_certifies_convolutional_nets_and_any_gloro_checkpoint(tmp_path):
    from certnet.archs import build_arch
    from certnet.checkpoint import load, save_model

    layers = build_arch("2c2f", (1, 12, 12), 4, activation="clipped-relu")
    model = GloroNet(layers, (1, 12, 12), 4).eval()
    x = torch.rand(6, 1, 12, 12, generator=gen(0))
    loc = certify(model, x, 0.05, "local-lipschitz")
    glob = certify(model, x, 0.05, "lipschitz")
    assert bool((loc.certified | ~glob.certified).all())
    assert bool((loc.margin[glob.certified] > 0).all())
    save_model(tmp_path / "m", model)
    again = certify(load(tmp_path / "m"), x, 0.05, "local-lipschitz")
    assert torch.equal(again.certified, loc.certified)
    assert type(layers[0]) is LipschitzConv2d


# -- training ----------------------------------------------------------------------------------
def test_local_training_step_has_finite_gradients_and_per_point_constants():
    from certnet.archs import build_arch

    layers = build_arch("2c2f", (1, 12, 12), 4, activation="clipped-relu")
    model = GloroNet(layers, (1, 12, 12), 4, lipschitz="local", sparsity=0.01)
    assert model.default_certifier == "local-lipschitz"
    x, y = torch.rand(8, 1, 12, 12, generator=gen(1)), torch.arange(8) % 4
    logits, k, penalty = model.local_training_lipschitz(x, 0.3)
    assert k.shape == (8, 4, 4) and penalty.dim() == 0
    torch.testing.assert_close(logits, model(x))
    loss, stats = model.loss(x, y, 0.3)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert model.layers[1].threshold.grad is not None  # the sparsity penalty reaches t
    _, k0, _ = model.local_training_lipschitz(x, 0.0)  # eps 0, as at the start of the ramp
    assert bool(torch.isfinite(k0).all())


def test_local_options_are_checked_and_saved(tmp_path):
    from certnet.archs import build_arch
    from certnet.checkpoint import load, save_model

    layers = build_arch("2c2f", (1, 12, 12), 4, activation="clipped-relu")
    with pytest.raises(ConfigError, match="lipschitz"):
        GloroNet(layers, (1, 12, 12), 4, lipschitz="semi")
    with pytest.raises(ConfigError, match="sparsity"):
        GloroNet(layers, (1, 12, 12), 4, sparsity=0.1)
    model = GloroNet(layers, (1, 12, 12), 4, lipschitz="local", sparsity=0.01)
    save_model(tmp_path / "m", model)
    loaded = load(tmp_path / "m")
    assert loaded.lipschitz == "local" and loaded.sparsity == 0.01
    assert loaded.default_certifier == "local-lipschitz"


def test_nets_without_maskable_activations_skip_the_local_walk():
    from certnet.bounds.local import has_masks

    assert has_masks(tiny_gloro(0).layers)
    minmax = tiny_gloro(0, act="minmax")
    assert not has_masks(minmax.layers)
    x = torch.rand(16, 4, generator=gen(2))
    glob, loc = certify(minmax, x, 0.1, "lipschitz"), certify(minmax, x, 0.1, "local-lipschitz")
    assert torch.equal(glob.certified, loc.certified)


def test_conv_masked_bounds_run_only_where_masks_are_sparse_and_stay_sound():
    from certnet.nn.masked_spectral import CONV_KEPT_FRACTION

    conv = LipschitzConv2d(2, 3, 3, stride=1, padding=1).double()
    conv.set_input_shape((2, 5, 5))
    g = gen(7)
    cols = torch.rand(4, 2, 5, 5, generator=g) < 0.9
    rows = torch.rand(4, 3, 5, 5, generator=g) < 0.9
    assert masked_bound(conv, rows, cols, None) is None  # dense masks: the global bound
    cols[2:] &= torch.rand(2, 2, 5, 5, generator=g) < CONV_KEPT_FRACTION / 2
    bound = masked_bound(conv, rows, cols, None)
    assert bool(torch.isinf(bound[:2]).all()) and bool(torch.isfinite(bound[2:]).all())
    matrix = conv_matrix(conv.weight.detach(), 1, 1, (2, 5, 5))
    exact = exact_masked_norm(matrix, rows.flatten(1), cols.flatten(1))
    assert bool((bound >= exact).all())


def test_the_float32_box_contains_the_float64_intervals():
    """The rigorous float32 walk (rounding bounded per rule, outward rounding) never lies
    inside the float64 walk's intervals, and is barely wider."""
    from copy import deepcopy

    from certnet.archs import build_arch
    from certnet.bounds.ibp import supports_low_precision

    layers = build_arch("2c2f", (1, 12, 12), 4, activation="clipped-relu").double().eval()
    assert supports_low_precision(layers)
    box = deepcopy(layers).float()
    x = torch.rand(8, 1, 12, 12, generator=gen(3), dtype=torch.float64)
    for norm, eps in (("linf", 0.05), ("l2", 0.8)):
        exact, _ = interval_walk(layers, x, ThreatModel(norm, eps))
        fast, _ = interval_walk(layers, x, ThreatModel(norm, eps), box_layers=box)
        for a, b in zip(exact, fast, strict=True):
            assert b.lo.dtype == torch.float32
            tol = 1e-12 * (1 + a.lo.abs() + a.hi.abs())
            assert bool((b.lo.double() <= a.lo + tol).all() and (b.hi.double() >= a.hi - tol).all())
            assert bool(((b.hi.double() - b.lo.double()) <= (a.hi - a.lo) * 1.01 + 1e-3).all())


def test_the_float32_copy_is_used_only_when_it_has_exactly_the_same_weights():
    from certnet.certifiers.local_lipschitz import float32_copy

    layers = tiny_gloro(1).layers
    twin = nn.Sequential(*[m for m in layers]).double()
    assert float32_copy(twin) is not None
    with torch.no_grad():
        twin[1].weight[0, 0] = 0.1  # not a float32 number
    assert float32_copy(twin) is None


def test_local_bounds_on_activations_that_are_never_constant_are_refused_with_the_fix():
    """MinMax outputs are never constant on a ball: lipschitz=local would train with the
    global bounds at several times the cost, silently (the first-hour report)."""
    from certnet.archs import build_arch
    from certnet.errors import ConfigError

    with pytest.raises(ConfigError, match="activation=clipped-relu"):
        GloroNet(build_arch("2c2f", (1, 12, 12), 4), (1, 12, 12), 4, lipschitz="local")
    GloroNet(build_arch("2c2f", (1, 12, 12), 4, activation="relu"), (1, 12, 12), 4,
             lipschitz="local")
