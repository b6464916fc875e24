"""All routers; ``create_app`` mounts this under ``/v1``."""

from __future__ import annotations

from fastapi import APIRouter

from allocator.service.api.routes import jobs, meta, plans, tables

__all__ = ["api_router"]

api_router = APIRouter()
api_router.include_router(meta.router)
api_router.include_router(tables.router)
api_router.include_router(plans.router)
api_router.include_router(jobs.router)
