"""Behaviour only a real server shows: keep-alive after a 500, the 401 before the body arrives,
and the client's one retry of idempotent requests on a dropped connection."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest

from allocator.service.client import Client, ServiceClientError
from tests.service.conftest import TOKEN


@pytest.fixture
def live(app) -> Iterator[int]:  # type: ignore[no-untyped-def]
    """The app under uvicorn on a free loopback port, in a thread; yields the port."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical",
                                           lifespan="off", http="h11"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise AssertionError("uvicorn did not start")
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


def _response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response (head + Content-Length body) from ``sock``; b"" if it closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body


def _explode(monkeypatch: pytest.MonkeyPatch) -> None:
    from allocator.service.api.routes import meta

    def explode() -> list[object]:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(meta, "_solvers", explode)


def test_a_500_keeps_the_connection_alive(live, monkeypatch):  # type: ignore[no-untyped-def]
    _explode(monkeypatch)
    with socket.create_connection(("127.0.0.1", live), timeout=10) as sock:
        sock.sendall(b"GET /v1/solvers HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = _response(sock)
        assert first.startswith(b"HTTP/1.1 500") and b'"internal_error"' in first, first
        assert b"secret" not in first
        sock.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        second = _response(sock)  # b"" before the fix: uvicorn closed the connection
        assert second.startswith(b"HTTP/1.1 200"), second


def test_client_survives_an_internal_error(live, monkeypatch, table):  # type: ignore[no-untyped-def]
    _explode(monkeypatch)
    api = Client(f"http://127.0.0.1:{live}", token=TOKEN, timeout=10)
    try:
        for _ in range(3):
            with pytest.raises(ServiceClientError) as info:
                api._json("GET", "/solvers")
            assert info.value.code == "internal_error"
            assert api.health()["status"] == "ok"
            assert api.upload_table(table)["n_rows"] == len(table)
    finally:
        api.close()


def test_tokenless_upload_gets_401_before_its_body(live):  # type: ignore[no-untyped-def]
    # Content-Length under the body limit and no body sent: a server that reads the body
    # first would wait here until the timeout.
    with socket.create_connection(("127.0.0.1", live), timeout=5) as sock:
        sock.sendall(b"POST /v1/tables HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     b"Content-Type: multipart/form-data; boundary=xyz\r\n"
                     b"Content-Length: 1500000\r\n\r\n")
        t0 = time.monotonic()
        reply = _response(sock)
        assert reply.startswith(b"HTTP/1.1 401") and b'"unauthorized"' in reply, reply
        assert time.monotonic() - t0 < 4


def test_a_client_uploading_without_token_reads_the_401(live):  # type: ignore[no-untyped-def]
    # the server answers while the client is still sending; httpx then reads the 401
    with httpx.Client(base_url=f"http://127.0.0.1:{live}") as http:
        for _ in range(3):
            r = http.post("/v1/tables", files={"file": ("t.csv", b"x" * 1_900_000)})
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            assert http.get("/v1/health").status_code == 200


def _flaky(fail: type[httpx.TransportError], calls: list[str]) -> httpx.Client:
    """A transport that drops the first request's connection, then answers."""

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        if len(calls) == 1:
            raise fail("connection dropped", request=request)
        return httpx.Response(200, json={"status": "ok"})

    return httpx.Client(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(handler))


@pytest.mark.parametrize("fail", [httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError])
def test_client_retries_idempotent_requests_once(fail):  # type: ignore[no-untyped-def]
    calls: list[str] = []
    assert Client(token=TOKEN, http=_flaky(fail, calls)).health() == {"status": "ok"}
    assert calls == ["GET", "GET"]
    calls.clear()
    Client(token=TOKEN, http=_flaky(fail, calls)).delete_plan("p")
    assert calls == ["DELETE", "DELETE"]


def test_client_does_not_resend_posts(table):  # type: ignore[no-untyped-def]
    calls: list[str] = []
    with pytest.raises(httpx.ReadError):
        Client(token=TOKEN, http=_flaky(httpx.ReadError, calls)).plan("t", bpw=3.0)
    assert calls == ["POST"]


def test_client_retries_only_once():  # type: ignore[no-untyped-def]
    calls: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request.method)
        raise httpx.ReadError("down", request=request)

    http = httpx.Client(base_url="http://127.0.0.1:1", transport=httpx.MockTransport(handler))
    with pytest.raises(httpx.ReadError):
        Client(token=TOKEN, http=http).health()
    assert calls == ["GET", "GET"]
