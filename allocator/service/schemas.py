"""Pydantic request/response models, separate from the dataclass domain types.

Conversions from store records live here (``*.from_record``) so routes stay thin.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from allocator.service.store.models import JobRecord, PlanRecord, TableRecord

__all__ = [
    "BudgetIn", "ErrorBody", "ExportPublic", "ExportRequest", "FrontierPointPublic",
    "FrontierPublic", "HealthPublic", "JobCreate", "JobPublic", "JobsPublic", "PlanPublic",
    "PlanRequest", "PlansPublic", "SolverInfoPublic", "TablePublic", "TablesPublic", "VersionPublic",
]


def _iso(t: float | None) -> dt.datetime | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC)


def _iso_req(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(t, dt.UTC)


class ErrorDetail(BaseModel):
    code: str = Field(description="stable machine-readable code, e.g. 'table_not_found'")
    message: str
    detail: Any = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class BudgetIn(BaseModel):
    """Same fields as :class:`allocator.core.budget.Budget` (exactly one of bpw / size_bytes)."""

    model_config = ConfigDict(extra="forbid")

    bpw: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    size_bytes: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max: dict[str, float] = Field(default_factory=dict)
    min_bits: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    max_bits: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    allowed: dict[str, list[str]] = Field(default_factory=dict)
    unit_min_bits: dict[str, float] = Field(default_factory=dict)
    unit_max_bits: dict[str, float] = Field(default_factory=dict)

    def to_domain_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude_defaults=True)


# ------------------------------------------------------------------ tables
class TablePublic(BaseModel):
    id: str
    fingerprint: str
    name: str
    n_units: int
    n_rows: int
    total_params: int
    options: list[str]
    resource_columns: list[str]
    metadata: dict[str, Any]
    size_bytes: int
    created_at: dt.datetime
    deduplicated: bool = Field(default=False, description="an identical table was already stored")

    @classmethod
    def from_record(cls, r: TableRecord, *, deduplicated: bool = False) -> TablePublic:
        return cls(id=r.id, fingerprint=r.fingerprint, name=r.name, n_units=r.n_units, n_rows=r.n_rows,
                   total_params=r.total_params, options=list(r.options),
                   resource_columns=list(r.resource_columns), metadata=dict(r.meta),
                   size_bytes=r.size_bytes, created_at=_iso_req(r.created_at), deduplicated=deduplicated)


class TablesPublic(BaseModel):
    data: list[TablePublic]
    count: int


# ------------------------------------------------------------------ plans
class PlanRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    table_id: str = Field(min_length=1, max_length=64)
    budget: BudgetIn
    solver: str = Field(default="mckp", min_length=1, max_length=64)
    seed: int | None = Field(default=None, ge=0, le=2**32 - 1)
    store: bool = Field(default=True, description="keep the plan (false: solve only)")
    consumer: str | None = Field(
        default=None, min_length=1, max_length=64,
        description="export target the plan is for (gptqmodel, llmcompressor, autoround, hqq, "
                    "llamacpp, torchao): the table must have been estimated for it "
                    "(estimate job param 'consumer')")


class PlanPublic(BaseModel):
    id: str | None = Field(description="stored plan id (null when store=false)")
    table_id: str
    status: Literal["optimal", "feasible", "infeasible", "time_limit", "error"]
    solver: str
    budget: dict[str, Any]
    objective: float | None
    bound: float | None
    gap: float | None
    seconds: float
    message: str
    min_feasible: float | None
    stats: dict[str, Any]
    plan: dict[str, Any] | None = Field(description="versioned bitalloc.plan JSON, or null")
    job_id: str | None = None
    created_at: dt.datetime | None

    @classmethod
    def from_record(cls, r: PlanRecord) -> PlanPublic:
        return cls(id=r.id, table_id=r.table_id, status=r.status, solver=r.solver, budget=dict(r.budget),  # type: ignore[arg-type]
                   objective=r.objective, bound=r.bound, gap=r.gap, seconds=r.seconds,
                   message=r.message, min_feasible=r.min_feasible, stats=dict(r.stats), plan=r.plan,
                   job_id=r.job_id, created_at=_iso(r.created_at))


class PlansPublic(BaseModel):
    data: list[PlanPublic]
    count: int


class FrontierPointPublic(BaseModel):
    size_bits: float
    bpw: float
    cost: float
    kind: str
    status: str
    cost_std: float | None = None  #: σ of the predicted cost; null when the table has no cost_std


class FrontierPublic(BaseModel):
    table_id: str
    total_params: int
    points: list[FrontierPointPublic]
    consumer: str | None = Field(
        default=None, description="export target the frontier was computed for (query "
                                  "'consumer'): the table restricted to its palette, ties and "
                                  "accounting; null: the table as stored")


class ExportRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    target: str = Field(min_length=1, max_length=64)
    lossy: bool = False
    base: str | None = Field(default=None, max_length=64)
    arch: str | None = Field(default=None, max_length=64)


class ExportPublic(BaseModel):
    plan_id: str
    target: str
    suffix: str
    text: str
    files: dict[str, str]
    notes: list[str]
    changed: dict[str, list[str]]


class SolverInfoPublic(BaseModel):
    name: str
    available: bool
    exact: bool


# ------------------------------------------------------------------ jobs
class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: str = Field(min_length=1, max_length=64, description="'estimate', 'search' or a plug-in kind")
    params: dict[str, Any] = Field(default_factory=dict)
    max_attempts: int | None = Field(default=None, ge=1, le=20)


class JobError(BaseModel):
    code: str
    message: str


class JobPublic(BaseModel):
    id: str
    kind: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    params: dict[str, Any]
    progress: float
    message: str
    error: JobError | None
    attempts: int
    max_attempts: int
    cancel_requested: bool
    worker: str | None
    heartbeat_at: dt.datetime | None
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    has_result: bool

    @classmethod
    def from_record(cls, r: JobRecord) -> JobPublic:
        err = JobError(code=r.error_code, message=r.error_message or "") if r.error_code else None
        return cls(id=r.id, kind=r.kind, status=r.status, params=dict(r.params), progress=r.progress,  # type: ignore[arg-type]
                   message=r.message, error=err, attempts=r.attempts, max_attempts=r.max_attempts,
                   cancel_requested=r.cancel_requested, worker=r.worker,
                   heartbeat_at=_iso(r.heartbeat_at), created_at=_iso_req(r.created_at),
                   started_at=_iso(r.started_at), finished_at=_iso(r.finished_at),
                   has_result=r.result is not None)


class JobsPublic(BaseModel):
    data: list[JobPublic]
    count: int


# ------------------------------------------------------------------ meta
class HealthPublic(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
    queued_jobs: int
    running_jobs: int


class VersionPublic(BaseModel):
    version: str
    api: str
    solvers: list[SolverInfoPublic]
    job_kinds: list[str]
    export_targets: list[str]
