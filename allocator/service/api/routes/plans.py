"""Plans: solve (synchronous), list, get, delete, export; the frontier of a table."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Response, status

from allocator.core.budget import Budget
from allocator.core.plan import BitPlan
from allocator.core.result import SolveResult
from allocator.core.table import CostTable
from allocator.export.palettes import table_for
from allocator.service.api.routes import errors
from allocator.service.deps import DbDep, ReadAuth, WriteAuth
from allocator.service.infra.errors import ServiceError
from allocator.service.schemas import (
    ErrorBody,
    ExportPublic,
    FrontierPointPublic,
    FrontierPublic,
    PlanPublic,
    PlanRequest,
    PlansPublic,
)
from allocator.service.store import repo

router = APIRouter(tags=["plans"], responses=errors(401, 404))


def _solve(table: CostTable, budget: Budget, solver: str, seed: int | None) -> SolveResult:
    import solvers

    try:
        cls = solvers.solver_class(solver)
    except ImportError as exc:  # registered but not built/installed here
        raise ServiceError(501, "solver_unavailable", f"solver {solver!r} is not available: {exc}") from None
    if cls.capabilities.needs_evaluator:
        raise ServiceError(422, "use_search_job",
                           f"solver {solver!r} evaluates models; submit a 'search' job instead")
    return solvers.solve(table, budget, solver=solver, seed=seed)


@router.post("/plans", response_model=PlanPublic, status_code=status.HTTP_201_CREATED,
             dependencies=[WriteAuth], responses={200: {"model": PlanPublic}, 501: {"model": ErrorBody}})
def create_plan(db: DbDep, req: PlanRequest, response: Response) -> PlanPublic:
    """Solve ``table_id`` under ``budget``; an infeasible budget is a status, not an error."""
    budget = Budget.from_dict(req.budget.to_domain_dict())
    with db.read() as s:
        table = repo.load_table(s, req.table_id, db.cache)
    made_for = table.metadata.get("consumer")
    if req.consumer is not None and made_for != req.consumer:
        from allocator.export.palettes import palette_for

        palette_for(req.consumer)  # an unknown consumer is named as such
        what = f"for {made_for}" if made_for else "without a consumer"
        raise ServiceError(422, "table_not_for_consumer",
                           f"table {req.table_id!r} was estimated {what}; submit an estimate job "
                           f"with params.consumer = {req.consumer!r}")
    result = _solve(table, budget, req.solver, req.seed)
    if not req.store:
        response.status_code = status.HTTP_200_OK
        return PlanPublic(
            id=None, table_id=req.table_id, status=str(result.status), solver=result.solver,  # type: ignore[arg-type]
            budget=budget.to_dict(), objective=repo._finite(result.objective),
            bound=repo._finite(result.bound), gap=repo._finite(result.gap), seconds=result.seconds,
            message=result.message, min_feasible=repo._finite(result.min_feasible),
            stats={k: repo._finite(v) for k, v in dict(result.stats).items()},
            plan=result.plan.to_dict() if result.plan else None, created_at=None)
    with db.write() as s:
        repo.get_table_record(s, req.table_id)  # deleted while we solved?
        rec = repo.add_plan(s, table_id=req.table_id, result=result, budget=budget)
        return PlanPublic.from_record(rec)


@router.get("/plans", response_model=PlansPublic, dependencies=[ReadAuth])
def list_plans(db: DbDep, table_id: str | None = None,
               limit: Annotated[int, Query(ge=1, le=1000)] = 100,
               offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> PlansPublic:
    """Stored plans, newest first (optionally of one table)."""
    with db.read() as s:
        rows, count = repo.list_plans(s, table_id=table_id, limit=limit, offset=offset)
        return PlansPublic(data=[PlanPublic.from_record(r) for r in rows], count=count)


@router.get("/plans/{plan_id}", response_model=PlanPublic, dependencies=[ReadAuth])
def get_plan(db: DbDep, plan_id: str) -> PlanPublic:
    with db.read() as s:
        return PlanPublic.from_record(repo.get_plan(s, plan_id))


@router.delete("/plans/{plan_id}", status_code=status.HTTP_204_NO_CONTENT, dependencies=[WriteAuth])
def delete_plan(db: DbDep, plan_id: str) -> Response:
    with db.write() as s:
        repo.delete_plan(s, plan_id)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/plans/{plan_id}/export", response_model=ExportPublic, dependencies=[ReadAuth],
            responses={501: {"model": ErrorBody}})
def export_plan(db: DbDep, plan_id: str,
                target: Annotated[str, Query(min_length=1, max_length=64)],
                lossy: bool = False,
                base: Annotated[str | None, Query(max_length=64)] = None,
                arch: Annotated[str | None, Query(max_length=64)] = None) -> ExportPublic:
    """The plan in a quantization tool's config format (``target``: see ``/v1/version``)."""
    with db.read() as s:
        rec = repo.get_plan(s, plan_id)
    if rec.plan is None:
        raise ServiceError(409, "plan_has_no_assignments",
                           f"plan {plan_id!r} is {rec.status}; there is nothing to export")
    try:
        from allocator.export import export_plan as _export
    except ImportError:
        raise ServiceError(501, "export_unavailable", "this installation has no exporters") from None
    out = _export(BitPlan.from_dict(rec.plan), target, lossy=lossy, base=base, arch=arch)
    return ExportPublic(plan_id=plan_id, target=out.target, suffix=out.suffix, text=out.text,
                        files=dict(out.files), notes=list(out.notes),
                        changed={u: list(v) for u, v in out.changed.items()})


