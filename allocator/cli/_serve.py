"""``bitalloc serve``: the HTTP service (uvicorn) plus job worker processes."""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
from typing import Any

HELP = "run the HTTP service (FastAPI on uvicorn) and its job workers"

logger = logging.getLogger("bitalloc.service")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", help="bind address (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, help="port (default 8765)")
    p.add_argument("--db", dest="db_url", help="database URL: sqlite:///file.db (default "
                   "~/.local/share/bitalloc/service.db) or postgresql://user@host/db")
    p.add_argument("--token", help="bearer token for writes (default: BITALLOC_TOKEN, else one "
                   "generated into a 0600 file next to the database)")
    p.add_argument("--workers", type=int, help="job worker processes to start (default 1; 0: none)")
    p.add_argument("--model-root", dest="model_roots", action="append", metavar="DIR",
                   help="directory estimate jobs may read models from (repeatable)")
    p.add_argument("--job-module", dest="job_modules", action="append", metavar="MODULE",
                   help="import MODULE to register extra job kinds (repeatable)")
    p.add_argument("--stale-after", dest="stale_after_s", type=float,
                   help="seconds without a heartbeat before a job's worker is declared lost")
    p.add_argument("--heartbeat", dest="heartbeat_s", type=float, help="heartbeat period in seconds")
    p.add_argument("--worker-only", action="store_true",
                   help="run only job workers (e.g. on another machine sharing a PostgreSQL URL)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def settings_from_args(args: argparse.Namespace) -> Any:
    """Settings from flags over ``BITALLOC_*`` variables; invalid ones fail before anything starts."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from allocator.core.errors import InvalidParameterError
    from allocator.service.infra.config import Settings, ensure_token

    keys = ("host", "port", "db_url", "token", "workers", "model_roots", "job_modules",
            "stale_after_s", "heartbeat_s")
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    try:
        return ensure_token(Settings(**given))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "settings"
        raise InvalidParameterError(f"{where}: {first['msg']}") from None
    except SettingsError as exc:  # a BITALLOC_* variable that is not even parseable
        raise InvalidParameterError(_settings_error(str(exc))) from None


def _settings_error(message: str) -> str:
    """pydantic-settings says 'error parsing value for field "x" ...': name the variable."""
    import re

    m = re.search(r'field "(\w+)"', message)
    if m is None:
        return f"settings: {message}"
    var = f"BITALLOC_{m[1].upper()}"
    return (f"environment variable {var} cannot be parsed ({message}); list and object "
            f"settings take JSON, e.g. {var}='[\"/models\"]', or unset it")


def _start_workers(settings: Any, n: int) -> list[Any]:
    from allocator.service.worker import run_worker_process

    ctx = mp.get_context("spawn")  # torch (estimate jobs) and fork do not mix
    procs = [ctx.Process(target=run_worker_process, args=(settings.model_dump_json(), os.getpid()),
                         name=f"bitalloc-worker-{i}") for i in range(n)]
    for proc in procs:
        proc.start()
    return procs


def _stop_workers(procs: list[Any]) -> None:
    for proc in procs:
        proc.terminate()  # SIGTERM: the worker finishes its poll and exits
    for proc in procs:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def run(args: argparse.Namespace) -> int:
    from allocator.service.store.db import make_engine, migrate

    settings = settings_from_args(args)
    migrate(make_engine(settings.db_url, pool_size=1))  # once, before workers race to do it
    if args.worker_only:
        from allocator.service.worker import run_worker_process

        if settings.workers <= 1:
            run_worker_process(settings.model_dump_json())
            return 0
        procs = _start_workers(settings, settings.workers)
        try:
            for proc in procs:
                proc.join()
        finally:
            _stop_workers(procs)
        return 0
    import uvicorn

    from allocator.service.infra.config import token_file
    from allocator.service.main import create_app

    app = create_app(settings)
    logger.warning("bitalloc serve on http://%s:%d/v1 (docs /docs); token in %s",
                   settings.host, settings.port,
                   "BITALLOC_TOKEN/--token" if args.token or _env_token() else token_file(settings))
    procs = _start_workers(settings, settings.workers)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                    timeout_graceful_shutdown=5)
    finally:
        _stop_workers(procs)
    return 0


def _env_token() -> bool:
    import os

    return bool(os.environ.get("BITALLOC_TOKEN"))
