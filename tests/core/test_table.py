"""CostTable construction, validation, IO round trips (parquet, CSV, JSON) and fingerprint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from allocator import CostTable
from allocator.core.errors import InvalidCostTableError, InvalidParameterError
from allocator.core.io import sidecar_path
from allocator.core.synth import synth_table


@pytest.fixture
def table() -> CostTable:
    t = synth_table(n_units=21, n_options=4, seed=1, ties=True, resources=True)
    df = t.df.assign(cost_std=t.df["cost"] * 0.1)
    return CostTable(df, {**t.metadata, "estimator": "synthetic", "seed": 1})


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".json"])
def test_round_trip_keeps_rows_metadata_and_fingerprint(table: CostTable, tmp_path: Path,
                                                        suffix: str) -> None:
    path = table.save(tmp_path / f"t{suffix}")
    back = CostTable.load(path)
    pd.testing.assert_frame_equal(back.df, table.df, check_dtype=False, check_like=True)
    assert back.fingerprint == table.fingerprint
    assert back.metadata["estimator"] == "synthetic" and back.metadata["seed"] == 1
    assert back.metadata["format"] == "bitalloc.cost_table" and back.metadata["version"] == 1
    assert back.has_ties and back.resource_columns == ["bops"]
    if suffix == ".csv":
        assert sidecar_path(path).is_file()


def test_fingerprint_ignores_row_order_and_metadata_but_not_content(table: CostTable) -> None:
    shuffled = CostTable(table.df.sample(frac=1.0, random_state=0), {"estimator": "other"})
    assert shuffled.fingerprint == table.fingerprint
    changed = table.df.copy()
    changed.loc[0, "cost"] += 1e-9
    assert CostTable(changed).fingerprint != table.fingerprint


def test_accessors() -> None:
    t = CostTable.from_unit_costs(units=["b", "a"], params=[100, 300], options=["fp16", "q8_0"],
                                  cost=[[0.0, 1.0], [0.0, 2.0]])
    assert t.units == ["b", "a"] and t.options == ["fp16", "q8_0"]
    assert t.unit_params.tolist() == [100, 300] and t.total_params == 400 and len(t) == 4
    assert t.subset(["a"]).units == ["a"]
    assert CostTable.concat([t.subset(["a"]), t.subset(["b"])]).fingerprint == t.fingerprint
    assert not t.has_ties and t.resource_columns == []


def test_csv_written_by_hand_loads(tmp_path: Path) -> None:
    path = tmp_path / "hand.csv"
    path.write_text("unit,params,option,bits,size_bits,cost,tie\n"
                    "q,128,int4-g128-asym,4,544,1.5,qk\nk,128,int4-g128-asym,4,544,0.5,qk\n"
                    "v,128,int4-g128-asym,4,544,0.25,\n")
    t = CostTable.load(path)
    assert t.has_ties and t.df["tie"].tolist() == ["qk", "qk", ""]
    assert t.metadata["format"] == "bitalloc.cost_table"


@pytest.mark.parametrize("mutate,pattern", [
    (lambda df: df.iloc[:0], "no rows"),
    (lambda df: df.assign(params=df["params"] + 0.5), "whole numbers"),
    (lambda df: df.assign(size_bits=0.0), "'size_bits' must be finite and > 0"),
    (lambda df: df.assign(cost="high"), "'cost' must be numeric"),
    (lambda df: df.assign(owner="me"), "extra column 'owner' must be numeric"),
    (lambda df: df.assign(bops=-1.0), "'bops' must be finite and ≥ 0"),
    (lambda df: df.assign(tie=["x", "y", "x", "x"]), "several tie ids"),
    (lambda df: df.assign(tie=["x", "", "x", "x"]), "different option sets|with and without"),
])
def test_validation_names_the_problem(mutate: object, pattern: str) -> None:
    df = pd.DataFrame({"unit": ["a", "a", "b", "b"], "params": [128] * 4,
                       "option": ["int2-g128-asym", "int4-g128-asym"] * 2, "bits": [2, 4, 2, 4],
                       "size_bits": [288.0, 544.0, 288.0, 544.0], "cost": [4.0, 1.0, 9.0, 1.0]})
    with pytest.raises(InvalidCostTableError, match=pattern):
        CostTable(mutate(df))  # type: ignore[operator]


def test_file_errors(table: CostTable, tmp_path: Path) -> None:
    with pytest.raises(InvalidParameterError, match="suffix '.xlsx'"):
        table.save(tmp_path / "t.xlsx")
    with pytest.raises(InvalidParameterError, match="does not exist"):
        CostTable.load(tmp_path / "missing.parquet")
    path = table.save(tmp_path / "t.json")
    doc = json.loads(path.read_text())
    doc["version"] = 99
    path.write_text(json.dumps(doc))
    with pytest.raises(InvalidCostTableError, match="version 99.*upgrade bitalloc"):
        CostTable.load(path)
    (tmp_path / "junk.json").write_text("[1, 2]")
    with pytest.raises(InvalidCostTableError, match="no 'rows'"):
        CostTable.load(tmp_path / "junk.json")


def test_nan_cost_in_a_csv_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("unit,params,option,bits,size_bits,cost\na,128,fp16,16,2048,nan\n")
    with pytest.raises(InvalidCostTableError, match=r"'cost'.*row 0 \(a, fp16\)"):
        CostTable.load(path)


def test_from_unit_costs_checks_shapes() -> None:
    with pytest.raises(InvalidParameterError, match="expected \\(n_units, n_options\\)"):
        CostTable.from_unit_costs(units=["a"], params=[1], options=["fp16"], cost=np.zeros((2, 1)))


def test_saved_files_get_the_umask_mode_not_mkstemps_0600(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import stat

    from allocator.core.synth import synth_table

    umask = os.umask(0o022)
    try:
        path = synth_table(n_units=3, n_options=3, seed=0).save(tmp_path / "t.parquet")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
