"""The l_inf-dist neuron's kernels (certnet.nn.linf_dist_kernels): the numba and torch
backends against the naive reference, ties at p = inf, gradcheck, the torch backend's chunk
budget, backend selection and input validation."""

import math
import subprocess
import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode

from certnet.nn import linf_dist_kernels as K
from certnet.nn.linf_dist_kernels import linf_dist, linf_dist_backend, linf_dist_reference

INF = math.inf
TORCH_P = [1, 1.5, 2, 3, 6, 8, 64, 1024, INF]  # integer p: squarings on the CPU
NUMBA_P = [2, 8, 64, 1024, INF]  # 1024: the subnormal flush must not change the result
SHAPES = [(1, 1, 1), (1, 5, 3), (7, 1, 4), (3, 6, 1), (13, 9, 11), (33, 17, 70)]  # B, out, in


def numba_or_skip() -> None:
    pytest.importorskip("numba")


def inputs(shape, dtype=torch.float64, seed=0, ints=False):
    """x (B, in), w (out, in) requiring grad, and an upstream gradient g (B, out)."""
    n_b, n_out, n_in = shape
    gen = torch.Generator().manual_seed(seed)
    if ints:  # small integers: many exact ties of |x - w|, and zeros
        x = torch.randint(-2, 3, (n_b, n_in), generator=gen).to(dtype)
        w = torch.randint(-2, 3, (n_out, n_in), generator=gen).to(dtype)
    else:
        x = torch.randn(n_b, n_in, generator=gen, dtype=dtype)
        w = torch.randn(n_out, n_in, generator=gen, dtype=dtype)
    g = torch.randn(n_b, n_out, generator=gen, dtype=dtype)
    return x.requires_grad_(), w.requires_grad_(), g


def value_and_grads(fn, x, w, g):
    u = fn(x, w)
    gx, gw = torch.autograd.grad(u, (x, w), g)
    return u.detach(), gx, gw


