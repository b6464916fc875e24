"""The app factory: settings → engine + migrations → routers, limits and error handlers."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from allocator.core.errors import AllocatorError
from allocator.core.version import __version__
from allocator.service.deps import Db
from allocator.service.infra.auth import host_error, needs_token, token_error
from allocator.service.infra.config import Settings, ensure_token
from allocator.service.infra.errors import ServiceError, domain_error, error_body
from allocator.service.job_kinds import load_job_modules
from allocator.service.store.db import make_engine, migrate
from allocator.service.store.repo import TableCache

__all__ = ["create_app"]

logger = logging.getLogger("bitalloc.service")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 406: "not_acceptable", 413: "request_too_large",
               415: "unsupported_media_type"}


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length or while streaming."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            await self._refuse(send)
            return
        seen = 0
        exceeded = started = False

        async def counted() -> Message:
            nonlocal seen, exceeded
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.limit:
                exceeded = True
                raise _TooLarge
            return msg

        async def watch(msg: Message) -> None:
            # The app may turn _TooLarge into its own error (FastAPI's form parser answers
            # 400): whatever it says after the limit was hit, the client gets the 413.
            nonlocal started
            if exceeded:
                if msg["type"] == "http.response.start" and not started:
                    started = True
                    await self._refuse(send)
                return
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, watch)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        await _send_error(send, ServiceError(
            413, "request_too_large", f"request body exceeds {self.limit} bytes (BITALLOC_MAX_BODY_BYTES)"))


async def _send_error(send: Send, err: ServiceError) -> None:
    """An error response from ASGI middleware (the same JSON body as the exception handlers)."""
    body = json.dumps(error_body(err.code, err.message, err.detail)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Host allow-list and token check on the headers alone, before the body is read.

    A tokenless upload is refused without reading a byte of it, and a DNS-rebinding page (a
    foreign ``Host``) never reaches the tokenless loopback reads. Off loopback this also covers
    ``/docs`` and ``/openapi.json``, which have no route dependencies.
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        err = host_error(self.settings, headers.get("host"))
        if err is None and needs_token(self.settings, scope.get("method", "GET")):
            err = token_error(self.settings, headers)
        if err is None:
            await self.app(scope, receive, send)
        elif scope["type"] == "http":
            await _send_error(send, err)
        else:
            await send({"type": "websocket.close", "code": 1008})


class CatchAll:
    """Turn any exception that escaped the handlers into the JSON 500 and *return*.

    Starlette's ServerErrorMiddleware re-raises after answering, and uvicorn then closes the
    keep-alive connection, so a client's next request on it fails with a read error.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:  # half a response is out: only closing the connection can end it
                raise
            await _send_error(send, domain_error(exc))  # logs the traceback, sends no detail


def _json_error(err: ServiceError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
    return JSONResponse(error_body(err.code, err.message, err.detail), status_code=err.status,
                        headers=headers)


def _install_handlers(app: FastAPI) -> None:
    """The ONE mapping from exceptions to JSON error bodies (see core/errors.py)."""

    @app.exception_handler(ServiceError)
    async def _service(_r: Request, exc: ServiceError) -> JSONResponse:
        return _json_error(exc)

    @app.exception_handler(AllocatorError)
    async def _domain(_r: Request, exc: AllocatorError) -> JSONResponse:
        return _json_error(domain_error(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [{"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")),
                   "type": str(e.get("type", ""))}
                  for e in exc.errors()]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first["loc"])
        return _json_error(ServiceError(422, "validation_error", f"{where}: {first['msg']}", errors))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
        return _json_error(ServiceError(exc.status_code, code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def _crash(_r: Request, exc: Exception) -> JSONResponse:
        return _json_error(domain_error(exc))


def create_app(settings: Settings | None = None, **overrides: Any) -> FastAPI:
    """Build the app; migrates the database to the newest schema first.

    ``overrides`` are Settings fields (``create_app(db_url="sqlite:///x.db", token=...)``).
    """
    from allocator.service.api.main import api_router

    settings = ensure_token(settings if settings is not None else Settings(**overrides))
    engine = make_engine(settings.db_url)
    migrate(engine)
    load_job_modules(settings.job_modules)
    app = FastAPI(
        title="bitalloc", version=__version__,
        description="Mixed-precision bit allocation: cost tables, plans, frontiers, exports, jobs.",
    )
    app.state.settings = settings
    app.state.db = Db(engine, TableCache(settings.table_cache))
    _install_handlers(app)
    app.include_router(api_router, prefix="/v1")
    # Outermost last: CatchAll → Guard (host, token) → BodyLimit → routes.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.add_middleware(Guard, settings=settings)
    app.add_middleware(CatchAll)
    return app
