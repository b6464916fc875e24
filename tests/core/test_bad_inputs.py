"""Issue 10: no input ends in a traceback.

Every malformed, overflowing or inconsistent table or plan file raises one error of the project's
own hierarchy (:class:`~allocator.core.errors.AllocatorError`) from the loaders, and the CLI turns it
into exit code 2 with exactly one line on stderr. The fixed cases first, then Hypothesis over
random JSON values, random bytes and mutated valid documents.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator import BitPlan, Budget, CostTable
from allocator.cli import main
from allocator.core.errors import (
    AllocatorError,
    InvalidCostTableError,
    InvalidParameterError,
    InvalidPlanError,
)
from allocator.core.plan import PlanSummary
from allocator.core.synth import synth_table
from allocator.core.table import MAX_TOTAL_PARAMS

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture(scope="module")
def synth() -> CostTable:
    return synth_table(n_units=3, seed=0)


@pytest.fixture(scope="module")
def table_doc(synth: CostTable, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = synth.save(tmp_path_factory.mktemp("doc") / "t.json")
    doc: dict[str, Any] = json.loads(path.read_text())
    return doc


@pytest.fixture(scope="module")
def plan_doc(synth: CostTable) -> dict[str, Any]:
    import solvers

    plan = solvers.solve(synth, Budget(bpw=3.0)).plan
    assert plan is not None
    doc: dict[str, Any] = plan.to_dict()
    return doc


def _rows(doc: dict[str, Any], **values: Any) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    out["rows"] = [{**r, **values} for r in out["rows"]]
    return out


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(argv)
    err = capsys.readouterr().err
    return code, err.splitlines()


def _assert_one_line_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str],
                            match: str) -> None:
    code, lines = _cli(argv, capsys)
    assert code == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"bitalloc {argv[0]}: error: ")
    assert match in lines[0], lines[0]


# ------------------------------------------------------------------ table files, fixed cases
def _json_table(doc: dict[str, Any], mutate: Callable[[dict[str, Any]], Any]) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = tmp / "t.json"
        path.write_text(json.dumps(mutate(copy.deepcopy(doc))))
        return path

    return write


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    return lambda d: {**d, key: value}


def _csv_with_sidecar(synth: CostTable, sidecar: str) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        path = synth.save(tmp / "t.csv")
        (tmp / "t.meta.json").write_text(sidecar)
        return path

    return write


def _parquet_with_meta(synth: CostTable, meta: bytes) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        import pyarrow.parquet as pq

        path = synth.save(tmp / "t.parquet")
        arrow = pq.read_table(path)
        pq.write_table(arrow.replace_schema_metadata({**(arrow.schema.metadata or {}),
                                                      b"bitalloc": meta}), path)
        return path

    return write


def _raw(name: str, data: bytes) -> Callable[[Path], Path]:
    def write(tmp: Path) -> Path:
        (tmp / name).write_bytes(data)
        return tmp / name

    return write


def table_cases(synth: CostTable, doc: dict[str, Any]) -> list[tuple[str, Callable[[Path], Path], str]]:
    """(id, writer of the bad file, text the one-line error must contain)."""
    return [
        ("json_version_abc", _json_table(doc, _set("version", "abc")), "version 'abc'"),
        ("json_metadata_str", _json_table(doc, _set("metadata", "x")),
         "'metadata' must be a JSON object"),
        ("json_rows_of_ints", _json_table(doc, lambda d: {"rows": [1, 2]}),
         "'rows' must be a list of objects"),
        ("csv_sidecar_list", _csv_with_sidecar(synth, "[1]"), "metadata must be a JSON object"),
        ("parquet_meta_list", _parquet_with_meta(synth, b"[1]"), "metadata must be a JSON object"),
        ("parquet_version_abc", _parquet_with_meta(synth, b'{"version": "abc"}'),
         "version 'abc'"),
        ("parquet_version_null", _parquet_with_meta(synth, b'{"version": null}'),
         "version None"),
        ("json_deep", _raw("t.json", DEEP.encode()), "nests JSON too deeply"),
        ("json_binary", _raw("t.json", b"\xff\xfe"), "is not JSON"),
        ("sidecar_deep", _csv_with_sidecar(synth, DEEP), "nests JSON too deeply"),
        ("cost_1e308", _json_table(doc, lambda d: _rows(d, cost=1e308)), "totals overflow"),
        ("params_2_62", _json_table(doc, lambda d: _rows(d, params=4611686018427387904)),
         "'params' 4.61169e+18 is too large"),
        ("size_bits_1", _json_table(doc, lambda d: _rows(d, size_bits=1.0)),
         "'size_bits' does not match the option's storage"),
    ]


def _table_case_ids() -> list[str]:
    return [c[0] for c in table_cases(synth_table(n_units=1), {"rows": []})]


@pytest.mark.parametrize("case", _table_case_ids())
def test_bad_table_file_is_one_project_error(case: str, synth: CostTable,
                                             table_doc: dict[str, Any], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, write, match = next(c for c in table_cases(synth, table_doc) if c[0] == case)
    path = write(tmp_path)
    with pytest.raises(InvalidCostTableError) as info:
        CostTable.load(path)
    assert match in str(info.value) and "\n" not in str(info.value)
    _assert_one_line_exit_2(["solve", str(path), "--bpw", "3", "-o", str(tmp_path / "p.json")],
                            capsys, match)
    assert not (tmp_path / "p.json").exists()


# ------------------------------------------------------------------ overflow and size accounting
def test_total_params_past_2_53_are_refused_even_when_each_unit_is_below() -> None:
    each = MAX_TOTAL_PARAMS // 2
    units, opts = [f"u{i}" for i in range(3)], ["fp16"]
    with pytest.raises(InvalidCostTableError, match=r"total params over 3 units is 1\.35108e\+16"):
        CostTable.from_unit_costs(units=units, params=[each] * 3, options=opts,
                                  cost=[[0.0]] * 3)
    ok = CostTable.from_unit_costs(units=units[:2], params=[each] * 2, options=opts,
                                   cost=[[0.0]] * 2)
    assert ok.total_params == MAX_TOTAL_PARAMS


def test_params_past_int64_in_from_unit_costs_is_a_parameter_error() -> None:
    with pytest.raises(InvalidParameterError, match="params must be whole numbers"):
        CostTable.from_unit_costs(units=["a"], params=[2**64], options=["fp16"], cost=[[0.0]])


def test_costs_that_overflow_only_as_a_plan_total_are_refused() -> None:
    # each cost is finite, and so is each unit's cheapest choice; only plan totals overflow
    cost = [[1e308, 1e308], [1e308, 1e308]]
    with pytest.raises(InvalidCostTableError, match="column 'cost' totals overflow.*rescale"):
        CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
                                  options=["int2-g128-asym", "int4-g128-asym"], cost=cost)
    # one unit at 1e308: the row sum overflows but no plan does (a plan takes one row per unit)
    t = CostTable.from_unit_costs(units=["a", "b"], params=[128, 128],
                                  options=["int2-g128-asym", "int4-g128-asym"],
                                  cost=[[1e308, 1e308], [1.0, 0.0]])
    assert t.n_units == 2


def test_resource_columns_that_overflow_are_refused() -> None:
    with pytest.raises(InvalidCostTableError, match="column 'bops' totals overflow"):
        CostTable.from_unit_costs(units=["a", "b"], params=[128, 128], options=["fp16"],
                                  cost=[[0.0], [0.0]], resources={"bops": [[1e308], [1e308]]})


def _frame(option: str, size_bits: float, params: int = 4096) -> pd.DataFrame:
    return pd.DataFrame({"unit": ["a"], "params": [params], "option": [option], "bits": [4],
                         "size_bits": [size_bits], "cost": [1.0]})


@pytest.mark.parametrize(("option", "bpw"), [
    ("int4-g128-asym", 4.25), ("int4-g128-sym", 4.125), ("int4-g128-asym-gptq", 4.15625),
    ("q4_K", 4.5), ("fp16", 16.0), ("int4-ch-asym", 4.0), ("int4-ch-asym", 36.0),
    ("int4-g128-asym", 4.25 * 1.049), ("int4-g128-asym", 4.25 * 0.951),
    ("my-codebook-4bit", 1e-6),  # unknown labels cannot be checked: taken as given
])
def test_size_bits_within_the_label_accounting_load(option: str, bpw: float) -> None:
    assert CostTable(_frame(option, 4096 * bpw)).n_units == 1


@pytest.mark.parametrize(("option", "bpw"), [
    ("int4-g128-asym", 4.25 / 8),  # bytes, not bits
    ("int4-g128-asym", 4.25 * 1.06), ("int4-g128-asym", 4.25 * 0.94),
    ("q4_K", 4.25), ("fp16", 8.0), ("int4-ch-sym", 3.5), ("int4-ch-sym", 22.0),
])
def test_size_bits_off_the_label_accounting_are_refused(option: str, bpw: float) -> None:
    with pytest.raises(InvalidCostTableError, match=f"'{option}' stores .* bits/weight \\(±5%\\)"):
        CostTable(_frame(option, 4096 * bpw))


# ------------------------------------------------------------------ plan files, fixed cases
@pytest.mark.parametrize(("data", "match"), [
    (b"\xff\xfe", "is not JSON"),
    (DEEP.encode(), "nests JSON too deeply"),
    (b"\x80\x81\x82 not text", "is not JSON"),
])
def test_bad_plan_bytes_are_one_plan_error(data: bytes, match: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "plan.json"
    path.write_bytes(data)
    with pytest.raises(InvalidPlanError, match=match):
        BitPlan.load(path)
    _assert_one_line_exit_2(["export", str(path), "--to", "hqq", "-o", str(tmp_path / "out")],
                            capsys, match)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: {**d, "budget": 5}, "'budget' must be a JSON object"),
    (lambda d: {**d, "provenance": "x"}, "'provenance' must be a JSON object"),
    (lambda d: {**d, "version": True}, "version True"),
    (lambda d: {**d, "summary": {**d["summary"], "predicted_cost": math.inf}},
     "summary.predicted_cost must be a finite number"),
    (lambda d: {**d, "summary": {**d["summary"], "params": 1e400}},
     "summary.params must be a finite number"),
    (lambda d: {**d, "assignments": {"u": {"option": "fp16", "bits": 16, "group_size": [1]}}},
     "group_size [1] is not an int"),
    (lambda d: {**d, "assignments": {"u": {"option": 4, "bits": 16}}}, "needs an option label"),
    (lambda d: {**d, "assignments": [1]}, "'assignments' must be a JSON object"),
    (lambda d: {k: v for k, v in d.items() if k != "summary"}, "missing field 'summary'"),
])
def test_bad_plan_documents_are_one_plan_error(plan_doc: dict[str, Any], mutate: Any, match: str,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    doc = mutate(copy.deepcopy(plan_doc))
    with pytest.raises(InvalidPlanError, match=re.escape(match)):
        BitPlan.from_dict(doc)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(doc))  # Python's json writes inf as Infinity: reads it back too
    _assert_one_line_exit_2(["export", str(path), "--to", "hqq", "-o", str(tmp_path / "out")],
                            capsys, match.split("'")[0])


def test_plan_json_refuses_non_finite_numbers(plan_doc: dict[str, Any], tmp_path: Path) -> None:
    plan = BitPlan.from_dict(plan_doc)
    bad = BitPlan(assignments=plan.assignments, solver=plan.solver, budget=plan.budget,
                  summary=PlanSummary(params=1, size_bits=1.0, bpw=1.0, predicted_cost=math.inf))
    with pytest.raises(InvalidPlanError, match="non-finite number"):
        bad.to_json()
    with pytest.raises(InvalidPlanError, match="non-finite number"):
        bad.save(tmp_path / "p.json")
    assert not (tmp_path / "p.json").exists()
    again = json.loads(plan.to_json(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert again == plan_doc


def test_table_json_refuses_non_finite_metadata(synth: CostTable, tmp_path: Path) -> None:
    bad = CostTable(synth.df, {**synth.metadata, "seconds": math.nan})
    for suffix in (".json", ".parquet", ".csv"):
        with pytest.raises(InvalidCostTableError, match="non-finite number"):
            bad.save(tmp_path / f"t{suffix}")
        assert not (tmp_path / f"t{suffix}").exists()
    text = synth.save(tmp_path / "ok.json").read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in JSON"))


# ------------------------------------------------------------------ serve settings from the environment
def test_serve_with_an_unparseable_env_setting_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("BITALLOC_MODEL_ROOTS", "x")
    _assert_one_line_exit_2(["serve"], capsys, "BITALLOC_MODEL_ROOTS cannot be parsed")


def _subprocess(argv: list[str], env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    proc = subprocess.run([sys.executable, "-m", "allocator.cli", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, **(env or {})}, check=False)
    return proc.returncode, proc.stderr.splitlines()


def test_subprocess_serve_env_and_deep_table(tmp_path: Path) -> None:
    code, lines = _subprocess(["serve"], {"BITALLOC_MODEL_ROOTS": "x"})
    assert code == 2 and len(lines) == 1 and "BITALLOC_MODEL_ROOTS" in lines[0], lines
    (tmp_path / "t.json").write_text(DEEP)
    code, lines = _subprocess(["solve", str(tmp_path / "t.json"), "--bpw", "3", "-o",
                               str(tmp_path / "p.json")])
    assert code == 2 and len(lines) == 1 and "too deeply" in lines[0], lines


# ------------------------------------------------------------------ generated inputs
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                  max_size=4),
    max_leaves=12,
)


def _load_or_own_error(load: Callable[[], Any]) -> None:
    """The only acceptable outcomes: a value, or one error of our hierarchy on one line."""
    try:
        load()
    except AllocatorError as exc:
        assert str(exc) and "\n" not in str(exc).strip(), repr(str(exc))


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:3]):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, doc: dict[str, Any]) -> Any:
    """``doc`` with 1-3 places replaced by random JSON values or deleted."""
    out: Any = copy.deepcopy(doc)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(out)))
        if not path:
            out = draw(JSON_VALUES)
            continue
        parent = out
        for key in path[:-1]:
            parent = parent[key]
        if isinstance(parent, dict) and draw(st.booleans()):
            del parent[path[-1]]
        else:
            parent[path[-1]] = draw(st.one_of(JSON_VALUES, st.sampled_from(
                [1e308, -1.0, 0, 2**63, 4611686018427387904, math.nan, "abc", [], {}])))
    return out


@settings(max_examples=150)
@given(value=JSON_VALUES)
def test_random_json_values_never_escape_the_loaders(value: Any, tmp_path_factory: Any) -> None:
    tmp = tmp_path_factory.mktemp("rand")
    (tmp / "t.json").write_text(json.dumps(value))
    (tmp / "c.csv").write_text("unit,params,option,bits,size_bits,cost\na,128,fp16,16,2048,0\n")
    (tmp / "c.meta.json").write_text(json.dumps(value))
    _load_or_own_error(lambda: CostTable.load(tmp / "t.json"))
    _load_or_own_error(lambda: CostTable.load(tmp / "c.csv"))
    _load_or_own_error(lambda: BitPlan.load(tmp / "t.json"))


@settings(max_examples=100)
@given(data=st.binary(max_size=64))
def test_random_bytes_never_escape_the_loaders(data: bytes, tmp_path_factory: Any) -> None:
    tmp = tmp_path_factory.mktemp("bytes")
    for name in ("t.json", "t.csv", "t.parquet"):
        (tmp / name).write_bytes(data)
        _load_or_own_error(lambda name=name: CostTable.load(tmp / name))  # type: ignore[misc]
    _load_or_own_error(lambda: BitPlan.load(tmp / "t.json"))


@settings(max_examples=200)
@given(data=st.data())
def test_mutated_table_documents_never_escape_the_loader(data: st.DataObject,
                                                         table_doc: dict[str, Any],
                                                         tmp_path_factory: Any) -> None:
    doc = data.draw(mutated(table_doc))
    path = tmp_path_factory.mktemp("mt") / "t.json"
    path.write_text(json.dumps(doc))
    _load_or_own_error(lambda: CostTable.load(path))


@settings(max_examples=200)
@given(data=st.data())
def test_mutated_plan_documents_never_escape_the_loader(data: st.DataObject,
                                                        plan_doc: dict[str, Any],
                                                        tmp_path_factory: Any) -> None:
    doc = data.draw(mutated(plan_doc))
    path = tmp_path_factory.mktemp("mp") / "p.json"
    path.write_text(json.dumps(doc))
    _load_or_own_error(lambda: BitPlan.load(path))


@settings(max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_cli_on_mutated_tables_exits_cleanly(data: st.DataObject, table_doc: dict[str, Any],
                                            tmp_path_factory: Any,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    doc = data.draw(mutated(table_doc))
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "t.json").write_text(json.dumps(doc))
    capsys.readouterr()
    code = main(["solve", str(tmp / "t.json"), "--bpw", "3", "-o", str(tmp / "p.json")])
    err = capsys.readouterr().err.splitlines()
    assert code in (0, 1, 2), code
    if code == 2:
        assert len(err) == 1 and err[0].startswith("bitalloc solve: error: "), err
    if code == 0:
        json.loads((tmp / "p.json").read_text(),
                   parse_constant=lambda c: pytest.fail(f"{c} in the plan JSON"))
        assert np.isfinite(BitPlan.load(tmp / "p.json").summary.predicted_cost)
