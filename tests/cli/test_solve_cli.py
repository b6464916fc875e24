"""``bitalloc solve``: plans, statuses, exit codes and one-line errors."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from allocator import BitPlan, Budget, CostTable
from allocator.cli import main
from allocator.core.plan import check_plan
from allocator.core.synth import synth_table


@pytest.fixture(scope="module")
def table_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("solve") / "table.parquet"
    synth_table(n_units=28, n_options=5, seed=0, ties=True, resources=True).save(path)
    return path


def test_writes_a_checked_plan(table_path: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main(["solve", str(table_path), "--bpw", "3.5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    for field in ("status:    optimal", "objective:", "gap:", "bpw:", "time:"):
        assert field in text
    plan = BitPlan.load(out)
    table = CostTable.load(table_path)
    assert check_plan(plan, table, Budget(bpw=3.5)) == []
    assert plan.budget == {"bpw": 3.5} and plan.solver.name == "mckp"
    assert json.loads(out.read_text())["format"] == "bitalloc.plan"


@pytest.mark.parametrize("solver", ["ilp", "greedy", "closed_form", "brute_force"])
def test_other_solvers_and_restrictions(table_path: Path, tmp_path: Path, solver: str) -> None:
    out = tmp_path / "plan.json"
    args = ["solve", str(table_path), "--size-bytes", "3.6e8", "--max-bits", "6",
            "--solver", solver, "--seed", "0", "-o", str(out)]
    if solver == "brute_force":  # 28 units are beyond enumeration: a clear error, exit 2
        assert main(args) == 2
        return
    assert main(args) == 0
    plan = BitPlan.load(out)
    assert plan.solver.name == solver
    assert max(a.bits for a in plan.assignments.values()) <= 6
    budget = Budget(size_bytes=3.6e8, max_bits=6)
    assert check_plan(plan, CostTable.load(table_path), budget) == []


def test_resource_cap(table_path: Path, tmp_path: Path) -> None:
    table = CostTable.load(table_path)
    cap = float(table.df.groupby("unit")["bops"].min().sum() * 1.3)
    out = tmp_path / "plan.json"
    assert main(["solve", str(table_path), "--bpw", "4", "--max", f"bops={cap}", "-o",
                 str(out)]) == 0
    assert BitPlan.load(out).summary.resources["bops"] <= cap * (1 + 1e-9)


def test_infeasible_prints_the_smallest_budget(table_path: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plan.json"
    assert main(["solve", str(table_path), "--bpw", "1.5", "-o", str(out)]) == 1
    text = capsys.readouterr().out
    assert "status:    infeasible" in text and "smallest feasible budget: --bpw 2.25" in text
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--bpw", "3", "--max", "latency_us=5"], "budget caps column 'latency_us'"),
    (["--bpw", "3", "--solver", "nope"], "unknown solver 'nope'"),
    (["--bpw", "3", "--max", "bops"], "--max expects COLUMN=VALUE"),
    (["--bpw", "-3"], "bpw must be a finite number > 0"),
    (["--bpw", "3", "--solver", "brute_force"], "combinations"),
])
def test_bad_input_is_one_line_exit_2(table_path: Path, tmp_path: Path, args: list[str],
                                      message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["solve", str(table_path), *args, "-o", str(tmp_path / "p.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("bitalloc solve: error: ") and message in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_solver_error_status_exits_1(table_path: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    args = ["solve", str(table_path), "--bpw", "4", "--max", "bops=1e18", "--solver",
            "closed_form", "-o", str(tmp_path / "p.json")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot honour resource caps" in err


def test_missing_table_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["solve", str(tmp_path / "nope.parquet"), "--bpw", "3", "-o",
                 str(tmp_path / "p.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_script(table_path: Path, tmp_path: Path) -> None:
    exe = shutil.which("bitalloc")
    if exe is None:
        pytest.skip("console script not installed (pip install -e .)")
    out = tmp_path / "plan.json"
    done = subprocess.run([exe, "solve", str(table_path), "--bpw", "3.25", "-o", str(out)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "status:    optimal" in done.stdout and out.is_file()
    bad = subprocess.run([exe, "solve", str(table_path), "--bpw", "1", "-o", str(out)],
                         capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 1 and "smallest feasible budget" in bad.stdout
