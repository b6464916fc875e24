"""Crash test: kill -9 the server and the workers mid-job, restart, and check that every stored
table and plan is intact and every job ends in the right state (retried or worker_lost)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from allocator.core.synth import synth_table
from allocator.service.client import Client
from tests.service.conftest import PLUGINS, TOKEN

REPO = Path(__file__).resolve().parents[2]
BEAT, STALE = 0.2, 1.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _spawn(db_url: str, port: int, *extra: str, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PLUGINS), str(REPO)])}
    env.pop("BITALLOC_TOKEN", None)
    cmd = [sys.executable, "-m", "allocator.cli", "serve", "--db", db_url, "--port", str(port),
           "--token", TOKEN, "--job-module", "bitalloc_test_jobkinds", "--heartbeat", str(BEAT),
           "--stale-after", str(STALE), "--log-level", "warning", *extra]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT)


def _wait_up(url: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError("server did not come up")


def _wait(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill9(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        os.kill(p.pid, signal.SIGKILL)
    for p in procs:
        p.wait(timeout=10)


@pytest.mark.timeout(180)
def test_kill_dash_nine_then_restart(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "procs.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _spawn(db_url, port, "--workers", "0", log=log)
    workers = [_spawn(db_url, port, "--worker-only", log=log) for _ in range(2)]
    procs = [server, *workers]
    try:
        _wait_up(url, server)
        api = Client(url, token=TOKEN, timeout=30)
        tables = [api.upload_table(synth_table(n_units=8 + i, n_options=4, seed=i)) for i in range(3)]
        plans = [api.plan(t["id"], bpw=b) for t in tables for b in (3.0, 4.5)]
        attempts_log = tmp_path / "attempts.txt"
        retried = api.submit("sleep", {"seconds": 3, "steps": 30, "log": str(attempts_log)}, max_attempts=2)
        lost = api.submit("sleep", {"seconds": 3, "steps": 30}, max_attempts=1)
        _wait(lambda: all(api.job(j["id"])["progress"] > 0 for j in (retried, lost)), 60,
              "both jobs running on the two workers")
        queued = api.submit("sleep", {"seconds": 0.1})
        _kill9(*procs)

        server = _spawn(db_url, port, "--workers", "1", log=log)
        procs = [server]
        _wait_up(url, server)
        for t in tables:
            back = api.table(t["id"])
            assert back["fingerprint"] == t["fingerprint"] and back["n_rows"] == t["n_rows"]
            assert api.download_table(t["id"]).fingerprint == t["fingerprint"]
        for p in plans:
            assert api.get_plan(p["id"])["plan"] == p["plan"]
        assert api.tables()["count"] == 3 and api.plans()["count"] == len(plans)

        r = api.wait(retried["id"], timeout=60, poll=0.1)
        assert r["status"] == "succeeded" and r["attempts"] == 2, r
        assert len(attempts_log.read_text().split()) == 2  # it really ran twice
        f = api.wait(lost["id"], timeout=60, poll=0.1)
        assert f["status"] == "failed" and f["error"]["code"] == "worker_lost", f
        assert api.wait(queued["id"], timeout=60, poll=0.1)["status"] == "succeeded"
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if any(proc.returncode not in (0, -15, -9) for proc in procs):
            print(log.read_text()[-4000:])
