"""``bitalloc apply --method gptq --sequential``: the same weights as the whole-model apply."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from allocator.cli import main  # noqa: E402
from allocator.core.plan import BitPlan  # noqa: E402
from allocator.core.table import CostTable  # noqa: E402
from allocator.core.units import discover_units  # noqa: E402
from allocator.model.loading import load_model  # noqa: E402

OPTIONS = ["int4-g32-asym", "int3-g64-sym"]


def test_sequential_apply_writes_the_same_model(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    units = discover_units(load_model("tiny-llama").model)
    table = CostTable.from_unit_costs(units=[u.name for u in units], params=[u.params for u in units],
                                      options=OPTIONS, cost=[[0.0, 0.0]] * len(units),
                                      in_features=[u.in_features for u in units])
    plan = tmp_path / "plan.json"
    BitPlan.from_choice(table, {u: OPTIONS[i % 2] for i, u in enumerate(table.units)}).save(plan)
    common = ["apply", "tiny-llama", str(plan), "--method", "gptq", "--samples", "8", "--seq-len", "32"]
    assert main([*common, "-o", str(tmp_path / "whole")]) == 0
    assert main([*common, "--sequential", "-o", str(tmp_path / "seq")]) == 0
    shown = capsys.readouterr().out
    assert "sequential" in shown and "peak" in shown
    a, b = load_model(tmp_path / "whole").model, load_model(tmp_path / "seq").model
    for name, p in a.named_parameters():
        torch.testing.assert_close(b.get_parameter(name), p, rtol=1e-5, atol=1e-6, msg=name)


def test_sequential_needs_gptq_and_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert main(["apply", "tiny-llama", str(plan), "--sequential"]) != 0
    assert "--method gptq and -o" in capsys.readouterr().err


def test_sequential_estimate_gives_the_whole_model_table(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """``bitalloc estimate --sequential``: the default estimator block by block, on the same
    calibration batches as the whole-model command, gives its table."""
    import numpy as np

    common = ["estimate", "tiny-llama", "--method", "gauss-newton", "--samples", "4", "--seq-len", "32",
              "--options", "int2-g32-asym,int4-g64-asym", "--no-progress"]
    assert main([*common, "-o", str(tmp_path / "whole.parquet")]) == 0
    assert main([*common, "--sequential", "-o", str(tmp_path / "seq.parquet")]) == 0
    assert "(sequential)" in capsys.readouterr().out
    whole, seq = (CostTable.load(tmp_path / f"{n}.parquet") for n in ("whole", "seq"))
    assert seq.metadata["data_fingerprint"] == whole.metadata["data_fingerprint"]
    assert seq.metadata["sequential"] is True
    np.testing.assert_allclose(seq.df["cost"].to_numpy(), whole.df["cost"].to_numpy(), rtol=1e-4)
    assert main([*common[:3], "measured", "--sequential"]) != 0
    assert "no sequential mode" in capsys.readouterr().err
