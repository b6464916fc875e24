"""Health, version and solver listing."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import func, select, text

from allocator.core.version import __version__
from allocator.service.api.routes import errors
from allocator.service.deps import DbDep, ReadAuth
from allocator.service.job_kinds import JOB_KINDS
from allocator.service.schemas import HealthPublic, SolverInfoPublic, VersionPublic
from allocator.service.store.models import JobRecord

router = APIRouter(tags=["meta"], dependencies=[ReadAuth], responses=errors(401))

API_VERSION = "v1"


@router.get("/health", response_model=HealthPublic)
def health(db: DbDep) -> HealthPublic:
    """Liveness plus a database round trip and the queue depth."""
    with db.read() as s:
        s.execute(text("SELECT 1"))
        counts = dict(s.execute(select(JobRecord.status, func.count()).group_by(JobRecord.status)).all())
    return HealthPublic(status="ok", database="ok", queued_jobs=counts.get("queued", 0),
                        running_jobs=counts.get("running", 0))


def _solvers() -> list[SolverInfoPublic]:
    import solvers

    out = []
    for name in solvers.SOLVERS:
        try:
            cls = solvers.solver_class(name)
        except ImportError:  # a registered solver whose module is not built yet
            continue
        out.append(SolverInfoPublic(name=name, available=cls.is_available(),
                                    exact=bool(cls.capabilities.exact)))
    return out


def _export_targets() -> list[str]:
    try:
        from allocator.export import EXPORTERS
    except ImportError:
        return []
    return list(EXPORTERS)


@router.get("/version", response_model=VersionPublic)
def version() -> VersionPublic:
    """Library and API versions, solvers, job kinds and export targets of this server."""
    return VersionPublic(version=__version__, api=API_VERSION, solvers=_solvers(),
                         job_kinds=sorted(JOB_KINDS), export_targets=_export_targets())


@router.get("/solvers", response_model=list[SolverInfoPublic])
def list_solvers() -> list[SolverInfoPublic]:
    """Registered solvers in preference order (the first is the default)."""
    return _solvers()
