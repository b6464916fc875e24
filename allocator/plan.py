"""Bit plans (versioned JSON) and the one central check every plan passes."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from allocator.budget import SIZE_RTOL, Budget
from allocator.errors import InvalidPlanError, UnknownNameError
from allocator.formats import FormatKind, parse_format
from allocator.table import CostTable

__all__ = [
    "PLAN_FORMAT",
    "PLAN_VERSION",
    "Assignment",
    "BitPlan",
    "PlanSummary",
    "SolverInfo",
    "allowed_mask",
    "check_plan",
    "check_rows",
    "plan_rows",
]

PLAN_FORMAT = "bitalloc.plan"
PLAN_VERSION = 1


@dataclass(frozen=True, kw_only=True)
class Assignment:
    """The option one unit takes, with the quantizer settings a backend needs."""

    option: str
    bits: float
    group_size: int | None = None
    symmetric: bool | None = None

    @classmethod
    def for_option(cls, option: str, bits: float) -> Assignment:
        """Settings from the catalogue when the label parses; otherwise only bits."""
        try:
            fmt = parse_format(option)
        except UnknownNameError:
            return cls(option=option, bits=float(bits))
        if fmt.kind is FormatKind.FLOAT:
            return cls(option=option, bits=16)
        return cls(option=option, bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"option": self.option, "bits": _num(self.bits)}
        if self.group_size is not None:
            out["group_size"] = self.group_size
        if self.symmetric is not None:
            out["symmetric"] = self.symmetric
        return out


def _num(x: float) -> int | float:
    return int(x) if float(x).is_integer() else float(x)


@dataclass(frozen=True, kw_only=True)
class PlanSummary:
    params: int
    size_bits: float
    bpw: float
    predicted_cost: float
    resources: Mapping[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"params": self.params, "size_bits": self.size_bits, "bpw": self.bpw,
                               "predicted_cost": self.predicted_cost}
        if self.resources:
            out["resources"] = dict(self.resources)
        return out


@dataclass(frozen=True, kw_only=True)
class SolverInfo:
    name: str
    status: str
    gap: float | None = None
    seconds: float = 0.0
    params: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "gap": self.gap,
                "seconds": self.seconds, "params": dict(self.params)}


@dataclass(frozen=True, kw_only=True)
class BitPlan:
    """One option per unit, a summary recomputed from the table, and where it came from."""

    assignments: Mapping[str, Assignment]
    summary: PlanSummary
    budget: Mapping[str, Any] = field(default_factory=dict)
    solver: SolverInfo = field(default_factory=lambda: SolverInfo(name="manual", status="feasible"))
    provenance: Mapping[str, Any] = field(default_factory=dict)

    @property
    def choice(self) -> dict[str, str]:
        """unit → option label."""
        return {u: a.option for u, a in self.assignments.items()}

    @classmethod
    def from_rows(
        cls, table: CostTable, rows: np.ndarray, *, budget: Budget | None = None,
        solver: SolverInfo | None = None,
    ) -> BitPlan:
        """Build a plan from chosen row indices of ``table.df`` (one per unit)."""
        ix = table.index
        idx = np.asarray(rows, dtype=np.int64)
        bits = table.df["bits"].to_numpy()
        per_option = np.empty(len(ix.options), dtype=object)
        for code in np.unique(ix.option_codes[idx]):
            first = idx[np.argmax(ix.option_codes[idx] == code)]
            per_option[code] = Assignment.for_option(str(ix.options[code]), float(bits[first]))
        assignments = dict(zip(ix.units[ix.unit_codes[idx]].tolist(),
                               per_option[ix.option_codes[idx]].tolist(), strict=True))
        return cls(
            assignments=assignments,
            summary=summarize_rows(table, rows),
            budget=budget.to_dict() if budget is not None else {},
            solver=solver or SolverInfo(name="manual", status="feasible"),
            provenance=_provenance(table),
        )

    @classmethod
    def from_choice(cls, table: CostTable, choice: Mapping[str, str], **kw: Any) -> BitPlan:
        """Build a plan from unit → option labels (raises on unknown pairs)."""
        return cls.from_rows(table, plan_rows(table, choice), **kw)

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PLAN_FORMAT, "version": PLAN_VERSION,
            "assignments": {u: a.to_dict() for u, a in self.assignments.items()},
            "summary": self.summary.to_dict(), "budget": dict(self.budget),
            "solver": self.solver.to_dict(), "provenance": dict(self.provenance),
        }

    def to_json(self, indent: int | None = 1) -> str:
        return json.dumps(self.to_dict(), indent=indent, default=str)

    def save(self, path: str | Path) -> Path:
        from allocator.io import _atomic_write

        p = Path(path)
        text = self.to_json()
        _atomic_write(p, lambda tmp: tmp.write_text(text))
        return p

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BitPlan:
        if not isinstance(doc, Mapping) or doc.get("format") != PLAN_FORMAT:
            raise InvalidPlanError(f"not a bit plan: expected format {PLAN_FORMAT!r}")
        version = doc.get("version")
        if not isinstance(version, int) or version < 1 or version > PLAN_VERSION:
            raise InvalidPlanError(
                f"bit plan version {version!r} is not readable here (reads 1..{PLAN_VERSION}); "
                "upgrade bitalloc"
            )
        try:
            assignments = {
                str(u): Assignment(option=str(a["option"]), bits=float(a["bits"]),
                                   group_size=a.get("group_size"), symmetric=a.get("symmetric"))
                for u, a in doc["assignments"].items()
            }
            s = doc["summary"]
            summary = PlanSummary(params=int(s["params"]), size_bits=float(s["size_bits"]),
                                  bpw=float(s["bpw"]), predicted_cost=float(s["predicted_cost"]),
                                  resources=dict(s.get("resources", {})))
            sv = doc.get("solver", {"name": "manual", "status": "feasible"})
            solver = SolverInfo(name=str(sv["name"]), status=str(sv["status"]), gap=sv.get("gap"),
                                seconds=float(sv.get("seconds", 0.0)), params=dict(sv.get("params", {})))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise InvalidPlanError(f"malformed bit plan: missing or bad field {exc}") from None
        return cls(assignments=assignments, summary=summary, budget=dict(doc.get("budget", {})),
                   solver=solver, provenance=dict(doc.get("provenance", {})))

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        p = Path(path)
        if not p.is_file():
            raise InvalidPlanError(f"plan file {str(p)!r} does not exist")
        try:
            doc = json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise InvalidPlanError(f"plan file {str(p)!r} is not JSON: {exc}") from None
        return cls.from_dict(doc)


def _provenance(table: CostTable) -> dict[str, Any]:
    m = table.metadata
    return {"table_sha256": table.fingerprint, "estimator": m.get("estimator"),
            "model": m.get("model"), "data": m.get("data"), "seed": m.get("seed")}


def summarize_rows(table: CostTable, rows: np.ndarray) -> PlanSummary:
    df = table.df
    idx = np.asarray(rows, dtype=np.int64)
    params = int(df["params"].to_numpy()[idx].sum())
    size = float(df["size_bits"].to_numpy()[idx].sum())
    cost = float(df["cost"].to_numpy()[idx].sum())
    res = {c: float(df[c].to_numpy()[idx].sum()) for c in table.resource_columns}
    return PlanSummary(params=params, size_bits=size, bpw=size / params if params else 0.0,
                       predicted_cost=cost, resources=res)


def plan_rows(table: CostTable, choice: Mapping[str, str]) -> np.ndarray:
    """Row indices of ``table.df`` for unit → option; raises naming the first unknown pair."""
    df = table.df
    key = pd.MultiIndex.from_arrays([df["unit"], df["option"]])
    want = pd.MultiIndex.from_arrays([list(choice.keys()), list(choice.values())])
    rows = key.get_indexer(want)
    if np.any(rows < 0):
        i = int(np.flatnonzero(rows < 0)[0])
        unit, opt = want[i]
        if unit not in set(df["unit"]):
            raise InvalidPlanError(f"plan names unit {unit!r}, which the cost table does not have")
        raise InvalidPlanError(
            f"plan gives unit {unit!r} option {opt!r}, which the cost table does not offer for it"
        )
    return np.asarray(rows, dtype=np.int64)


def allowed_mask(table: CostTable, budget: Budget) -> np.ndarray:
    """Rows a budget allows (per-unit options and bit limits)."""
    df = table.df
    ok = np.ones(len(df), dtype=bool)
    bits = df["bits"].to_numpy()
    if budget.min_bits is not None:
        ok &= bits >= budget.min_bits
    if budget.max_bits is not None:
        ok &= bits <= budget.max_bits
    units = df["unit"]
    for unit, opts in budget.allowed.items():
        sel = (units == unit).to_numpy()
        ok[sel] &= np.isin(df["option"].to_numpy()[sel], list(opts))
    for unit, lo in budget.unit_min_bits.items():
        sel = (units == unit).to_numpy()
        ok[sel] &= bits[sel] >= lo
    for unit, hi in budget.unit_max_bits.items():
        sel = (units == unit).to_numpy()
        ok[sel] &= bits[sel] <= hi
    return ok


def check_rows(table: CostTable, rows: np.ndarray, budget: Budget | None) -> list[str]:
    """Problems with a choice of rows: coverage, ties, per-unit restrictions, caps, NaN."""
    df = table.df
    idx = np.asarray(rows, dtype=np.int64)
    problems: list[str] = []
    if idx.size and (idx.min() < 0 or idx.max() >= len(df)):
        return ["plan refers to rows outside the table"]
    ix = table.index
    counts = np.bincount(ix.unit_codes[idx], minlength=len(ix.units))
    if np.any(counts > 1):
        problems.append(f"unit {ix.units[np.argmax(counts > 1)]!r} has more than one option")
    if np.any(counts == 0):
        problems.append(
            f"{int(np.sum(counts == 0))} unit(s) have no option, e.g. {ix.units[np.argmax(counts == 0)]!r}"
        )
    if table.has_ties:
        sel = df.iloc[idx]
        sel = sel[sel["tie"] != ""]
        n_opts = sel.groupby("tie")["option"].nunique()
        if (n_opts > 1).any():
            problems.append(f"tie group {n_opts.index[n_opts > 1][0]!r} mixes options")
    for col in ("cost", "size_bits"):
        if not np.all(np.isfinite(df[col].to_numpy()[idx])):
            problems.append(f"plan has a non-finite {col}")
    if budget is None:
        return problems
    ok = allowed_mask(table, budget)
    if not np.all(ok[idx]):
        bad = idx[~ok[idx]][0]
        problems.append(
            f"unit {df['unit'].iat[bad]!r} takes {df['option'].iat[bad]!r}, which the budget forbids"
        )
    cap = budget.size_cap_bits(table.total_params)
    size = float(df["size_bits"].to_numpy()[idx].sum())
    if size > cap * (1 + SIZE_RTOL):
        problems.append(f"size {size:.6g} bits exceeds the cap {cap:.6g} bits")
    for col, hi in budget.max.items():
        if col not in df.columns:
            problems.append(f"budget caps unknown column {col!r}")
            continue
        used = float(df[col].to_numpy()[idx].sum())
        if used > hi * (1 + SIZE_RTOL) + 1e-12:
            problems.append(f"{col} {used:.6g} exceeds the cap {hi:.6g}")
    return problems


def check_plan(plan: BitPlan, table: CostTable, budget: Budget | None = None) -> list[str]:
    """Every problem with ``plan`` against ``table`` (and ``budget``); empty when valid.

    Checks: each unit exactly one option the table offers and the budget allows, ties take
    one option, size and resource caps hold, no NaN, and the stored summary equals the one
    recomputed from the table.
    """
    try:
        rows = plan_rows(table, plan.choice)
    except InvalidPlanError as exc:
        return [str(exc)]
    problems = check_rows(table, rows, budget)
    fresh = summarize_rows(table, rows)
    for name in ("size_bits", "predicted_cost"):
        a, b = getattr(plan.summary, name), getattr(fresh, name)
        if not math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9):
            problems.append(f"summary {name}={a!r} differs from the table's {b!r}")
    if plan.summary.params != fresh.params:
        problems.append(f"summary params={plan.summary.params} differs from the table's {fresh.params}")
    return problems
