"""Stable error codes and the ONE place where exceptions become HTTP responses.

Every error body is ``{"error": {"code": "...", "message": "...", "detail": ...}}``. Codes are
part of the API (clients branch on them); messages are one line and never hold a traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from allocator.core.errors import (
    AllocatorError,
    EstimatorUnavailableError,
    ExportError,
    InvalidBudgetError,
    InvalidCostTableError,
    InvalidParameterError,
    InvalidPlanError,
    SolverUnavailableError,
    UnknownNameError,
)

__all__ = ["ServiceError", "domain_error", "error_body"]

logger = logging.getLogger("bitalloc.service")


class ServiceError(Exception):
    """An error the service raises on purpose: HTTP status + stable code + one-line message."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.detail = detail


def not_found(kind: str, ident: str) -> ServiceError:
    return ServiceError(404, f"{kind}_not_found", f"no {kind} with id {ident!r}")


def error_body(code: str, message: str, detail: Any = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if detail is not None:
        err["detail"] = detail
    return {"error": err}


#: domain exception → (HTTP status, code); the first matching class wins (most specific first).
_DOMAIN: tuple[tuple[type[BaseException], int, str], ...] = (
    (UnknownNameError, 422, "unknown_name"),
    (InvalidCostTableError, 422, "invalid_cost_table"),
    (InvalidBudgetError, 422, "invalid_budget"),
    (InvalidPlanError, 422, "invalid_plan"),
    (ExportError, 422, "export_failed"),
    (InvalidParameterError, 422, "invalid_parameter"),
    (SolverUnavailableError, 501, "solver_unavailable"),
    (EstimatorUnavailableError, 501, "estimator_unavailable"),
)


def domain_error(exc: BaseException) -> ServiceError:
    """Map any exception to a :class:`ServiceError`; unknown ones become a 500 without detail."""
    if isinstance(exc, ServiceError):
        return exc
    for cls, status, code in _DOMAIN:
        if isinstance(exc, cls):
            return ServiceError(status, code, str(exc))
    if isinstance(exc, AllocatorError):
        logger.warning("allocator error: %s", exc)
        return ServiceError(500, "allocator_error", str(exc))
    # Log the traceback here, never send it: the message is generic on purpose.
    logger.error("internal error", exc_info=exc)
    return ServiceError(500, "internal_error", "internal server error; see the server log")
