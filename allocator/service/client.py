"""A small Python client for the bitalloc service, for notebooks and pipelines.

Example (against a running ``bitalloc serve``)::

    from allocator.service.client import Client
    c = Client()                                   # http://127.0.0.1:8765, token from the env/file
    t = c.upload_table("costs.parquet")
    p = c.plan(t["id"], bpw=3.0)                   # synchronous solve → stored plan
    plan = c.bitplan(p)                            # allocator.core.plan.BitPlan
    job = c.wait(c.search(t["id"], bpw=3.0, n_trials=200)["id"])

Errors come back as :class:`ServiceClientError` with the server's stable ``code``. Idempotent
requests (GET, HEAD, PUT, DELETE) are sent once more when a keep-alive connection was dropped
under them; a POST never is (it may have run).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from allocator.core.errors import AllocatorError
from allocator.core.plan import BitPlan
from allocator.core.table import CostTable
from allocator.service.parquet import table_from_parquet, table_to_parquet

if TYPE_CHECKING:
    import httpx

    from allocator.core.budget import Budget
    from allocator.core.plan import BitPlan
    from allocator.core.table import CostTable

__all__ = ["Client", "ServiceClientError"]

DEFAULT_URL = "http://127.0.0.1:8765"
_FINISHED = ("succeeded", "failed", "cancelled")
_IDEMPOTENT = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})


class ServiceClientError(AllocatorError):
    """The service answered with an error body (``status``, stable ``code``, one-line message)."""

    def __init__(self, status: int, code: str, message: str, detail: Any = None) -> None:
        super().__init__(f"{code} ({status}): {message}")
        self.status, self.code, self.message, self.detail = status, code, message, detail


def _default_token() -> str | None:
    if os.environ.get("BITALLOC_TOKEN"):
        return os.environ["BITALLOC_TOKEN"]
    from allocator.service.infra.config import default_db_url

    path = Path(default_db_url().removeprefix("sqlite:///")).with_suffix(".token")
    return path.read_text().strip() if path.is_file() else None


class Client:
    """Thin, typed wrapper over ``/v1``; returns the JSON documents of the API as dicts.

    Args:
        url: server root (``BITALLOC_URL`` or http://127.0.0.1:8765).
        token: write token (``BITALLOC_TOKEN``, else the default server's token file).
        timeout: seconds per request.
        http: an existing ``httpx.Client`` (e.g. FastAPI's ``TestClient``) to send through.
    """

    def __init__(self, url: str | None = None, *, token: str | None = None, timeout: float = 60.0,
                 http: httpx.Client | None = None) -> None:
        import httpx

        self.url = (url or os.environ.get("BITALLOC_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else _default_token()
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        if http is not None:
            http.headers.update(headers)
            self._http = http
        else:
            self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)
        self._prefix = "/v1"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ plumbing
    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        import httpx

        try:
            r = self._http.request(method, self._prefix + path, **kw)
        except (httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError):
            # A keep-alive connection the server (or a proxy) closed under us: the request may
            # or may not have run, so only idempotent ones are sent again, once, on a new one.
            if method.upper() not in _IDEMPOTENT:
                raise
            r = self._http.request(method, self._prefix + path, **kw)
        if r.status_code >= 400:
            try:
                err = r.json()["error"]
                raise ServiceClientError(r.status_code, err["code"], err["message"], err.get("detail"))
            except (ValueError, KeyError, TypeError):
                raise ServiceClientError(r.status_code, f"http_{r.status_code}", r.text[:200]) from None
        return r

    def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = self._request(method, path, **kw)
        return r.json() if r.content else None

    # ------------------------------------------------------------ meta
    def health(self) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", "/health")
        return out

    def version(self) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", "/version")
        return out

    # ------------------------------------------------------------ tables
    def upload_table(self, table: CostTable | str | Path, *, name: str | None = None,
                     metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Upload a table object or file (.parquet/.csv/.json); identical tables deduplicate."""
        import json

        if isinstance(table, CostTable):
            content, filename = table_to_parquet(table), f"{name or 'table'}.parquet"
        else:
            p = Path(table)
            content, filename = p.read_bytes(), p.name
        data: dict[str, str] = {}
        if name:
            data["name"] = name
        if metadata:
            data["metadata"] = json.dumps(dict(metadata), default=str)
        out: dict[str, Any] = self._json("POST", "/tables", files={"file": (filename, content)}, data=data)
        return out

    def tables(self, *, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", "/tables", params={"limit": limit, "offset": offset})
        return out

    def table(self, table_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", f"/tables/{table_id}")
        return out

    def download_table(self, table_id: str) -> CostTable:
        r = self._request("GET", f"/tables/{table_id}/data", params={"format": "parquet"})
        return table_from_parquet(r.content)

    def delete_table(self, table_id: str) -> None:
        self._request("DELETE", f"/tables/{table_id}")

    # ------------------------------------------------------------ plans
    def plan(self, table_id: str, budget: Budget | Mapping[str, Any] | None = None, *,
             bpw: float | None = None, solver: str = "mckp", seed: int | None = None,
             store: bool = True) -> dict[str, Any]:
        """Solve synchronously; pass a Budget / budget dict, or ``bpw=`` for the common case."""
        if budget is None:
            budget = {"bpw": bpw}
        doc = budget if isinstance(budget, Mapping) else budget.to_dict()
        body = {"table_id": table_id, "budget": dict(doc), "solver": solver, "seed": seed, "store": store}
        out: dict[str, Any] = self._json("POST", "/plans", json=body)
        return out

    @staticmethod
    def bitplan(plan: Mapping[str, Any]) -> BitPlan:
        """The :class:`~allocator.core.plan.BitPlan` inside a plan response."""
        if plan.get("plan") is None:
            raise ServiceClientError(409, "plan_has_no_assignments", f"plan status is {plan.get('status')}")
        return BitPlan.from_dict(plan["plan"])

    def plans(self, *, table_id: str | None = None, limit: int = 100, offset: int = 0) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit, "offset": offset}
        if table_id:
            params["table_id"] = table_id
        out: dict[str, Any] = self._json("GET", "/plans", params=params)
        return out

    def get_plan(self, plan_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", f"/plans/{plan_id}")
        return out

    def delete_plan(self, plan_id: str) -> None:
        self._request("DELETE", f"/plans/{plan_id}")

    def export(self, plan_id: str, target: str, *, lossy: bool = False, base: str | None = None,
               arch: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"target": target, "lossy": lossy}
        params.update({k: v for k, v in (("base", base), ("arch", arch)) if v is not None})
        out: dict[str, Any] = self._json("GET", f"/plans/{plan_id}/export", params=params)
        return out

    def frontier(self, table_id: str, *, bpw: list[float] | None = None,
                 consumer: str | None = None) -> dict[str, Any]:
        """The table's frontier; ``consumer`` (an export target, like ``frontier --for``)
        computes it on the table as that target stores it."""
        params: dict[str, Any] = {"bpw": bpw or []}
        if consumer is not None:
            params["consumer"] = consumer
        out: dict[str, Any] = self._json("GET", f"/tables/{table_id}/frontier", params=params)
        return out

    def frontier_plan(self, table_id: str, index: int, *, bpw: list[float] | None = None,
                      consumer: str | None = None) -> BitPlan:
        """The plan of frontier point ``index`` (same ``bpw`` / ``consumer`` as the frontier)."""
        params: dict[str, Any] = {"bpw": bpw or []}
        if consumer is not None:
            params["consumer"] = consumer
        return self.bitplan(self._json("GET", f"/tables/{table_id}/frontier/{index}", params=params))

    # ------------------------------------------------------------ jobs
    def submit(self, kind: str, params: Mapping[str, Any], *,
               max_attempts: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"kind": kind, "params": dict(params)}
        if max_attempts is not None:
            body["max_attempts"] = max_attempts
        out: dict[str, Any] = self._json("POST", "/jobs", json=body)
        return out

    def estimate(self, model: str, *, method: str = "datafree", **params: Any) -> dict[str, Any]:
        """Queue an estimation of ``model`` (``<root>/<dir>`` on the server)."""
        return self.submit("estimate", {"model": model, "method": method, **params})

    def run(self, model: str, *, bpw: float, **params: Any) -> dict[str, Any]:
        """Queue ``bitalloc run`` on ``model`` (``<root>/<dir>`` on the server) at ``bpw``; its
        result holds ``table_id``, ``plan_id`` (the plan chosen on calibration data) and
        ``warning`` when that plan measured worse than uniform on held-out data."""
        return self.submit("run", {"model": model, "bpw": bpw, **params})

    def search(self, table_id: str, budget: Mapping[str, Any] | None = None, *, bpw: float | None = None,
               n_trials: int = 50, seed: int | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"table_id": table_id, "budget": dict(budget or {"bpw": bpw}),
                                  "n_trials": n_trials}
        if seed is not None:
            params["seed"] = seed
        return self.submit("search", params)

    def job(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", f"/jobs/{job_id}")
        return out

    def jobs(self, *, status: str | None = None, kind: str | None = None, limit: int = 100) -> dict[str, Any]:
        params = {k: v for k, v in (("status", status), ("kind", kind)) if v}
        out: dict[str, Any] = self._json("GET", "/jobs", params={**params, "limit": limit})
        return out

    def cancel(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("POST", f"/jobs/{job_id}/cancel")
        return out

    def result(self, job_id: str) -> dict[str, Any]:
        out: dict[str, Any] = self._json("GET", f"/jobs/{job_id}/result")["result"]
        return out

    def wait(self, job_id: str, *, timeout: float = 3600.0, poll: float = 0.5) -> dict[str, Any]:
        """Poll until the job finishes; returns its final state (raises on timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job["status"] in _FINISHED:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout:g} s")
            time.sleep(poll)
