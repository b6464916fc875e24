"""The conformance suite every sensitivity estimator passes (shipped, so plug-ins can reuse it).

Subclass :class:`EstimatorConformance` and provide an ``estimator`` fixture (a fresh instance,
with cheap settings) and a ``case`` fixture (an :class:`EstimatorCase`: a model, its batches and
units)::

    class TestMyEstimator(EstimatorConformance):
        @pytest.fixture(scope="class")
        def estimator(self) -> BaseEstimator:
            return MyEstimator(probes=1)

        @pytest.fixture(scope="class", params=["causal_lm", "encoder"])
        def case(self, request) -> EstimatorCase:
            return tiny_case(request.param)

What the estimator contract promises (``design.md``, "Estimator contract"), checked here:

* the table has the required columns and exactly one row per unit × option, in the context's
  units and options, whatever the method;
* every cost is finite and ≥ 0;
* a run under a seed reproduces the same costs;
* the needs-data contract: an estimator with ``needs_data`` refuses an empty batch list with a
  one-line :class:`~allocator.core.errors.InvalidParameterError` naming it; a data-free one works
  without batches;
* its constructor's declared parameters are what the table records, and an unknown parameter is
  rejected by name (for registered estimators, through :class:`sensitivity.EstimateSpec` too).

Needs pytest, torch and transformers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from allocator.core.errors import InvalidParameterError
from allocator.core.formats import QuantFormat, parse_options
from allocator.core.table import REQUIRED_COLUMNS, CostTable
from allocator.core.units import Unit, discover_units
from sensitivity import EstimateContext, EstimateSpec, check_estimator_params, estimator_parameters, seeded

if TYPE_CHECKING:
    import torch

    from sensitivity import BaseEstimator, EstimateContext

__all__ = ["EstimatorCase", "EstimatorConformance", "context", "run_seeded", "tiny_case"]

#: Candidate options of the conformance cases: the cheapest pair that still differs in bits.
CASE_OPTIONS = "int2-g128-asym,int4-g128-asym"


@dataclass(frozen=True, kw_only=True, eq=False)
class EstimatorCase:
    """A model to estimate on, with its calibration batches, units and options."""

    name: str
    model: torch.nn.Module
    kind: str
    batches: Sequence[Mapping[str, Any]]
    units: Sequence[Unit]
    options: Sequence[QuantFormat]


def padded_token_batches(vocab: int, *, rows: int = 3, width: int = 6, n: int = 2,
             seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Right-padded token batches (row 0 full, every row ≥ 2 tokens)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, vocab, (rows, width), generator=g)
        lengths = torch.randint(2, width + 1, (rows,), generator=g)
        lengths[0] = width
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask})
    return out


def tiny_case(kind: str = "causal_lm", *, seed: int = 0) -> EstimatorCase:
    """A seeded one-block model of ``kind`` (``causal_lm``: Llama; ``encoder``: BERT) with two
    calibration batches: every estimator runs on it in well under a second."""
    import torch
    import transformers

    torch.manual_seed(seed)
    if kind == "causal_lm":
        vocab = 13
        cfg = transformers.LlamaConfig(
            vocab_size=vocab, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
            tie_word_embeddings=False)
        model: torch.nn.Module = transformers.LlamaForCausalLM(cfg).eval()
        with torch.no_grad():  # larger weights than the init's 0.02 std: real curvature
            for p in model.parameters():
                if p.dim() == 2:
                    p.normal_(0.0, 0.5)
    elif kind == "encoder":
        vocab = 31
        bert = transformers.BertConfig(vocab_size=vocab, hidden_size=8, num_hidden_layers=1,
                                       num_attention_heads=2, intermediate_size=16,
                                       max_position_embeddings=32)
        model = transformers.BertModel(bert).eval()
    else:
        raise InvalidParameterError(f"no tiny conformance model of kind {kind!r}; use "
                                    "'causal_lm' or 'encoder'")
    return EstimatorCase(name=f"tiny-{kind}", model=model, kind=kind,
                         batches=padded_token_batches(vocab, seed=seed + 1), units=discover_units(model),
                         options=parse_options(CASE_OPTIONS))


def context(case: EstimatorCase, *, seed: int = 0,
            batches: Sequence[Mapping[str, Any]] | None = None) -> EstimateContext:
    """The estimate context of ``case`` (its batches unless ``batches`` is given)."""
    return EstimateContext(batches=list(case.batches if batches is None else batches),
                           units=list(case.units), options=list(case.options), seed=seed,
                           model_kind=case.kind, progress=False)


def run_seeded(estimator: BaseEstimator, case: EstimatorCase, *, seed: int = 0) -> CostTable:
    """One estimate as the driver runs it: torch's RNG seeded (and restored afterwards)."""
    with seeded(seed):
        return estimator.estimate(case.model, context(case, seed=seed))


