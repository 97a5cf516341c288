"""Exact robustness oracles for tiny piecewise-linear networks (testing certificates).

For a network f built from Flatten, (Lipschitz)Linear, (Lipschitz, residual) Conv2d (as its
dense matrix), ReLU, MinMax and their clipped forms (rewritten exactly with ReLUs:
clamp(min(z, t), 0) = relu(t - relu(t - z)), max(m, l) = l + relu(m - l), min(M, u) =
u - relu(u - M)), a point x, a label and a radius eps, the oracles compute

    m* = min { min_{j != label} f(x')_label - f(x')_j :  ||x' - x|| <= eps,  lo <= x' <= hi }

(``domain=(lo, hi)``, default the pixel box [0, 1]; ``domain=None`` drops the box). The point is
robust iff m* > 0 (a tie is not robust). Every oracle also returns a concrete minimiser x', and
the value it reports is the margin of x' itself, from a float64 forward pass of the torch layers:

* it is *attained*, hence >= m*, so a reported value <= 0 is a genuine counterexample;
* it exceeds m* by at most the solver's tolerance (see each method), never by more.

Methods:

* ``linf``, ``method="milp"`` (default): one MILP per competing class j, solved by HiGHS through
  ``scipy.optimize.milp``, with the big-M encoding of Tjeng, Xiao & Tedrake (ICLR 2019,
  "Evaluating Robustness of Neural Networks with Mixed Integer Programming"): y = max(z, 0) with
  l < 0 < u becomes y >= 0, y >= z, y <= u*a, y <= z - l*(1 - a), a binary; MinMax uses the same
  encoding on t = relu(a - b): max(a, b) = b + t, min(a, b) = a - t. l, u are interval bounds
  (IBP) in float64, widened by a relative slack that covers rounding; neurons stable on the
  whole box get no binary. Exact up to HiGHS' tolerances (primal feasibility 1e-7, absolute MIP
  gap 1e-6); ``OracleResult.bound`` is the solver's optimum.
* ``l2`` (and ``linf`` with ``method="enumerate"``): the network is affine on each activation
  region. Regions meeting the ball are enumerated by branching on the neurons whose sign changes
  inside (region ∩ ball); on each region the linear margin is minimised over polyhedron ∩ ball
  exactly, by enumerating active-constraint sets (see :func:`_min_over_polytope_ball`). Exact
  up to float64 rounding (feasibility tolerance 1e-9 on normalised constraints; vertices of
  nearly parallel hyperplanes, angle < ~1e-6, are skipped: a region that thin can only hide a
  minimum below its neighbours' by Lip * eps * 1e-6). The cost is combinatorial in the input
  dimension, so inputs above ``max_dim`` (default 4) are refused.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn
from torch.func import functional_call

from certnet.errors import ConfigError, InputError, UnsupportedLayerError
from certnet.nn.activations import ClippedMinMax, ClippedReLU, MinMax
from certnet.nn.lipschitz import LipschitzConv2d, LipschitzLinear, ResidualConv2d

Norm = Literal["l2", "linf"]
Method = Literal["milp", "enumerate"]
Domain = tuple[float, float] | None

#: Inputs of higher dimension are refused by the enumeration oracle (its cost is C(m, d)).
MAX_DIM = 4
#: Relative widening of float64 interval bounds (covers the rounding of the dot products).
IBP_SLACK = 1e-10
#: Feasibility tolerance of the enumeration oracle (constraints are normalised to unit rows).
FEAS_TOL = 1e-9
#: Active sets whose (unit) constraint normals have a Gram eigenvalue below this count as
#: dependent: a vertex of two hyperplanes at an angle below ~1.4e-6 rad is not enumerated.
GRAM_TOL = 1e-12

_Op = tuple  # ("affine", W, b) | ("relu",) | ("minmax",)


@dataclass
class OracleResult:
    """Outcome of an oracle call.

    ``margin``: min_{j != label} f(point)_label - f(point)_j in float64 (>= the exact minimum,
    equal to it up to the solver tolerance); ``bound``: the solver's optimum (the exact minimum
    up to the same tolerance, possibly slightly below it); ``point``: the minimiser x' (shape of
    x, float64, inside the ball and the domain); ``runner_up``: the class j attaining ``margin``.
    """

    margin: float
    bound: float
    point: torch.Tensor
    runner_up: int

    @property
    def robust(self) -> bool:
        return self.margin > 0


# -- the network as a list of float64 operations -----------------------------------------------
def _network_ops(layers: nn.Module, shape: tuple[int, ...]) -> tuple[list[_Op], tuple[int, ...]]:
    """Flatten ``layers`` (acting on one point of ``shape``) into affine / relu / minmax
    operations on the flattened vector; returns them and the output shape."""
    ops: list[_Op] = []
    for layer in layers if isinstance(layers, nn.Sequential) else [layers]:
        if type(layer) is nn.Sequential:
            sub, shape = _network_ops(layer, shape)
            ops += sub
        elif type(layer) is nn.Identity:
            continue
        elif type(layer) is nn.Flatten:
            if layer.start_dim != 1 or layer.end_dim != -1:
                raise UnsupportedLayerError("verify: only Flatten(start_dim=1, end_dim=-1)")
            shape = (int(np.prod(shape)),)
        elif type(layer) in (nn.Linear, LipschitzLinear):
            if len(shape) != 1 or shape[0] != layer.in_features:
                raise UnsupportedLayerError(
                    f"verify: Linear({layer.in_features}, ...) applied to shape {shape}; "
                    "flatten first")
            w = layer.weight.detach().to(torch.float64).cpu().numpy()
            b = np.zeros(w.shape[0]) if layer.bias is None else \
                layer.bias.detach().to(torch.float64).cpu().numpy()
            ops.append(("affine", w, b))
            shape = (layer.out_features,)
        elif type(layer) in (nn.Conv2d, LipschitzConv2d, ResidualConv2d):
            op, shape = _conv_affine(layer, shape)
            ops.append(op)
        elif type(layer) is nn.ReLU:
            ops.append(("relu",))
        elif type(layer) is MinMax:
            # channels c and c + C/2 (dim 0 of one point) are i and i + N/2 once flattened.
            if shape[0] % 2:
                raise UnsupportedLayerError(f"verify: MinMax on {shape[0]} (odd) channels")
            ops.append(("minmax",))
        elif type(layer) is ClippedReLU:
            ops += _clipped_relu_ops(_flat(layer.threshold))
        elif type(layer) is ClippedMinMax:
            ops += [("minmax",), *_clamp_halves_ops(_flat(layer.lower), _flat(layer.upper))]
        else:
            raise UnsupportedLayerError(
                f"verify: no exact encoding for layer {type(layer).__name__} (supported: "
                "Flatten, Linear, Conv2d, ReLU, MinMax, ClippedReLU, ClippedMinMax)")
    return ops, shape


def _conv_affine(layer: nn.Conv2d, shape: tuple[int, ...]) -> tuple[_Op, tuple[int, ...]]:
    """A convolution on one point of ``shape`` (C, H, W) as the dense affine operation on the
    flattened vector, and its output shape: column k is the kernel (``effective_weight`` for
    certnet's layers) applied to the k-th basis image, exact in float64 (one product per entry,
    the rest zeros)."""
    if len(shape) != 3 or shape[0] != layer.in_channels:
        raise UnsupportedLayerError(
            f"verify: Conv2d({layer.in_channels}, ...) applied to shape {shape}")
    if layer.groups != 1 or layer.dilation != (1, 1) or layer.padding_mode != "zeros" or \
            isinstance(layer.padding, str):
        raise UnsupportedLayerError("verify: only zero-padded convolutions without groups, "
                                    "dilation or string padding")
    weight = (layer.effective_weight() if isinstance(layer, LipschitzConv2d) else
              layer.weight).detach().to(torch.float64).cpu()
    n = int(np.prod(shape))
    basis = torch.eye(n, dtype=torch.float64).view(n, *shape)
    with torch.no_grad():
        columns = F.conv2d(basis, weight, None, layer.stride, layer.padding)
    positions = columns[0, 0].numel()
    bias = np.zeros(columns[0].numel()) if layer.bias is None else np.repeat(
        layer.bias.detach().to(torch.float64).cpu().numpy(), positions)
    return ("affine", columns.reshape(n, -1).T.numpy(), bias), tuple(columns.shape[1:])


def _flat(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float64).cpu().numpy().reshape(-1)


def _clipped_relu_ops(t: np.ndarray) -> list[_Op]:
    """clamp(min(z, t), 0) = relu(t - relu(t - z)), for any threshold t."""
    flip = -np.eye(t.size)
    return [("affine", flip, t), ("relu",), ("affine", flip, t), ("relu",)]


def _clamp_halves_ops(lower: np.ndarray, upper: np.ndarray) -> list[_Op]:
    """[m; M] -> [max(m, lower); min(M, upper)] = [lower + relu(m - lower); upper -
    relu(upper - M)]."""
    sign = np.diag(np.concatenate([np.ones(lower.size), -np.ones(upper.size)]))
    return [("affine", sign, np.concatenate([-lower, upper])), ("relu",),
            ("affine", sign, np.concatenate([lower, upper]))]


def _margins(layers: nn.Module, points: torch.Tensor, label: int) -> torch.Tensor:
    """f_label - f_j for every j (inf at j = label), float64 forward pass of the torch layers."""
    params = {k: v.detach().double() if v.is_floating_point() else v
              for k, v in [*layers.named_parameters(), *layers.named_buffers()]}
    logits = functional_call(layers, params, (points.double(),))
    margins = logits[:, label : label + 1] - logits
    margins[:, label] = float("inf")
    return margins


def _project(points: np.ndarray, x0: np.ndarray, eps: float, norm: Norm, domain: Domain
             ) -> np.ndarray:
    """Move (numerically) near-feasible points into ball ∩ domain."""
    if norm == "linf":
        points = np.clip(points, x0 - eps, x0 + eps)
    else:
        dist = np.linalg.norm(points - x0, axis=-1, keepdims=True)
        scale = np.where(dist > eps, eps / np.maximum(dist, 1e-300), 1.0)
        points = x0 + (points - x0) * scale
    if domain is not None:  # projection onto a box containing x0 never leaves the l2 ball
        points = np.clip(points, domain[0], domain[1])
    return points


# -- MILP (l_inf) -------------------------------------------------------------------------------
def _interval(coef: np.ndarray, const: np.ndarray, lb: np.ndarray, ub: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray]:
    """Sound bounds on coef @ v + const for lb <= v <= ub (float64, widened for rounding)."""
    n = coef.shape[1]
    lb, ub = lb[:n], ub[:n]
    pos, neg = np.clip(coef, 0, None), np.clip(coef, None, 0)
    lower = pos @ lb + neg @ ub + const
    upper = pos @ ub + neg @ lb + const
    slack = IBP_SLACK * (np.abs(coef) @ np.maximum(np.abs(lb), np.abs(ub)) + np.abs(const))
    return lower - slack, upper + slack


class _MilpBuilder:
    """Variables: the input x' (first d), then one (t, a) pair per unstable ReLU / MinMax pair.
    Neuron values are affine expressions ``coef @ v + const`` over the variables so far."""

    def __init__(self, lb: np.ndarray, ub: np.ndarray) -> None:
        self.lb, self.ub = list(lb), list(ub)
        self.integer = [0] * len(lb)
        self.rows: list[tuple[dict[int, float], float, float]] = []

    @property
    def n(self) -> int:
        return len(self.lb)

    def bounds(self, coef: np.ndarray, const: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return _interval(coef, const, np.array(self.lb), np.array(self.ub))

    def relu(self, coef: np.ndarray, const: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Expressions of max(z, 0) for the expressions z = coef @ v + const (Tjeng et al.)."""
        lower, upper = self.bounds(coef, const)
        out_coef = np.zeros((coef.shape[0], self.n + 2 * int(((lower < 0) & (upper > 0)).sum())))
        out_const = np.zeros(coef.shape[0])
        for i in range(coef.shape[0]):
            if lower[i] >= 0:
                out_coef[i, : coef.shape[1]], out_const[i] = coef[i], const[i]
            elif upper[i] <= 0:
                continue
            else:
                t, a = self.n, self.n + 1
                self.lb += [0.0, 0.0]
                self.ub += [float(upper[i]), 1.0]
                self.integer += [0, 1]
                z = {k: float(v) for k, v in enumerate(coef[i]) if v != 0}
                c, lo, up = float(const[i]), float(lower[i]), float(upper[i])
                self.rows.append(({**z, t: -1.0}, -np.inf, -c))                   # t >= z
                self.rows.append(({**{k: -v for k, v in z.items()}, t: 1.0, a: -lo},
                                  -np.inf, c - lo))                                # t <= z - l(1-a)
                self.rows.append(({t: 1.0, a: -up}, -np.inf, 0.0))                 # t <= u a
                out_coef[i, t] = 1.0
        return out_coef, out_const

    def solve(self, objective: np.ndarray) -> tuple[float, np.ndarray]:
        c = np.zeros(self.n)
        c[: objective.size] = objective
        constraints = []
        if self.rows:
            a = np.zeros((len(self.rows), self.n))
            for r, (row, _, _) in enumerate(self.rows):
                for k, v in row.items():
                    a[r, k] = v
            constraints = [LinearConstraint(a, [r[1] for r in self.rows],
                                            [r[2] for r in self.rows])]
        res = milp(c, integrality=np.array(self.integer), bounds=Bounds(self.lb, self.ub),
                   constraints=constraints, options={"mip_rel_gap": 1e-9})
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"verify: HiGHS failed on the robustness MILP: {res.message}")
        bound = getattr(res, "mip_dual_bound", None)
        return float(res.fun if bound is None or not np.isfinite(bound) else bound), res.x


