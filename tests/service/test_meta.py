"""Health, version, docs, settings that fail fast, off-loopback auth, and the error contract."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from allocator.service.infra.config import Settings, ensure_token, token_file
from tests.service.conftest import AUTH, BASE, TOKEN


def test_health_and_version(anon):  # type: ignore[no-untyped-def]
    h = anon.get("/v1/health").json()
    assert h == {"status": "ok", "database": "ok", "queued_jobs": 0, "running_jobs": 0}
    v = anon.get("/v1/version").json()
    from allocator import __version__

    assert v["version"] == __version__ and v["api"] == "v1"
    assert v["solvers"][0]["name"] == "mckp" and v["solvers"][0]["exact"] is True
    assert {"estimate", "search", "sleep"} <= set(v["job_kinds"])
    assert anon.get("/v1/solvers").json() == v["solvers"]


def test_openapi_and_docs(anon):  # type: ignore[no-untyped-def]
    spec = anon.get("/openapi.json").json()
    assert "/v1/plans" in spec["paths"] and "/v1/jobs/{job_id}/cancel" in spec["paths"]
    assert "HTTPBearer" in spec["components"]["securitySchemes"]
    assert anon.get("/docs").status_code == 200


def test_unknown_route_and_method_are_json(anon, client):  # type: ignore[no-untyped-def]
    r = anon.get("/v1/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = client.put("/v1/tables")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"
    # any method but GET/HEAD/OPTIONS is a write: the token is checked before routing
    assert anon.put("/v1/tables").json()["error"]["code"] == "unauthorized"


def test_internal_errors_have_no_traceback(app, monkeypatch):  # type: ignore[no-untyped-def]
    from allocator.service.api.routes import meta

    def explode() -> list[object]:
        raise RuntimeError("secret detail /home/user/.ssh")

    monkeypatch.setattr(meta, "_solvers", explode)
    r = TestClient(app, raise_server_exceptions=False, base_url=BASE).get("/v1/solvers")
    assert r.status_code == 500
    assert r.json() == {"error": {"code": "internal_error",
                                  "message": "internal server error; see the server log"}}
    assert "secret" not in r.text and "Traceback" not in r.text


@pytest.mark.parametrize("kw, needle", [
    ({"host": "0.0.0.0"}, "BITALLOC_TOKEN"),
    ({"token": "short"}, "at least 16"),
    ({"db_url": "mysql://x"}, "not supported"),
    ({"model_roots": ["/definitely/not/here"]}, "not a directory"),
    ({"heartbeat_s": 5, "stale_after_s": 6}, "must exceed"),
    ({"port": 70000}, "less than or equal"),
])
def test_settings_fail_fast(kw, needle, tmp_path):  # type: ignore[no-untyped-def]
    with pytest.raises(ValidationError, match=needle):
        Settings(db_url=f"sqlite:///{tmp_path}/x.db", **kw) if "db_url" not in kw else Settings(**kw)


def test_settings_from_environment(monkeypatch, tmp_path):  # type: ignore[no-untyped-def]
    monkeypatch.setenv("BITALLOC_DB_URL", f"sqlite:///{tmp_path}/env.db")
    monkeypatch.setenv("BITALLOC_MODEL_ROOTS", f'["{tmp_path}"]')
    s = Settings()
    assert s.db_url.endswith("env.db") and s.model_roots == [tmp_path.resolve()]


def test_generated_token_file_is_private_and_stable(tmp_path):  # type: ignore[no-untyped-def]
    s = Settings(db_url=f"sqlite:///{tmp_path}/svc.db")
    a, b = ensure_token(s), ensure_token(s)
    assert a.token and a.token == b.token and len(a.token) >= 32
    assert token_file(s) == tmp_path / "svc.token"
    assert oct(token_file(s).stat().st_mode & 0o777) == "0o600"


def test_off_loopback_every_request_needs_the_token(tmp_path):  # type: ignore[no-untyped-def]
    from allocator.service import create_app

    app = create_app(Settings(db_url=f"sqlite:///{tmp_path}/x.db", host="0.0.0.0", token=TOKEN))
    r = TestClient(app).get("/v1/tables")
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
    assert TestClient(app, headers=AUTH).get("/v1/tables").status_code == 200


def test_serve_refuses_an_open_bind_without_token(capsys):  # type: ignore[no-untyped-def]
    from allocator.cli import main

    assert main(["serve", "--host", "0.0.0.0", "--db", "sqlite:///:memory:"]) == 2
    assert "BITALLOC_TOKEN" in capsys.readouterr().err
