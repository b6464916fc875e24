"""Per-item lower convex hulls and the LP relaxation of the multiple-choice knapsack.

The LP relaxation of a single-constraint MCKP is solved by the lower convex hull of every item's
(size, cost) points plus a greedy on incremental efficiencies (Sinha & Zoltners 1979): start every
item at its smallest point, then take hull steps in order of decreasing efficiency
``e = Δcost / Δsize`` until the capacity is used up. At most one step is fractional; its
efficiency is the optimal dual ``λ`` of the capacity constraint. Everything is vectorised over
items on dense (items × slots) arrays; no Python loop runs per item.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from solvers._tolerances import CAP_RTOL

__all__ = ["Hull", "LpGreedy", "lagrangian_value", "lower_hulls", "lp_greedy"]


@dataclass(frozen=True, eq=False)
class Hull:
    """Lower convex hulls of every item and their steps, dense and slot-major.

    Arrays are stored (slot/step index, item) so that the per-item scans run along the long
    axis (numpy is slow along a short contiguous axis).

    Attributes:
        vertices: (K, n) slot of hull vertex ``t`` of item ``i`` (by increasing size); -1 after
            the last vertex. Row 0 is the item's smallest (then cheapest) valid slot.
        n_vertices: (n,) vertices per item (≥ 1 when the item has a valid slot).
        ds, dc: (K−1, n) Δsize > 0 and Δcost reduction > 0 of step ``t → t+1``; 0 past the
            last vertex. eff = dc / ds, non-increasing along t (convexity); −inf past the
            last vertex.
    """

    vertices: np.ndarray
    n_vertices: np.ndarray
    ds: np.ndarray
    dc: np.ndarray
    eff: np.ndarray

    @property
    def start(self) -> np.ndarray:
        return self.vertices[0]

    @property
    def n_steps(self) -> int:
        return int(np.maximum(self.n_vertices - 1, 0).sum())

    def choice_after(self, counts: np.ndarray) -> np.ndarray:
        """Slot of each item after taking its first ``counts[i]`` steps."""
        return self.vertices[counts, np.arange(self.vertices.shape[1])]

    def flat_steps(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(item, ds, dc, eff) of every step, ordered by step index t, then item.

        In this layout a stable sort by efficiency keeps each item's steps in order.
        """
        mask = self.eff > -np.inf
        _, item = np.nonzero(mask)
        return item, self.ds[mask], self.dc[mask], self.eff[mask]


