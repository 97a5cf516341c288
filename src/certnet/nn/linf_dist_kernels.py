"""Compute kernels of the l_inf-dist neuron (Zhang et al., ICML 2021, "Towards Certifying
L-infinity Robustness using Neural Networks with L-inf-dist Neurons").

A layer maps x (B, in) to u[b, o] = ||x[b, :] - w[o, :]||_p, p in [1, inf]: training anneals
p from 8 upwards and ends at p = inf. ``linf_dist`` is the differentiable op, with two
backends:

* ``"numba"``: CPU kernels (float32 / float64) for p = inf and p = 2**k, k >= 1. x is used
  transposed (in x B) so that the innermost loop runs over the batch and vectorizes;
  |t|**p is k squarings (which vectorize; a general real power does not).
* ``"torch"``: blocked torch ops for any p on any device; no chunk tensor holds more than
  ``TORCH_CHUNK_ELEMENTS`` elements (the full B x out x in difference is never built).

Numerics. For finite p the norm is normalised by its largest term, u = m (sum_i
(|d_i| / m)**p)**(1/p), m = max_i |d_i| (u = 0 and a zero gradient where m = 0; u = m where m
is inf or NaN). 1/m overflows at a subnormal m: the torch backend divides by m, the numba
backend scales d and m by an exact power of two first where m is very small or large (both
finite and within docs/rounding.md's error for every m). du/dx_i = sign(d_i) (|d_i| / u)**(p - 1)
= -du/dw_i. At p = inf the forward records the FIRST index attaining the max (torch.argmax's
tie rule) and the backward sends g * sign(d) to that index only (sign(0) = 0). A NaN input
gives a NaN output.

numba is optional: it is imported on first use, never by ``import certnet``.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from certnet.errors import ConfigError, InputError

__all__ = [
    "TORCH_CHUNK_ELEMENTS",
    "linf_dist",
    "linf_dist_backend",
    "linf_dist_interval",
    "linf_dist_reference",
    "numba_available",
]

BACKENDS = ("auto", "numba", "torch")
#: Most elements of any one (B-block, out-block, in-block) tensor of the torch backend.
TORCH_CHUNK_ELEMENTS = 2**22
#: The torch backend's budget on the CPU, where blocks that stay in L2 are faster.
TORCH_CPU_CHUNK_ELEMENTS = 2**18
#: The numba backend's largest finite p is 2**NUMBA_MAX_LOG2P (one compiled kernel per k).
NUMBA_MAX_LOG2P = 30
#: LLVM fast-math flags of the numba kernels. "reassoc" lets the finite-p backward's sum over
#: the batch vectorize (12x faster measured); "contract" allows FMAs. Not "nnan"/"ninf"
#: (fastmath=True): with them LLVM drops the NaN test of the max and a NaN input no longer
#: gives a NaN output. Ties pick the first index under any flags (a strict ">"). Sums are
#: reordered, so results can differ from the reference in the last bits. numba's on-disk
#: cache does not notice a change here: clear __pycache__/linf_dist_kernels*.nb* after one.
NUMBA_FASTMATH = frozenset({"reassoc", "contract", "nsz", "arcp"})

#: Flags of the numba forward at finite p: without "reassoc" and "arcp", which would let LLVM
#: fold the row scale into the reciprocal (t = (d sc) (1 / (m sc)) into d (1 / m), which
#: overflows at a subnormal m); its loops vectorize without them.
NUMBA_FORWARD_FASTMATH = frozenset({"contract", "nsz"})

#: Input features per block of the numba backward at finite p.
_IBLOCK = 8

_UNSET = object()
_numba_module: Any = _UNSET
_kernels: dict[Any, Any] = {}


# ---------------------------------------------------------------------------- public API


def linf_dist(x: torch.Tensor, weight: torch.Tensor, p: float,
              backend: str = "auto") -> torch.Tensor:
    """u[b, o] = ||x[b] - weight[o]||_p (Zhang et al. 2021), differentiable in x and weight.

    x: (B, in), weight: (out, in), same floating dtype and device; p >= 1 (``math.inf``
    allowed). backend: ``"auto"`` (numba where it applies, else torch), ``"numba"`` or
    ``"torch"``; see the module docstring. Returns (B, out).
    """
    p = _check(x, weight, p)
    if linf_dist_backend(x, p, backend) == "numba":
        return _NumbaLinfDist.apply(x, weight, p)
    return _TorchLinfDist.apply(x, weight, p)


def linf_dist_backend(x: torch.Tensor, p: float, backend: str = "auto") -> str:
    """The backend ``linf_dist(x, ., p, backend)`` runs: "numba" or "torch".

    "auto" picks numba when x is a float32/float64 CPU tensor, numba imports, and p is inf or
    a power of two in [2, 2**30]; otherwise torch. An explicit "numba" that cannot run raises
    (ImportError without numba, ValueError for the device, dtype or p).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown linf_dist backend {backend!r}; expected one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    why_not = _numba_unsupported(x, p)
    if why_not is None and not numba_available():
        if backend == "numba":
            raise ImportError("linf_dist backend='numba' needs numba, which cannot be imported "
                              "(pip install numba); backend='auto' uses the torch backend")
        return "torch"
    if why_not is not None:
        if backend == "numba":
            raise InputError(f"linf_dist backend='numba' cannot run this: {why_not}; "
                             "use backend='torch' or 'auto'")
        return "torch"
    return "numba"


