"""Run the shipped estimator conformance suite over every registered estimator, on a tiny causal
LM and a tiny encoder (cheap settings: the contract is the same)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import sensitivity  # noqa: E402
from allocator.testing.estimator_conformance import (  # noqa: E402
    EstimatorCase,
    EstimatorConformance,
    tiny_case,
)

#: A few probes / iterations are enough to check the contract.
FAST: dict[str, dict[str, Any]] = {"hessian-trace": {"max_probes": 2},
                                   "hessian-eig": {"max_iter": 2}}


class TestAllEstimators(EstimatorConformance):
    @pytest.fixture(params=list(sensitivity.ESTIMATORS), scope="class")
    def estimator(self, request: pytest.FixtureRequest) -> sensitivity.BaseEstimator:
        return sensitivity.get_estimator(request.param, **FAST.get(request.param, {}))

    @pytest.fixture(params=["causal_lm", "encoder"], scope="class")
    def case(self, request: pytest.FixtureRequest) -> EstimatorCase:
        return tiny_case(request.param)


def test_every_registered_estimator_is_covered() -> None:
    # the suite parametrises over ESTIMATORS itself; this guards the registry's shape
    assert len(sensitivity.ESTIMATORS) >= 11
    for name in sensitivity.ESTIMATORS:
        assert sensitivity.estimator_class(name).name == name


def test_spec_rejects_bad_fields_by_name() -> None:
    from allocator.core.errors import InvalidParameterError, UnknownNameError
    from sensitivity import EstimateSpec

    with pytest.raises(UnknownNameError, match="unknown estimator 'nope'"):
        EstimateSpec(method="nope")
    with pytest.raises(InvalidParameterError, match="estimator 'lim' has no parameter 'probes'"):
        EstimateSpec(method="lim", params={"probes": 2})
    with pytest.raises(InvalidParameterError, match="samples must be an int ≥ 1, got 0"):
        EstimateSpec(method="fisher", samples=0)
    with pytest.raises(InvalidParameterError, match="unknown unit kind 'lstm'"):
        EstimateSpec(method="fisher", kinds=("lstm",))
    spec = EstimateSpec(method="fisher", params={"probes": 3}, kinds=["linear"])  # type: ignore[arg-type]
    assert spec.kinds == ("linear",) and spec.estimator().params()["probes"] == 3


def test_one_entry_point_takes_the_spec() -> None:
    # sensitivity.estimate(model, spec) is the one way in: no keyword-spelled copy to drift
    import inspect

    from sensitivity import estimate

    params = inspect.signature(estimate).parameters
    assert list(params)[:2] == ["model", "spec"]
    # beyond them only runtime objects, keyword-only, never a second spelling of a spec field
    from sensitivity import EstimateSpec

    rest = list(params)[2:]
    assert rest == ["prebuilt_quantizer"]
    assert all(params[p].kind is inspect.Parameter.KEYWORD_ONLY for p in rest)
    assert not set(rest) & set(EstimateSpec.field_names())


def test_cli_help_names_every_estimator() -> None:
    import argparse

    from allocator.cli import _estimate

    parser = argparse.ArgumentParser()
    _estimate.add_arguments(parser)
    help_text = next(a.help for a in parser._actions if a.dest == "method") or ""
    listed = {n.strip() for n in help_text.split(":", 1)[1].split(",")}
    assert listed == set(sensitivity.ESTIMATORS)
