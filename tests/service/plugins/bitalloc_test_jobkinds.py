"""Job kinds used only by the service tests (loaded through ``job_modules``).

``sleep`` sleeps in steps, reporting progress and honouring cancel; it appends one line per
attempt to ``params["log"]`` so tests can count retries across processes. ``fail`` raises a
JobFailure with a chosen code; ``boom`` raises a plain exception (an internal error).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from allocator.service.job_kinds import JOB_KINDS, JobFailure, JobKind, Progress, register_job_kind


def _sleep(params: Mapping[str, Any], progress: Progress, cancel: threading.Event) -> dict[str, Any]:
    steps = int(params.get("steps", 10))
    seconds = float(params.get("seconds", 0.1))
    if params.get("log"):
        with open(params["log"], "a") as fh:
            fh.write(f"{os.getpid()}\n")
    for i in range(steps):
        if cancel.is_set():
            from allocator.service.job_kinds import JobCancelled

            raise JobCancelled
        time.sleep(seconds / steps)
        progress((i + 1) / steps, f"step {i + 1}/{steps}")
    return {"slept": seconds, "pid": os.getpid(), "value": float("nan")}


def _fail(params: Mapping[str, Any], progress: Progress, cancel: threading.Event) -> dict[str, Any]:
    raise JobFailure(str(params.get("code", "test_failure")), "failed on purpose")


def _boom(params: Mapping[str, Any], progress: Progress, cancel: threading.Event) -> dict[str, Any]:
    raise RuntimeError("secret internal detail /etc/passwd")


for _kind in (JobKind("sleep", _sleep), JobKind("fail", _fail), JobKind("boom", _boom)):
    if _kind.name not in JOB_KINDS:
        register_job_kind(_kind)
