"""Budget validation and conversions."""

from __future__ import annotations

from typing import Any

import pytest

from allocator import Budget
from allocator.core.errors import InvalidBudgetError


def test_primary_caps() -> None:
    b = Budget(bpw=3.5)
    assert b.primary == ("bpw", 3.5) and b.size_cap_bits(1000) == 3500.0
    assert b.primary_value(4000.0, 1000) == 4.0
    assert b.with_size_bits(5000.0, 1000).bpw == 5.0
    s = Budget(size_bytes=100)
    assert s.size_cap_bits(10**9) == 800.0 and s.primary_value(1600.0, 7) == 200.0
    assert s.with_size_bits(80.0, 7).size_bytes == 10.0
    assert not b.restricts_units and Budget(bpw=3, max_bits=4).restricts_units


@pytest.mark.parametrize("kw,pattern", [
    ({"bpw": 0}, "bpw must be"), ({"bpw": True}, "bpw must be"),
    ({"size_bytes": float("inf")}, "size_bytes must be"),
    ({"bpw": 3, "max": {"size_bits": 5}}, "cannot cap column 'size_bits'"),
    ({"bpw": 3, "max": {"bops": float("nan")}}, "finite"),
    ({"bpw": 3, "min_bits": 0}, "min_bits must be"),
    ({"bpw": 3, "allowed": {"a": "fp16"}}, "non-empty tuple"),
    ({"bpw": 3, "allowed": {"a": ()}}, "non-empty tuple"),
])
def test_invalid_budgets(kw: dict[str, Any], pattern: str) -> None:
    with pytest.raises(InvalidBudgetError, match=pattern):
        Budget(**kw)


def test_dict_round_trip() -> None:
    b = Budget(size_bytes=1e6, max={"bops": 1e9}, min_bits=2, max_bits=8,
               allowed={"a": ("fp16", "q4_K")}, unit_min_bits={"b": 4}, unit_max_bits={"c": 6})
    d = b.to_dict()
    assert d["allowed"] == {"a": ["fp16", "q4_K"]} and "bpw" not in d
    assert Budget.from_dict(d) == b
    with pytest.raises(InvalidBudgetError, match="unknown budget field"):
        Budget.from_dict({"bpw": 3, "avg_bits": 3})


def test_budget_is_frozen() -> None:
    b = Budget(bpw=3.0)
    with pytest.raises(AttributeError):
        b.bpw = 4.0  # type: ignore[misc]
