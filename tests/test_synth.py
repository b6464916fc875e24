"""Synthetic tables and the ``synth`` / ``frontier`` CLI verbs."""

from __future__ import annotations

import numpy as np
import pytest

from allocator import CostTable
from allocator.cli import main
from allocator.core.errors import InvalidParameterError
from allocator.core.formats import parse_options
from allocator.core.synth import MODEL_SHAPES, synth_options, synth_table


def test_shapes_sizes_and_costs() -> None:
    t = synth_table(n_units=14, seed=0)
    assert t.n_units == 14 and len(t.options) == 7
    df = t.df
    q = df[df["unit"] == "model.layers.0.self_attn.q_proj"]
    down = df[df["unit"] == "model.layers.1.mlp.down_proj"]
    assert set(q["params"]) == {4096 * 4096} and set(down["params"]) == {4096 * 11008}
    row = q[q["option"] == "int4-g128-asym"].iloc[0]
    assert row["size_bits"] == pytest.approx(4096 * 4096 * 4.25)
    costs = q.set_index("bits")["cost"].sort_index().to_numpy()
    ratios = costs[:-1] / costs[1:]
    assert np.all((ratios > 2.0) & (ratios < 8.0))  # ≈ 4 per bit with 10% noise


def test_seeded_and_options() -> None:
    a, b = synth_table(n_units=30, seed=3), synth_table(n_units=30, seed=3)
    assert a.fingerprint == b.fingerprint
    assert synth_table(n_units=30, seed=4).fingerprint != a.fingerprint
    t8 = synth_table(n_units=7, n_options=8, seed=0)
    assert "fp16" in t8.options and (t8.df.loc[t8.df["option"] == "fp16", "cost"] == 0).all()
    assert [f.name for f in synth_options(3)] == ["int2-g128-asym", "int3-g128-asym",
                                                  "int4-g128-asym"]
    custom = synth_table(n_units=5, options=parse_options("int3..5-g64-sym"), seed=0)
    assert custom.options == ["int3-g64-sym", "int4-g64-sym", "int5-g64-sym"]


def test_ties_resources_and_gqa_shapes() -> None:
    t = synth_table(n_units=21, seed=0, ties=True, resources=True, model="llama-3-8b")
    assert t.has_ties and "bops" in t.resource_columns
    k = t.df[t.df["unit"] == "model.layers.0.self_attn.k_proj"]
    assert set(k["params"]) == {MODEL_SHAPES["llama-3-8b"].kv_dim * 4096}
    assert set(k["tie"]) == {"model.layers.0.qkv"}
    o = t.df[t.df["unit"] == "model.layers.0.self_attn.o_proj"]
    assert set(o["tie"]) == {""}
    row = k[k["option"] == "int4-g128-asym"].iloc[0]
    assert row["bops"] == row["params"] * 4 * 8


@pytest.mark.parametrize("kw", [{"n_units": 0}, {"n_units": 3, "n_options": 9},
                                {"n_units": 3, "model": "gpt-9"}, {"n_units": 3, "sigma": -1.0}])
def test_bad_arguments(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidParameterError):
        synth_table(**kw)  # type: ignore[arg-type]


def test_cli_synth_and_frontier(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "t.parquet"
    argv = ["synth", "-n", "28", "--ties", "--resources", "--seed", "2", "-o", str(path)]
    assert main(argv) == 0
    t = CostTable.load(path)
    assert t.n_units == 28 and t.has_ties and "bops" in t.resource_columns
    csv, png = tmp_path / "f.csv", tmp_path / "f.png"
    code = main(["frontier", str(path), "-o", str(csv), "--plot", str(png), "--bpw", "3", "4.5"])
    assert code == 0 and csv.exists() and png.exists()
    out = capsys.readouterr().out
    assert "Pareto frontier" in out and "exact" in out
    assert main(["frontier", str(tmp_path / "missing.parquet")]) == 2