class EstimatorConformance:
    """The estimator contract; subclasses provide the ``estimator`` and ``case`` fixtures."""

    @pytest.fixture(scope="class")
    def table(self, estimator: BaseEstimator, case: EstimatorCase) -> CostTable:
        return run_seeded(estimator, case)

    def test_columns_and_rows(self, estimator: BaseEstimator, case: EstimatorCase,
                              table: CostTable) -> None:
        assert set(REQUIRED_COLUMNS) <= set(table.df.columns), table.df.columns
        assert table.units == [u.name for u in case.units]
        assert table.options == [o.name for o in case.options]
        assert len(table) == len(case.units) * len(case.options)
        assert table.metadata["estimator"] == estimator.name
        assert table.metadata["seed"] == 0

    def test_costs_are_finite_and_non_negative(self, table: CostTable) -> None:
        cost = table.df["cost"].to_numpy()
        assert np.isfinite(cost).all() and (cost >= 0).all(), cost
        assert (cost > 0).any(), "every cost is 0: the estimator measured nothing"

    def test_seeded_runs_reproduce(self, estimator: BaseEstimator, case: EstimatorCase,
                                   table: CostTable) -> None:
        again = run_seeded(estimator, case)
        np.testing.assert_allclose(again.df["cost"].to_numpy(), table.df["cost"].to_numpy(),
                                   rtol=1e-9, atol=0.0)

    def test_needs_data_contract(self, estimator: BaseEstimator, case: EstimatorCase) -> None:
        ctx = context(case, batches=[])
        if estimator.needs_data:
            with pytest.raises(InvalidParameterError) as info:
                estimator.estimate(case.model, ctx)
            msg = str(info.value)
            assert "\n" not in msg and repr(estimator.name) in msg, msg
        else:
            with seeded(0):
                table = estimator.estimate(case.model, ctx)
            assert len(table) == len(case.units) * len(case.options)
            assert np.isfinite(table.df["cost"].to_numpy()).all()

    def test_declared_parameters_are_recorded(self, estimator: BaseEstimator,
                                              table: CostTable) -> None:
        declared = estimator_parameters(type(estimator))
        if declared is None:
            pytest.skip(f"{type(estimator).__name__} takes **kwargs: no declared parameters")
        recorded = table.metadata["estimator_params"]
        assert declared <= set(recorded), sorted(declared - set(recorded))

    def test_unknown_parameter_is_rejected_by_name(self, estimator: BaseEstimator) -> None:
        import sensitivity

        if estimator_parameters(type(estimator)) is None:
            pytest.skip(f"{type(estimator).__name__} takes **kwargs: anything is accepted")
        cls: Any = type(estimator)
        with pytest.raises(TypeError):  # the constructor declares its parameters
            cls(no_such_parameter=1)
        if sensitivity.ESTIMATORS.get(estimator.name, "").endswith(
                ":" + type(estimator).__name__):
            with pytest.raises(InvalidParameterError, match="no parameter 'no_such_parameter'"):
                check_estimator_params(estimator.name, {"no_such_parameter": 1})
            with pytest.raises(InvalidParameterError, match="no parameter 'no_such_parameter'"):
                EstimateSpec(method=estimator.name, params={"no_such_parameter": 1})