#: the consumer query parameter of both frontier routes (they must agree on the point indices)
ConsumerQuery = Annotated[str | None, Query(
    min_length=1, max_length=64,
    description="export target (gptqmodel, llmcompressor, autoround, hqq, llamacpp, torchao): the "
                "frontier of the table as that target stores it, like 'bitalloc frontier --for'")]


def _frontier(db: DbDep, table_id: str, bpw: list[float], consumer: str | None) -> tuple[CostTable, Any]:
    """The frontier of table ``table_id`` (for ``consumer``) with exact points at ``bpw``."""
    import math

    import solvers

    for b in bpw:
        if not (math.isfinite(b) and b > 0):
            raise ServiceError(422, "invalid_budget", f"bpw must be finite and > 0, got {b!r}")
    with db.read() as s:
        table = repo.load_table(s, table_id, db.cache)
    # as the CLI verb: a table made for the consumer as is, a generic one restricted to its
    # palette; a table made for another consumer, or without the palette's options, is a 422
    # naming the fix (InvalidParameterError / UnknownNameError → the domain error handler)
    table = table_for(table, consumer)
    return table, solvers.frontier(table, budgets=[Budget(bpw=b) for b in bpw])


@router.get("/tables/{table_id}/frontier", response_model=FrontierPublic, dependencies=[ReadAuth])
def frontier(db: DbDep, table_id: str,
             bpw: Annotated[list[float], Query(max_length=64, description="add exact points here")] = [],  # noqa: B006
             consumer: ConsumerQuery = None) -> FrontierPublic:
    """The size-vs-cost Pareto frontier (hull sweep, plus exact solves at ``bpw``), optionally
    for export target ``consumer``."""
    table, f = _frontier(db, table_id, bpw, consumer)
    stds = [None] * len(f) if f.cost_std is None else [float(v) for v in f.cost_std]
    points = [FrontierPointPublic(size_bits=float(sz), bpw=float(bp), cost=float(c), kind=str(k),
                                  status=str(st), cost_std=sd)
              for sz, bp, c, k, st, sd in zip(f.size_bits, f.bpw, f.cost, f.kind, f.status, stds,
                                              strict=True)]
    return FrontierPublic(table_id=table_id, total_params=table.total_params, points=points,
                          consumer=consumer)


@router.get("/tables/{table_id}/frontier/{index}", response_model=PlanPublic, dependencies=[ReadAuth])
def frontier_plan(db: DbDep, table_id: str, index: int,
                  bpw: Annotated[list[float], Query(max_length=64)] = [],  # noqa: B006
                  consumer: ConsumerQuery = None) -> PlanPublic:
    """The plan of frontier point ``index`` (not stored; POST /v1/plans to keep one); pass the
    same ``bpw`` and ``consumer`` as for the frontier the index came from."""
    _, f = _frontier(db, table_id, bpw, consumer)
    if not -len(f) <= index < len(f):
        raise ServiceError(404, "frontier_point_not_found",
                           f"frontier has points 0..{len(f) - 1}, not {index}")
    plan = f.plan(index)
    return PlanPublic(id=None, table_id=table_id, status=str(f.status[index]), solver=plan.solver.name,  # type: ignore[arg-type]
                      budget=dict(plan.budget), objective=plan.summary.predicted_cost, bound=None,
                      gap=plan.solver.gap, seconds=plan.solver.seconds, message="",
                      min_feasible=None, stats={}, plan=plan.to_dict(), created_at=None)
