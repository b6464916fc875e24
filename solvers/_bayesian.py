"""Bayesian (TPE) and evolutionary (NSGA-II) search with a real evaluator in the loop.

Cost tables assume losses add up across units; they do not exactly (inter-layer Hessians,
arXiv 2306.04879). Search evaluates real quantized models instead, as AMQ, FLIQS and
exllamav2's annealing do (methods.md), and stays cheap by:

* narrowing each unit to the options near its lower-convex-hull neighbourhood of the
  cost-table optimum (``radius`` hull steps either way),
* warm-starting with that optimum and its one-step neighbours (``Study.enqueue_trial``),
* repairing every sampled plan to the size budget (greedy on predicted Δcost/Δsize), so the
  budget is a hard constraint,
* pruning a trial whose running (per-batch) error is already worse than the median.

The evaluator is injected, so this module never imports torch: any callable
``choice(unit → option) → error`` works; one with ``evaluate_steps`` (yielding running
estimates) enables pruning. Without an evaluator the table's own additive cost is used, which
turns this into a (slow) heuristic on the table — useful for tests and conformance.
Storage: in-memory by default; any Optuna RDB URL (``sqlite:///f.db``, ``postgresql://``)
shares one study between processes and machines, and an interrupted study resumes.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from allocator.errors import InvalidParameterError
from allocator.result import SolveStatus
from solvers._base import BaseSolver, RawSolution, SolverCapabilities
from solvers._problem import Problem

__all__ = ["BayesianSolver", "Evaluator", "SearchSpace", "StepEvaluator", "build_search_space"]

logger = logging.getLogger("bitalloc.search")

#: unit → option label; returns the measured error (lower is better).
Evaluator = Callable[[Mapping[str, str]], float]


@runtime_checkable
class StepEvaluator(Protocol):
    """An evaluator that can also yield running estimates (one per batch) for pruning."""

    def __call__(self, choice: Mapping[str, str]) -> float: ...

    def evaluate_steps(self, choice: Mapping[str, str]) -> Iterator[float]: ...


@dataclass(frozen=True, kw_only=True, eq=False)
class SearchSpace:
    """Per item: the candidate slots (sorted by size) and the warm-start slot."""

    names: list[str]  #: parameter name of each item (its unit, or tie id)
    candidates: list[np.ndarray]
    warm: np.ndarray

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for n, c in zip(self.names, self.candidates, strict=True):
            h.update(n.encode())
            h.update(c.astype(np.int64).tobytes())
        return h.hexdigest()[:16]


def lower_hull(size: np.ndarray, cost: np.ndarray) -> np.ndarray:
    """Slots on the lower convex hull of one item's (size, cost) points, by increasing size.

    A slot is kept iff no other slot is both smaller and cheaper and it lies on the convex
    lower envelope (Sinha & Zoltners 1979: only hull points can be LP-optimal).
    """
    ok = np.flatnonzero(np.isfinite(size))
    order = ok[np.lexsort((cost[ok], size[ok]))]
    hull: list[int] = []
    for j in order:
        if hull and cost[j] >= cost[hull[-1]]:
            continue  # dominated: larger (or equal) and not cheaper
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on/above the segment a→j
            if (cost[b] - cost[a]) * (size[j] - size[a]) >= (cost[j] - cost[a]) * (size[b] - size[a]):
                hull.pop()
            else:
                break
        hull.append(int(j))
    return np.asarray(hull, dtype=np.int64)


def build_search_space(problem: Problem, warm: np.ndarray, *, radius: int = 1) -> SearchSpace:
    """Options within ``radius`` hull steps of the warm-start choice, per item."""
    names = _item_names(problem)
    candidates: list[np.ndarray] = []
    for i in range(problem.n_items):
        hull = lower_hull(problem.size[i], problem.cost[i])
        pos = int(np.searchsorted(problem.size[i, hull], problem.size[i, warm[i]]))
        lo, hi = max(0, pos - radius), min(len(hull), pos + radius + 1)
        cand = set(hull[lo:hi].tolist()) | {int(warm[i])}
        candidates.append(np.asarray(sorted(cand, key=lambda s: problem.size[i, s]), dtype=np.int64))
    return SearchSpace(names=names, candidates=candidates, warm=np.asarray(warm, dtype=np.int64))


def _item_names(problem: Problem) -> list[str]:
    units = problem.table.units
    df = problem.table.df
    ties = dict(zip(df["unit"], df["tie"], strict=False)) if problem.table.has_ties else {}
    names = [""] * problem.n_items
    for u, item in zip(units, problem.item_of_unit, strict=True):
        if not names[item]:
            names[item] = ties.get(u) or u
    return names


def repair(problem: Problem, space: SearchSpace, choice: np.ndarray) -> np.ndarray:
    """Greedily step items down their candidate lists (least Δcost/Δsize first) until it fits."""
    choice = choice.copy()
    idx = np.arange(problem.n_items)
    size = float(problem.size[idx, choice].sum())
    while size > problem.cap * (1 + 1e-12):
        best, best_ratio = -1, np.inf
        for i in range(problem.n_items):
            cand = space.candidates[i]
            k = int(np.flatnonzero(cand == choice[i])[0]) if choice[i] in cand else len(cand)
            lower = cand[:k]
            if lower.size == 0:
                continue
            nxt = lower[-1]
            d_size = problem.size[i, choice[i]] - problem.size[i, nxt]
            if d_size <= 0:
                continue
            ratio = (problem.cost[i, nxt] - problem.cost[i, choice[i]]) / d_size
            if ratio < best_ratio:
                best, best_ratio = i, ratio
        if best < 0:  # candidates exhausted: fall back to each item's smallest slot
            smallest = np.argmin(problem.size, axis=1)
            return np.where(problem.size[idx, choice] > problem.size[idx, smallest], smallest, choice)
        size -= problem.size[best, choice[best]]
        cand = space.candidates[best]
        choice[best] = cand[cand.tolist().index(choice[best]) - 1] if choice[best] in cand else cand[-1]
        size += problem.size[best, choice[best]]
    return choice


def fill(problem: Problem, space: SearchSpace, choice: np.ndarray) -> np.ndarray:
    """Spend the slack a plan leaves: step items up their candidate lists while the plan fits.

    Each step takes the move with the largest predicted gain per bit, −Δcost/Δsize, among the
    moves that fit, so every trial plan uses the budget (an under-full plan is never the best).
    """
    choice = choice.copy()
    idx = np.arange(problem.n_items)
    slack = problem.cap * (1 + 1e-12) - float(problem.size[idx, choice].sum())
    while True:
        best, best_gain, best_slot = -1, 0.0, -1
        for i, cand in enumerate(space.candidates):
            up = cand[problem.size[i, cand] > problem.size[i, choice[i]]]
            if up.size == 0:
                continue
            nxt = int(up[0])
            d_size = problem.size[i, nxt] - problem.size[i, choice[i]]
            gain = (problem.cost[i, choice[i]] - problem.cost[i, nxt]) / d_size
            if d_size <= slack and gain > best_gain:
                best, best_gain, best_slot = i, gain, nxt
        if best < 0:
            return choice
        slack -= problem.size[best, best_slot] - problem.size[best, choice[best]]
        choice[best] = best_slot


def perturb(space: SearchSpace, choice: np.ndarray, rng: np.random.Generator, moves: int = 1) -> np.ndarray:
    """``moves`` items moved to another of their candidates at random (a local-search step)."""
    out = choice.copy()
    movable = [i for i, c in enumerate(space.candidates) if c.size > 1]
    if not movable:
        return out
    for i in rng.choice(movable, size=min(moves, len(movable)), replace=False):
        others = space.candidates[int(i)][space.candidates[int(i)] != out[int(i)]]
        out[int(i)] = int(rng.choice(others))
    return out


class BayesianSolver(BaseSolver):
    """TPE search over per-unit options with a real evaluator and the budget as a hard constraint.

    Args:
        evaluator: ``choice → measured error``; ``None`` uses the table's additive cost.
        n_trials: trials in the study in total (a resumed study counts earlier trials).
        radius: hull steps around the cost-table optimum that each unit may move.
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
        local_every: int = 2, progress: bool = False,
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

    def params(self) -> dict[str, Any]:
        p = super().params()
        p["evaluator"] = type(self.evaluator).__name__ if self.evaluator is not None else "table-cost"
        return p

    def _solve(self, problem: Problem, *, seed: int | None) -> RawSolution:
        import optuna

        from solvers import get_solver

        start = get_solver("mckp").solve(problem.table, problem.budget)
        if start.plan is None:
            return RawSolution(status=start.status, message=f"warm start failed: {start.message}")
        warm = _slots_of(problem, start.plan.choice)
        space = build_search_space(problem, warm, radius=self.radius)
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
    def create_study(self, problem: Problem, space: SearchSpace, *, seed: int | None) -> Any:
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
            for params in warm_neighbours(space, problem, self.n_warm):
                study.enqueue_trial(params, skip_if_exists=True)
        elif study.user_attrs["space"] != space.fingerprint():
            raise InvalidParameterError(
                f"study {name!r} was created for a different search space; pass a new --study name"
            )
        return study

    def objective(self, problem: Problem, space: SearchSpace) -> Callable[[Any], float]:
        """The Optuna objective: sample → repair to the budget → evaluate (with pruning)."""
        import optuna

        units = problem.table.units
        labels = problem.labels
        cache: dict[bytes, float] = {}

        def choice_map(choice: np.ndarray) -> dict[str, str]:
            return {u: str(labels[choice[problem.item_of_unit[k]]]) for k, u in enumerate(units)}

        def run(trial: optuna.Trial) -> float:
            sampled = np.array([
                int(trial.suggest_categorical(n, [int(s) for s in c]))
                for n, c in zip(space.names, space.candidates, strict=True)
            ], dtype=np.int64)
            choice = fill(problem, space, repair(problem, space, sampled))
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

    def __init__(self, space: SearchSpace, *, every: int, seed: int | None, n_trials: int) -> None:
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
        base = np.asarray(best.user_attrs["choice"], dtype=np.int64)
        moved = perturb(self.space, base, rng, moves=int(rng.integers(1, 3)))
        if all(int(s) in c for s, c in zip(moved, self.space.candidates, strict=True)):
            study.enqueue_trial({n: int(s) for n, s in zip(self.space.names, moved, strict=True)},
                                skip_if_exists=True)


