"""The search space of the Bayesian / evolutionary search, and budget repair.

Per item (a unit, or a tie group acting as one) the candidates are the options within
``radius`` lower-convex-hull steps of the cost-table optimum (:class:`SearchSpace`). What the
sampler sees is a :class:`ParamSpace` over it: one categorical per item (``unit``), or, for
large models, one hull-step offset per transformer block shared by all its items (``block``:
tens of parameters instead of hundreds). Every sampled plan is repaired down to the size cap
and then filled up to it, so the budget is a hard constraint and no trial wastes it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np

from allocator.core.errors import InvalidParameterError
from solvers._problem import Problem
from solvers._tolerances import CAP_RTOL

__all__ = ["Granularity", "ParamSpace", "SearchSpace", "build_param_space", "build_search_space", "fill",
           "lower_hull", "repair", "slots_of"]


class Granularity(StrEnum):
    UNIT = "unit"  #: one parameter per item (unit or tie group)
    BLOCK = "block"  #: one hull-step offset per transformer block


@dataclass(frozen=True, kw_only=True, eq=False)
class SearchSpace:
    """Per item: the candidate slots (sorted by size) and the warm-start slot."""

    names: list[str]  #: parameter name of each item (its unit, or tie id)
    candidates: list[np.ndarray]
    warm: np.ndarray

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n, c in zip(self.names, self.candidates, strict=True):
            h.update(n.encode())
            h.update(c.astype(np.int64).tobytes())
        return h.hexdigest()[:16]


def lower_hull(size: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Slots on the lower convex hull of one item's (size, cost) points, by increasing size.

    A slot is kept iff no other slot is both smaller and cheaper and it lies on the convex
    lower envelope (Sinha & Zoltners 1979: only hull points can be LP-optimal).
    """
    ok = np.flatnonzero(np.isfinite(size))
    order = ok[np.lexsort((cost[ok], size[ok]))]
    hull: list[int] = []
    for j in order:
        if hull and cost[j] >= cost[hull[-1]]:
            continue  # dominated: larger (or equal) and not cheaper
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on/above the segment a→j
            if (cost[b] - cost[a]) * (size[j] - size[a]) >= (cost[j] - cost[a]) * (size[b] - size[a]):
                hull.pop()
            else:
                break
        hull.append(int(j))
    return np.asarray(hull, dtype=np.int64)


def build_search_space(problem: Problem, warm: np.ndarray, *, radius: int = 1) -> SearchSpace:
    """Options within ``radius`` hull steps of the warm-start choice, per item."""
    names = _item_names(problem)
    candidates: list[np.ndarray] = []
    for i in range(problem.n_items):
        hull = lower_hull(problem.size[i], problem.cost[i])
        pos = int(np.searchsorted(problem.size[i, hull], problem.size[i, warm[i]]))
        lo, hi = max(0, pos - radius), min(len(hull), pos + radius + 1)
        cand = set(hull[lo:hi].tolist()) | {int(warm[i])}
        candidates.append(np.asarray(sorted(cand, key=lambda s: problem.size[i, s]), dtype=np.int64))
    return SearchSpace(names=names, candidates=candidates, warm=np.asarray(warm, dtype=np.int64))


def _item_names(problem: Problem) -> list[str]:
    units = problem.table.units
    df = problem.table.df
    ties = dict(zip(df["unit"], df["tie"], strict=False)) if problem.table.has_ties else {}
    names = [""] * problem.n_items
    for u, item in zip(units, problem.item_of_unit, strict=True):
        if not names[item]:
            names[item] = ties.get(u) or u
    return names


