"""A long run survives: each stage's output is written as soon as it exists, and a later run
starts from the saved table (``run --table FILE`` / ``--resume``) with the same plan."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.jobs import pipeline  # noqa: E402
from allocator.jobs.pipeline import RunConfig, run_pipeline, run_spec  # noqa: E402


def _cfg(out: Path, seed: int = 0, **kw: Any) -> RunConfig:
    # refine_rounds=0: the plan is the best measured candidate, no time limit can cut it short
    spec = run_spec("hessian-proxy", samples=4, seq_len=32, batch_size=4, progress=False, seed=seed,
                    options="int2-g32-asym,int4-g32-asym,int8-g32-asym")
    return RunConfig(model="tiny-llama", estimate=spec, bpw=5.0, eval_samples=4, refine_rounds=0,
                     out=out, **kw)


def test_an_interrupted_run_keeps_its_table_and_a_rerun_starts_from_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = run_pipeline(_cfg(tmp_path / "full"))

    def killed(*_a: Any, **_k: Any) -> Any:
        raise KeyboardInterrupt  # the run dies in the stage after the solve

    monkeypatch.setattr(pipeline, "_select", killed)
    cut = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(_cfg(cut))
    monkeypatch.undo()
    assert CostTable.load(cut / "table.parquet").fingerprint == full.table.fingerprint
    assert json.loads((cut / "frontier.json").read_text())["points"]
    progress = json.loads((cut / "results.json").read_text())
    assert progress["stage"] == "solve" and progress["complete"] is False
    assert progress["config"]["estimator"] == "hessian-proxy" and progress["config"]["batch_size"] == 4
    assert not (cut / "plan.json").exists()

    def no_estimate(*_a: Any, **_k: Any) -> Any:
        raise AssertionError("a saved table must not be estimated again")

    monkeypatch.setattr(pipeline, "estimate_table", no_estimate)
    reused = run_pipeline(_cfg(tmp_path / "again", table=cut / "table.parquet"))
    resumed = run_pipeline(_cfg(cut, resume=True))
    for run in (reused, resumed):
        assert run.result.plan.choice == full.result.plan.choice
        assert run.table.fingerprint == full.table.fingerprint
    done = json.loads((cut / "results.json").read_text())
    assert done["complete"] is True and done["chosen"] == full.result.label
    assert (cut / "plan.json").is_file() and (cut / "candidates.json").is_file()
    with pytest.raises(InvalidParameterError, match=r"does not match this run: seed is 0, this run's is 1"):
        run_pipeline(_cfg(cut, seed=1, resume=True))


def test_a_table_of_another_model_is_refused_in_one_line(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from allocator.cli import main

    args = ["run", "tiny-llama", "--estimator", "datafree", "--samples", "4", "--eval-samples", "4",
            "--seq-len", "32", "--refine-rounds", "0", "--no-progress", "--bpw", "5",
            "--options", "int2-g32-asym,int4-g32-asym,int8-g32-asym"]
    assert main([*args, "--out", str(tmp_path / "a")]) == 0
    table = CostTable.load(tmp_path / "a" / "table.parquet")
    other = tmp_path / "other.parquet"
    CostTable(table.df, {**table.metadata, "model_fingerprint": "0" * 64}).save(other)
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b"), "--table", str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("bitalloc run: error: saved table") and "model_fingerprint" in err[-1]
    assert main([*args, "--out", str(tmp_path / "c"), "--table", str(tmp_path / "a" / "table.parquet")]) == 0
    assert "using the saved table" in capsys.readouterr().out
    plans = [json.loads((tmp_path / d / "plan.json").read_text())["assignments"] for d in ("a", "c")]
    assert plans[0] == plans[1]
