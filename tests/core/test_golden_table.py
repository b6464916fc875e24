"""Golden ``cost_table_v1`` files (parquet, CSV + .meta.json, JSON) keep loading with the same
content; a newer version or another format is refused, whichever way the bytes arrive."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from allocator import CostTable
from allocator.core.errors import InvalidCostTableError
from allocator.core.io import table_from_parquet_bytes, table_to_parquet_bytes

GOLDEN = Path(__file__).parent.parent / "golden"
FILES = ["cost_table_v1.parquet", "cost_table_v1.csv", "cost_table_v1.json"]
Q, K, DOWN = ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
              "model.layers.0.mlp.down_proj")
OPTIONS = ["int2-g128-asym", "int4-g128-asym", "fp16"]
#: the content hash of the golden rows (CostTable.fingerprint: row order and metadata excluded)
FINGERPRINT = "5c52535d1ef406b7aef6a38da3fba9caa444e861565318845e94e3ed7957bcf3"


def _check_content(t: CostTable) -> None:
    assert list(t.df.columns) == ["unit", "params", "option", "bits", "size_bits", "cost",
                                  "cost_std", "tie", "latency_us"]
    assert t.units == [Q, K, DOWN] and sorted(t.options) == sorted(OPTIONS)
    cost = t.df.pivot(index="unit", columns="option", values="cost").loc[[Q, K, DOWN], OPTIONS]
    np.testing.assert_array_equal(cost.to_numpy(), [[0.75, 0.125, 0.0], [0.5, 0.0625, 0.0],
                                                    [3.25, 0.5, 0.0]])
    assert t.df.groupby("unit")["params"].first().to_dict() == {Q: 4096, K: 1024, DOWN: 8192}
    assert t.df["size_bits"].tolist() == [9216.0, 17408.0, 65536.0, 2304.0, 4352.0, 16384.0,
                                          18432.0, 34816.0, 131072.0]
    assert t.df["tie"].tolist() == ["layers.0.qkv"] * 6 + [""] * 3
    assert t.df["latency_us"].sum() == pytest.approx(24.75)
    assert t.df["cost_std"].max() == pytest.approx(0.25)
    assert t.fingerprint == FINGERPRINT
    m = t.metadata
    assert (m["format"], m["version"]) == ("bitalloc.cost_table", 1)
    assert m["estimator"] == "golden" and m["estimator_params"] == {"probes": 2}
    assert m["seed"] == 7 and m["model"] == "golden-model"
    assert m["data"] == {"source": "none", "n_samples": 0}


@pytest.mark.parametrize("name", FILES)
def test_golden_v1_table_keeps_loading(name: str) -> None:
    _check_content(CostTable.load(GOLDEN / name))


@pytest.mark.parametrize("name", FILES)
def test_golden_v1_table_round_trips(name: str, tmp_path: Path) -> None:
    t = CostTable.load(GOLDEN / name)
    _check_content(CostTable.load(t.save(tmp_path / name)))


def test_parquet_bytes_decode_like_the_file() -> None:
    blob = (GOLDEN / "cost_table_v1.parquet").read_bytes()
    _check_content(table_from_parquet_bytes(blob))
    _check_content(table_from_parquet_bytes(table_to_parquet_bytes(CostTable.load(
        GOLDEN / "cost_table_v1.json"))))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("version", 2, "version 2; this bitalloc reads up to 1"),
    ("format", "bitalloc.plan", "not a 'bitalloc.cost_table'"),
])
def test_newer_version_or_other_format_is_refused(key: str, value: object, match: str,
                                                  tmp_path: Path) -> None:
    doc = json.loads((GOLDEN / "cost_table_v1.json").read_text())
    doc[key] = value
    (tmp_path / "t.json").write_text(json.dumps(doc))
    with pytest.raises(InvalidCostTableError, match=match):
        CostTable.load(tmp_path / "t.json")
    shutil.copy(GOLDEN / "cost_table_v1.csv", tmp_path / "t.csv")
    meta = json.loads((GOLDEN / "cost_table_v1.meta.json").read_text())
    (tmp_path / "t.meta.json").write_text(json.dumps({**meta, key: value}))
    with pytest.raises(InvalidCostTableError, match=match):
        CostTable.load(tmp_path / "t.csv")
    t = CostTable.load(GOLDEN / "cost_table_v1.parquet")
    bad = CostTable(t.df, {**t.metadata, key: value}) if key != "format" else None
    if bad is not None:  # a table object cannot hold another format; a blob can carry a version
        with pytest.raises(InvalidCostTableError, match=match):
            table_from_parquet_bytes(table_to_parquet_bytes(bad))