def repair(problem: Problem, space: SearchSpace, choice: np.ndarray) -> np.ndarray:
    """Greedily step items down their candidate lists (least Δcost/Δsize first) until it fits."""
    choice = choice.copy()
    idx = np.arange(problem.n_items)
    size = float(problem.size[idx, choice].sum())
    while size > problem.cap * (1 + CAP_RTOL):
        best, best_ratio = -1, np.inf
        for i in range(problem.n_items):
            cand = space.candidates[i]
            k = int(np.flatnonzero(cand == choice[i])[0]) if choice[i] in cand else len(cand)
            lower = cand[:k]
            if lower.size == 0:
                continue
            nxt = lower[-1]
            d_size = problem.size[i, choice[i]] - problem.size[i, nxt]
            if d_size <= 0:
                continue
            ratio = (problem.cost[i, nxt] - problem.cost[i, choice[i]]) / d_size
            if ratio < best_ratio:
                best, best_ratio = i, ratio
        if best < 0:  # candidates exhausted: fall back to each item's smallest slot
            smallest = np.argmin(problem.size, axis=1)
            return np.where(problem.size[idx, choice] > problem.size[idx, smallest], smallest, choice)
        size -= problem.size[best, choice[best]]
        cand = space.candidates[best]
        choice[best] = cand[cand.tolist().index(choice[best]) - 1] if choice[best] in cand else cand[-1]
        size += problem.size[best, choice[best]]
    return choice


def fill(problem: Problem, space: SearchSpace, choice: np.ndarray) -> np.ndarray:
    """Spend the slack a plan leaves: step items up their candidate lists while the plan fits.

    Each step takes the move with the largest predicted gain per bit, −Δcost/Δsize, among the
    moves that fit, so every trial plan uses the budget (an under-full plan is never the best).
    """
    choice = choice.copy()
    idx = np.arange(problem.n_items)
    slack = problem.cap * (1 + CAP_RTOL) - float(problem.size[idx, choice].sum())
    while True:
        best, best_gain, best_slot = -1, 0.0, -1
        for i, cand in enumerate(space.candidates):
            up = cand[problem.size[i, cand] > problem.size[i, choice[i]]]
            if up.size == 0:
                continue
            nxt = int(up[0])
            d_size = problem.size[i, nxt] - problem.size[i, choice[i]]
            gain = (problem.cost[i, choice[i]] - problem.cost[i, nxt]) / d_size
            if d_size <= slack and gain > best_gain:
                best, best_gain, best_slot = i, gain, nxt
        if best < 0:
            return choice
        slack -= problem.size[best, best_slot] - problem.size[best, choice[best]]
        choice[best] = best_slot






def slots_of(problem: Problem, choice: Mapping[str, str]) -> np.ndarray:
    label_slot = {str(lab): j for j, lab in enumerate(problem.labels)}
    out = np.zeros(problem.n_items, dtype=np.int64)
    for k, unit in enumerate(problem.table.units):
        out[problem.item_of_unit[k]] = label_slot[choice[unit]]
    return out