def _milp_linf(ops: list[_Op], x0: np.ndarray, eps: float, label: int, domain: Domain
               ) -> tuple[float, list[np.ndarray]]:
    lo, hi = x0 - eps, x0 + eps
    if domain is not None:
        lo, hi = np.maximum(lo, domain[0]), np.minimum(hi, domain[1])
    builder = _MilpBuilder(lo, hi)
    coef, const = np.eye(x0.size), np.zeros(x0.size)
    for op in ops:
        if op[0] == "affine":
            coef, const = op[1] @ coef, op[1] @ const + op[2]
        elif op[0] == "relu":
            coef, const = builder.relu(coef, const)
        else:
            h = coef.shape[0] // 2
            a_coef, a_const, b_coef, b_const = coef[:h], const[:h], coef[h:], const[h:]
            t_coef, t_const = builder.relu(a_coef - b_coef, a_const - b_const)
            pad = t_coef.shape[1] - coef.shape[1]
            a_coef, b_coef = np.pad(a_coef, ((0, 0), (0, pad))), np.pad(b_coef, ((0, 0), (0, pad)))
            # min(a, b) = a - relu(a - b), max(a, b) = b + relu(a - b)
            coef = np.concatenate([a_coef - t_coef, b_coef + t_coef])
            const = np.concatenate([a_const - t_const, b_const + t_const])
    bound, points = np.inf, []
    for j in range(coef.shape[0]):
        if j != label:
            value, v = builder.solve(coef[label] - coef[j])
            bound = min(bound, value + const[label] - const[j])
            points.append(v[: x0.size])
    return bound, points