def warm_neighbours(space: SearchSpace, problem: Problem, n: int) -> Iterator[dict[str, int]]:
    """The warm start, then up to ``n`` one-step moves (most promising predicted trades first)."""
    base = {name: int(s) for name, s in zip(space.names, space.warm, strict=True)}
    yield base
    moves: list[tuple[float, str, int]] = []
    for i, (name, cand) in enumerate(zip(space.names, space.candidates, strict=True)):
        w = int(space.warm[i])
        for s in cand:
            if s == w:
                continue
            d_size = problem.size[i, s] - problem.size[i, w]
            d_cost = problem.cost[i, s] - problem.cost[i, w]
            moves.append((d_cost / d_size if d_size else np.inf, name, int(s)))
    moves.sort(key=lambda m: abs(m[0]))
    for _, name, s in moves[:n]:
        yield {**base, name: s}


def _slots_of(problem: Problem, choice: Mapping[str, str]) -> np.ndarray:
    label_slot = {str(lab): j for j, lab in enumerate(problem.labels)}
    out = np.zeros(problem.n_items, dtype=np.int64)
    for k, unit in enumerate(problem.table.units):
        out[problem.item_of_unit[k]] = label_slot[choice[unit]]
    return out


def _finished(study: Any) -> int:
    import optuna

    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def _warm_value(study: Any) -> float:
    import optuna

    trials = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return float(trials[0].value) if trials else float("nan")


