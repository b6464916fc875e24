"""Per-item lower convex hulls and the LP relaxation of the multiple-choice knapsack.

The LP relaxation of a single-constraint MCKP is solved by the lower convex hull of every item's
(size, cost) points plus a greedy on incremental efficiencies (Sinha & Zoltners 1979): start every
item at its smallest point, then take hull steps in order of decreasing efficiency
``e = Δcost / Δsize`` until the capacity is used up. At most one step is fractional; its
efficiency is the optimal dual ``λ`` of the capacity constraint. Everything here is vectorised
across items: the hull is built by gift wrapping, one pass per slot, over all items at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Hull", "LpGreedy", "lagrangian_value", "lower_hulls", "lp_greedy"]

#: Slopes within this relative distance count as collinear (the farther point is kept).
_COLLINEAR_RTOL = 1e-12


@dataclass(frozen=True, eq=False)
class Hull:
    """Lower convex hulls of every item, and their steps in one flat, t-major layout.

    Attributes:
        vertices: (n, K) slot of hull vertex ``t`` of item ``i`` (by increasing size); -1 after
            the last vertex. Column 0 is the item's smallest (then cheapest) valid slot.
        n_vertices: (n,) vertices per item (≥ 1 when the item has a valid slot).
        step_item, step_t: item and index ``t ≥ 1`` of each step ``vertex[t-1] → vertex[t]``,
            ordered by ``t`` then item (so a stable sort keeps an item's steps in order).
        ds, dc: Δsize > 0 and Δcost reduction > 0 of each step; eff = dc / ds, non-increasing
            along each item's steps (convexity).
    """

    vertices: np.ndarray
    n_vertices: np.ndarray
    step_item: np.ndarray
    step_t: np.ndarray
    ds: np.ndarray
    dc: np.ndarray
    eff: np.ndarray

    @property
    def start(self) -> np.ndarray:
        return self.vertices[:, 0]

    def choice_after(self, counts: np.ndarray) -> np.ndarray:
        """Slot of each item after taking its first ``counts[i]`` steps."""
        return self.vertices[np.arange(self.vertices.shape[0]), counts]


def lower_hulls(size: np.ndarray, cost: np.ndarray) -> Hull:
    """Lower-left convex hull of every row's (size, cost) points (``inf`` = invalid slot).

    Gift wrapping from the smallest point: the next vertex is the point of least slope
    ``(c_j − c_cur) / (s_j − s_cur)`` among larger, strictly cheaper points (the farther one on
    collinear ties). Dominated points (larger and not cheaper) are never reached.
    """
    n, k = size.shape
    valid = np.isfinite(size) & np.isfinite(cost)
    s = np.where(valid, size, np.inf)
    c = np.where(valid, cost, np.inf)
    rows = np.arange(n)
    smin = s.min(axis=1)
    cur = np.argmin(np.where(s == smin[:, None], c, np.inf), axis=1)
    vertices = np.full((n, k), -1, dtype=np.int64)
    vertices[:, 0] = np.where(np.isfinite(smin), cur, -1)
    alive = np.isfinite(smin)
    n_vertices = alive.astype(np.int64)
    for t in range(1, k):
        if not alive.any():
            break
        ids = rows[alive]
        cs, cc = s[ids, cur[ids]], c[ids, cur[ids]]
        ss, sc = s[ids], c[ids]
        ok = (ss > cs[:, None]) & (sc < cc[:, None])
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.where(ok, (sc - cc[:, None]) / (ss - cs[:, None]), np.inf)
        best = slope.min(axis=1)
        has = np.isfinite(best)
        near = ok & (slope <= (best + np.abs(best) * _COLLINEAR_RTOL)[:, None])
        nxt = np.argmax(np.where(near, ss, -np.inf), axis=1)  # farthest of the collinear ties
        ids_next = ids[has]
        vertices[ids_next, t] = nxt[has]
        n_vertices[ids_next] += 1
        cur[ids_next] = nxt[has]
        alive[ids[~has]] = False
    # Steps, t-major: for t = 1.., every item that has a vertex t.
    t_idx, i_idx = np.nonzero((vertices[:, 1:] >= 0).T)
    step_t = (t_idx + 1).astype(np.int64)
    step_item = i_idx.astype(np.int64)
    a, b = vertices[step_item, step_t - 1], vertices[step_item, step_t]
    ds = s[step_item, b] - s[step_item, a]
    dc = c[step_item, a] - c[step_item, b]
    eff = dc / ds
    eff = _clamp_non_increasing(eff, step_item, step_t, n)
    return Hull(vertices=vertices, n_vertices=n_vertices, step_item=step_item, step_t=step_t,
                ds=ds, dc=dc, eff=eff)


def _clamp_non_increasing(eff: np.ndarray, item: np.ndarray, t: np.ndarray, n: int) -> np.ndarray:
    """Rounding can make a later step of an item 1 ulp steeper; clamp so order stays valid."""
    out = eff.copy()
    last = np.full(n, np.inf)
    for tt in np.unique(t):  # ≤ K passes
        sel = t == tt
        out[sel] = np.minimum(out[sel], last[item[sel]])
        last[item[sel]] = out[sel]
    return out


@dataclass(frozen=True, eq=False)
class LpGreedy:
    """The greedy solution of the LP relaxation.

    Attributes:
        order: step indices by decreasing efficiency (stable: ties keep an item's step order).
        n_taken: whole steps that fit (the integral prefix).
        counts: (n,) steps taken per item in the prefix.
        choice: (n,) slot per item of the prefix (a feasible integral solution).
        lam: efficiency of the first step that does not fit (the LP dual ``λ``); 0 when all fit.
    """

    order: np.ndarray
    n_taken: int
    counts: np.ndarray
    choice: np.ndarray
    lam: float


def lp_greedy(hull: Hull, size: np.ndarray, cap: float, order: np.ndarray | None = None) -> LpGreedy:
    """Take hull steps by decreasing efficiency while the capacity ``cap`` allows."""
    n = hull.vertices.shape[0]
    if order is None:
        order = np.argsort(-hull.eff, kind="stable")
    base = float(size[np.arange(n), hull.start].sum())
    room = cap - base
    cum = np.cumsum(hull.ds[order])
    # Tolerate round-off of the cumulative sum: a prefix counts as fitting if it is within
    # 1e-12 relative of the cap (the central plan check allows 1e-9).
    n_taken = int(np.searchsorted(cum, room + abs(cap) * 1e-12, side="right"))
    counts = np.bincount(hull.step_item[order[:n_taken]], minlength=n).astype(np.int64)
    lam = float(hull.eff[order[n_taken]]) if n_taken < len(order) else 0.0
    return LpGreedy(order=order, n_taken=n_taken, counts=counts, choice=hull.choice_after(counts),
                    lam=max(lam, 0.0))


def lagrangian_value(cost: np.ndarray, weights: list[np.ndarray], mult: list[float],
                     caps: list[float]) -> tuple[float, np.ndarray]:
    """L(μ) = Σ_i min_j (c_ij + Σ_k μ_k·w_kij) − Σ_k μ_k·cap_k, and the penalised matrix.

    Weak duality: for any μ ≥ 0, L(μ) ≤ the cost of every solution that respects the caps,
    so it is a valid lower bound whatever μ is (invalid slots are ``inf`` and never chosen).
    """
    pen = cost.copy()
    for w, m in zip(weights, mult, strict=True):
        if m != 0.0:
            pen += m * w
    mins = pen.min(axis=1)
    return float(mins.sum()) - float(sum(m * c for m, c in zip(mult, caps, strict=True))), pen
