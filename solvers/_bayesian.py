"""Bayesian (TPE) and evolutionary (NSGA-II) search with a real evaluator in the loop.

Cost tables assume losses add up across units; they do not exactly (inter-layer Hessians,
arXiv 2306.04879). Search evaluates real quantized models instead, as AMQ, FLIQS and
exllamav2's annealing do (methods.md), and stays cheap by:

* narrowing each unit to the options near its lower-convex-hull neighbourhood of the
  cost-table optimum (``radius`` hull steps either way), per unit or per transformer block
  (:mod:`solvers._search_space`),
* warm-starting with that optimum and its one-step neighbours (``Study.enqueue_trial``),
* repairing every sampled plan to the size budget and filling it back up to the budget
  (greedy on predicted Δcost/Δsize), so the budget is a hard constraint and is never wasted,
* interleaving TPE proposals with random local moves around the best plan so far,
* pruning a trial whose running (per-batch) error is already worse than the median.

The evaluator is injected, so this module never imports torch: any callable
``choice(unit → option) → error`` works; one with ``evaluate_steps`` (yielding running
estimates) enables pruning. Without an evaluator the table's own additive cost is used, which
turns this into a (slow) heuristic on the table — useful for tests and conformance.
Storage: in-memory by default; any Optuna RDB URL (``sqlite:///f.db``, ``postgresql://``)
shares one study between processes and machines, and an interrupted study resumes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from allocator.core.errors import InvalidParameterError
from allocator.core.result import SolveStatus
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._problem import Problem
from solvers._registry import get_solver
from solvers._search_space import (
    Granularity,
    ParamSpace,
    build_param_space,
    build_search_space,
    fill,
    repair,
    slots_of,
)

__all__ = ["BayesianSolver", "Evaluator", "LocalMoves", "StepEvaluator", "pareto_front", "search_space"]

logger = logging.getLogger(__name__)

#: unit → option label; returns the measured error (lower is better).
Evaluator = Callable[[Mapping[str, str]], float]


@runtime_checkable
class StepEvaluator(Protocol):
    """An evaluator that can also yield running estimates (one per batch) for pruning."""

    def __call__(self, choice: Mapping[str, str]) -> float: ...

    def evaluate_steps(self, choice: Mapping[str, str]) -> Iterator[float]: ...


class BayesianSolver(BaseSolver):
    """TPE search over per-unit options with a real evaluator and the budget as a hard constraint.

    Args:
        evaluator: ``choice → measured error``; ``None`` uses the table's additive cost.
        n_trials: trials in the study in total (a resumed study counts earlier trials).
        radius: hull steps around the cost-table optimum that each unit may move.
        granularity: ``unit`` (one parameter per unit / tie group) or ``block`` (one hull-step
            offset per transformer block: far fewer parameters for large models).
        storage: Optuna storage URL (``None`` = in memory); study_name: study to create/resume.
        prune: prune trials whose running error is worse than the median (needs evaluate_steps).
        n_warm: neighbours of the optimum to enqueue besides the optimum itself.
        local_every: after every ``local_every``-th trial, enqueue a random one- or two-unit
            perturbation of the best plan so far (local search between TPE proposals, as
            exllamav2's annealing moves); 0 turns it off.
        progress: show a progress bar with ETA over this process's trials.
    """

    name: ClassVar[str] = "bayesian"
    capabilities: ClassVar[SolverCapabilities] = SolverCapabilities(
        exact=False, multi_resource=False, needs_evaluator=True
    )
    REQUIRED_MODULES: ClassVar[tuple[str, ...]] = ("optuna",)
    INSTALL_HINT: ClassVar[str] = "pip install 'bitalloc[search]'"

    def __init__(
        self, *, evaluator: Evaluator | None = None, n_trials: int = 50, radius: int = 1,
        storage: str | None = None, study_name: str | None = None, prune: bool = True, n_warm: int = 4,
        local_every: int = 2, progress: bool = False, granularity: Granularity | str = "unit",
    ) -> None:
        if n_trials < 1:
            raise InvalidParameterError(f"n_trials must be ≥ 1, got {n_trials}")
        if radius < 0:
            raise InvalidParameterError(f"radius must be ≥ 0, got {radius}")
        if local_every < 0:
            raise InvalidParameterError(f"local_every must be ≥ 0 (0 = off), got {local_every}")
        self.evaluator = evaluator
        self.n_trials = n_trials
        self.radius = radius
        self.storage = storage
        self.study_name = study_name
        self.prune = prune
        self.n_warm = n_warm
        self.local_every = local_every
        self.progress = progress
        try:
            self.granularity = Granularity(granularity)
        except ValueError:
            raise InvalidParameterError(
                f"granularity {granularity!r} is unknown; use 'unit' or 'block'") from None

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["evaluator"] = type(self.evaluator).__name__ if self.evaluator is not None else "table-cost"
        return p

    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        import optuna

        start = get_solver("mckp").solve(problem.table, problem.budget)
        if start.plan is None:
            return RawSolution(status=start.status, message=f"warm start failed: {start.message}")
        space = search_space(problem, start.plan.choice, radius=self.radius, granularity=self.granularity)
        study = self.create_study(problem, space, seed=seed)
        objective = self.objective(problem, space)
        done = _finished(study)
        if done < self.n_trials:
            # Other workers may share the study: stop when the study (not this process) is done.
            stop = optuna.study.MaxTrialsCallback(
                self.n_trials, states=(optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED))
            callbacks: list[Any] = [stop]
            if self.local_every:
                callbacks.append(LocalMoves(space, every=self.local_every, seed=seed, n_trials=self.n_trials))
            study.optimize(objective, n_trials=self.n_trials - done, callbacks=callbacks,
                           show_progress_bar=self.progress)
        best = study.best_trial
        choice = np.asarray(best.user_attrs["choice"], dtype=np.int64)
        stats = {"trials": float(len(study.trials)), "measured_error": float(best.value or 0.0),
                 "warm_measured_error": float(_warm_value(study))}
        return RawSolution(status=SolveStatus.FEASIBLE, choice=choice, stats=stats,
                           message=f"best measured error {best.value:.6g} after {len(study.trials)} trials")

    # ---------------------------------------------------------------- study pieces
    def create_study(self, problem: Problem, space: ParamSpace, *, seed: int | None) -> Any:
        """Create or resume the study and enqueue the warm start (once per study)."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=10, multivariate=True,
                                             constant_liar=True)
        pruner = optuna.pruners.MedianPruner(n_startup_trials=5) if self.prune else optuna.pruners.NopPruner()
        name = self.study_name or f"bitalloc-{problem.table.fingerprint[:12]}-{space.fingerprint()}"
        study = optuna.create_study(storage=self.storage, study_name=name, direction="minimize",
                                    sampler=sampler, pruner=pruner, load_if_exists=True)
        if study.user_attrs.get("space") is None:
            study.set_user_attr("space", space.fingerprint())
            for params in space.neighbours(problem, self.n_warm):
                study.enqueue_trial(params, skip_if_exists=True)
        elif study.user_attrs["space"] != space.fingerprint():
            raise InvalidParameterError(
                f"study {name!r} was created for a different search space; pass a new --study name"
            )
        return study

    def objective(self, problem: Problem, space: ParamSpace) -> Callable[[Any], float]:
        """The Optuna objective: sample → repair to the budget → evaluate (with pruning)."""
        import optuna

        units = problem.table.units
        labels = problem.labels
        cache: dict[bytes, float] = {}

        def choice_map(choice: np.ndarray) -> dict[str, str]:
            return {u: str(labels[choice[problem.item_of_unit[k]]]) for k, u in enumerate(units)}

        def run(trial: optuna.Trial) -> float:
            choice = fill(problem, space.space, repair(problem, space.space, _sample(trial, space)))
            cost, size, _ = problem.totals(choice)
            trial.set_user_attr("choice", choice.tolist())
            trial.set_user_attr("size_bits", size)
            trial.set_user_attr("predicted_cost", cost)
            key = choice.tobytes()
            if key in cache:
                return cache[key]
            value = self._evaluate(trial, choice_map(choice), cost)
            cache[key] = value
            return value

        return run

    def _evaluate(self, trial: Any, choice: Mapping[str, str], predicted: float) -> float:
        import optuna

        ev = self.evaluator
        if ev is None:
            return predicted
        if self.prune and isinstance(ev, StepEvaluator):
            value = float("nan")
            for step, value in enumerate(ev.evaluate_steps(choice)):
                trial.report(value, step)
                if trial.should_prune():
                    raise optuna.TrialPruned()
            return float(value)
        return float(ev(choice))


