"""Search orchestration: one Optuna study shared by N worker processes (one or many machines).

A :class:`SearchSpec` says everything a worker needs (table file, budget, storage URL, study
name, evaluator), so a worker on another machine can join with the same spec:
``bitalloc search TABLE --bpw 3 --storage postgresql://... --study s1 --workers 4``.
In-memory storage cannot be shared, so ``workers > 1`` needs an RDB URL (SQLite file or
PostgreSQL). Interrupting and re-running the same command resumes the study.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from typing import Any

from allocator.core.budget import Budget
from allocator.core.errors import BackendError, InfeasibleBudgetError, InvalidParameterError, PlanCheckError
from allocator.core.plan import BitPlan, check_plan
from allocator.core.result import SolveResult
from allocator.core.table import CostTable
from solvers import BayesianSolver, build_problem, pareto_front, search_space

__all__ = ["EvaluatorKind", "ParetoPoint", "SearchSpec", "make_evaluator", "run_pareto", "run_search",
           "run_worker"]


class EvaluatorKind(StrEnum):
    TABLE = "table"  #: the table's additive cost (no model; for tests and dry runs)
    MODEL = "model"  #: apply the plan to the model and measure its output error


@dataclass(frozen=True, kw_only=True)
class SearchSpec:
    """Everything a search worker needs; plain data so it crosses process boundaries."""

    table_path: str
    budget: Mapping[str, Any]
    n_trials: int = 50
    seed: int = 0
    storage: str | None = None
    study: str | None = None
    radius: int = 1
    granularity: str = "unit"  #: ``unit`` or ``block`` (one parameter per transformer block)
    prune: bool = True
    evaluator: EvaluatorKind = EvaluatorKind.TABLE
    model: str | None = None
    method: str = "rtn"
    samples: int = 32
    seq_len: int = 128
    #: the user's calibration (trials are scored on it) / held-out text files; None: built-in
    data: str | None = None
    eval_data: str | None = None
    progress: bool = False  #: a progress bar in the first worker
    threads: int | None = None  #: torch threads per worker (None: torch's default)

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise InvalidParameterError(f"n_trials must be ≥ 1, got {self.n_trials}")
        object.__setattr__(self, "evaluator", EvaluatorKind(self.evaluator))
        if self.evaluator is EvaluatorKind.MODEL and self.model is None:
            raise InvalidParameterError("a model evaluator needs --model (a local model dir or 'minilm')")
        if self.evaluator is EvaluatorKind.TABLE and (self.data or self.eval_data):
            raise InvalidParameterError("--data/--eval-data need --model: the table's own cost "
                                        "uses no data")


def make_evaluator(spec: SearchSpec, table: CostTable) -> Any:
    """The evaluator a worker uses (``None`` = the table's cost)."""
    if spec.evaluator is EvaluatorKind.TABLE:
        return None
    return LazyModelEvaluator(spec, table)


class LazyModelEvaluator:
    """A :class:`~allocator.backend.search_eval.ModelEvaluator` built on first use.

    A worker that joins a finished study (or the final read of the best plan) then never loads
    the model or computes reference outputs.
    """

    def __init__(self, spec: SearchSpec, table: CostTable) -> None:
        self.spec, self.table = spec, table
        self._ev: Any = None

    def _get(self) -> Any:
        if self._ev is None:
            from allocator.backend.search_eval import ModelEvaluator

            s = self.spec
            if s.threads:
                import torch

                torch.set_num_threads(s.threads)
            self._ev = ModelEvaluator(model=str(s.model), table=self.table, method=s.method,
                                      samples=s.samples, seq_len=s.seq_len, seed=s.seed,
                                      data=s.data, eval_data=s.eval_data)
        return self._ev

    def __call__(self, choice: Mapping[str, str]) -> float:
        return float(self._get()(choice))

    def evaluate_steps(self, choice: Mapping[str, str]) -> Iterator[float]:
        return iter(self._get().evaluate_steps(choice))


def run_worker(spec: SearchSpec, worker: int = 0) -> SolveResult:
    """Join (or create) the study and run trials until the study has ``n_trials``."""
    table = CostTable.load(spec.table_path)
    solver = BayesianSolver(evaluator=make_evaluator(spec, table), n_trials=spec.n_trials, radius=spec.radius,
                            storage=spec.storage, study_name=spec.study, prune=spec.prune,
                            progress=spec.progress and worker == 0, granularity=spec.granularity)
    # Distinct sampler seeds per worker, or every worker would propose the same trials.
    return solver.solve(table, Budget.from_dict(spec.budget), seed=spec.seed + worker)


def _worker_entry(spec_dict: dict[str, Any], worker: int) -> None:
    run_worker(SearchSpec(**spec_dict), worker)


def run_search(spec: SearchSpec, *, workers: int = 1) -> SolveResult:
    """Run a search with ``workers`` processes on this machine; returns the study's best plan."""
    if workers < 1:
        raise InvalidParameterError(f"workers must be ≥ 1, got {workers}")
    if workers > 1 and spec.storage is None:
        raise InvalidParameterError(
            "several workers need shared storage: pass --storage sqlite:///search.db or a PostgreSQL URL"
        )
    if workers > 1 and spec.study is None:
        raise InvalidParameterError("several workers need one --study name to share")
    if workers > 1 and spec.threads is None:  # N workers on one machine share its cores
        spec = replace(spec, threads=max(1, (os.cpu_count() or 1) // workers))
    ctx = mp.get_context("spawn")  # torch and fork do not mix
    procs = [ctx.Process(target=_worker_entry, args=(asdict(spec), w), daemon=False)
             for w in range(1, workers)]
    for p in procs:
        p.start()
    try:
        result = run_worker(spec, 0)
    finally:
        for p in procs:
            p.join()
    failed = [p.exitcode for p in procs if p.exitcode]
    if failed:
        raise BackendError(f"{len(failed)} search worker(s) failed (exit codes {failed}); "
                           "re-run the same command to resume the study")
    if workers > 1:  # other workers may have found a better plan after this one finished
        return run_worker(spec, 0)
    return result


@dataclass(frozen=True, kw_only=True)
class ParetoPoint:
    """One plan on the measured front: its size, measured error and the (checked) plan."""

    bpw: float
    size_bits: float
    error: float
    plan: BitPlan


def run_pareto(spec: SearchSpec, *, population_size: int = 20) -> list[ParetoPoint]:
    """NSGA-II over (size, measured error) below the budget: the measured Pareto front.

    Each front plan is rebuilt from the table and passes the central plan check; a plan that
    does not (it cannot, unless the search is broken) raises instead of being returned.
    """
    import solvers

    table = CostTable.load(spec.table_path)
    budget = Budget.from_dict(spec.budget)
    start = solvers.solve(table, budget)
    if start.plan is None:
        raise InfeasibleBudgetError(f"no plan fits the budget (status {start.status}): {start.message}")
    problem = build_problem(table, budget)
    space = search_space(problem, start.plan.choice, radius=spec.radius, granularity=spec.granularity)
    evaluator = make_evaluator(spec, table)
    front = pareto_front(problem, space, evaluator, n_trials=spec.n_trials, seed=spec.seed,
                         population_size=population_size, storage=spec.storage, study_name=spec.study)
    points = []
    for size, error, slots in front:
        units = problem.table.units
        choice = {u: str(problem.labels[slots[problem.item_of_unit[k]]]) for k, u in enumerate(units)}
        plan = BitPlan.from_choice(table, choice)
        problems = check_plan(plan, table, budget)
        if problems:
            raise PlanCheckError(problems)
        points.append(ParetoPoint(bpw=plan.summary.bpw, size_bits=size, error=error, plan=plan))
    return points


def study_trials(storage: str, study: str) -> Iterator[Mapping[str, Any]]:
    """Every trial of a stored study as plain dicts (number, state, value, size, worker)."""
    import optuna

    s = optuna.load_study(study_name=study, storage=storage)
    for t in s.get_trials(deepcopy=False):
        yield {"number": t.number, "state": t.state.name, "value": t.value,
               "size_bits": t.user_attrs.get("size_bits"), "params": dict(t.params)}
