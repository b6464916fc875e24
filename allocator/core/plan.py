"""Bit plans (versioned JSON) and the one central check every plan passes."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from allocator.core.atomic import atomic_write_text
from allocator.core.budget import CAP_ATOL, SIZE_RTOL, Budget
from allocator.core.errors import InvalidPlanError, UnknownNameError
from allocator.core.formats import FormatKind, parse_format
from allocator.core.json_io import dump_json, parse_json
from allocator.core.table import CostTable

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
        """The plan document; NaN/inf anywhere is refused (``Infinity`` is not JSON)."""
        return dump_json(self.to_dict(), what="bit plan", error=InvalidPlanError, indent=indent)

    def save(self, path: str | Path) -> Path:
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> BitPlan:
        if not isinstance(doc, Mapping) or doc.get("format") != PLAN_FORMAT:
            raise InvalidPlanError(f"not a bit plan: expected format {PLAN_FORMAT!r}")
        version = doc.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= PLAN_VERSION:
            raise InvalidPlanError(
                f"bit plan version {_short(version)} is not readable here (reads 1..{PLAN_VERSION}); "
                "upgrade bitalloc"
            )
        try:
            assignments = {str(u): _assignment(str(u), a)
                           for u, a in _mapping(doc["assignments"], "assignments").items()}
            s = _mapping(doc["summary"], "summary")
            summary = PlanSummary(
                params=int(_finite(s["params"], "summary.params")),
                size_bits=_finite(s["size_bits"], "summary.size_bits"),
                bpw=_finite(s["bpw"], "summary.bpw"),
                predicted_cost=_finite(s["predicted_cost"], "summary.predicted_cost"),
                resources={str(k): _finite(v, f"summary.resources.{k}") for k, v in
                           _mapping(s.get("resources", {}), "summary.resources").items()})
            sv = _mapping(doc.get("solver", {"name": "manual", "status": "feasible"}), "solver")
            gap = sv.get("gap")
            solver = SolverInfo(name=str(sv["name"]), status=str(sv["status"]),
                                gap=None if gap is None else _finite(gap, "solver.gap"),
                                seconds=_finite(sv.get("seconds", 0.0), "solver.seconds"),
                                params=dict(_mapping(sv.get("params", {}), "solver.params")))
            budget = dict(_mapping(doc.get("budget", {}), "budget"))
            provenance = dict(_mapping(doc.get("provenance", {}), "provenance"))
        except KeyError as exc:
            raise InvalidPlanError(f"malformed bit plan: missing field {exc}") from None
        except (TypeError, ValueError, AttributeError, OverflowError) as exc:
            if isinstance(exc, InvalidPlanError):
                raise
            raise InvalidPlanError(f"malformed bit plan: bad field ({exc})") from None
        return cls(assignments=assignments, summary=summary, budget=budget, solver=solver,
                   provenance=provenance)

    @classmethod
    def load(cls, path: str | Path) -> BitPlan:
        p = Path(path)
        if not p.is_file():
            raise InvalidPlanError(f"plan file {str(p)!r} does not exist")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InvalidPlanError(f"cannot read plan file {str(p)!r}: {exc}") from None
        return cls.from_dict(parse_json(data, source=f"plan file {str(p)!r}", error=InvalidPlanError))


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _mapping(value: Any, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise InvalidPlanError(f"malformed bit plan: {name!r} must be a JSON object, got {_short(value)}")
    return value


def _finite(value: Any, name: str) -> float:
    """A JSON number (not a bool, not NaN/inf: a plan from an overflowing table is refused)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidPlanError(f"malformed bit plan: {name} must be a finite number, got {_short(value)}")
    return float(value)


def _assignment(unit: str, a: Any) -> Assignment:
    a = _mapping(a, f"assignments.{unit}")
    option, bits = a["option"], _finite(a["bits"], f"assignments.{unit}.bits")
    group, sym = a.get("group_size"), a.get("symmetric")
    if not isinstance(option, str) or bits <= 0:
        raise InvalidPlanError(
            f"malformed bit plan: unit {unit!r} needs an option label and bits > 0, "
            f"got option={_short(option)}, bits={bits!r}"
        )
    if group is not None and (isinstance(group, bool) or not isinstance(group, int)):
        raise InvalidPlanError(f"malformed bit plan: unit {unit!r} group_size {_short(group)} is not an int")
    if sym is not None and not isinstance(sym, bool):
        raise InvalidPlanError(f"malformed bit plan: unit {unit!r} symmetric {_short(sym)} is not true/false")
    return Assignment(option=option, bits=bits, group_size=group, symmetric=sym)


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
        if used > hi * (1 + SIZE_RTOL) + CAP_ATOL:
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
