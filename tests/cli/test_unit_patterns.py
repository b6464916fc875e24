"""One unit-pattern syntax (globs, as ``bitalloc run``) for estimate, EstimateSpec and run."""

from __future__ import annotations

import warnings

import pytest

from allocator.core.errors import InvalidParameterError, ModelError
from allocator.core.units import Unit, UnitKind
from allocator.model.unit_select import NoUnitMatchedError, check_patterns, filter_units


def _unit(name: str, tie: str | None = None) -> Unit:
    module = name.split("[")[0]
    return Unit(name=name, module=module, kind=UnitKind.LINEAR, shape=(4, 8), params=32,
                in_features=8, tie=tie)


UNITS = [_unit("model.layers.0.self_attn.q_proj", "a"), _unit("model.layers.0.self_attn.k_proj", "a"),
         _unit("model.layers.1.mlp.down_proj"), _unit("model.layers.10.mlp.down_proj"),
         _unit("pooler.dense"), _unit("lm_head[g=0]"), _unit("lm_head[g=1]")]


def _names(include: object = (), exclude: object = ()) -> list[str]:
    return [u.name for u in filter_units(UNITS, include, exclude).units]  # type: ignore[arg-type]


def test_globs_match_the_name_or_a_parent_module() -> None:
    assert _names(exclude="pooler") == [u.name for u in UNITS if u.name != "pooler.dense"]
    # a module selects what is under it, at a dot boundary: layers.1 is not layers.10
    assert _names(include="model.layers.1") == ["model.layers.1.mlp.down_proj"]
    assert _names(include=["*.down_proj"]) == ["model.layers.1.mlp.down_proj",
                                                "model.layers.10.mlp.down_proj"]
    # column groups are matched through their module
    assert _names(include="lm_head") == ["lm_head[g=0]", "lm_head[g=1]"]
    assert _names(include="model.layers.[01].*") == [u.name for u in UNITS[:3]]


def test_a_tie_left_with_one_member_is_cleared() -> None:
    kept = filter_units(UNITS, include="*.q_proj").units
    assert [(u.name, u.tie) for u in kept] == [("model.layers.0.self_attn.q_proj", None)]
    both = filter_units(UNITS, include="model.layers.0").units
    assert {u.tie for u in both} == {"a"}


def test_no_match_is_one_error_of_both_kinds() -> None:
    with pytest.raises(NoUnitMatchedError, match="matches no unit") as info:
        filter_units(UNITS, include="attention")
    assert isinstance(info.value, InvalidParameterError) and isinstance(info.value, ModelError)
    with pytest.raises(NoUnitMatchedError, match="leave no unit"):
        filter_units(UNITS, include="pooler", exclude="pooler.*")


def test_old_regex_patterns_still_work_with_a_warning() -> None:
    with pytest.warns(FutureWarning, match=r"--include .*\*layers\.1\.\*"):
        sel = filter_units(UNITS, include=r"layers\.1\.")
    assert [u.name for u in sel.units] == ["model.layers.1.mlp.down_proj"]
    with pytest.raises(InvalidParameterError, match="neither a glob nor a valid regex"):
        check_patterns("layer(", "--include")
    with pytest.raises(InvalidParameterError, match="non-empty glob"):
        check_patterns(["", "x"], "--exclude")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # globs never warn
        filter_units(UNITS, include=["model.*"], exclude="lm_head")


def test_estimate_spec_takes_the_same_globs() -> None:
    from sensitivity import EstimateSpec

    spec = EstimateSpec(method="datafree", include="model.layers.0", exclude=["*.k_proj"])
    assert spec.include == ("model.layers.0",) and spec.exclude == ("*.k_proj",)
    assert spec.filters()["include"] == ["model.layers.0"]
    assert EstimateSpec(method="datafree").filters()["include"] is None
    with pytest.raises(InvalidParameterError, match="include"):
        EstimateSpec(method="datafree", include=[""])


def test_estimate_cli_and_run_select_the_same_units(tmp_path) -> None:
    pytest.importorskip("torch")
    from allocator.cli import main
    from allocator.core.table import CostTable

    out = tmp_path / "t.parquet"
    assert main(["estimate", "tiny-llama", "--method", "datafree", "--include", "model.layers.0",
                 "--exclude", "*.o_proj", "--exclude", "*.mlp.*", "--options", "int4-g32-asym",
                 "--no-progress", "-o", str(out)]) == 0
    table = CostTable.load(out)
    assert sorted(table.units) == ["model.layers.0.self_attn.k_proj",
                                   "model.layers.0.self_attn.q_proj",
                                   "model.layers.0.self_attn.v_proj"]
    assert table.metadata["filters"]["exclude"] == ["*.o_proj", "*.mlp.*"]
