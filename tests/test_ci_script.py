"""``.ci/run``: lint, types and tests run in that order, and the first failure ends the run with a
non-zero status (run against a stand-in ``python`` that records its arguments)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$CI_LOG"
case "$*" in "$CI_FAIL"*) exit 3 ;; esac
exit 0
"""

STEPS = ["-m ruff check .", "-m mypy", "-m pytest"]


def _run_ci(tmp_path: Path, fail: str) -> tuple[int, list[str]]:
    if shutil.which("bash") is None:
        pytest.skip("no bash on this machine")
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").write_text(FAKE_PYTHON)
    (bin_dir / "python").chmod(0o755)
    log = tmp_path / "log"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "CI_LOG": str(log),
           "CI_FAIL": fail}
    r = subprocess.run(["bash", str(tmp_path / ".ci" / "run")], env=env, capture_output=True,
                       text=True, timeout=60)
    ran = [line for line in log.read_text().splitlines() if not line.startswith("-m pip")]
    return r.returncode, ran


def test_ci_runs_ruff_mypy_then_the_tests(tmp_path: Path) -> None:
    rc, ran = _run_ci(tmp_path, fail="no step matches this")
    assert rc == 0
    assert ran == STEPS


@pytest.mark.parametrize("failing", range(len(STEPS)))
def test_ci_stops_at_the_first_failing_step(tmp_path: Path, failing: int) -> None:
    rc, ran = _run_ci(tmp_path, fail=STEPS[failing])
    assert rc == 3
    assert ran == STEPS[:failing + 1]