class LocalMoves:
    """Optuna callback: every ``every``-th finished trial, queue a perturbation of the best plan.

    Deterministic for a seed: the move for trial t comes from ``default_rng([seed, t])``.
    Already-tried parameter sets are skipped (``skip_if_exists``), so TPE proposes instead.
    """

    def __init__(self, space: ParamSpace, *, every: int, seed: int | None, n_trials: int) -> None:
        self.space, self.every, self.seed = space, every, 0 if seed is None else seed
        self.n_trials = n_trials

    def __call__(self, study: Any, trial: Any) -> None:
        import optuna

        if (trial.number + 1) % self.every:
            return
        # Nothing queued beyond the study's size: a finished study holds no waiting trials.
        if _finished(study) >= self.n_trials:
            return
        if study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,)):
            return
        try:
            best = study.best_trial
        except ValueError:  # nothing complete yet
            return
        rng = np.random.default_rng([self.seed, trial.number])
        moved = self.space.perturb(self.space.params_for_moves(best), rng, moves=int(rng.integers(1, 3)))
        study.enqueue_trial(moved, skip_if_exists=True)


def search_space(problem: Problem, optimum: Mapping[str, str], *, radius: int,
                 granularity: Granularity | str = Granularity.UNIT) -> ParamSpace:
    """The sampler's space around the cost-table ``optimum`` (unit → option)."""
    warm = slots_of(problem, optimum)
    return build_param_space(problem, build_search_space(problem, warm, radius=radius), granularity, radius)