def lower_hulls(size: np.ndarray, cost: np.ndarray) -> Hull:
    """Lower-left convex hull of every row's (size, cost) points (``inf`` = invalid slot).

    Points are walked by increasing size (then cost). A point not strictly cheaper than every
    smaller one is dominated. Then every point lying on or above the chord between its
    surviving neighbours is removed, all rows and points at once, until none is (each removal
    is valid on its own: a point above a chord of two others is never a lower-hull vertex).
    Collinear middle points go, so efficiencies strictly decrease along a hull (up to rounding).
    """
    n, k = size.shape
    valid = np.isfinite(size) & np.isfinite(cost)
    all_valid = bool(valid.all())
    s = size if all_valid else np.where(valid, size, np.inf)
    c = cost if all_valid else np.where(valid, cost, np.inf)
    perm = _size_order(s, c, valid)
    if perm.ndim == 1:  # (K, n) contiguous copies, in size order
        ss, cc, ok = (np.ascontiguousarray(x.T[perm]) for x in (s, c, valid))
        perm_t = np.broadcast_to(perm[:, None], (k, n))
    else:
        perm_t = np.ascontiguousarray(perm.T)
        cols = np.arange(n)[None, :]
        ss, cc, ok = (np.ascontiguousarray(x.T)[perm_t, cols] for x in (s, c, valid))
    prev_min = np.empty_like(cc)
    prev_min[0] = np.inf
    np.minimum.accumulate(cc[:-1], axis=0, out=prev_min[1:])
    keep = ok & (cc < prev_min)
    del prev_min
    rows = np.arange(k)[:, None]
    items = np.arange(n)[None, :]
    while k > 2:
        left = np.where(keep, rows, -1)
        np.maximum.accumulate(left, axis=0, out=left)
        right = np.where(keep, rows, k)[::-1]
        right = np.minimum.accumulate(right, axis=0)[::-1]
        inner = keep[1:-1] & (left[:-2] >= 0) & (right[2:] < k)
        if not inner.any():
            break
        a, b = np.clip(left[:-2], 0, k - 1), np.clip(right[2:], 0, k - 1)
        sa, ca, sb, cb = ss[a, items], cc[a, items], ss[b, items], cc[b, items]
        with np.errstate(invalid="ignore"):
            above = inner & ((cc[1:-1] - ca) * (sb - sa) >= (cb - ca) * (ss[1:-1] - sa))
        if not above.any():
            break
        keep[1:-1] &= ~above
    n_vertices = keep.sum(axis=0)
    target = np.cumsum(keep, axis=0) - 1
    pos = np.zeros((k, n), dtype=np.int64)
    t, i = np.nonzero(keep)
    pos[target[t, i], i] = t
    live = rows < n_vertices[None, :]
    vertices = np.where(live, perm_t[pos, items], -1)
    vs = np.where(live, ss[pos, items], 0.0)
    vc = np.where(live, cc[pos, items], 0.0)
    step = live[1:]
    ds = np.where(step, vs[1:] - vs[:-1], 0.0)
    dc = np.where(step, vc[:-1] - vc[1:], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        eff = np.where(step, dc / np.where(step, ds, 1.0), -np.inf)
    # Rounding can make a later step of a row 1 ulp steeper; clamp so the order stays valid.
    np.minimum.accumulate(eff, axis=0, out=eff)
    return Hull(vertices=vertices, n_vertices=n_vertices, ds=ds, dc=dc, eff=eff)


def _size_order(size: np.ndarray, cost: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Slot order of every row by (size, cost): one shared (K,) order when it fits all rows,
    else an (n, K) row-wise order (``size``/``cost`` are ``inf`` at invalid slots).

    Tables built from a format catalogue order options the same way in every unit, so the
    common case costs one check instead of a row-wise sort.
    """
    full = valid.all(axis=1)
    first = int(np.argmax(full)) if full.any() else 0
    perm0 = np.lexsort((cost[first], size[first]))
    if full.all():
        if np.all(np.diff(size[:, perm0], axis=1) > 0):
            return perm0
    else:
        s = np.where(valid, size, -np.inf)[:, perm0]
        prev = np.maximum.accumulate(s, axis=1)
        if np.all((s[:, 1:] > prev[:, :-1]) | ~valid[:, perm0][:, 1:]):
            return perm0
    return np.lexsort((cost, size), axis=1)


@dataclass(frozen=True, eq=False)
class LpGreedy:
    """The greedy solution of the LP relaxation.

    Attributes:
        n_taken: whole steps that fit (the integral prefix).
        counts: (n,) steps taken per item in the prefix.
        choice: (n,) slot per item of the prefix (a feasible integral solution).
        lam: efficiency of the first step that does not fit (the LP dual ``λ``); 0 when all fit.
    """

    n_taken: int
    counts: np.ndarray
    choice: np.ndarray
    lam: float


def lp_greedy(hull: Hull, size: np.ndarray, cap: float) -> LpGreedy:
    """Take hull steps by decreasing efficiency while the capacity ``cap`` allows.

    Only the steps near the split are sorted: a strided sample of efficiencies brackets the
    threshold, two exact passes confirm the bracket (widened until they do), and the steps
    inside it are sorted (ties in the t-major order of :meth:`Hull.flat_steps`).
    """
    n = hull.vertices.shape[1]
    base = float(size[np.arange(n), hull.start].sum())
    # Round-off of the sums: a prefix fits if within CAP_RTOL of the cap (the central plan
    # check allows SIZE_RTOL).
    room = cap - base + abs(cap) * CAP_RTOL
    eff, ds = hull.eff, hull.ds
    total = float(ds.sum())
    if total <= room:
        counts = np.maximum(hull.n_vertices - 1, 0)
        return LpGreedy(n_taken=hull.n_steps, counts=counts, choice=hull.choice_after(counts),
                        lam=0.0)
    lo, hi = _bracket(eff, ds, room)
    above = eff > hi
    w_above = float(ds[above].sum())
    mid = (eff > lo) & ~above
    # t-major flat index = t·n + item: ties keep each item's steps in order
    t_idx, item = np.nonzero(mid)
    e_mid, d_mid = eff[t_idx, item], ds[t_idx, item]
    order = np.lexsort((t_idx * n + item, -e_mid))
    cum = w_above + np.cumsum(d_mid[order])
    n_mid = int(np.searchsorted(cum, room, side="right"))
    counts = above.sum(axis=0) + np.bincount(item[order[:n_mid]], minlength=n)
    if n_mid < len(order):
        lam = float(e_mid[order[n_mid]])
    else:  # the split step lies at or below lo: the first step not taken
        rest = np.where(eff <= lo, eff, -np.inf)
        lam = float(rest.max())
    n_taken = int(above.sum()) + n_mid
    return LpGreedy(n_taken=n_taken, counts=counts.astype(np.int64),
                    choice=hull.choice_after(counts), lam=max(lam, 0.0))


def _bracket(eff: np.ndarray, ds: np.ndarray, room: float) -> tuple[float, float]:
    """Efficiencies lo < hi with Σ ds[eff > hi] ≤ room < Σ ds[eff > lo] (lo may be −inf)."""
    flat_e, flat_d = eff.ravel(), ds.ravel()
    stride = max(1, flat_e.size // 200_000)
    se, sd = flat_e[::stride], flat_d[::stride]
    o = np.argsort(-se, kind="stable")
    cum = np.cumsum(sd[o]) * (flat_d.sum() / max(sd.sum(), 1e-300))
    at = int(np.searchsorted(cum, room))
    margin = 64
    while True:
        hi_i, lo_i = at - margin, at + margin
        hi = float(se[o[hi_i]]) if hi_i >= 0 else np.inf
        lo = float(se[o[lo_i]]) if lo_i < len(o) else -np.inf
        ok_hi = hi == np.inf or float(flat_d[flat_e > hi].sum()) <= room
        ok_lo = lo == -np.inf or float(flat_d[flat_e > lo].sum()) > room
        if ok_hi and ok_lo:
            return lo, hi
        margin *= 4


def lagrangian_value(cost: np.ndarray, weights: list[np.ndarray], mult: list[float],
                     caps: list[float]) -> tuple[float, np.ndarray]:
    """L(μ) = Σ_i min_j (c_ij + Σ_k μ_k·w_kij) − Σ_k μ_k·cap_k, and the penalised matrix.

    Weak duality: for any μ ≥ 0, L(μ) ≤ the cost of every solution that respects the caps,
    so it is a valid lower bound whatever μ is (invalid slots are ``inf`` and never chosen).
    """
    pen = cost.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        for w, m in zip(weights, mult, strict=True):
            if m != 0.0:
                pen += m * w
    mins = pen.min(axis=1)
    return float(mins.sum()) - float(sum(m * c for m, c in zip(mult, caps, strict=True))), pen
