"""The l2 oracle (and l_inf with ``method="enumerate"``): the network is affine on each
activation region. Regions meeting the ball are enumerated by branching on the neurons whose
sign changes inside (region ∩ ball); on each region the linear margin is minimised over
polyhedron ∩ ball exactly, by enumerating active-constraint sets (see
:func:`min_over_polytope_ball`). Exact up to float64 rounding (feasibility tolerance 1e-9 on
normalised constraints; vertices of nearly parallel hyperplanes, angle < ~1e-6, are skipped: a
region that thin can only hide a minimum below its neighbours' by Lip * eps * 1e-6). The cost is
combinatorial in the input dimension.
"""

from __future__ import annotations

import itertools

import numpy as np

from certnet.verify.lowering import Op

#: Feasibility tolerance of the enumeration oracle (constraints are normalised to unit rows).
FEAS_TOL = 1e-9
#: Active sets whose (unit) constraint normals have a Gram eigenvalue below this count as
#: dependent: a vertex of two hyperplanes at an angle below ~1.4e-6 rad is not enumerated.
GRAM_TOL = 1e-12


def min_over_polytope_ball(g: np.ndarray, h: np.ndarray, a: np.ndarray, b: np.ndarray,
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


def enumerate_regions(ops: list[Op], x0: np.ndarray, radius: float, a0: np.ndarray,
                      b0: np.ndarray, label: int) -> tuple[float, list[np.ndarray]]:
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
            vals, _ = min_over_polytope_ball(g, h, a, b, x0, radius)
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
            vals, pts = min_over_polytope_ball(g, h, a, b, x0, radius)
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