def pareto_front(
    problem: Problem, space: SearchSpace, evaluator: Evaluator, *, n_trials: int, seed: int | None,
    population_size: int = 20, storage: str | None = None, study_name: str | None = None,
) -> list[tuple[float, float, np.ndarray]]:
    """NSGA-II over (size_bits, measured error): the measured Pareto front, sorted by size.

    Plans above the budget's cap are repaired to it, so every point is within the budget.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.NSGAIISampler(seed=seed, population_size=population_size)
    study = optuna.create_study(storage=storage, study_name=study_name, directions=["minimize", "minimize"],
                                sampler=sampler, load_if_exists=True)
    for params in warm_neighbours(space, problem, population_size - 1):
        study.enqueue_trial(params, skip_if_exists=True)

    def run(trial: optuna.Trial) -> tuple[float, float]:
        sampled = np.array([
            int(trial.suggest_categorical(n, [int(s) for s in c]))
            for n, c in zip(space.names, space.candidates, strict=True)
        ], dtype=np.int64)
        choice = fill(problem, space, repair(problem, space, sampled))
        _, size, _ = problem.totals(choice)
        trial.set_user_attr("choice", choice.tolist())
        units = problem.table.units
        mapping = {u: str(problem.labels[choice[problem.item_of_unit[k]]]) for k, u in enumerate(units)}
        return size, float(evaluator(mapping))

    done = _finished(study)
    if done < n_trials:
        study.optimize(run, n_trials=n_trials - done)
    front = [(float(t.values[0]), float(t.values[1]), np.asarray(t.user_attrs["choice"], dtype=np.int64))
             for t in study.best_trials]
    return sorted(front, key=lambda p: p[0])
