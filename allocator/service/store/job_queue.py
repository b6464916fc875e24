"""Job rows: submit, claim (atomic), heartbeat, finish, cancel, and reaping lost jobs.

State machine::

    queued ──claim──▶ running ──▶ succeeded | failed | cancelled
       │                 │ heartbeat stale (worker died)
       │                 └──▶ queued again (attempts < max_attempts) or failed("worker_lost")
       └──cancel──▶ cancelled

A worker only writes a job it still owns (``worker`` = its id and ``status`` = running), so a
worker that was declared lost and comes back cannot overwrite the retry's outcome.
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import Any

from sqlalchemy import Engine, func, select, update
from sqlalchemy.orm import Session

from allocator.service.infra.errors import ServiceError, not_found
from allocator.service.store.db import is_sqlite
from allocator.service.store.models import JobRecord
from allocator.service.store.repo import new_id

__all__ = ["JobStatus", "claim_job", "finish_job", "heartbeat", "list_jobs", "reap_lost_jobs",
           "request_cancel", "submit_job"]


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


def submit_job(session: Session, *, kind: str, params: dict[str, Any], max_attempts: int) -> JobRecord:
    rec = JobRecord(id=new_id(), kind=kind, status=JobStatus.QUEUED, params=params, progress=0.0,
                    message="queued", attempts=0, max_attempts=max_attempts,
                    cancel_requested=False, created_at=time.time())
    session.add(rec)
    session.commit()
    return rec


def get_job(session: Session, job_id: str) -> JobRecord:
    rec = session.get(JobRecord, job_id)
    if rec is None:
        raise not_found("job", job_id)
    return rec


def list_jobs(session: Session, *, status: str | None, kind: str | None, limit: int,
              offset: int) -> tuple[list[JobRecord], int]:
    where = []
    if status:
        where.append(JobRecord.status == status)
    if kind:
        where.append(JobRecord.kind == kind)
    count = session.scalar(select(func.count()).select_from(JobRecord).where(*where)) or 0
    rows = session.scalars(select(JobRecord).where(*where)
                           .order_by(JobRecord.created_at.desc(), JobRecord.id)
                           .limit(limit).offset(offset)).all()
    return list(rows), int(count)


def request_cancel(session: Session, job_id: str) -> JobRecord:
    """Cancel a queued job now; ask a running one to stop (its worker sees it on heartbeat)."""
    rec = get_job(session, job_id)
    now = time.time()
    done = _rowcount(session.execute(
        update(JobRecord).where(JobRecord.id == job_id, JobRecord.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, cancel_requested=True, finished_at=now,
                message="cancelled before it started")))
    if not done:
        session.execute(update(JobRecord).where(JobRecord.id == job_id,
                                                JobRecord.status == JobStatus.RUNNING)
                        .values(cancel_requested=True))
    session.commit()
    session.refresh(rec)
    if JobStatus(rec.status).finished and rec.status != JobStatus.CANCELLED:
        raise ServiceError(409, "job_finished", f"job {job_id!r} already {rec.status}; nothing to cancel")
    return rec


def _rowcount(result: Any) -> int:
    """Rows an UPDATE matched (typed access: ``Result`` does not declare ``rowcount``)."""
    return int(result.rowcount)


def claim_job(engine: Engine, *, worker: str, kinds: list[str]) -> dict[str, Any] | None:
    """Atomically take the oldest queued job of ``kinds``; returns its id/kind/params or None.

    PostgreSQL: ``SELECT ... FOR UPDATE SKIP LOCKED`` (workers never wait on each other).
    SQLite: ``BEGIN IMMEDIATE`` takes the write lock before the read, so two workers cannot
    both see the same queued row.
    """
    with engine.connect() as conn:
        if is_sqlite(engine):
            conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            query = (select(JobRecord.id, JobRecord.kind, JobRecord.params, JobRecord.attempts)
                     .where(JobRecord.status == JobStatus.QUEUED, JobRecord.kind.in_(kinds))
                     .order_by(JobRecord.created_at).limit(1))
            if not is_sqlite(engine):
                query = query.with_for_update(skip_locked=True)
            row = conn.execute(query).first()
            if row is None:
                return None
            now = time.time()
            conn.execute(update(JobRecord).where(JobRecord.id == row.id)
                         .values(status=JobStatus.RUNNING, worker=worker, heartbeat_at=now,
                                 started_at=now, attempts=row.attempts + 1,
                                 message=f"running on {worker}"))
    return {"id": row.id, "kind": row.kind, "params": dict(row.params), "attempt": row.attempts + 1}


def heartbeat(engine: Engine, *, job_id: str, worker: str, progress: float,
              message: str) -> tuple[bool, bool]:
    """Record liveness and progress; returns (still_owned, cancel_requested)."""
    with engine.begin() as conn:
        owned = conn.execute(
            update(JobRecord).where(JobRecord.id == job_id, JobRecord.worker == worker,
                                    JobRecord.status == JobStatus.RUNNING)
            .values(heartbeat_at=time.time(), progress=progress, message=message[:2000])).rowcount
        cancel = conn.scalar(select(JobRecord.cancel_requested).where(JobRecord.id == job_id))
    return bool(owned), bool(cancel)


def finish_job(engine: Engine, *, job_id: str, worker: str, status: JobStatus,
               result: dict[str, Any] | None = None, error: tuple[str, str] | None = None,
               message: str = "") -> bool:
    """Write the outcome if this worker still owns the job; returns whether it did."""
    values: dict[str, Any] = {"status": status, "finished_at": time.time(), "result": result,
                              "message": message[:2000] or str(status)}
    if status is JobStatus.SUCCEEDED:
        values["progress"] = 1.0
    if error is not None:
        values["error_code"], values["error_message"] = error[0], error[1][:2000]
    with engine.begin() as conn:
        n = conn.execute(update(JobRecord).where(JobRecord.id == job_id, JobRecord.worker == worker,
                                                 JobRecord.status == JobStatus.RUNNING)
                         .values(**values)).rowcount
    return bool(n)


def reap_lost_jobs(engine: Engine, *, stale_after_s: float, now: float | None = None) -> int:
    """Requeue (or fail, when out of attempts) running jobs whose heartbeat is stale."""
    now = time.time() if now is None else now
    cutoff = now - stale_after_s
    lost = (JobRecord.status == JobStatus.RUNNING) & (JobRecord.heartbeat_at < cutoff)
    with engine.begin() as conn:
        n = conn.execute(update(JobRecord).where(lost, JobRecord.cancel_requested.is_(True))
                         .values(status=JobStatus.CANCELLED, finished_at=now,
                                 message="cancelled (its worker was lost)")).rowcount
        n += conn.execute(update(JobRecord).where(lost, JobRecord.attempts < JobRecord.max_attempts)
                          .values(status=JobStatus.QUEUED, worker=None, heartbeat_at=None,
                                  message="requeued: its worker stopped heartbeating")).rowcount
        n += conn.execute(update(JobRecord).where(lost).values(
            status=JobStatus.FAILED, finished_at=now, error_code="worker_lost",
            error_message=f"the worker running this job stopped heartbeating {stale_after_s:g} s "
                          "ago and the job is out of attempts; resubmit it",
            message="failed: worker lost")).rowcount
    return int(n)
