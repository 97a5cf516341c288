"""The l_inf oracle: one MILP per competing class j, solved by HiGHS through
``scipy.optimize.milp``, with the big-M encoding of Tjeng, Xiao & Tedrake (ICLR 2019,
"Evaluating Robustness of Neural Networks with Mixed Integer Programming"): y = max(z, 0) with
l < 0 < u becomes y >= 0, y >= z, y <= u*a, y <= z - l*(1 - a), a binary; MinMax uses the same
encoding on t = relu(a - b): max(a, b) = b + t, min(a, b) = a - t. l, u are interval bounds
(IBP) in float64, widened by a relative slack that covers rounding; neurons stable on the
whole box get no binary. Exact up to HiGHS' tolerances (primal feasibility 1e-7, absolute MIP
gap 1e-6); ``OracleResult.bound`` is the solver's optimum.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from certnet.verify.lowering import Op

#: Relative widening of float64 interval bounds (covers the rounding of the dot products).
IBP_SLACK = 1e-10


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


def milp_linf(ops: list[Op], lo: np.ndarray, hi: np.ndarray, label: int
              ) -> tuple[float, list[np.ndarray]]:
    """The minimum margin of ``label`` over the box [lo, hi] (the solver's optimum, over all
    competing classes) and the minimiser of each competing class's MILP."""
    builder = _MilpBuilder(lo, hi)
    coef, const = np.eye(lo.size), np.zeros(lo.size)
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
            points.append(v[: lo.size])
    return bound, points
