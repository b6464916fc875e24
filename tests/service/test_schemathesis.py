"""Property-based API fuzzing from the OpenAPI spec: no input may produce a server error."""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402

from allocator.service.infra.config import Settings  # noqa: E402
from tests.service.conftest import AUTH, TOKEN  # noqa: E402


def _app(tmp: Path):  # type: ignore[no-untyped-def]
    from allocator.service import create_app

    root = tmp / "models"
    root.mkdir(parents=True, exist_ok=True)
    return create_app(Settings(db_url=f"sqlite:///{tmp / 'fuzz.db'}", token=TOKEN, model_roots=[root],
                               job_modules=["bitalloc_test_jobkinds"],
                               trusted_hosts=["testserver"]))  # schemathesis's ASGI Host


_TMP = Path(__import__("tempfile").mkdtemp(prefix="bitalloc-fuzz-"))
schema = schemathesis.openapi.from_asgi("/openapi.json", _app(_TMP))


@schema.parametrize()
@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):  # type: ignore[no-untyped-def]
    from schemathesis.checks import not_a_server_error

    response = case.call(headers=AUTH)
    case.validate_response(response, checks=[not_a_server_error])
    if response.status_code >= 400:  # every error has the stable JSON body
        body = response.json()
        assert set(body) == {"error"} and isinstance(body["error"]["code"], str), body
