"""The bitalloc HTTP service (FastAPI): tables, plans, frontiers, exports and background jobs.

``create_app(settings)`` builds the app (:mod:`allocator.service.main`); ``bitalloc serve`` runs
it under uvicorn with worker processes (:mod:`allocator.service.worker`). Importing this package
imports neither FastAPI nor SQLAlchemy; user documentation is ``docs/service.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from allocator.service.infra.config import Settings

__all__ = ["create_app"]


def create_app(settings: Settings | None = None, **overrides: Any) -> FastAPI:
    """The FastAPI app (see :func:`allocator.service.main.create_app`)."""
    from allocator.service.main import create_app as _create

    return _create(settings, **overrides)