# -- exact minimisation of a linear function over polyhedron ∩ l2 ball --------------------------
def _min_over_polytope_ball(g: np.ndarray, h: np.ndarray, a: np.ndarray, b: np.ndarray,
                            x0: np.ndarray, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """min_x g_k @ x + h_k over {a x <= b, ||x - x0||_2 <= radius}, for each row k of g.

    Exact by enumeration: a minimiser can be chosen among, for every set S of linearly
    independent constraints (|S| <= d) made active, the point p_S of the flat L_S = {a_S x = b_S}
    nearest x0 and the minimiser p_S - r_S g_N / ||g_N|| of g over the sphere ∩ L_S (g_N: the
    projection of g on L_S, r_S^2 = radius^2 - ||p_S - x0||^2). (Take a minimiser with the most
    independent active constraints; if it is not a vertex, g is either non-constant on its flat,
    and it is the sphere point, or constant, and moving along the flat reaches p_S or a new
    active constraint.) Constraints whose hyperplane misses the ball are dropped first.
    Returns values (+inf where the set is empty) and minimisers.
    """
    k_obj, d = g.shape
    values, points = np.full(k_obj, np.inf), np.tile(x0, (k_obj, 1))
    norms = np.linalg.norm(a, axis=1)
    if np.any((norms == 0) & (b < 0)):
        return values, points
    a, b, norms = a[norms > 0], b[norms > 0], norms[norms > 0]
    a, b = a / norms[:, None], b / norms
    dist = a @ x0 - b  # signed distance of x0 to each hyperplane (> 0: violated)
    if np.any(dist > radius * (1 + 1e-12) + FEAS_TOL):
        return values, points
    keep = dist > -radius
    a, b = a[keep], b[keep]
    m = a.shape[0]
    for k in range(min(d, m) + 1):
        subsets = np.array(list(itertools.combinations(range(m), k)), dtype=int)
        subsets = subsets.reshape(len(subsets), k)
        a_s = a[subsets]  # (N, k, d)
        if k == 0:
            p = x0[None]
            proj = np.zeros((1, d, d))
        else:
            gram = a_s @ a_s.transpose(0, 2, 1)
            ok = np.linalg.eigvalsh(gram)[:, 0] > GRAM_TOL
            if not ok.any():
                continue
            a_s, gram, subsets = a_s[ok], gram[ok], subsets[ok]
            y = np.linalg.solve(gram, (a_s @ x0 - b[subsets])[..., None])[..., 0]
            p = x0 - np.einsum("nk,nkd->nd", y, a_s)
            proj = a_s.transpose(0, 2, 1) @ np.linalg.solve(gram, a_s)  # onto rows of a_S
        r2 = radius**2 - ((p - x0) ** 2).sum(1)
        inside = r2 >= -FEAS_TOL * radius
        if not inside.any():
            continue
        p, proj, r = p[inside], proj[inside], np.sqrt(np.clip(r2[inside], 0, None))
        g_n = g[None] - g[None] @ proj  # (N, K, d), proj is symmetric
        g_norm = np.linalg.norm(g_n, axis=2, keepdims=True)
        step = np.where(g_norm > 1e-12 * (1 + np.linalg.norm(g, axis=1))[None, :, None],
                        g_n / np.maximum(g_norm, 1e-300), 0.0)
        cand = p[:, None, :] - r[:, None, None] * step  # (N, K, d)
        feasible = ((cand @ a.T - b).max(axis=2, initial=-np.inf) <= FEAS_TOL) & \
            (np.linalg.norm(cand - x0, axis=2) <= radius * (1 + 1e-12) + FEAS_TOL)
        vals = np.where(feasible, (cand * g[None]).sum(2) + h[None], np.inf)
        best = vals.argmin(axis=0)
        better = vals[best, np.arange(k_obj)] < values
        values = np.where(better, vals[best, np.arange(k_obj)], values)
        points = np.where(better[:, None], cand[best, np.arange(k_obj)], points)
    return values, points


def _enumerate(ops: list[_Op], x0: np.ndarray, radius: float, a0: np.ndarray, b0: np.ndarray,
               label: int) -> tuple[float, list[np.ndarray]]:
    """Branch over activation regions meeting {a0 x <= b0, ||x - x0||_2 <= radius} and minimise
    the margin exactly on each. Returns the optimum and the minimiser of every region."""
    best = [np.inf]
    points: list[np.ndarray] = []

    def exact_range(rows: np.ndarray, consts: np.ndarray, a: np.ndarray, b: np.ndarray
                    ) -> tuple[np.ndarray, np.ndarray]:
        """Exact min and max of rows @ x + consts over the region ∩ ball."""
        lower, upper = consts + rows @ x0 - radius * np.linalg.norm(rows, axis=1), \
            consts + rows @ x0 + radius * np.linalg.norm(rows, axis=1)
        unsure = np.flatnonzero((lower < 0) & (upper > 0))
        if unsure.size:
            g = np.concatenate([rows[unsure], -rows[unsure]])
            h = np.concatenate([consts[unsure], -consts[unsure]])
            vals, _ = _min_over_polytope_ball(g, h, a, b, x0, radius)
            lower[unsure], upper[unsure] = vals[: unsure.size], -vals[unsure.size :]
        return lower, upper

    def recurse(step: int, coef: np.ndarray, const: np.ndarray, a: np.ndarray, b: np.ndarray,
                signs: np.ndarray | None = None) -> None:
        """coef x + const: the values after ``ops[:step]`` on the region {a x <= b}; ``signs``:
        the signs (+1 / -1, 0 = not yet decided) of this nonlinearity's switch variables."""
        while step < len(ops) and ops[step][0] == "affine":
            coef, const = ops[step][1] @ coef, ops[step][1] @ const + ops[step][2]
            step += 1
        if step == len(ops):
            g = coef[label] - np.delete(coef, label, axis=0)
            h = const[label] - np.delete(const, label)
            vals, pts = _min_over_polytope_ball(g, h, a, b, x0, radius)
            if np.isfinite(vals).any():
                best[0] = min(best[0], float(vals.min()))
                points.extend(pts[np.isfinite(vals)])
            return
        # the switch variables: z (relu) or a - b (minmax)
        half = coef.shape[0] // 2
        if ops[step][0] == "relu":
            z_coef, z_const = coef, const
        else:
            z_coef, z_const = coef[:half] - coef[half:], const[:half] - const[half:]
        signs = np.zeros(z_coef.shape[0]) if signs is None else signs
        todo = np.flatnonzero(signs == 0)
        if todo.size:
            lower, upper = exact_range(z_coef[todo], z_const[todo], a, b)
            if not (np.isfinite(lower).all() and np.isfinite(upper).all()):
                return  # region ∩ ball is empty
            signs = signs.copy()
            signs[todo[lower >= 0]], signs[todo[upper <= 0]] = 1.0, -1.0
            split = todo[(lower < 0) & (upper > 0)]
            if split.size:  # branch on one switch, re-examine the others in each child
                i = split[0]
                for sign in (1.0, -1.0):  # z_i >= 0, then z_i <= 0
                    child = signs.copy()
                    child[i] = sign
                    recurse(step, coef, const, np.vstack([a, -sign * z_coef[i]]),
                            np.append(b, sign * z_const[i]), child)
                return
        active = signs > 0  # no switch changes sign on this region
        if ops[step][0] == "relu":
            coef, const = coef * active[:, None], const * active
        else:
            lo_part = np.where(active[:, None], coef[half:], coef[:half])
            hi_part = np.where(active[:, None], coef[:half], coef[half:])
            lo_c = np.where(active, const[half:], const[:half])
            hi_c = np.where(active, const[:half], const[half:])
            coef, const = np.concatenate([lo_part, hi_part]), np.concatenate([lo_c, hi_c])
        recurse(step + 1, coef, const, a, b)

    d = x0.size
    recurse(0, np.eye(d), np.zeros(d), a0, b0)
    return best[0], points


# -- public API ---------------------------------------------------------------------------------
def min_margin(layers: nn.Sequential, x: torch.Tensor, label: int, eps: float, norm: Norm,
               domain: Domain = (0.0, 1.0), method: Method | None = None,
               max_dim: int = MAX_DIM) -> OracleResult:
    """Exact minimum margin of ``label`` over the ``norm`` ball of radius ``eps`` around one
    point ``x`` (no batch dimension) intersected with ``domain``; see the module docstring for
    the methods and their tolerances (MILP: Tjeng, Xiao & Tedrake, ICLR 2019). Raises
    :class:`UnsupportedLayerError` for layers other than Flatten / Linear / Conv2d / ReLU /
    MinMax and their clipped forms, and :class:`InputError` for an enumeration problem above
    ``max_dim`` input dimensions."""
    if norm not in ("l2", "linf"):
        raise ConfigError(f"verify: norm must be 'l2' or 'linf', got {norm!r}")
    method = method or ("milp" if norm == "linf" else "enumerate")
    if method not in ("milp", "enumerate") or (norm == "l2" and method == "milp"):
        raise ConfigError(f"verify: method {method!r} is not available for norm {norm!r}")
    if not isinstance(eps, (int, float)) or not (0 <= eps < float("inf")):
        raise InputError(f"verify: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(x, torch.Tensor) or not torch.isfinite(x).all():
        raise InputError("verify: x must be a finite tensor (one point, no batch dimension)")
    x0 = x.detach().to(torch.float64).cpu().numpy().reshape(-1)
    if domain is not None and (x0.min() < domain[0] or x0.max() > domain[1]):
        raise InputError(f"verify: x lies outside the domain {domain}")
    d = x0.size
    ops, out_shape = _network_ops(layers, tuple(x.shape))
    if len(out_shape) != 1:
        raise UnsupportedLayerError(f"verify: the network must output a vector, not {out_shape}")
    classes = out_shape[0]
    if not 0 <= label < classes or classes < 2:
        raise InputError(f"verify: label {label} out of range for {classes} classes")
    eps = float(eps)

    if method == "milp":
        bound, candidates = _milp_linf(ops, x0, eps, label, domain)
    else:
        if d > max_dim:
            raise InputError(f"verify: exact enumeration supports inputs of at most {max_dim} "
                             f"dimensions (got {d}); raise max_dim at your own risk")
        a0, b0 = np.zeros((0, d)), np.zeros(0)
        if norm == "linf":  # the box as a polytope; a ball around it that cuts nothing
            lo, hi = x0 - eps, x0 + eps
            if domain is not None:
                lo, hi = np.maximum(lo, domain[0]), np.minimum(hi, domain[1])
            a0 = np.concatenate([np.eye(d), -np.eye(d)])
            b0 = np.concatenate([hi, -lo])
            radius = 2 * eps * np.sqrt(d) + 1.0
        else:
            radius = eps
            if domain is not None:
                a0 = np.concatenate([np.eye(d), -np.eye(d)])
                b0 = np.concatenate([np.full(d, domain[1]), np.full(d, -domain[0])])
        bound, candidates = _enumerate(ops, x0, radius, a0, b0, label)
        if not candidates:
            raise RuntimeError("verify: region enumeration found no feasible point")
    pts = _project(np.stack(candidates), x0, eps, norm, domain)
    margins = _margins(layers, torch.from_numpy(pts).reshape(-1, *x.shape), label)
    per_point, runner_up = margins.min(1)
    i = int(per_point.argmin())
    return OracleResult(margin=float(per_point[i]), bound=float(bound),
                        point=torch.from_numpy(pts[i]).reshape(x.shape),
                        runner_up=int(runner_up[i]))


def exact_min_margin(layers: nn.Sequential, x: torch.Tensor, label: int, eps: float,
                     norm: Norm, domain: Domain = (0.0, 1.0), method: Method | None = None,
                     max_dim: int = MAX_DIM) -> float:
    """min over ||x' - x|| <= eps (∩ domain) of min_{j != label} f(x')_label - f(x')_j.

    The value is the float64 margin of a concrete minimiser, so it is <= 0 only for a genuine
    counterexample; robust iff > 0. See :func:`min_margin`."""
    return min_margin(layers, x, label, eps, norm, domain, method, max_dim).margin


def find_counterexample(layers: nn.Sequential, x: torch.Tensor, label: int, eps: float,
                        norm: Norm, domain: Domain = (0.0, 1.0), method: Method | None = None,
                        max_dim: int = MAX_DIM) -> torch.Tensor | None:
    """A point x' in the ball (∩ domain) where some class j != label scores >= ``label``
    (checked by a float64 forward pass; float64, rounding it to float32 may undo the flip), or
    None if the oracle proves there is none."""
    result = min_margin(layers, x, label, eps, norm, domain, method, max_dim)
    if result.margin > 0:
        return None
    margins = _margins(layers, result.point.reshape(1, *x.shape).double(), label)
    assert float(margins.min()) <= 0, "oracle minimiser does not reproduce in float64"
    return result.point
