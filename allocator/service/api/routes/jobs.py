"""Jobs: submit (estimate, search, plug-ins), list, get, cancel, result."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, status
from pydantic import BaseModel

from allocator.service.api.routes import errors
from allocator.service.deps import DbDep, ReadAuth, SettingsDep, WriteAuth
from allocator.service.infra.errors import ServiceError
from allocator.service.job_kinds import get_job_kind
from allocator.service.schemas import JobCreate, JobPublic, JobsPublic
from allocator.service.store import job_queue, repo

router = APIRouter(prefix="/jobs", tags=["jobs"], responses=errors(401, 404))


class JobResultPublic(BaseModel):
    job_id: str
    kind: str
    result: dict[str, Any]


@router.post("", response_model=JobPublic, status_code=status.HTTP_202_ACCEPTED,
             dependencies=[WriteAuth], responses=errors(401, 403, 404))
def submit(db: DbDep, settings: SettingsDep, req: JobCreate) -> JobPublic:
    """Queue a job; a worker process picks it up. Parameters are checked now, not later."""
    kind = get_job_kind(req.kind)
    params = dict(req.params)
    if kind.validate is not None:
        kind.validate(params, list(settings.model_roots))  # raises; the stored params stay as sent
    with db.write() as s:
        if kind.needs_table:
            repo.get_table_record(s, str(params.get("table_id")))
        rec = job_queue.submit_job(s, kind=req.kind, params=params,
                                  max_attempts=req.max_attempts or settings.max_attempts)
        return JobPublic.from_record(rec)


@router.get("", response_model=JobsPublic, dependencies=[ReadAuth])
def list_jobs(db: DbDep, status: job_queue.JobStatus | None = None,
              kind: Annotated[str | None, Query(max_length=64)] = None,
              limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              offset: Annotated[int, Query(ge=0, le=2**31)] = 0) -> JobsPublic:
    """Jobs, newest first."""
    with db.read() as s:
        rows, count = job_queue.list_jobs(s, status=status, kind=kind, limit=limit, offset=offset)
        return JobsPublic(data=[JobPublic.from_record(r) for r in rows], count=count)


@router.get("/{job_id}", response_model=JobPublic, dependencies=[ReadAuth])
def get_job(db: DbDep, job_id: str) -> JobPublic:
    """Status, progress, message and error of one job."""
    with db.read() as s:
        return JobPublic.from_record(job_queue.get_job(s, job_id))


@router.post("/{job_id}/cancel", response_model=JobPublic, dependencies=[WriteAuth],
             responses=errors(401, 404, 409))
def cancel(db: DbDep, job_id: str) -> JobPublic:
    """Cancel a queued job at once; a running one stops at its next heartbeat."""
    with db.write() as s:
        return JobPublic.from_record(job_queue.request_cancel(s, job_id))


@router.get("/{job_id}/result", response_model=JobResultPublic, dependencies=[ReadAuth],
            responses=errors(401, 404, 409))
def result(db: DbDep, job_id: str) -> JobResultPublic:
    """The result of a succeeded job (409 with the job's state otherwise)."""
    with db.read() as s:
        rec = job_queue.get_job(s, job_id)
    if rec.status == job_queue.JobStatus.SUCCEEDED and rec.result is not None:
        return JobResultPublic(job_id=rec.id, kind=rec.kind, result=dict(rec.result))
    if rec.status == job_queue.JobStatus.FAILED:
        raise ServiceError(409, "job_failed", f"job {job_id!r} failed: {rec.error_message}",
                           {"job_error": rec.error_code})
    raise ServiceError(409, "job_not_finished" if rec.status in ("queued", "running") else "job_cancelled",
                       f"job {job_id!r} is {rec.status}; it has no result")
