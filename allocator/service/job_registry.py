"""The job-kind registry: a name → :class:`JobKind` (``run(params, progress, cancel) -> result``
and an optional ``validate``), and the two exceptions a run callable raises.

The built-in kinds register themselves in :mod:`allocator.service.job_kinds`, which re-exports
this API; plug-ins and tests register more with :func:`register_job_kind` from a module named in
``BITALLOC_JOB_MODULES``.

A run callable may put a :class:`~allocator.core.table.CostTable` or a
:class:`~allocator.core.result.SolveResult` in its result dict: the worker stores it and replaces it
by ``<key>_id`` (a table id / plan id), so results stay JSON.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from allocator.core.errors import InvalidParameterError
from allocator.service.infra.errors import ServiceError

__all__ = ["JOB_KINDS", "JobCancelled", "JobFailure", "JobKind", "Progress", "RunFn", "ValidateFn",
           "get_job_kind", "load_job_modules", "register_job_kind"]

#: progress(fraction in [0, 1], message)
Progress = Callable[[float, str], None]
RunFn = Callable[[Mapping[str, Any], Progress, threading.Event], Mapping[str, Any]]
#: validate(params, model_roots) -> normalised params; raises ServiceError / InvalidParameterError
ValidateFn = Callable[[Mapping[str, Any], list[Path]], dict[str, Any]]


class JobCancelled(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a run callable (or its progress hook) when the cancel flag is set."""


class JobFailure(Exception):
    """A job failed for a reason with a stable code (shown to clients)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class JobKind:
    name: str
    run: RunFn
    validate: ValidateFn | None = None
    #: the worker loads ``params["table_id"]`` into ``params["table"]`` before ``run``
    needs_table: bool = False


JOB_KINDS: dict[str, JobKind] = {}


def register_job_kind(kind: JobKind, *, replace: bool = False) -> JobKind:
    """Add ``kind`` to :data:`JOB_KINDS` (duplicate names raise unless ``replace``)."""
    if kind.name in JOB_KINDS and not replace:
        raise InvalidParameterError(f"job kind {kind.name!r} is already registered; pick another name")
    JOB_KINDS[kind.name] = kind
    return kind


def get_job_kind(name: str) -> JobKind:
    if name not in JOB_KINDS:
        raise ServiceError(422, "unknown_job_kind",
                           f"unknown job kind {name!r}; choose one of {sorted(JOB_KINDS)}")
    return JOB_KINDS[name]


def load_job_modules(modules: list[str]) -> None:
    """Import plug-in modules that call :func:`register_job_kind` (idempotent)."""
    for name in modules:
        importlib.import_module(name)
