"""``run --groups G``: units of G input columns (SliM-LLM-style group mixing) through the whole
pipeline: estimated, solved, refined, applied, verified and evaluated per column group."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from allocator.core.errors import InvalidParameterError  # noqa: E402
from allocator.jobs.pipeline import RunConfig, run_pipeline, run_spec  # noqa: E402


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_groups_are_refused(bad) -> None:
    with pytest.raises(InvalidParameterError, match="groups"):
        RunConfig(estimate=run_spec(groups=bad))


def test_groups_and_a_consumer_are_refused() -> None:
    with pytest.raises(InvalidParameterError, match="groups"):
        RunConfig(consumer="gptqmodel", estimate=run_spec(groups=8))


def test_groups_that_split_an_option_s_quantization_groups_are_refused() -> None:
    # 64-column units under int3-g128 would really be g64 while counted as g128
    with pytest.raises(InvalidParameterError, match=r"groups=64 splits .*int3-g128-asym.*--groups 128"):
        RunConfig(estimate=run_spec(groups=64))
    RunConfig(estimate=run_spec(groups=128))  # the dense palette's groups all divide 128
    RunConfig(estimate=run_spec(groups=64, options="int2-g64-asym,int4-g32-sym,fp16"))


def test_run_allocates_column_groups() -> None:
    bpw = 6.5  # g16 options: int2 4, int4 6, int8 10 bits per weight
    spec = run_spec("hessian-proxy", groups=16, options="int2-g16-asym,int4-g16-asym,int8-g16-asym",
                    samples=4, seq_len=32, batch_size=4, progress=False)
    run = run_pipeline(RunConfig(model="tiny-llama", estimate=spec, bpw=bpw, eval_samples=4,
                                 refine_rounds=1, out=None))
    units = run.table.units
    assert units and all("[g=" in u for u in units)
    plan = run.result.plan
    assert set(plan.assignments) == set(units)
    assert plan.summary.bpw <= bpw + 1e-9
    assert run.result.verified
    # one module's column groups may differ: the point of group mixing
    by_module: dict[str, set[str]] = {}
    for u, a in plan.assignments.items():
        by_module.setdefault(u.split("[g=")[0], set()).add(a.option)
    assert any(len(opts) > 1 for opts in by_module.values())
