"""Worker processes: claim queued jobs, run them with heartbeats, store the outcome.

A heartbeat thread writes progress and liveness every ``heartbeat_s`` and reads the job's
``cancel_requested`` flag. Every worker also reaps lost jobs (stale heartbeats) on each poll, so
a job whose worker was killed is requeued or failed by whichever worker is alive next — it is
never lost. Job failures never end the worker: every exception becomes a stable error code.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import threading
import uuid
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

from allocator.core.budget import Budget
from allocator.core.result import SolveResult
from allocator.core.table import CostTable
from allocator.service.infra.config import Settings
from allocator.service.infra.errors import ServiceError, domain_error
from allocator.service.job_kinds import JOB_KINDS, JobCancelled, JobFailure, get_job_kind, load_job_modules
from allocator.service.store import job_queue, repo
from allocator.service.store.db import is_sqlite, make_engine, migrate

__all__ = ["Worker", "jsonable", "run_worker_process"]

logger = logging.getLogger("bitalloc.service.worker")


def jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats → None, numpy scalars → Python, unknown objects → str."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [jsonable(v) for v in obj]
    if isinstance(obj, bool) or obj is None or isinstance(obj, str | int):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalar
        return jsonable(obj.item())
    return str(obj)


class _Run:
    """Shared state between a running job, its progress hook and the heartbeat thread."""

    def __init__(self) -> None:
        self.progress = 0.0
        self.message = "started"
        self.cancel = threading.Event()
        self.lost = False
        self.done = threading.Event()

    def report(self, fraction: float, message: str) -> None:
        if self.cancel.is_set():
            raise JobCancelled
        self.progress = min(max(float(fraction), 0.0), 1.0)
        self.message = str(message)


class Worker:
    """One job at a time; ``run_forever`` until ``stop`` is set."""

    def __init__(self, settings: Settings, *, engine: Engine | None = None, ident: str | None = None) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings.db_url, pool_size=2)
        self.ident = ident or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        load_job_modules(settings.job_modules)

    def run_forever(self, stop: threading.Event, *, parent_pid: int | None = None) -> None:
        """Poll until ``stop`` is set or, with ``parent_pid``, until that parent process dies
        (workers started by ``bitalloc serve`` must not outlive it, even after a kill -9)."""
        logger.info("worker %s polling %s", self.ident, self.engine.url.render_as_string())
        if parent_pid is not None:
            threading.Thread(target=_exit_with_parent, args=(parent_pid, self.ident, stop),
                             name="parent-watchdog", daemon=True).start()
        while not stop.is_set():
            if parent_pid is not None and os.getppid() != parent_pid:
                logger.warning("worker %s: parent %d is gone; exiting", self.ident, parent_pid)
                return
            try:
                ran = self.run_once()
            except Exception:  # the database went away: wait and retry, never die
                logger.exception("worker %s: poll failed", self.ident)
                ran = False
            if not ran:
                stop.wait(self.settings.poll_s)

    def run_once(self) -> bool:
        """Reap lost jobs, claim one and run it; returns whether a job ran."""
        job_queue.reap_lost_jobs(self.engine, stale_after_s=self.settings.stale_after_s)
        job = job_queue.claim_job(self.engine, worker=self.ident, kinds=sorted(JOB_KINDS))
        if job is None:
            return False
        self._execute(job)
        return True

    def _execute(self, job: dict[str, Any]) -> None:
        run = _Run()
        beat = threading.Thread(target=self._heartbeat, args=(job["id"], run), daemon=True)
        beat.start()
        status, result, error = job_queue.JobStatus.SUCCEEDED, None, None
        try:
            result = self._call(job, run)
        except JobCancelled:
            status = job_queue.JobStatus.CANCELLED
        except JobFailure as exc:
            status, error = job_queue.JobStatus.FAILED, (exc.code, str(exc))
        except Exception as exc:  # noqa: BLE001 - every failure becomes a code, the worker lives on
            err = domain_error(exc)
            status, error = job_queue.JobStatus.FAILED, (err.code, err.message)
        finally:
            run.done.set()
            beat.join()
        if run.lost:
            logger.warning("job %s was taken from %s (declared lost); dropping its outcome",
                           job["id"], self.ident)
            return
        if status is job_queue.JobStatus.CANCELLED:
            message = "cancelled"
        elif error is not None:
            message = f"failed: {error[0]}"
        else:
            message = "done"
        job_queue.finish_job(self.engine, job_id=job["id"], worker=self.ident, status=status,
                            result=result, error=error, message=message)

    def _call(self, job: dict[str, Any], run: _Run) -> dict[str, Any]:
        kind = get_job_kind(job["kind"])
        params = dict(job["params"])
        if kind.validate is not None:  # again at run time: roots or files may have changed
            params = kind.validate(params, list(self.settings.model_roots))
        if kind.needs_table:
            with Session(self.engine) as session:
                try:
                    params["table"] = repo.load_table(session, str(params["table_id"]))
                except ServiceError as exc:
                    raise JobFailure("table_not_found", exc.message) from None
        out = kind.run(params, run.report, run.cancel)
        if run.cancel.is_set():
            raise JobCancelled
        return self._persist(job, params, dict(out))

    def _persist(self, job: dict[str, Any], params: Mapping[str, Any], out: dict[str, Any]) -> dict[str, Any]:
        """Store tables and plans a job returned; results hold their ids."""
        stored: dict[str, Any] = {}
        for key, value in out.items():
            if isinstance(value, CostTable | SolveResult):
                # one session, and so one fresh transaction, per record: reading an id back after
                # a commit starts a deferred read transaction, and SQLite refuses to upgrade that
                # stale snapshot to a write once the heartbeat thread has committed in between
                with Session(self.engine) as session:
                    if is_sqlite(self.engine):
                        session.connection(execution_options={"sqlite_immediate": True})
                    stored.update(self._store_one(session, job, params, stored, key, value,
                                                  name=str(out.get("name") or key)))
            else:
                stored[key] = value
        result: dict[str, Any] = jsonable(stored)
        return result

    @staticmethod
    def _store_one(session: Session, job: Mapping[str, Any], params: Mapping[str, Any],
                   stored: Mapping[str, Any], key: str, value: CostTable | SolveResult,
                   *, name: str) -> dict[str, Any]:
        if isinstance(value, CostTable):
            rec, _ = repo.add_table(session, table=value, name=name)
            return {f"{key}_id": rec.id}
        ids: dict[str, Any] = {f"{key}_status": str(value.status)}
        table_id = params.get("table_id") or stored.get("table_id")
        if value.plan is not None and table_id:
            budget = Budget.from_dict(params.get("budget") or value.plan.budget)
            plan = repo.add_plan(session, table_id=str(table_id), result=value,
                                 budget=budget, job_id=job["id"])
            ids[f"{key}_id"] = plan.id
        return ids

    def _heartbeat(self, job_id: str, run: _Run) -> None:
        while not run.done.wait(self.settings.heartbeat_s):
            try:
                owned, cancel = job_queue.heartbeat(self.engine, job_id=job_id, worker=self.ident,
                                                   progress=run.progress, message=run.message)
            except Exception:  # a missed beat is not fatal; staleness needs several
                logger.exception("heartbeat for %s failed", job_id)
                continue
            if cancel:
                run.cancel.set()
            if not owned:
                run.lost = True
                run.cancel.set()


#: how often a worker started by ``serve`` checks that the server is still its parent
PARENT_POLL_S = 0.5


def _exit_with_parent(parent_pid: int, ident: str, stop: threading.Event) -> None:
    """Exit the process within ``PARENT_POLL_S`` of the parent's death, even mid-job.

    A kill -9 of the server gives the worker no signal; it is re-parented, which ``getppid``
    shows. The job's own thread may not look at its cancel flag for minutes (an estimation
    step), so the process ends here; the job's heartbeat stops and the next worker's reaper
    requeues it (or fails it ``worker_lost``), exactly as if the worker had died too.
    """
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != parent_pid:
            logger.warning("worker %s: parent %d is gone; exiting", ident, parent_pid)
            logging.shutdown()
            os._exit(3)


def run_worker_process(settings_json: str, parent_pid: int | None = None) -> None:
    """Entry point of a worker process (``multiprocessing`` spawn target, or ``serve --worker-only``)."""
    settings = Settings.model_validate_json(settings_json)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    def _stop(signum: int, _frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    worker = Worker(settings)
    migrate(worker.engine)
    worker.run_forever(stop, parent_pid=parent_pid)
