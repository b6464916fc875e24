"""Workers started by ``serve`` exit within seconds of a kill -9 of the server, even mid-job."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from allocator.service.client import Client
from tests.service.conftest import TOKEN
from tests.service.test_crash import _free_port, _spawn, _wait, _wait_up

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs Linux /proc")


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.timeout(120)
def test_worker_exits_mid_job_when_the_server_is_killed(db_url: str, tmp_path: Path) -> None:
    log = tmp_path / "procs.log"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server = _spawn(db_url, port, "--workers", "1", log=log)
    worker_pid = None
    try:
        _wait_up(url, server)
        api = Client(url, token=TOKEN, timeout=30)
        pids = tmp_path / "pids.txt"
        job = api.submit("sleep", {"seconds": 60, "steps": 600, "log": str(pids)}, max_attempts=1)
        _wait(lambda: api.job(job["id"])["progress"] > 0, 60, "the job running on the worker")
        worker_pid = int(pids.read_text().split()[0])
        assert worker_pid != server.pid and _alive(worker_pid)
        os.kill(server.pid, signal.SIGKILL)
        server.wait(timeout=10)
        t0 = time.monotonic()
        _wait(lambda: not _alive(worker_pid), 10, "the worker to notice its parent died")
        assert time.monotonic() - t0 < 10
    finally:
        if server.poll() is None:
            server.kill()
            server.wait(timeout=10)
        if worker_pid is not None and _alive(worker_pid):
            os.kill(worker_pid, signal.SIGKILL)
        if server.returncode not in (None, -9):
            print(log.read_text()[-4000:])