def assert_matches_reference(backend, p, x, w, g, rtol=1e-10, atol=1e-12):
    got = value_and_grads(lambda a, b: linf_dist(a, b, p, backend), x, w, g)
    want = value_and_grads(lambda a, b: linf_dist_reference(a, b, p), x, w, g)
    for name, a, b in zip(("u", "grad x", "grad w"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"{backend} p={p} {name}")


# ---------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", TORCH_P)
def test_torch_backend_matches_reference(p, shape):
    assert_matches_reference("torch", p, *inputs(shape))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", NUMBA_P)
def test_numba_backend_matches_reference(p, shape):
    numba_or_skip()
    assert_matches_reference("numba", p, *inputs(shape))


@pytest.mark.parametrize("p", [8, INF])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_float32_close_to_float64_reference(backend, p):
    if backend == "numba":
        numba_or_skip()
    x, w, g = inputs((20, 12, 37), dtype=torch.float32)
    u, gx, gw = value_and_grads(lambda a, b: linf_dist(a, b, p, backend), x, w, g)
    assert u.dtype == gx.dtype == gw.dtype == torch.float32
    ref = value_and_grads(lambda a, b: linf_dist_reference(a, b, p),
                          *(t.detach().double().requires_grad_() for t in (x, w)), g.double())
    for a, b in zip((u, gx, gw), ref, strict=True):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ties_at_inf_follow_first_argmax(backend, seed):
    """Integer inputs: many |x - w| tie for the max (and d = 0 occurs): the gradient goes to
    the first index attaining it, exactly like the reference's torch.argmax + gather."""
    if backend == "numba":
        numba_or_skip()
    x, w, g = inputs((17, 13, 9), ints=True, seed=seed)
    assert_matches_reference(backend, INF, x, w, g, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_tie_goes_to_the_first_index(backend):
    if backend == "numba":
        numba_or_skip()
    x = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    w = torch.tensor([[0.5, 1.0, -1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    u = linf_dist(x, w, INF, backend)
    assert u.item() == 1.0
    gx, gw = torch.autograd.grad(u.sum(), (x, w))
    assert gx.tolist() == [[0.0, -1.0, 0.0, 0.0]]  # index 1 (d = -1), not 2 or 3
    assert gw.tolist() == [[0.0, 1.0, 0.0, 0.0]]


@pytest.mark.parametrize("p", [2, 8, INF])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_zero_distance_and_zero_gradient(backend, p):
    """x[b] == w[o]: u = 0 and no gradient (max normalisation with m = 0; sign(0) = 0)."""
    if backend == "numba":
        numba_or_skip()
    w = torch.tensor([[1.0, -2.0, 3.0], [0.0, 0.0, 1.0]], dtype=torch.float64,
                     requires_grad=True)
    x = torch.tensor([[1.0, -2.0, 3.0]], dtype=torch.float64, requires_grad=True)
    u = linf_dist(x, w, p, backend)
    assert u[0, 0].item() == 0.0 and u[0, 1].item() > 0
    gx, gw = torch.autograd.grad(u[0, 0], (x, w))
    assert not gx.any() and not gw.any()


@pytest.mark.parametrize("p", [8, INF])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_nan_input_gives_nan(backend, p):
    if backend == "numba":
        numba_or_skip()
    x, w, _ = inputs((4, 3, 6))
    x = x.detach().clone()
    x[1, 2] = math.nan
    w = w.detach().clone()
    w[2, 5] = math.nan
    u = linf_dist(x, w, p, backend)
    nan = torch.zeros(4, 3, dtype=torch.bool)
    nan[1, :] = True
    nan[:, 2] = True
    assert torch.equal(u.isnan(), nan)


def integers(seed=0):
    """x (5, 6) and w (4, 6), float64 integers in [-40, 40] (column 0 of w is 0, as is x[0, 0]),
    to be scaled exactly by a power of two."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-40, 41, (5, 6), generator=gen).double()
    w = torch.randint(-40, 41, (4, 6), generator=gen).double()
    w[:, 0] = 0
    x[0, 0] = 0
    return x, w


@pytest.mark.parametrize("p", [2, 8, 2**30, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_subnormal_distances_are_finite_and_accurate(backend, dtype, p):
    """Every |x_i - w_i| subnormal (below 2^-1045 resp. 2^-135, where 1/m overflows): the
    forward is the exact distance (the reference on the integers, times 2**exponent) to
    rounding and two subnormal spacings, not inf."""
    if backend == "numba":
        numba_or_skip()
        if p == 3:
            pytest.skip("numba takes p = 2**k")
    exponent = -142 if dtype == torch.float32 else -1052
    x, w = integers()
    u = linf_dist((x * 2.0**exponent).to(dtype), (w * 2.0**exponent).to(dtype), p, backend)
    want = linf_dist_reference(x, w, p)
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps
    torch.testing.assert_close(u.double(), want * 2.0**exponent, rtol=1e-5, atol=2 * tiny)


@pytest.mark.parametrize("p", [2, 8, 2**30])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_distances_near_overflow_are_accurate(backend, p):
    """float32 differences near 2**127, where 1/m is subnormal (21 bits) and its rounding to
    the power p = 2**30 gave 0 or inf: the forward is the exact distance (the reference on
    the integers, times 2**120) to rounding; gradients are finite and match it."""
    if backend == "numba":
        numba_or_skip()
    x, w = integers(seed=1)
    g = torch.ones(5, 4, dtype=torch.float64)
    u, gx, gw = value_and_grads(lambda a, b: linf_dist(a, b, p, backend),
                                *((t * 2.0**120).float().requires_grad_() for t in (x, w)),
                                g.float())
    want, wx, ww = value_and_grads(lambda a, b: linf_dist_reference(a, b, p),
                                   x.requires_grad_(), w.requires_grad_(), g)
    assert u.isfinite().all()
    torch.testing.assert_close(u.double(), want * 2.0**120, rtol=1e-5, atol=0)
    if p < 2**30:  # at p = 2**30 the backward's 1/u is subnormal too (left as it was)
        torch.testing.assert_close(gx.double(), wx, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(gw.double(), ww, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_empty_batch_and_empty_output(backend):
    if backend == "numba":
        numba_or_skip()
    for shape in [(0, 3, 5), (4, 0, 5)]:
        x, w, g = inputs(shape)
        u, gx, gw = value_and_grads(lambda a, b: linf_dist(a, b, INF, backend), x, w, g)
        assert u.shape == (shape[0], shape[1])
        assert not gx.any() and not gw.any()


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_in_place_on_output_and_one_sided_gradients(backend):
    if backend == "numba":
        numba_or_skip()
    x, w, g = inputs((5, 4, 6))
    for p in (8, INF):
        u = linf_dist(x.detach(), w, p, backend)  # no gradient wanted for x
        u.mul_(2)  # not a view: in-place ops downstream are allowed
        (gw,) = torch.autograd.grad(u, (w,), g)
        (want,) = torch.autograd.grad(linf_dist_reference(x.detach(), w, p), (w,), 2 * g)
        torch.testing.assert_close(gw, want, rtol=1e-10, atol=1e-12)
        (gx,) = torch.autograd.grad(linf_dist(x, w.detach(), p, backend), (x,), g)
        (want,) = torch.autograd.grad(linf_dist_reference(x, w.detach(), p), (x,), g)
        torch.testing.assert_close(gx, want, rtol=1e-10, atol=1e-12)


def test_non_contiguous_inputs():
    x, w, g = inputs((6, 5, 7))
    xt = x.detach().T.contiguous().T.requires_grad_()  # same values, column-major
    wt = w.detach().T.contiguous().T.requires_grad_()
    assert not xt.is_contiguous() and not wt.is_contiguous()
    for backend in ["torch"] + (["numba"] if K.numba_available() else []):
        for p in (8, INF):
            assert_matches_reference(backend, p, xt, wt, g[:, ::1])
            assert_matches_reference(backend, p, xt, wt, g.T.contiguous().T)


# ---------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("p", [1, 1.5, 2, 3, 8])
def test_gradcheck_torch_backend(p):
    x, w, _ = inputs((3, 4, 5), seed=3)
    assert torch.autograd.gradcheck(lambda a, b: linf_dist(a, b, p, "torch"), (x, w))


@pytest.mark.parametrize("p", [2, 8, 64])
def test_gradcheck_numba_backend(p):
    numba_or_skip()
    x, w, _ = inputs((3, 4, 5), seed=3)
    assert torch.autograd.gradcheck(lambda a, b: linf_dist(a, b, p, "numba"), (x, w))


# ---------------------------------------------------------------------------- chunk budget


class LargestTensor(TorchFunctionMode):
    """Records the most elements of any new 3-D tensor (not a view) a torch function returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() == 3 and t._base is None:
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("budget", [1, 7, 40, 150])
@pytest.mark.parametrize("p", [1.5, 8, INF])
def test_torch_backend_respects_chunk_budget(monkeypatch, budget, p):
    """Budgets below one row of ``in`` split it (ties at p = inf cross block borders)."""
    monkeypatch.setattr(K, "TORCH_CHUNK_ELEMENTS", budget)
    x, w, g = inputs((5, 6, 20), ints=p == INF, seed=4)
    with LargestTensor() as mode:
        assert_matches_reference("torch", p, x, w, g, atol=1e-12 if p != INF else 1e-14)
    # the reference builds the full 5 x 6 x 20 = 600 elements; the backend at most the budget
    assert mode.largest == 600
    seen = []  # largest new 3-D tensor inside the forward, then the backward

    def spy(fn):
        def watched(*args):
            with LargestTensor() as mode:
                out = fn(*args)
            seen.append(mode.largest)
            return out
        return watched

    monkeypatch.setattr(K, "_torch_forward", spy(K._torch_forward))
    monkeypatch.setattr(K, "_torch_backward", spy(K._torch_backward))
    torch.autograd.grad(linf_dist(x, w, p, "torch"), (x, w), g)
    assert len(seen) == 2
    assert 0 < seen[0] <= budget
    assert (seen[1] == 0) if p == INF else (0 < seen[1] <= budget)  # inf: an (B, out) scatter


def test_blocks_fit_the_budget(monkeypatch):
    for budget in (1, 5, 64, 1000, 2**22):
        monkeypatch.setattr(K, "TORCH_CHUNK_ELEMENTS", budget)
        for n_b, n_out, n_in in [(1, 1, 1), (256, 1024, 1024), (3, 7, 5000), (10, 0, 3)]:
            bb, bo, bi = K._blocks(n_b, n_out, n_in, torch.device("cpu"))
            assert 1 <= bi <= n_in and bb >= 1 and bo >= 1
            assert bb * bo * bi <= max(budget, 1)


def test_torch_backend_runs_on_meta_device():
    """No CPU is hard-coded: shapes flow through on the meta device (as on CUDA)."""
    for p in (1.5, 8, INF):
        x = torch.empty(4, 6, device="meta", requires_grad=True)
        w = torch.empty(3, 6, device="meta", requires_grad=True)
        assert linf_dist_backend(x, p) == "torch"
        u = linf_dist(x, w, p)
        assert u.shape == (4, 3) and u.device.type == "meta"
        gx, gw = torch.autograd.grad(u, (x, w), torch.empty(4, 3, device="meta"))
        assert gx.shape == x.shape and gw.shape == w.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_uses_torch_backend():
    x, w, g = (t.detach().cuda() for t in inputs((9, 5, 12)))
    x.requires_grad_()
    w.requires_grad_()
    assert linf_dist_backend(x, INF) == "torch"
    for p in (2, 8, INF):
        assert_matches_reference("auto", p, x, w, g)


# ---------------------------------------------------------------------------- backend choice


def test_auto_picks_numba_for_cpu_powers_of_two():
    numba_or_skip()
    x32, x64 = torch.zeros(2, 3), torch.zeros(2, 3, dtype=torch.float64)
    for p in (INF, 2, 8, 64, 2.0**30):
        assert linf_dist_backend(x32, p) == "numba"
        assert linf_dist_backend(x64, p, "numba") == "numba"
    for p in (1, 1.5, 3, 6, 100, 2.0**31):
        assert linf_dist_backend(x32, p) == "torch"
        with pytest.raises(ValueError, match="numba"):
            linf_dist_backend(x32, p, "numba")
    for dtype in (torch.float16, torch.bfloat16):
        x = torch.zeros(2, 3, dtype=dtype)
        assert linf_dist_backend(x, INF) == "torch"
        with pytest.raises(ValueError, match="dtype"):
            linf_dist(x, torch.zeros(1, 3, dtype=dtype), INF, "numba")
    assert linf_dist_backend(x32, INF, "torch") == "torch"


def test_without_numba_auto_falls_back_and_numba_raises(monkeypatch):
    monkeypatch.setattr(K, "numba_available", lambda: False)
    x, w, g = inputs((3, 4, 5))
    assert linf_dist_backend(x, INF) == "torch"
    assert_matches_reference("auto", INF, x, w, g)
    with pytest.raises(ImportError, match="needs numba"):
        linf_dist(x, w, INF, "numba")


def test_import_certnet_does_not_import_numba():
    code = ("import sys, certnet, certnet.nn.linf_dist_kernels as k, torch\n"
            "k.linf_dist(torch.ones(2, 3), torch.zeros(4, 3), 1.5)\n"
            "assert 'numba' not in sys.modules, 'numba imported'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("x, w, p, match", [
    (torch.zeros(3), torch.zeros(2, 3), INF, "x must be 2-D"),
    (torch.zeros(1, 2, 3), torch.zeros(2, 3), INF, "x must be 2-D"),
    (torch.zeros(2, 3), torch.zeros(3), INF, "weight must be 2-D"),
    (torch.zeros(2, 3), torch.zeros(4, 5), INF, "3 input features but weight has 5"),
    (torch.zeros(2, 0), torch.zeros(4, 0), INF, "at least one input feature"),
    (torch.zeros(2, 3), torch.zeros(4, 3, dtype=torch.float64), INF, "float32 but weight"),
    (torch.zeros(2, 3, dtype=torch.int64), torch.zeros(4, 3), INF, "floating point"),
    (torch.zeros(2, 3), torch.zeros(4, 3), 0.5, "p must be >= 1"),
    (torch.zeros(2, 3), torch.zeros(4, 3), -INF, "p must be >= 1"),
    (torch.zeros(2, 3), torch.zeros(4, 3), math.nan, "p must be >= 1"),
    (torch.zeros(2, 3), torch.zeros(4, 3), "inf", "p must be a real number"),
    (torch.zeros(2, 3), torch.zeros(4, 3), True, "p must be a real number"),
    ([[0.0, 1.0]], torch.zeros(4, 2), INF, "x must be a torch.Tensor"),
])
def test_bad_inputs_raise_value_error(x, w, p, match):
    for backend in ("auto", "torch", "numba"):
        with pytest.raises(ValueError, match=match):
            linf_dist(x, w, p, backend)
    with pytest.raises(ValueError, match=match):
        linf_dist_reference(x, w, p)


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown linf_dist backend 'cuda'"):
        linf_dist(torch.zeros(2, 3), torch.zeros(4, 3), INF, "cuda")


def test_numba_refuses_other_devices():
    numba_or_skip()
    x = torch.empty(2, 3, device="meta")
    with pytest.raises(ValueError, match="numba runs on the CPU"):
        linf_dist(x, torch.empty(4, 3, device="meta"), INF, "numba")
