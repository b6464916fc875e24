"""The real evaluator the Bayesian search calls: apply a choice to the model, measure its error.

One :class:`ModelEvaluator` loads the model and its data once, keeps the full-precision outputs
and the original weights of every planned module, and for each trial fake-quantizes only the
planned modules (RTN by default, GPTQ on request), measures the output error against the
full-precision outputs and restores those modules. ``evaluate_steps`` yields the running error
after every batch so the search can prune a hopeless trial early (Optuna's MedianPruner).

The search objective must not be the data the final plan is reported on: by default trials
are scored on the ``calibration`` split, and the benchmark reports on ``evaluation`` (disjoint
by construction, :mod:`allocator.model.data.corpus`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from allocator.backend import ReferenceOutputs, evaluate, module_weight
from allocator.core.errors import InvalidParameterError, InvalidPlanError
from allocator.core.plan import BitPlan
from allocator.core.table import CostTable
from allocator.core.units import discover_units
from allocator.model.data import user_data_for
from allocator.model.kind import ModelKind

if TYPE_CHECKING:
    import torch

    from allocator.backend import EvalReport
    from allocator.model.loading import LoadedModel

__all__ = ["ModelEvaluator", "running_error"]


def running_error(errors: Sequence[float], weights: Sequence[float]) -> float:
    """Weighted mean error over the batches seen so far: ē_k = Σ_{b≤k} w_b e_b / Σ_{b≤k} w_b.

    With ``w_b`` the samples (encoders, classifiers) or target tokens (causal LMs) of batch b,
    the last value equals the error :func:`allocator.backend.evaluate` gives on all batches.
    """
    total = sum(weights)
    if total <= 0:
        raise InvalidParameterError("running_error needs positive batch weights; got an empty batch set")
    return float(sum(e * w for e, w in zip(errors, weights, strict=True)) / total)


class ModelEvaluator:
    """``choice(unit → option) → measured output error`` on a real model.

    Args:
        model: a local model directory, ``"minilm"``, ``"tiny-llama"``, or a loaded model.
        table: the cost table the choices come from (gives the plan's sizes and formats).
        method: ``rtn`` or ``gptq`` (GPTQ uses the calibration split as its data).
        samples, seq_len, batch_size, seed: the scoring data.
        split: corpus split the trials are scored on (``calibration`` keeps ``evaluation``
            held out for reporting).
        data, eval_data: the user's text files instead of the built-in corpus (calibration /
            held-out, as :func:`allocator.model.data.user_data_for` reads them).
        device: where a model given by name is loaded (``cpu``, ``cuda``, ...); the scoring
            batches go to the device of the model's parameters either way.
    """

    def __init__(
        self, *, model: str | LoadedModel, table: CostTable, method: str = "rtn",
        samples: int = 32, seq_len: int = 128, batch_size: int = 8, seed: int = 0,
        split: str = "calibration", data: str | None = None, eval_data: str | None = None,
        device: str = "cpu",
    ) -> None:
        from allocator.backend import reference_outputs
        from allocator.model.loading import load_model

        if samples < 1:
            raise InvalidParameterError(f"samples must be ≥ 1, got {samples}")
        self.loaded = load_model(model, device=device) if isinstance(model, str) else model
        # batches where the model is: the forwards and GPTQ's Hessians run there
        where = next(self.loaded.model.parameters()).device
        self.loaded.model.eval()
        self.table = table
        self.method = method
        common: dict[str, Any] = {"seq_len": seq_len, "batch_size": batch_size, "seed": seed,
                                  "data": data, "eval_data": eval_data}
        self.data = user_data_for(self.loaded, split, samples, **common)
        self.batches = list(self.data.to(where))
        self.calibration = (self.batches if split == "calibration" else list(
            user_data_for(self.loaded, "calibration", samples, **common).to(where)))
        self.units = discover_units(self.loaded.model)
        self.reference = reference_outputs(self.loaded.model, self.batches, kind=self.loaded.kind,
                                           model_fingerprint=self.loaded.fingerprint)
        self._originals: dict[str, torch.Tensor] = {}
        self.calls = 0

    # ------------------------------------------------------------------ public
    def __call__(self, choice: Mapping[str, str]) -> float:
        """Measured error of the model quantized as ``choice`` (lower is better)."""
        with self._applied(choice):
            from allocator.backend import evaluate

            return evaluate(self.loaded.model, self.batches, self.reference).error

    def evaluate_steps(self, choice: Mapping[str, str]) -> Iterator[float]:
        """Running error after each batch; the last value equals ``self(choice)``."""
        with self._applied(choice):
            errors: list[float] = []
            weights: list[float] = []
            for batch, ref in zip(self.batches, self.reference.outputs, strict=True):
                one = ReferenceOutputs(kind=self.reference.kind, outputs=[ref])
                report = evaluate(self.loaded.model, [batch], one, n_queries=None)
                errors.append(report.error)
                weights.append(float(_weight(report)))
                yield running_error(errors, weights)

    def report(self, choice: Mapping[str, str], batches: Sequence[Mapping[str, Any]]) -> EvalReport:
        """Every metric of ``choice`` on other (e.g. held-out) ``batches``."""
        from allocator.backend import evaluate, reference_outputs

        ref = reference_outputs(self.loaded.model, list(batches), kind=self.loaded.kind,
                                model_fingerprint=self.loaded.fingerprint)
        with self._applied(choice):
            return evaluate(self.loaded.model, list(batches), ref)

    # ------------------------------------------------------------------ internals
    def _plan(self, choice: Mapping[str, str]) -> BitPlan:
        return BitPlan.from_choice(self.table, dict(choice))

    def _applied(self, choice: Mapping[str, str]) -> _Applied:
        if not choice:
            raise InvalidPlanError("empty choice: the search gave no unit → option assignment")
        self.calls += 1
        return _Applied(self, self._plan(choice))


class _Applied:
    """Context: planned modules quantized on entry, their original weights back on exit."""

    def __init__(self, ev: ModelEvaluator, plan: BitPlan) -> None:
        self.ev, self.plan = ev, plan

    def __enter__(self) -> None:
        from allocator.backend import apply_plan, module_weight

        model = self.ev.loaded.model
        modules = {u.split("[", 1)[0] for u in self.plan.assignments}
        for m in modules - self.ev._originals.keys():
            self.ev._originals[m] = module_weight(model, m).detach().clone()
        self.modules = modules
        apply_plan(model, self.plan, method=self.ev.method, calibration=self.ev.calibration,
                   units=self.ev.units)

    def __exit__(self, *exc: object) -> None:
        import torch

        with torch.no_grad():
            for m in self.modules:
                module_weight(self.ev.loaded.model, m).copy_(self.ev._originals[m])


def _weight(report: EvalReport) -> int:
    return report.n_tokens if report.kind == ModelKind.CAUSAL_LM else report.n_samples
