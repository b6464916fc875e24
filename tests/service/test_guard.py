"""The Guard middleware: Host allow-list (DNS rebinding), token before the body, docs off
loopback, and the catch-all that keeps every error JSON."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from allocator.service.infra.config import Settings
from tests.service.conftest import AUTH, BASE, TOKEN


def _app(tmp_path: Path, **kw: object):  # type: ignore[no-untyped-def]
    from allocator.service import create_app

    return create_app(Settings(db_url=f"sqlite:///{tmp_path}/g.db", token=TOKEN, **kw))  # type: ignore[arg-type]


@pytest.mark.parametrize("base", ["http://evil.example", "http://evil.example:8765",
                                  "http://127.0.0.1.nip.io:8765", "http://testserver"])
def test_foreign_host_is_refused_on_loopback(tmp_path, base):  # type: ignore[no-untyped-def]
    app = _app(tmp_path)
    for path in ("/v1/tables", "/v1/plans", "/v1/health", "/openapi.json"):
        r = TestClient(app, base_url=base).get(path)
        assert r.status_code == 400, (base, path, r.text)
        assert r.json()["error"]["code"] == "host_not_allowed"
        assert "BITALLOC_TRUSTED_HOSTS" in r.json()["error"]["message"]


@pytest.mark.parametrize("base", ["http://localhost", "http://localhost:8765", "http://127.0.0.1:8765",
                                  "http://[::1]:8765", "http://LOCALHOST."])
def test_loopback_names_are_served(tmp_path, base):  # type: ignore[no-untyped-def]
    assert TestClient(_app(tmp_path), base_url=base).get("/v1/tables").status_code == 200


def test_the_bound_host_and_configured_hosts(tmp_path):  # type: ignore[no-untyped-def]
    app = _app(tmp_path, host="10.1.2.3")
    assert TestClient(app, base_url="http://10.1.2.3:8765", headers=AUTH).get("/v1/tables").status_code == 200
    assert TestClient(app, base_url="http://gpu-box:8765", headers=AUTH).get("/v1/tables").status_code == 400
    app = _app(tmp_path, host="10.1.2.3", trusted_hosts=["gpu-box", "*.corp.example"])
    for base, code in (("http://gpu-box:8765", 200), ("http://a.corp.example", 200),
                       ("http://corp.example", 400), ("http://10.1.2.3", 400)):
        assert TestClient(app, base_url=base, headers=AUTH).get("/v1/tables").status_code == code, base
    # a wildcard bind serves any name (every request needs the token there)
    anyhost = _app(tmp_path, host="0.0.0.0")
    assert TestClient(anyhost, base_url="http://whatever", headers=AUTH).get("/v1/tables").status_code == 200
    star = _app(tmp_path, trusted_hosts=["*"])
    assert TestClient(star, base_url="http://whatever").get("/v1/tables").status_code == 200


@pytest.mark.parametrize("hosts", [["a/b"], [""], ["*foo.com"], ["user@host"], ["gpu-box:8765"]])
def test_bad_trusted_hosts_fail_fast(tmp_path, hosts):  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match="trusted host"):
        Settings(db_url=f"sqlite:///{tmp_path}/x.db", trusted_hosts=hosts)


def test_trusted_hosts_from_environment(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BITALLOC_TRUSTED_HOSTS", '["Box.Example", "localhost"]')
    s = Settings(db_url=f"sqlite:///{tmp_path}/x.db")
    assert s.allowed_hosts == frozenset({"box.example", "localhost"})
    v6 = Settings(db_url=f"sqlite:///{tmp_path}/x.db", trusted_hosts=["[::1]", "fe80::2"])
    assert v6.allowed_hosts == frozenset({"::1", "fe80::2"})


def test_off_loopback_docs_and_spec_need_the_token(tmp_path):  # type: ignore[no-untyped-def]
    app = _app(tmp_path, host="0.0.0.0")
    anon, auth = TestClient(app), TestClient(app, headers=AUTH)
    for path in ("/docs", "/openapi.json", "/redoc", "/docs/oauth2-redirect"):
        r = anon.get(path)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", path
        assert r.headers["www-authenticate"] == "Bearer"
    assert auth.get("/openapi.json").json()["info"]["title"] == "bitalloc"
    assert auth.get("/docs").status_code == 200
    wrong = TestClient(app, headers={"Authorization": "Bearer wrong-token-wrong-token"})
    assert wrong.get("/openapi.json").status_code == 401
    assert TestClient(app, headers={"X-Bitalloc-Token": TOKEN}).get("/openapi.json").status_code == 200


def test_on_loopback_docs_stay_open(anon):  # type: ignore[no-untyped-def]
    assert anon.get("/openapi.json").status_code == 200 and anon.get("/docs").status_code == 200


def test_tokenless_write_is_refused_before_the_body_is_read(anon, client, table):  # type: ignore[no-untyped-def]
    from allocator.service.parquet import table_to_parquet

    pulled: list[int] = []

    def body() -> Iterator[bytes]:
        pulled.append(1)
        yield b"x" * 1024

    r = anon.post("/v1/tables", content=body(),
                  headers={"Content-Type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert pulled == []  # the server answered without reading a byte
    bad = {"Authorization": "Bearer wrong-token-wrong-token",
           "Content-Type": "multipart/form-data; boundary=xyz"}
    assert anon.post("/v1/tables", content=body(), headers=bad).status_code == 401 and pulled == []
    # the same upload with the token goes through
    ok = client.post("/v1/tables", files={"file": ("t.parquet", table_to_parquet(table))})
    assert ok.status_code == 201


def test_unhandled_error_is_json_and_not_reraised(app, monkeypatch):  # type: ignore[no-untyped-def]
    from allocator.service.api.routes import meta

    def explode() -> list[object]:
        raise RuntimeError("secret detail")

    monkeypatch.setattr(meta, "_solvers", explode)
    # raise_server_exceptions=True (the default) re-raises whatever reaches the server: the
    # catch-all must answer and return, or uvicorn drops the keep-alive connection.
    r = TestClient(app, base_url=BASE).get("/v1/solvers")
    assert r.status_code == 500 and r.json()["error"]["code"] == "internal_error"
    assert "secret" not in r.text
