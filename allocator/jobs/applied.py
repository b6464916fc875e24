"""The last choice between plans, made with the quantizer as the backend applies it.

Costs, candidates and refinement quantize each unit alone (:class:`allocator.model.quant.Quantizer`):
that is what an additive cost table and a cache of per-unit results need. For RTN and ggml that is
exactly what :func:`allocator.backend.apply_plan` does. GPTQ differs: the per-unit quantizer
starts from the full-precision model's inputs, while the backend quantizes block after block on
the outputs of the blocks already quantized (as GPTQModel does) and lets one module's column
errors flow into its later columns. At 4 bits the two agree closely; at 3 bits they part: on
SmolLM2 at 3.25 bpw the plan the per-unit quantizer ranked best measured 1.07× the KL of uniform
GPTQ on held-out text (docs/quality.md).

So for such quantizers (:data:`APPLIED_CHECK_METHODS`) the plans in play — the refined plan,
the cost table's optimum and the uniform plan that fits — are each applied as the backend
applies them, fitted on the fit share of the calibration data, and measured on its validation
share (data neither the costs nor the GPTQ fit saw). The rule:

* a plan that is worse than the uniform plan on any metric beyond the paired 95 % bootstrap
  interval (:func:`allocator.backend.paired_comparison`) is ruled out, and so is one whose point
  estimate is worse than uniform's on any metric (KL lower but perplexity higher): the
  validation share is small (8 texts at ``run``'s defaults), and on SmolLM2 at 3.25 bpw a plan
  with 0.99× uniform's validation KL but 1.05× its perplexity measured 1.09× its perplexity on
  held-out text [1.01, 1.19];
* of the rest (the uniform plan is never ruled out), the lowest validation error wins.

The cost is one application and one validation forward per distinct plan, except for the plan
the per-unit quantizer was fitted under (``run``'s uniform plan,
:func:`allocator.backend.gptq_quantizer_as_applied`): its per-unit results are already the
backend's weights, so they are set from the quantizer (mostly its cache) instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from allocator.core.errors import InvalidParameterError
from allocator.core.plan import BitPlan

if TYPE_CHECKING:
    from allocator.backend import Comparison, EvalReport
    from allocator.core.units import Unit
    from allocator.model.quant import Quantizer

__all__ = ["APPLIED_CHECK_METHODS", "AppliedCandidate", "AppliedChoice", "applied_choice", "choose",
           "set_units"]

#: apply methods whose per-unit quantizer is not what the backend applies
APPLIED_CHECK_METHODS = frozenset({"gptq"})


@dataclass(frozen=True, kw_only=True)
class AppliedCandidate:
    """One plan as applied: its validation error and its paired comparisons with uniform."""

    label: str
    error: float
    metrics: Mapping[str, float]
    #: metric → this plan against the uniform plan (empty for the uniform plan itself)
    vs_uniform: Mapping[str, Comparison] = field(default_factory=dict)
    #: labels of the other candidates that are the same plan
    same_as: tuple[str, ...] = ()

    @property
    def worse_on(self) -> list[str]:
        """Metrics on which this plan is worse than uniform beyond the interval."""
        return [m for m, c in self.vs_uniform.items() if c.worse]

    @property
    def behind_on(self) -> list[str]:
        """Metrics on which this plan's point estimate is worse than uniform's (any interval)."""
        return [m for m, c in self.vs_uniform.items() if c.point_worse]

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "error": self.error, "metrics": dict(self.metrics),
                "vs_uniform": {k: c.to_dict() for k, c in self.vs_uniform.items()},
                "worse_on": self.worse_on, "behind_on": self.behind_on, "same_as": list(self.same_as)}


@dataclass(frozen=True, kw_only=True)
class AppliedChoice:
    """Which plan was handed out after applying every plan in play (module docstring)."""

    method: str
    candidates: tuple[AppliedCandidate, ...]
    chosen: str
    uniform: str | None
    n_samples: int
    seconds: float

    def candidate(self, label: str) -> AppliedCandidate:
        for c in self.candidates:
            if c.label == label or label in c.same_as:
                return c
        raise KeyError(label)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "chosen": self.chosen, "uniform": self.uniform,
                "n_samples": self.n_samples, "seconds": self.seconds,
                "candidates": [c.to_dict() for c in self.candidates],
                "rule": "ruled out when worse than uniform on any metric (beyond the paired 95 % "
                        "interval, or at the point estimate); of the rest, the lowest validation "
                        "error"}


def choose(candidates: Sequence[AppliedCandidate]) -> str:
    """The label :func:`applied_choice` hands out: the lowest error among the candidates not
    worse than uniform on any metric, beyond the interval or at the point estimate (candidates
    are in preference order for ties)."""
    if not candidates:
        raise InvalidParameterError("applied choice: no candidate plan")
    allowed = [c for c in candidates if not c.worse_on and not c.behind_on]
    return min(allowed or candidates, key=lambda c: c.error).label


def applied_choice(model: Any, plans: Mapping[str, BitPlan | None], *, kind: str, method: str,
                   fit: Sequence[Mapping[str, Any]], validation: Sequence[Mapping[str, Any]],
                   units: Sequence[Unit], restore: Callable[[], None], uniform: str | None,
                   seed: int = 0, say: Callable[[str], None] | None = None,
                   quantizer: Quantizer | None = None) -> AppliedChoice:
    """Apply each distinct plan of ``plans`` with ``method`` (GPTQ fitted on ``fit``), measure it
    on ``validation`` and choose (:func:`choose`). ``restore()`` puts the full-precision weights
    back; it is called after each plan and before returning. ``uniform`` names the uniform plan
    among ``plans`` (None: no comparisons, the lowest error wins). A plan equal to
    ``quantizer.reference`` (a per-unit quantizer fitted under that plan as applied, on ``fit``)
    takes its weights from ``quantizer``, unit by unit, instead of being applied again."""
    from allocator.backend import apply_plan, evaluate, paired_comparison, reference_outputs, resamples

    t0 = time.perf_counter()
    distinct: dict[str, BitPlan] = {}
    aliases: dict[str, list[str]] = {}
    for label, plan in plans.items():
        if plan is None:
            continue
        same = next((k for k, p in distinct.items() if dict(p.choice) == dict(plan.choice)), None)
        if same is None:
            distinct[label], aliases[label] = plan, []
        else:
            aliases[same].append(label)
    if not distinct:
        raise InvalidParameterError("applied choice: no candidate plan")
    ref = reference_outputs(model, list(validation), kind=kind)
    reports: dict[str, EvalReport] = {}
    try:
        for label, plan in distinct.items():
            if say is not None:
                say(f"applying {label} ({method}, fitted on {_rows(fit)} samples) and measuring it "
                    f"on {_rows(validation)} validation samples")
            if quantizer is not None and _reproduces(quantizer, plan):
                set_units(model, plan, units, quantizer)
            else:
                apply_plan(model, plan, method=method, calibration=list(fit), units=units)
            reports[label] = evaluate(model, list(validation), ref)
            restore()
    finally:
        restore()
    base = next((k for k in distinct if k == uniform or uniform in aliases[k]), None)
    first = next(iter(reports.values()))
    idx = resamples(first.n_samples, seed=seed) if first.n_samples else None
    out: list[AppliedCandidate] = []
    for label, rep in reports.items():
        comps: dict[str, Comparison] = {}
        against = reports[base].samples if base is not None and label != base else None
        if against is not None and idx is not None and rep.samples is not None:
            comps = paired_comparison(rep.samples, against, idx)
        out.append(AppliedCandidate(label=label, error=rep.error, metrics=dict(rep.metrics),
                                    vs_uniform=comps, same_as=tuple(aliases[label])))
    return AppliedChoice(method=method, candidates=tuple(out), chosen=choose(out), uniform=base,
                         n_samples=first.n_samples, seconds=time.perf_counter() - t0)


def _reproduces(quantizer: Quantizer, plan: BitPlan) -> bool:
    """Whether ``quantizer`` was fitted under ``plan`` as applied (its results are the backend's)."""
    reference = getattr(quantizer, "reference", None)
    return reference is not None and dict(reference) == dict(plan.choice)


def set_units(model: Any, plan: BitPlan, units: Sequence[Unit], quantizer: Quantizer) -> None:
    """Each unit of ``plan`` set to ``quantizer``'s result for its option, from the weights the
    model holds now (full precision)."""
    import torch

    from allocator.core.formats import parse_format
    from allocator.core.units import unit_weight

    with torch.no_grad():
        for u in units:
            if u.name in plan.choice:
                view = unit_weight(model, u)
                view.copy_(quantizer.quantize(u, view.detach().clone(), parse_format(plan.choice[u.name])))


def _rows(batches: Sequence[Mapping[str, Any]]) -> int:
    from allocator.model.data.batches import batch_rows

    return sum(batch_rows(b) for b in batches)