@dataclass(frozen=True, kw_only=True, eq=False)
class ParamSpace:
    """What the sampler samples, and how a sample decodes to item slots.

    ``unit``: parameter k is item k's slot (its candidates). ``block``: parameter k is a hull-step
    offset in ``-radius..radius`` applied to every item of block k (clipped to its candidates).
    """

    granularity: Granularity
    names: list[str]
    choices: list[list[int]]
    members: list[np.ndarray]  #: items each parameter moves
    space: SearchSpace

    def decode(self, values: Sequence[int]) -> np.ndarray:
        if self.granularity is Granularity.UNIT:
            return np.asarray(values, dtype=np.int64)
        slots = self.space.warm.copy()
        for items, off in zip(self.members, values, strict=True):
            for i in items:
                cand = self.space.candidates[i]
                pos = int(np.flatnonzero(cand == self.space.warm[i])[0]) + int(off)
                slots[i] = cand[min(max(pos, 0), len(cand) - 1)]
        return slots

    def warm_params(self) -> dict[str, int]:
        if self.granularity is Granularity.UNIT:
            return {n: int(s) for n, s in zip(self.names, self.space.warm, strict=True)}
        return dict.fromkeys(self.names, 0)

    def params_for_moves(self, trial: Any) -> dict[str, int]:
        """The parameters a local move starts from: the repaired plan where it is expressible."""
        if self.granularity is Granularity.UNIT and "choice" in trial.user_attrs:
            slots = trial.user_attrs["choice"]
            if all(int(s) in c for s, c in zip(slots, self.choices, strict=True)):
                return {n: int(s) for n, s in zip(self.names, slots, strict=True)}
        return {n: int(trial.params[n]) for n in self.names}

    def perturb(self, params: Mapping[str, int], rng: np.random.Generator, moves: int = 1) -> dict[str, int]:
        """``moves`` parameters set to another of their choices at random (a local-search step)."""
        out = dict(params)
        movable = [k for k, c in enumerate(self.choices) if len(c) > 1]
        for k in rng.choice(movable, size=min(moves, len(movable)), replace=False) if movable else []:
            name = self.names[int(k)]
            others = [c for c in self.choices[int(k)] if c != out[name]]
            out[name] = int(rng.choice(others))
        return out

    def neighbours(self, problem: Problem, n: int) -> Iterator[dict[str, int]]:
        """The warm start, then up to ``n`` one-parameter moves, most promising predicted trade first.

        A move whose plan, once repaired and filled to the budget, is the warm start again (or
        an earlier move's plan) is skipped: it would spend a trial on a plan already queued.
        """
        base = self.warm_params()
        yield base
        cost0, size0, _ = problem.totals(self.decode(list(base.values())))
        moves: list[tuple[float, str, int]] = []
        for name, choices in zip(self.names, self.choices, strict=True):
            for v in choices:
                if v == base[name]:
                    continue
                cost, size, _ = problem.totals(self.decode(list({**base, name: v}.values())))
                moves.append((abs((cost - cost0) / (size - size0)) if size != size0 else np.inf, name, v))
        moves.sort(key=lambda m: m[0])
        seen = {self._budgeted(problem, base).tobytes()}
        for _, name, v in moves:
            if n <= 0:
                return
            params = {**base, name: v}
            key = self._budgeted(problem, params).tobytes()
            if key not in seen:
                seen.add(key)
                n -= 1
                yield params

    def _budgeted(self, problem: Problem, params: Mapping[str, int]) -> np.ndarray:
        slots = self.decode([params[k] for k in self.names])
        return fill(problem, self.space, repair(problem, self.space, slots))

    def fingerprint(self) -> str:
        h = hashlib.sha256(self.space.fingerprint().encode())
        h.update(self.granularity.value.encode())
        for name, items in zip(self.names, self.members, strict=True):
            h.update(name.encode())
            h.update(np.asarray(items, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]


_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def block_of(unit: str) -> str | None:
    """The transformer block a unit belongs to: the first integer path component (``layers.3``)."""
    m = _BLOCK_INDEX.search(unit)
    return f"block.{m.group(1)}" if m else None


def build_param_space(problem: Problem, space: SearchSpace, granularity: Granularity | str,
                      radius: int) -> ParamSpace:
    """One parameter per item, or per block (items outside every block stay on their own)."""
    try:
        g = Granularity(granularity)
    except ValueError:
        raise InvalidParameterError(
            f"granularity {granularity!r} is unknown; use one of {[x.value for x in Granularity]}") from None
    if g is Granularity.UNIT:
        return ParamSpace(granularity=g, names=list(space.names),
                          choices=[[int(s) for s in c] for c in space.candidates],
                          members=[np.array([i]) for i in range(len(space.names))], space=space)
    groups: dict[str, list[int]] = {}
    first_unit: dict[int, str] = {}
    for k, item in enumerate(problem.item_of_unit):
        first_unit.setdefault(int(item), problem.table.units[k])
    for i in range(problem.n_items):
        groups.setdefault(block_of(first_unit[i]) or space.names[i], []).append(i)
    offsets = list(range(-radius, radius + 1))
    return ParamSpace(granularity=g, names=list(groups), choices=[offsets] * len(groups),
                      members=[np.array(v) for v in groups.values()], space=space)