def numba_available() -> bool:
    """Whether numba imports (tried once, on first call)."""
    return _numba() is not None


def linf_dist_interval(lo: torch.Tensor, hi: torch.Tensor, weight: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Exact bounds of ||x - w_o||_inf over the boxes [lo, hi] (B, in), by the numba kernel:
    lower = max_i max(lo_i - w_i, w_i - hi_i, 0), upper = max_i max(|lo_i - w_i|, |hi_i - w_i|),
    each term one rounded subtraction (NaN propagates). None where the kernel does not apply
    (no numba, not on the CPU, not float32/64): the caller takes its portable path."""
    if _numba_unsupported(lo, math.inf) is not None or not numba_available() or \
            weight.dtype != lo.dtype or weight.device != lo.device:
        return None
    lower = lo.new_empty(lo.shape[0], weight.shape[0])
    upper = torch.empty_like(lower)
    _interval_kernel()(lo.detach().T.contiguous().numpy(), hi.detach().T.contiguous().numpy(),
                       weight.detach().contiguous().numpy(), lower.numpy(), upper.numpy())
    return lower, upper


def linf_dist_reference(x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
    """The naive l_p distance by broadcasting, in plain torch autograd: FOR TESTS ONLY.

    It builds the full (B, out, in) difference. Same conventions as ``linf_dist``: max
    normalisation for finite p (with m = 0 giving u = 0 and a zero gradient) and, at p = inf,
    the gradient through the first argmax only (torch.argmax + gather).
    """
    p = _check(x, weight, p)
    a = (x[:, None, :] - weight[None, :, :]).abs()
    if p == math.inf:
        return a.gather(-1, a.argmax(-1, keepdim=True)).squeeze(-1)
    m = a.amax(-1, keepdim=True).detach()  # u does not depend on m: no gradient through it
    pos = m > 0
    m = torch.where(pos, m, torch.ones_like(m))
    s = (a / m).pow(p).sum(-1, keepdim=True)
    s = torch.where(pos, s, torch.ones_like(s))  # keeps s**(1/p)'s gradient finite at m = 0
    return torch.where(pos, m * s.pow(1 / p), torch.zeros_like(s)).squeeze(-1)


# ---------------------------------------------------------------------------- checks


def _check(x: torch.Tensor, weight: torch.Tensor, p: float) -> float:
    """Validate the inputs; returns p as a float."""
    for name, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"linf_dist: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise InputError(f"linf_dist: {name} must be 2-D, got shape {tuple(t.shape)}")
        if not t.dtype.is_floating_point:
            raise InputError(f"linf_dist: {name} must be floating point, got {t.dtype}")
    if x.shape[1] != weight.shape[1]:
        raise InputError(f"linf_dist: x has {x.shape[1]} input features but weight has "
                         f"{weight.shape[1]} (x: (B, in), weight: (out, in))")
    if x.shape[1] == 0:
        raise InputError("linf_dist: needs at least one input feature")
    if x.dtype != weight.dtype:
        raise InputError(f"linf_dist: x is {x.dtype} but weight is {weight.dtype}")
    if x.device != weight.device:
        raise InputError(f"linf_dist: x is on {x.device} but weight is on {weight.device}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise InputError(f"linf_dist: p must be a real number >= 1 or math.inf, got {p!r}")
    p = float(p)
    if math.isnan(p) or p < 1:
        raise InputError(f"linf_dist: p must be >= 1 (or math.inf), got {p}")
    return p


def _log2_p(p: float) -> int | None:
    """k when p = 2**k with 1 <= k <= NUMBA_MAX_LOG2P, else None."""
    mantissa, exponent = math.frexp(p)
    k = exponent - 1
    return k if mantissa == 0.5 and 1 <= k <= NUMBA_MAX_LOG2P else None


def _numba_unsupported(x: torch.Tensor, p: float) -> str | None:
    """Why the numba backend cannot compute this (None if it can)."""
    if x.device.type != "cpu":
        return f"x is on {x.device} (numba runs on the CPU)"
    if x.dtype not in (torch.float32, torch.float64):
        return f"dtype {x.dtype} (numba takes float32 or float64)"
    if p != math.inf and _log2_p(p) is None:
        return f"p = {p} (numba takes p = inf or p = 2**k, 1 <= k <= {NUMBA_MAX_LOG2P})"
    return None


# ---------------------------------------------------------------------------- torch backend


def _blocks(n_b: int, n_out: int, n_in: int, device: torch.device) -> tuple[int, int, int]:
    """Block sizes (B, out, in) whose product is at most TORCH_CHUNK_ELEMENTS (and at most
    TORCH_CPU_CHUNK_ELEMENTS on the CPU)."""
    budget = TORCH_CHUNK_ELEMENTS
    if device.type == "cpu":
        budget = min(budget, TORCH_CPU_CHUNK_ELEMENTS)
    budget = max(1, int(budget))
    bi = min(n_in, budget)
    bo = min(max(n_out, 1), max(1, budget // bi))
    bb = min(max(n_b, 1), max(1, budget // (bi * bo)))
    return bb, bo, bi


def _pow_(t: torch.Tensor, e: float) -> torch.Tensor:
    """t**e for t in [0, ~1], overwriting t. On the CPU an integer e (up to 2**31) is done by
    squarings, several times faster than pow; t with t**e below the smallest normal are set to
    0 first (subnormal arithmetic is slow; in the forward such a term vanishes next to the
    largest, 1, and in the backward its gradient term is below tiny * |g|)."""
    if t.device.type != "cpu" or e != int(e) or not 1 <= e <= 2**31:
        return t.pow_(e)
    e = int(e)
    torch.nn.functional.threshold_(t, torch.finfo(t.dtype).tiny ** (1 / e), 0)
    result = None
    while True:
        if e & 1:
            result = t.clone() if result is None else result.mul_(t)
        e >>= 1
        if not e:
            return result
        t.square_()


def _torch_forward(x: torch.Tensor, w: torch.Tensor, p: float
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(u, first argmax as int32 at p = inf, else None), block by block."""
    n_b, n_in = x.shape
    n_out = w.shape[0]
    bb, bo, bi = _blocks(n_b, n_out, n_in, x.device)
    u = x.new_empty(n_b, n_out)
    idx = torch.empty(n_b, n_out, dtype=torch.int32, device=x.device) if p == math.inf else None
    for b0 in range(0, n_b, bb):
        xb = x[b0:b0 + bb, None, :]
        for o0 in range(0, n_out, bo):
            wb = w[None, o0:o0 + bo, :]
            if p == math.inf:
                best = arg = None
                for i0 in range(0, n_in, bi):
                    a = (xb[..., i0:i0 + bi] - wb[..., i0:i0 + bi]).abs_()
                    v, j = a.max(-1)  # first index of the max; NaN counts as the max
                    del a
                    if best is None:
                        best, arg = v, j + i0
                    else:  # strictly larger (or a first NaN) replaces: first index wins
                        take = (v > best) | (v.isnan() & ~best.isnan())
                        best = torch.where(take, v, best)
                        arg = torch.where(take, j + i0, arg)
                u[b0:b0 + bb, o0:o0 + bo] = best
                idx[b0:b0 + bb, o0:o0 + bo] = arg
                continue
            m = None
            for i0 in range(0, n_in, bi):
                a = (xb[..., i0:i0 + bi] - wb[..., i0:i0 + bi]).abs_()
                am = a.amax(-1, keepdim=True)
                m = am if m is None else torch.maximum(m, am)  # propagates NaN
            # a division, not a product with 1 / m (inf for m < 2^-1024); m = 0: 0 / 1
            top = torch.where(m > 0, m, torch.ones_like(m))
            s = None
            for i0 in range(0, n_in, bi):
                if bi < n_in:  # several in-blocks: recompute (else reuse the one block's a)
                    a = (xb[..., i0:i0 + bi] - wb[..., i0:i0 + bi]).abs_()
                part = _pow_(a.div_(top), p).sum(-1)
                s = part if s is None else s + part
                del a
            m = m.squeeze(-1)
            u[b0:b0 + bb, o0:o0 + bo] = torch.where(m < torch.inf, m * s.pow(1 / p), m)
    return u, idx


def _inverse(u: torch.Tensor) -> torch.Tensor:
    """1 / u, with 0 where u = 0 (a zero gradient there; NaN stays NaN)."""
    return (1 / u).masked_fill_(u == 0, 0)


def _torch_backward(x: torch.Tensor, w: torch.Tensor, p: float, aux: torch.Tensor,
                    g: torch.Tensor, need_x: bool, need_w: bool
                    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients w.r.t. x and w of sum(g * u), block by block (p = inf: a sparse scatter).
    aux: the first argmax (p = inf) or ``_inverse(u)``."""
    gx = torch.zeros_like(x) if need_x else None
    gw = torch.zeros_like(w) if need_w else None
    if p == math.inf:
        j = aux.long()
        val = g * (x.gather(1, j) - w.gather(1, j.T).T).sign()  # x[b, j], w[o, j], j = j[b, o]
        if need_x:
            gx.scatter_add_(1, j, val)
        if need_w:
            gw.scatter_add_(1, j.T, -val.T)
        return gx, gw
    n_b, n_in = x.shape
    n_out = w.shape[0]
    bb, bo, bi = _blocks(n_b, n_out, n_in, x.device)
    coef = (g * aux)[..., None]  # g / u
    inv_u = aux[..., None]
    for b0 in range(0, n_b, bb):
        bs = slice(b0, b0 + bb)
        for o0 in range(0, n_out, bo):
            os_ = slice(o0, o0 + bo)
            for i0 in range(0, n_in, bi):
                is_ = slice(i0, i0 + bi)
                d = x[bs, None, is_] - w[None, os_, is_]
                # g sign(d) (|d| / u)**(p - 1), as g/u * d * (|d| / u)**(p - 2) for p >= 2
                if p >= 2:
                    c = _pow_(d.abs().mul_(inv_u[bs, os_]), p - 2).mul_(d).mul_(coef[bs, os_])
                else:  # 1 <= p < 2: g sign(d) (|d| / u)**(p - 1) (0**0 = 1, sign(0) = 0)
                    c = d.abs().mul_(inv_u[bs, os_]).pow_(p - 1).mul_(d.sign_())
                    c.mul_(g[bs, os_, None])
                del d
                if need_x:
                    gx[bs, is_] += c.sum(1)
                if need_w:
                    gw[os_, is_] -= c.sum(0)
    return gx, gw


class _TorchLinfDist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        u, idx = _torch_forward(x.detach(), weight.detach(), p)
        ctx.p = p
        # not u itself: in-place ops on the output stay allowed
        ctx.save_for_backward(x, weight, _inverse(u) if idx is None else idx)
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        x, weight, aux = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        gx, gw = _torch_backward(x, weight, ctx.p, aux, g.contiguous(), need_x, need_w)
        return gx, gw, None


# ---------------------------------------------------------------------------- numba backend


def _numba() -> Any:
    """The numba module, or None when it cannot be imported (tried once)."""
    global _numba_module
    if _numba_module is _UNSET:
        try:
            import numba  # noqa: PLC0415 -- optional dependency, imported on first use
        except ImportError:
            numba = None
        _numba_module = numba
    return _numba_module


def _interval_kernel() -> Any:
    """The p = inf interval kernel (the forward loop over two endpoints), compiled once."""
    if "interval" in _kernels:
        return _kernels["interval"]
    numba = _numba()

    @numba.njit(parallel=True, fastmath=set(NUMBA_FASTMATH), cache=True, boundscheck=False)
    def interval(loT, hiT, w, lower, upper):  # loT, hiT: (in, B); lower, upper: (B, out)
        n_in, n_b = loT.shape
        for o in numba.prange(w.shape[0]):
            low = np.zeros(n_b, loT.dtype)
            high = np.zeros(n_b, loT.dtype)
            for i in range(n_in):
                wi = w[o, i]
                lo_i, hi_i = loT[i], hiT[i]
                for b in range(n_b):
                    below, above = lo_i[b] - wi, wi - hi_i[b]
                    near = below if (below > above) | (below != below) else above
                    fb, fa = abs(below), abs(above)
                    far = fb if (fb > fa) | (fb != fb) else fa
                    low[b] = near if (near > low[b]) | (near != near) else low[b]
                    high[b] = far if (far > high[b]) | (far != far) else high[b]
            for b in range(n_b):
                lower[b, o] = low[b]
                upper[b, o] = high[b]

    _kernels["interval"] = interval
    return interval


def _inf_kernels() -> tuple[Any, Any]:
    """(forward, backward) numba kernels at p = inf, compiled on first use."""
    if "inf" in _kernels:
        return _kernels["inf"]
    numba = _numba()
    njit, prange = numba.njit, numba.prange

    @njit(parallel=True, fastmath=set(NUMBA_FASTMATH), cache=True, boundscheck=False)
    def forward(xT, w, u, idxT):  # xT: x transposed (in, B); idxT: (out, B)
        n_in, n_b = xT.shape
        for o in prange(w.shape[0]):
            m = np.full(n_b, -1.0, xT.dtype)
            arg = idxT[o]
            for b in range(n_b):
                arg[b] = 0
            for i in range(n_in):
                wi = w[o, i]
                xi = xT[i]
                ii = np.int32(i)
                for b in range(n_b):
                    d = abs(xi[b] - wi)
                    # strictly larger, or a first NaN: the first index of the max wins
                    take = (d > m[b]) | ((d != d) & (m[b] == m[b]))
                    m[b] = d if take else m[b]
                    arg[b] = ii if take else arg[b]
            for b in range(n_b):
                u[b, o] = m[b]

    @njit(parallel=True, cache=True, boundscheck=False)
    def backward(x, w, gT, idxT, gx, gw):
        # pass 1 (rows of w thread-private): v[o, b] = g sign(d) at the argmax, gw -= v;
        # pass 2 (rows of x thread-private, 16 at a time): gx += v
        n_out, n_b = gT.shape
        v = np.empty_like(gT)
        for o in prange(n_out):
            for b in range(n_b):
                i = idxT[o, b]
                d = x[b, i] - w[o, i]
                vb = gT[o, b] if d > 0 else (-gT[o, b] if d < 0 else 0.0)
                v[o, b] = vb
                gw[o, i] -= vb
        for c in prange((n_b + 15) // 16):
            for o in range(n_out):
                for b in range(16 * c, min(16 * c + 16, n_b)):
                    gx[b, idxT[o, b]] += v[o, b]

    _kernels["inf"] = forward, backward
    return forward, backward


def _pow_kernels(k: int) -> tuple[Any, Any]:
    """(forward, backward) numba kernels at p = 2**k, compiled on first use (k is a compile-time
    constant, so the k squarings unroll inside the vectorized batch loop)."""
    if k in _kernels:
        return _kernels[k]
    numba = _numba()
    njit, prange = numba.njit, numba.prange
    inv_p = 1.0 / 2**k
    iblock = _IBLOCK  # a closure variable is part of numba's cache key, a global is not

    @njit(parallel=True, fastmath=set(NUMBA_FORWARD_FASTMATH), cache=True, boundscheck=False)
    def forward(xT, w, u, flush, scale):
        # flush: t**2 below it would make t**p subnormal, which adds nothing to s >= 1:
        # such t are set to 0 so the squarings never run on subnormals (slow on x86).
        # scale: 2**(maxexp / 2); rows with m outside [1 / scale, scale] use t = (d sc) / (m sc)
        # with sc = scale or 1 / scale, so that m sc and its reciprocal are normal numbers
        n_in, n_b = xT.shape
        zero = flush - flush
        one = zero + 1
        shrink = one / scale
        for o in prange(w.shape[0]):
            m = np.full(n_b, -1.0, xT.dtype)
            for i in range(n_in):
                wi = w[o, i]
                xi = xT[i]
                for b in range(n_b):
                    d = abs(xi[b] - wi)
                    m[b] = d if (d > m[b]) | (d != d) else m[b]
            inv = np.empty(n_b, xT.dtype)
            sc = np.empty(n_b, xT.dtype)
            for b in range(n_b):
                mb = m[b]
                sc[b] = scale if mb < shrink else (shrink if mb > scale else one)
                inv[b] = one / (mb * sc[b]) if mb > 0 else zero
            s = np.zeros(n_b, xT.dtype)
            for i in range(n_in):
                wi = w[o, i]
                xi = xT[i]
                for b in range(n_b):
                    t = (xi[b] - wi) * sc[b] * inv[b]  # sc exact: a power of two
                    t = t * t
                    t = t if t >= flush else zero
                    for _ in range(k - 1):
                        t = t * t
                    s[b] += t
            for b in range(n_b):
                u[b, o] = m[b] * s[b] ** inv_p if m[b] < np.inf else m[b]  # inf, NaN: m

    @njit(parallel=True, fastmath=set(NUMBA_FASTMATH), cache=True, boundscheck=False)
    def backward(xT, w, gT, inv_uT, gxT, gw, flush):
        # g sign(d) (|d|/u)**(p-1) = g q q**(p-2), q = d/u, q**(p-2) = q**2 q**4 ... q**(p/2).
        # Parallel over blocks of input features (thread-private rows of gxT and columns of
        # gw); a block's rows of xT and gxT stay in L1 while the rows of g and 1/u stream by.
        n_in, n_b = xT.shape
        n_out = w.shape[0]
        zero = flush - flush
        for blk in prange((n_in + iblock - 1) // iblock):
            i0 = blk * iblock
            i1 = min(i0 + iblock, n_in)
            for i in range(i0, i1):
                gxi = gxT[i]
                for b in range(n_b):
                    gxi[b] = zero
            for o in range(n_out):
                go = gT[o]
                iu = inv_uT[o]
                for i in range(i0, i1):
                    xi = xT[i]
                    gxi = gxT[i]
                    wi = w[o, i]
                    acc = zero
                    for b in range(n_b):
                        q = (xi[b] - wi) * iu[b]
                        if k == 1:
                            c = go[b] * q
                        else:
                            t = q * q
                            t = t if t >= flush else zero  # |q|**(p-1) would be subnormal
                            prod = t
                            for _ in range(k - 2):
                                t = t * t
                                prod = prod * t
                            c = go[b] * q * prod
                        gxi[b] += c
                        acc += c
                    gw[o, i] = -acc

    _kernels[k] = forward, backward
    return forward, backward


def _flush(dtype: torch.dtype, exponent: float) -> np.floating:
    """tiny**exponent in the numpy dtype matching ``dtype`` (tiny: smallest normal)."""
    npd = np.float32 if dtype == torch.float32 else np.float64
    return npd(float(np.finfo(npd).tiny) ** exponent)


def _scale(dtype: torch.dtype) -> np.floating:
    """2**(maxexp // 2) in the numpy dtype matching ``dtype`` (2**512 in float64, 2**64 in
    float32): m scaled by it or by its reciprocal, when m lies outside [1 / it, it], is normal
    with a normal reciprocal."""
    npd = np.float32 if dtype == torch.float32 else np.float64
    return np.ldexp(npd(1), np.finfo(npd).maxexp // 2)


class _NumbaLinfDist(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, p: float) -> torch.Tensor:
        xT = x.detach().T.contiguous()
        w = weight.detach().contiguous()
        u = x.new_empty(x.shape[0], w.shape[0])
        ctx.p = p
        if p == math.inf:
            idxT = torch.empty(w.shape[0], x.shape[0], dtype=torch.int32)  # first argmax
            _inf_kernels()[0](xT.numpy(), w.numpy(), u.numpy(), idxT.numpy())
            ctx.save_for_backward(x.detach().contiguous(), w, idxT)
        else:
            k = _log2_p(p)
            _pow_kernels(k)[0](xT.numpy(), w.numpy(), u.numpy(), _flush(x.dtype, 2 / p),
                               _scale(x.dtype))
            ctx.save_for_backward(xT, w, _inverse(u).T.contiguous())  # not u: see torch's
        return u

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor):
        need_x, need_w = ctx.needs_input_grad[:2]
        p = ctx.p
        if p == math.inf:
            x, w, idxT = ctx.saved_tensors
            gx, gw = torch.zeros_like(x), torch.zeros_like(w)
            _inf_kernels()[1](x.numpy(), w.numpy(), g.to(x.dtype).T.contiguous().numpy(),
                              idxT.numpy(), gx.numpy(), gw.numpy())
            return (gx if need_x else None), (gw if need_w else None), None
        xT, w, inv_uT = ctx.saved_tensors
        gT = g.to(xT.dtype).T.contiguous()
        gxT = torch.empty_like(xT)
        gw = torch.empty_like(w)
        _pow_kernels(_log2_p(p))[1](xT.numpy(), w.numpy(), gT.numpy(), inv_uT.numpy(),
                                    gxT.numpy(), gw.numpy(), _flush(xT.dtype, 2 / (p - 1)))
        return (gxT.T if need_x else None), (gw if need_w else None), None
