"""Rank agreement between cost tables (e.g. two estimators on the same model).

Solvers only care about the *order* of costs (across units at a given option, and across
options), so estimators are compared by rank correlation of a per-unit score:

    score_i = cost(i, b_ref)

with ``b_ref`` the reference option: by default the *lowest-bit option that every table has*
(ties broken by label). The lowest bit width is where the estimators' predictions differ most
and matter most for an allocation. Only units present in both tables are compared.

For each pair of tables, Spearman's ρ and Kendall's τ-b (``scipy.stats``) with their p-values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from allocator.core.errors import InvalidParameterError
from allocator.core.table import CostTable

__all__ = [
    "RankAgreement",
    "agreement_frame",
    "compare_tables",
    "reference_option",
    "table_label",
    "unit_scores",
]


@dataclass(frozen=True, kw_only=True)
class RankAgreement:
    """Agreement of the unit orders of two tables at one option."""

    a: str
    b: str
    option: str
    units: int
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float


def table_label(table: CostTable, fallback: str) -> str:
    """The estimator name from the metadata, else ``fallback`` (e.g. the file name)."""
    name = table.metadata.get("estimator")
    return str(name) if name else fallback


def reference_option(tables: Sequence[CostTable]) -> str:
    """The lowest-bit option present in every table (ties: smallest label)."""
    common = set(tables[0].options)
    for t in tables[1:]:
        common &= set(t.options)
    if not common:
        raise InvalidParameterError("the tables share no option label; pass tables scored on "
                                    "the same options (or --option with one they all have)")
    bits = tables[0].df.groupby("option")["bits"].first()
    return min(common, key=lambda o: (float(bits[o]), o))


def unit_scores(table: CostTable, option: str) -> pd.Series:
    """cost(i, option) indexed by unit."""
    rows = table.df[table.df["option"] == option]
    if rows.empty:
        raise InvalidParameterError(f"option {option!r} is not in the table; it has {table.options}")
    return rows.set_index("unit")["cost"]


def compare_tables(tables: Sequence[CostTable], labels: Sequence[str] | None = None, *,
                   option: str | None = None) -> list[RankAgreement]:
    """Spearman / Kendall agreement of every pair of ``tables`` (in the order given)."""
    from scipy import stats

    if len(tables) < 2:
        raise InvalidParameterError(f"compare needs at least 2 tables, got {len(tables)}")
    names = list(labels) if labels is not None else [table_label(t, f"table{i}")
                                                    for i, t in enumerate(tables)]
    if len(names) != len(tables):
        raise InvalidParameterError(f"{len(names)} labels for {len(tables)} tables")
    ref = option if option is not None else reference_option(tables)
    scores = [unit_scores(t, ref) for t in tables]
    out = []
    for i in range(len(tables)):
        for j in range(i + 1, len(tables)):
            common = scores[i].index.intersection(scores[j].index)
            if len(common) < 2:
                raise InvalidParameterError(
                    f"tables {names[i]!r} and {names[j]!r} share {len(common)} unit(s); "
                    "rank agreement needs ≥ 2 common units")
            x = scores[i].loc[common].to_numpy(np.float64)
            y = scores[j].loc[common].to_numpy(np.float64)
            rho, rho_p = _safe(stats.spearmanr(x, y))
            tau, tau_p = _safe(stats.kendalltau(x, y))
            out.append(RankAgreement(a=names[i], b=names[j], option=ref, units=len(common),
                                     spearman=rho, spearman_p=rho_p, kendall=tau, kendall_p=tau_p))
    return out


def _safe(res: object) -> tuple[float, float]:
    """(statistic, p-value); NaN when one side is constant (no order to compare)."""
    stat = float(getattr(res, "statistic", getattr(res, "correlation", math.nan)))
    p = float(getattr(res, "pvalue", math.nan))
    return stat, p


def agreement_frame(rows: Sequence[RankAgreement]) -> pd.DataFrame:
    """The pairs as a DataFrame (one row per pair)."""
    return pd.DataFrame([r.__dict__ for r in rows])
