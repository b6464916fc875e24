"""``--data`` / ``--eval-data`` and ``--include`` / ``--exclude`` through the CLI verbs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

from allocator.cli import main  # noqa: E402
from allocator.core.plan import BitPlan  # noqa: E402
from allocator.model.data import corpus_texts  # noqa: E402

SMALL = ["--estimator", "datafree", "--samples", "4", "--eval-samples", "8", "--seq-len", "32",
         "--no-progress", "--refine-rounds", "0"]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("texts")
    texts = corpus_texts("train")
    data = d / "mine.txt"
    data.write_text("\n\n".join(texts[:60]), encoding="utf-8")
    held = d / "held.jsonl"
    held.write_text("\n".join(json.dumps({"text": t}) for t in texts[60:90]), encoding="utf-8")
    return data, held


def test_run_on_the_users_data_with_globs(files: tuple[Path, Path], tmp_path: Path) -> None:
    data, _ = files
    out = tmp_path / "r"
    assert main(["run", "tiny-llama", *SMALL, "--data", str(data), "--include", "model.layers.0.*",
                 "--exclude", "*.o_proj", "--out", str(out)]) == 0
    plan = BitPlan.load(out / "plan.json")
    assert sorted(plan.assignments) == sorted(
        f"model.layers.0.{m}" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))
    doc = json.loads((out / "results.json").read_text())
    assert doc["config"]["data"] == str(data) and doc["config"]["include"] == ["model.layers.0.*"]
    assert doc["data"]["calibration_batches"]["source"] == "file:mine.txt#calibration"
    assert doc["data"]["evaluation_batches"]["source"] == "file:mine.txt#held-out"
    assert doc["excluded_units"]["model.layers.0.self_attn.o_proj"] == "matched by --exclude"
    assert doc["excluded_units"]["lm_head"] == "not matched by --include"
    report = (out / "report.md").read_text()
    assert "--data mine.txt (held-out share" in report and "calibration split" not in report


def test_run_with_eval_data_and_the_other_verbs(files: tuple[Path, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data, held = files
    out = tmp_path / "r"
    assert main(["run", "tiny-llama", *SMALL, "--data", str(data), "--eval-data", str(held),
                 "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"]["calibration_batches"]["source"] == "file:mine.txt"
    assert doc["data"]["evaluation_batches"]["source"] == "file:held.jsonl"
    assert "no text shared with --data" in doc["data"]["evaluation"]
    plan = str(out / "plan.json")
    capsys.readouterr()
    assert main(["evaluate", "tiny-llama", plan, "--samples", "4", "--seq-len", "32",
                 "--eval-data", str(held)]) == 0
    shown = capsys.readouterr().out
    assert "held.jsonl" in shown
    assert main(["evaluate", "tiny-llama", plan, "--samples", "4", "--seq-len", "32",
                 "--method", "gptq", "--calib-samples", "4", "--data", str(data)]) == 0
    assert "mine.txt" in capsys.readouterr().out
    assert main(["apply", "tiny-llama", plan, "--method", "gptq", "--samples", "4",
                 "--seq-len", "32", "--data", str(data)]) == 0
    assert "calibration: file:mine.txt" in capsys.readouterr().out


def test_data_errors_are_one_line(files: tuple[Path, Path], tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    data, _ = files
    cases = [
        (["run", "tiny-llama", *SMALL, "--data", str(tmp_path / "no.txt")], "does not exist"),
        (["run", "tiny-llama", *SMALL, "--include", "layers.9.*"], "matches no unit"),
        (["run", "vit-digits", *SMALL, "--data", str(data)], "no tokenizer"),
        (["apply", "tiny-llama", str(tmp_path / "p.json"), "--data", str(data)], "gptq"),
    ]
    for argv, needle in cases:
        assert main([*argv, "--out", str(tmp_path / "o")] if argv[0] == "run" else argv) == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("bitalloc") and needle in last, last


def test_search_scores_on_data_and_reports_held_out(files: tuple[Path, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from allocator.backend.search_eval import ModelEvaluator
    from allocator.core.table import CostTable

    data, held = files
    table = tmp_path / "t.parquet"
    assert main(["estimate", "tiny-llama", "--method", "datafree", "--options",
                 "int2..4-g128-asym", "--no-progress", "-o", str(table)]) == 0
    ev = ModelEvaluator(model="tiny-llama", table=CostTable.load(table), samples=4, seq_len=32,
                        data=str(data))
    assert ev.data.source == "file:mine.txt#calibration"
    capsys.readouterr()
    plan = tmp_path / "p.json"
    assert main(["search", str(table), "--bpw", "3", "--model", "tiny-llama", "--trials", "3",
                 "--samples", "4", "--data", str(data), "--eval-data", str(held),
                 "-o", str(plan)]) == 0
    shown = capsys.readouterr().out
    assert "held-out (file:held.jsonl, 4 samples): kl" in shown and plan.is_file()
    assert main(["search", str(table), "--bpw", "3", "--data", str(data)]) == 2
    assert "need --model" in capsys.readouterr().err


def test_run_on_built_in_domains(tmp_path: Path) -> None:
    """``--data builtin:code`` calibrates on code and, without --eval-data, evaluates on code's own
    evaluation split; ``--eval-data builtin:prose`` evaluates on another domain."""
    out = tmp_path / "r"
    assert main(["run", "tiny-llama", *SMALL, "--data", "builtin:code", "--include", "model.layers.0.*",
                 "--out", str(out)]) == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["data"]["calibration_batches"]["source"].startswith("builtin:code:calibration@")
    assert doc["data"]["evaluation_batches"]["source"].startswith("builtin:code:evaluation@")
    assert "domain 'code'" in doc["data"]["evaluation"]
    out2 = tmp_path / "r2"
    assert main(["run", "tiny-llama", *SMALL, "--data", "builtin:code", "--eval-data", "builtin:prose",
                 "--include", "model.layers.0.*", "--out", str(out2)]) == 0
    doc = json.loads((out2 / "results.json").read_text())
    assert doc["data"]["evaluation_batches"]["source"].startswith("builtin:prose:evaluation@")
    assert "no text shared" in doc["data"]["evaluation"]


def test_estimate_on_a_built_in_domain(tmp_path: Path) -> None:
    """``estimate --data builtin:DOMAIN`` reads the domain (it is not a file path), and records it."""
    from allocator import CostTable

    out = tmp_path / "t.parquet"
    assert main(["estimate", "tiny-llama", "--method", "fisher", "--data", "builtin:code",
                 "--samples", "2", "--seq-len", "8", "--include", "model.layers.0.*",
                 "--out", str(out), "--no-progress"]) == 0
    assert "builtin:code" in str(CostTable.load(out).metadata)
    assert main(["estimate", "tiny-llama", "--method", "fisher", "--data", "builtin:nosuch",
                 "--out", str(out), "--no-progress"]) == 2