def _sample(trial: Any, space: ParamSpace) -> np.ndarray:
    return space.decode([int(trial.suggest_categorical(n, c))
                         for n, c in zip(space.names, space.choices, strict=True)])


def _finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _warm_value(study: Any) -> float:
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return float(trials[0].value) if trials else float("nan")


def pareto_front(
    problem: Problem, space: ParamSpace, evaluator: Evaluator | None, *, n_trials: int, seed: int | None,
    population_size: int = 20, storage: str | None = None, study_name: str | None = None,
) -> list[tuple[float, float, np.ndarray]]:
    """NSGA-II over (size_bits, measured error): the measured Pareto front, sorted by size.

    ``evaluator=None`` uses the table's additive cost (a dry run without a model).

    Plans above the budget's cap are repaired to it, so every point is within the budget; plans
    below it are kept as sampled (not filled), since smaller plans are the point of a front.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    for params in space.neighbours(problem, population_size - 1):
        study.enqueue_trial(params, skip_if_exists=True)

    def run(trial: optuna.Trial) -> tuple[float, float]:
        choice = repair(problem, space.space, _sample(trial, space))
        cost, size, _ = problem.totals(choice)
        trial.set_user_attr("choice", choice.tolist())
        if evaluator is None:  # the table's additive cost, as BayesianSolver without an evaluator
            return size, cost
        units = problem.table.units
        mapping = {u: str(problem.labels[choice[problem.item_of_unit[k]]]) for k, u in enumerate(units)}
        return size, float(evaluator(mapping))

    done = _finished(study)
    if done < n_trials:
        study.optimize(run, n_trials=n_trials - done)
    front: dict[bytes, tuple[float, float, np.ndarray]] = {}
    for t in study.best_trials:  # two samples can repair to one plan: keep each plan once
        choice = np.asarray(t.user_attrs["choice"], dtype=np.int64)
        front.setdefault(choice.tobytes(), (float(t.values[0]), float(t.values[1]), choice))
    return sorted(front.values(), key=lambda p: p[0])
