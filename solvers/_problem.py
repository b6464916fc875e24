"""The dense form every solver works on: items (tie groups collapsed) × option slots.

Slot ``j`` is the table's ``j``-th option label (sorted), so a label has the same slot in every
unit. A tie group (units with the same ``tie`` id) becomes one item whose size, cost and
resources are the sums over its members, so every solver respects ties by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from allocator.core.budget import Budget
from allocator.core.errors import InvalidBudgetError
from allocator.core.plan import allowed_mask
from allocator.core.table import CostTable

__all__ = ["Problem", "build_problem"]


@dataclass(frozen=True, kw_only=True, eq=False)
class Problem:
    """A cost table under a budget, as dense arrays.

    Attributes:
        size, cost: (n_items, K) float64; ``inf`` where a slot is absent or not allowed.
        valid: (n_items, K) bool.
        resources: name → (n_items, K) float64 for every capped resource column.
        cap: primary size cap in bits; caps: resource name → cap.
        labels: (K,) option label of each slot.
        item_of_unit: (n_units,) item index of each unit (units in ``table.units`` order).
        row_of: (n_units, K) row index into ``table.df`` (-1 where absent).
    """

    table: CostTable
    budget: Budget
    size: np.ndarray
    cost: np.ndarray
    valid: np.ndarray
    resources: dict[str, np.ndarray]
    cap: float
    caps: dict[str, float]
    labels: np.ndarray
    item_of_unit: np.ndarray
    row_of: np.ndarray

    @property
    def n_items(self) -> int:
        return int(self.size.shape[0])

    @property
    def n_slots(self) -> int:
        return int(self.size.shape[1])

    def rows_for(self, choice: np.ndarray) -> np.ndarray:
        """Table rows for a slot choice per item (one row per unit)."""
        slots = np.asarray(choice, dtype=np.int64)[self.item_of_unit]
        return self.row_of[np.arange(self.row_of.shape[0]), slots]

    def totals(self, choice: np.ndarray) -> tuple[float, float, dict[str, float]]:
        """(cost, size, resources) of a slot choice."""
        i = np.arange(self.n_items)
        c = np.asarray(choice, dtype=np.int64)
        return (float(self.cost[i, c].sum()), float(self.size[i, c].sum()),
                {k: float(v[i, c].sum()) for k, v in self.resources.items()})

    def min_size(self) -> float:
        """Smallest achievable size (resource caps ignored)."""
        return float(self.size.min(axis=1).sum())


def build_problem(table: CostTable, budget: Budget) -> Problem:
    """Collapse ties, apply per-unit restrictions, and lay the table out densely."""
    missing = [c for c in budget.max if c not in table.df.columns]
    if missing:
        raise InvalidBudgetError(
            f"budget caps column {missing[0]!r}, which the table lacks; "
            f"resource columns: {table.resource_columns}"
        )
    df, ix = table.df, table.index
    n_units, k = len(ix.units), len(ix.options)
    slot = ix.option_codes
    if table.has_ties:
        tie = df["tie"].to_numpy().astype(object)
        key = np.where(tie != "", "t:" + tie, "u:" + df["unit"].to_numpy().astype(object))
        codes, _ = pd.factorize(key, sort=False)
        item = np.asarray(codes, dtype=np.int64)
    else:
        item = ix.unit_codes
    item_of_unit = np.empty(n_units, dtype=np.int64)
    item_of_unit[ix.unit_codes] = item
    n_items = int(item_of_unit.max()) + 1

    row_of = np.full((n_units, k), -1, dtype=np.int64)
    row_of[ix.unit_codes, slot] = np.arange(len(df))
    allowed = allowed_mask(table, budget) if budget.restricts_units else np.ones(len(df), bool)
    if n_items == n_units:  # no ties: one row per (item, slot), plain scatter
        valid = np.zeros((n_items, k), dtype=bool)
        valid[item, slot] = allowed
    else:
        members = np.bincount(item_of_unit, minlength=n_items)
        n_ok = np.zeros((n_items, k), dtype=np.int64)
        np.add.at(n_ok, (item, slot), allowed.astype(np.int64))
        valid = n_ok == members[:, None]

    def dense(values: np.ndarray) -> np.ndarray:
        out = np.zeros((n_items, k))
        if n_items == n_units:
            out[item, slot] = values
        else:
            np.add.at(out, (item, slot), values)
        out[~valid] = np.inf
        return out

    return Problem(
        table=table, budget=budget,
        size=dense(df["size_bits"].to_numpy()), cost=dense(df["cost"].to_numpy()), valid=valid,
        resources={c: dense(df[c].to_numpy()) for c in budget.max},
        cap=budget.size_cap_bits(table.total_params), caps=dict(budget.max),
        labels=ix.options, item_of_unit=item_of_unit, row_of=row_of,
    )
